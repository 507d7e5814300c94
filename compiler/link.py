"""Linking a stage: mix the compiled task units, pack them, write shards, count.

Like a linker, a stage takes objects (each task's tokenized documents),
selects from them by the stage's mixture, decides labels by its objective,
packs, and writes the stage's training shards, plus one packed eval set per
evaluated task (its eval part, or all its rows for a held-out task).
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import leakage, mixture
from .errors import TunecError
from .fileio import atomic_write_text, sha256_text
from .pack import IGNORE, DocSource, best_fit_decreasing, build_rows, group_bins, ramps
from .plan import LENGTH_BINS, ChoicesFile, EvalSet, LeakReport, Lengths, PackedSet, ShardEntry, TaskCounts
from .recipe import Stage
from .shards import WrittenShard, write_shard
from .units import MESSAGES, UnitResult
from .unitstore import open_unit, release, take_tokens


@dataclass(frozen=True)
class Mix:
    labelled: dict[str, tuple]  # task -> (kept-doc mask, trained tokens per doc)
    docs: dict[str, np.ndarray]  # task -> selected document indices (sorted; repeats allowed)
    rates: dict[str, float]  # task -> requested share


@dataclass(frozen=True)
class Linker:
    out: Path
    seq_len: int
    pad_id: int
    shard_rows: int
    seed: int
    template_names: dict[str, list[str]]  # task -> its templates' names
    # worker processes (a concurrent.futures executor) that build and write shards beside each other;
    # None: this process builds them, one writing while the next is built
    pool: Any = field(default=None, compare=False, repr=False)

    def select(self, stage: Stage, units: dict[str, UnitResult]) -> "Mix":
        """The stage's mixture: which documents of each task (pure: no files written)."""
        objective = stage.objective.kind
        labelled = {t: _labelled(units[t], objective) for t in stage.tasks}
        # a pair (preference) is selected whole: the mixture counts and draws groups of documents
        group = {t: units[t].group for t in stage.tasks}
        keep_groups = {t: keep.reshape(-1, group[t]).all(axis=1) for t, (keep, _) in labelled.items()}
        sizes = {t: int(keep.sum()) for t, keep in keep_groups.items()}
        for t, n in sizes.items():
            if n == 0:
                raise TunecError(f"stage '{stage.name}': task '{t}' has no example left to train on "
                                 f"(all {units[t].docs + units[t].dropped} dropped); check `truncation` and `seq_len`")
        kept = {t: np.flatnonzero(keep) for t, keep in keep_groups.items()}
        lengths = {t: units[t].lengths.reshape(-1, group[t]).sum(axis=1)[kept[t]] for t in stage.tasks}
        picks, rates = mixture.select(stage.mixture, stage.budget, sizes, lengths, self.seed, stage.name)
        return Mix(labelled, {t: _docs_of(kept[t][picks[t]], group[t]) for t in stage.tasks}, rates)

    def train(self, stage: Stage, units: dict[str, UnitResult], mix: "Mix") -> tuple[PackedSet, dict[str, TaskCounts]]:
        """Write the stage's training shards; per-task counts, shares after packing included."""
        parts, counts = [], {}
        for t in stage.tasks:
            parts.append((units[t], mix.docs[t]))
            counts[t] = self._counts(t, units[t], mix.labelled[t], mix.docs[t], mix.rates[t])
        data = self._pack(Selected.of(parts, stage.objective.kind), Path("stages") / stage.name / "train", stage.name)
        total = data.trained_tokens
        counts = {t: c.model_copy(update={"trained_share": round(c.trained_tokens / total, 6) if total else 0.0})
                  for t, c in counts.items()}
        return data, counts

    def eval(self, stage: Stage, task: str, unit: UnitResult, held_out: bool) -> EvalSet:
        keep, trained = _labelled(unit, stage.objective.kind)
        idx = _docs_of(np.flatnonzero(keep.reshape(-1, unit.group).all(axis=1)), unit.group)
        docs = Selected.of([(unit, idx)], stage.objective.kind)
        rel = Path("stages") / stage.name / "eval" / task
        data = self._pack(docs, rel, stage.name)
        choices = None
        if unit.choices is not None:
            records = [unit.choices[i] for i in idx.tolist() if unit.choices[i] is not None]
            if records:
                choices = _write_choices(self.out, rel / "choices.jsonl", records)
        counts = self._counts(task, unit, (keep, trained), idx, None)
        return EvalSet(counts=counts, data=data, held_out=held_out, choices=choices)

    def _counts(self, task, unit: UnitResult, labelled, docs_idx: np.ndarray, rate: float | None) -> TaskCounts:
        keep, trained = labelled
        # a task without templates: a chat `messages` column, or preference pairs (unpaired: examples)
        names = self.template_names[task] or ["messages" if unit.side is None else "pairs" if unit.group == 2
                                              else "examples"]
        template = np.where(unit.template[docs_idx] == MESSAGES, 0, unit.template[docs_idx])
        return TaskCounts(
            examples=len(docs_idx),
            tokens=int(unit.lengths[docs_idx].sum()),
            trained_tokens=int(trained[docs_idx].sum()),
            # a doc cut down to its prompt alone has nothing to train: dropped, not also truncated
            truncated=unit.truncated - (int((unit.cut & ~keep).sum()) if unit.cut is not None else 0),
            dropped=unit.dropped + int((~keep).sum()),
            boundary_merges=unit.straddles,
            templates=_named(names, np.bincount(template, minlength=len(names))),
            skipped={k: v for k, v in _named(names, unit.skipped).items() if v},
            fewshot=int((unit.shots[docs_idx] > 0).sum()),
            requested_share=rate,
            lengths=_lengths(unit.lengths[docs_idx], unit.sft_trained[docs_idx], self.seq_len),
            pairs=None if unit.side is None else len(docs_idx) // unit.group,
            checks=dict(unit.checks),
            audit_failures=0 if unit.audit_failed is None else int(unit.audit_failed[docs_idx].sum()),
        )

    def _pack(self, docs: DocSource, rel: Path, stage: str) -> PackedSet:
        lengths = docs.lengths
        bins = group_bins(docs, self.seq_len) if docs.side is not None else best_fit_decreasing(lengths, self.seq_len)
        shards = self._shards_in_pool(docs, bins, rel, stage)
        if shards is None:
            shards = self._shards_here(docs, bins, rel, stage)
        tokens = int(lengths.sum())
        return PackedSet(
            rows=len(bins), seq_len=self.seq_len, tokens=tokens,
            trained_tokens=sum(s.trained_tokens for s in shards),
            fill_rate=round(tokens / (len(bins) * self.seq_len), 6) if bins else 0.0,
            shards=shards,
        )

    def _shards_in_pool(self, docs: DocSource, bins: list[list[int]], rel: Path, stage: str) -> list[ShardEntry] | None:
        """The shards built and written by the worker processes of ``pool``, each its own shard (the same
        files as :meth:`_shards_here` writes); None without a pool, or for documents the workers cannot
        read by themselves (in memory, or pairs, whose ids number the stage's pairs)."""
        if self.pool is None or not isinstance(docs, Selected) or docs.side is not None or \
                not all(getattr(u, "_stored", None) is not None for u in docs.units):
            return None
        from concurrent.futures.process import BrokenProcessPool

        paths = tuple(str(u._stored.path) for u in docs.units)  # type: ignore[attr-defined]
        jobs: list[tuple[Path, Future, int]] = []
        shards = []
        try:
            for s, lo in enumerate(range(0, len(bins), self.shard_rows)):
                group = bins[lo : lo + self.shard_rows]
                order = np.fromiter((d for b in group for d in b), dtype=np.int64, count=sum(len(b) for b in group))
                ends = np.cumsum([len(b) for b in group]).tolist()
                local = [list(range(a, b)) for a, b in zip([0, *ends[:-1]], ends)]  # the shard's docs, renumbered
                spec = ShardJob(paths, docs.part[order], docs.doc[order], docs.lengths[order], docs.lm, local,
                                self.seq_len, self.pad_id, str(self.out / rel / f"{s:05d}.safetensors"),
                                {"stage": stage, "seq_len": self.seq_len})
                jobs.append((rel / f"{s:05d}.safetensors", self.pool.submit(build_shard, spec),
                             int(docs.lengths[order].sum())))
            for path, job, tokens in jobs:
                written, trained = job.result()
                shards.append(ShardEntry(path=path.as_posix(), sha256=written.sha256, bytes=written.bytes,
                                         rows=written.rows, tokens=tokens, trained_tokens=trained))
        except BrokenProcessPool:
            raise TunecError("a compile worker process ended while it wrote a shard (killed by the system, e.g. "
                             "for memory); compile again, with fewer --workers if memory is short") from None
        finally:
            for _, pending, _ in jobs:
                pending.cancel()
        return shards

    def _shards_here(self, docs: DocSource, bins: list[list[int]], rel: Path, stage: str) -> list[ShardEntry]:
        lengths = docs.lengths
        shards: list[ShardEntry] = []
        # Each shard is written (saved, synced, hashed) on a thread while the next one's rows are built:
        # at most two shards' arrays exist at once, and the shards are listed in order whatever finishes first.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunec-shard") as writer:
            pending: list[tuple[Path, Future, int, int]] = []
            for s, lo in enumerate(range(0, len(bins), self.shard_rows)):
                group = bins[lo : lo + self.shard_rows]
                arrays = build_rows(docs, group, self.seq_len, self.pad_id)
                path = rel / f"{s:05d}.safetensors"
                pending.append((path, writer.submit(write_shard, self.out / path, arrays,
                                                    {"stage": stage, "seq_len": self.seq_len}),
                                int(lengths[np.concatenate(group)].sum()) if group else 0,
                                int((arrays["labels"] != IGNORE).sum())))
                del arrays  # the writer holds them until the shard is on disk
                while len(pending) > 1:  # the shard before this one is written before another is built
                    shards.append(_entry(*pending.pop(0)))
            shards.extend(_entry(*p) for p in pending)
        return shards


@dataclass(frozen=True)
class ShardJob:
    """One shard for a worker process to build and write: its documents (renumbered 0.. in the order
    ``bins`` packs them) by unit file, index in the unit and length."""

    units: tuple[str, ...]  # the unit files (compiler/unitstore.py), as `part` numbers them
    part: np.ndarray
    doc: np.ndarray
    lengths: np.ndarray
    lm: bool
    bins: list[list[int]]
    seq_len: int
    pad_id: int
    path: str
    metadata: dict


_opened: dict[str, UnitResult] = {}  # a worker's units, mapped once (a compile's unit files never change)


def build_shard(job: ShardJob) -> tuple[WrittenShard, int]:
    """Build and write ``job``'s shard (in a worker process); the shard, and its trained tokens."""
    units = []
    for path in job.units:
        if path not in _opened:
            unit = open_unit(Path(path), verify=False)  # checked by the process that handed it over
            if unit is None:
                raise OSError(f"{path}: not a whole unit")
            if len(_opened) >= 64:
                _opened.pop(next(iter(_opened)))
            _opened[path] = unit
        units.append(_opened[path])
    docs = Selected(units=units, part=job.part, doc=job.doc, lengths=job.lengths, lm=job.lm)
    arrays = build_rows(docs, job.bins, job.seq_len, job.pad_id)
    trained = int((arrays["labels"] != IGNORE).sum())
    return write_shard(Path(job.path), arrays, job.metadata), trained


def _entry(path: Path, written: Future, tokens: int, trained_tokens: int) -> ShardEntry:
    shard = written.result()  # a failed write raises here
    return ShardEntry(path=path.as_posix(), sha256=shard.sha256, bytes=shard.bytes, rows=shard.rows, tokens=tokens,
                      trained_tokens=trained_tokens)


def _labelled(unit: UnitResult, objective: str) -> tuple[np.ndarray, np.ndarray]:
    """Which documents keep something to train, and the trained tokens of each.

    The workers counted the `sft` labels already (preference objectives use them too); `lm` trains
    every token but each document's first.
    """
    trained = np.maximum(unit.lengths - 1, 0) if objective == "lm" else unit.sft_trained
    return trained > 0, trained


def _docs_of(groups: np.ndarray, size: int) -> np.ndarray:
    """The document indices of groups (pairs: ``2k, 2k + 1``), in order."""
    return (groups[:, None] * size + np.arange(size)).reshape(-1)


@dataclass
class Selected:
    """A stage's documents: the selected documents of its units, in order (repeats allowed), read from
    the units' (memory-mapped) arrays only when a shard gathers them. Labels: the units' `sft` labels,
    or for `lm` the ids, less each document's first token."""

    units: list[UnitResult]
    part: np.ndarray  # per stage document: which unit
    doc: np.ndarray  # per stage document: its index in that unit
    lengths: np.ndarray
    lm: bool
    side: np.ndarray | None = None
    group: int = 1

    @classmethod
    def of(cls, parts: list[tuple[UnitResult, np.ndarray]], objective: str) -> "Selected":
        paired = [u.side is not None for u, _ in parts]
        if any(paired) and not all(paired):
            raise TunecError("a stage mixes preference tasks with other tasks")  # the static checks refuse this first
        groups = {u.group for u, _ in parts}
        if len(groups) > 1:
            raise TunecError("a stage mixes paired and unpaired preference tasks")  # refused by the static checks
        idx = [np.asarray(i, np.int64) for _, i in parts]
        side = None
        if parts and all(paired):
            side = np.concatenate([u.side[i] for (u, _), i in zip(parts, idx) if u.side is not None])
        return cls(
            units=[u for u, _ in parts],
            part=np.concatenate([np.full(len(i), p, np.int32) for p, i in enumerate(idx)] or [np.zeros(0, np.int32)]),
            doc=np.concatenate(idx or [np.zeros(0, np.int64)]),
            lengths=np.concatenate([u.lengths[i] for (u, _), i in zip(parts, idx)] or [np.zeros(0, np.int64)]),
            lm=objective == "lm", side=side, group=groups.pop() if groups else 1,
        )

    def gather(self, order: np.ndarray, lengths: np.ndarray, inner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ids and labels of documents ``order``, one after the other (see ``pack.Docs.gather``)."""
        total = int(lengths.sum())
        ids = np.empty(total, np.int32)
        labels = np.empty(total, np.int32)
        at = np.cumsum(lengths) - lengths  # where each document starts in the output
        part = self.part[order]
        for p in np.unique(part).tolist():
            mine = np.flatnonzero(part == p)
            unit, lens = self.units[p], lengths[mine]
            ramp = ramps(lens) if len(mine) < len(order) else inner
            dst = np.repeat(at[mine], lens) + ramp
            starts = unit.offsets[:-1][self.doc[order[mine]]]
            ids[dst] = taken = take_tokens(unit, "ids", starts, lens)
            labels[dst] = taken if self.lm else take_tokens(unit, "sft_labels", starts, lens)
        if self.lm:
            labels[inner == 0] = IGNORE  # no document is predicted from the one before it
        return ids, labels

    def release(self) -> None:
        release(*self.units)


def _lengths(lengths: np.ndarray, completion: np.ndarray, seq_len: int) -> Lengths:
    """Histograms of the selected documents' token counts (repeats counted as often as they are packed)."""
    width = -(-seq_len // LENGTH_BINS)

    def hist(values: np.ndarray) -> list[int]:
        return np.bincount(np.minimum(values // width, LENGTH_BINS - 1), minlength=LENGTH_BINS).tolist()

    return Lengths(bin_width=width, document=hist(lengths), prompt=hist(lengths - completion),
                   completion=hist(completion))


def _named(names: list[str], counts) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, n in zip(names, np.asarray(counts).tolist()):
        key, k = name, 2
        while key in out:  # two templates of one task may share a name (e.g. two inline ones)
            key, k = f"{name}#{k}", k + 1
        out[key] = int(n)
    return out


def _write_choices(out: Path, rel: Path, records: list[dict]) -> ChoicesFile:
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    path = out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return ChoicesFile(path=rel.as_posix(), sha256=sha256_text(text), count=len(records))


def leak_reports(train: dict[str, leakage.Hashed],
                 evals: dict[str, leakage.Hashed]) -> dict[str, LeakReport]:
    found = leakage.find(train, evals)
    return {t: LeakReport(examples=l.examples, leaked=l.leaked, by_task=dict(sorted(l.by_task.items())),
                          by_kind=dict(sorted(l.by_kind.items())))
            for t, l in found.items() if l.leaked}
