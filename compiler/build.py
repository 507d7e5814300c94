"""``tunec compile``: link compile units into packed shards and write the plan last.

Order of writes, so an interrupted build is never mistaken for a finished one:
the old ``plan.json`` is removed first; the tokenizer and shards are written
(each to a temporary name, then renamed); then ``manifest.json``; then
``plan.json``, the commit marker.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import FORMAT_VERSION, __version__
from .check import Checked, check
from .errors import Problem, TunecError
from .load import LoadedRecipe
from .pack import IGNORE, Docs, best_fit_decreasing, build_rows, doc_labels
from .plan import (
    MANIFEST_FILE,
    MARKER_FILE,
    PLAN_FILE,
    EvalSet,
    PackedSet,
    Plan,
    RecipeInfo,
    ShardEntry,
    StagePlan,
    TaskCounts,
    TaskPlan,
    TemplatePlan,
    TokenizerPlan,
    canonical_json,
)
from .recipe import LocalModel, Stage
from .shards import sha256_file, write_shard
from .sources import fingerprint, load_part
from .tokenize import hash_folder, load_tokenizer, tokenizer_info
from .units import Chunk, RowError, UnitResult, UnitSpec, chunks_of, compile_chunk, init_worker, join

DEFAULT_SHARD_ROWS = 2048
COMPILED = ("stages", "tokenizer", MANIFEST_FILE)  # what a rebuild replaces (runs/ is kept)


@dataclass(frozen=True)
class Options:
    workers: int = 1
    force: bool = False
    shard_rows: int = DEFAULT_SHARD_ROWS
    progress: bool = False


def compile_recipe(recipe_path: str | Path, out: str | Path, options: Options = Options()) -> Plan:
    from .load import load_recipe

    checked = check(load_recipe(recipe_path))
    return build(checked, Path(out), options)


def build(checked: Checked, out: Path, options: Options) -> Plan:
    loaded = checked.loaded
    recipe = loaded.recipe
    tok = load_tokenizer(loaded)
    info = tokenizer_info(tok)

    # Units: the train part of every used task, and its eval part when it has one.
    specs: list[UnitSpec] = []
    for name in checked.used_tasks():
        task = recipe.tasks[name]
        for part in ("train", "eval") if task.eval is not None else ("train",):
            specs.append(UnitSpec(name, part, checked.templates[name], task.truncation, recipe.seq_len))
    parts = [load_part(loaded, s.task, recipe.tasks[s.task], s.part) for s in specs]

    inputs = {f"source:{n}": fingerprint(loaded, recipe.tasks[n]) for n in checked.used_tasks()}
    inputs.update(
        {f"templates:{n}": {t.name: t.sha256 for t in checked.templates[n]} for n in checked.used_tasks()}
    )

    _check_out(out, loaded, options.force)  # refuse early, before the long work

    chunks = [c for i, rows in enumerate(parts) for c in chunks_of(i, rows.columns, rows.count, rows.first_row)]
    total_rows = sum(p.count for p in parts)
    results: list[list[UnitResult]] = [[] for _ in specs]
    with _progress(options.progress, total_rows, "compile") as bar:
        for chunk, result in _run_chunks(chunks, info, specs, options.workers):
            results[chunk.unit].append(result)
            bar(len(next(iter(chunk.columns.values()), [])))
    units = {(s.task, s.part): join(r) for s, r in zip(specs, results)}

    # Every user error in the data has surfaced by now: only here is a previous
    # build in `out` replaced.
    _prepare_out(out, loaded, options.force)
    tok_dir = out / "tokenizer"
    _save_tokenizer(tok, tok_dir)
    tok_plan = TokenizerPlan(
        path="tokenizer", sha256=hash_folder(tok_dir), vocab_size=info.vocab_size,
        bos_id=info.bos_id, eos_id=info.eos_id, pad_id=info.pad_id,
    )

    stages = [
        _link_stage(stage, units, checked, out, info.pad_id, options, loaded)
        for stage in recipe.stages
    ]

    recipe_hash = _sha256_text(canonical_json({
        "format_version": FORMAT_VERSION,
        "recipe": recipe.model_dump(mode="json"),
        "inputs": inputs,
        "tokenizer": tok_plan.sha256,
    }))
    plan = Plan(
        versions=_versions(),
        recipe=RecipeInfo(file=loaded.path.name, sha256=_sha256_text(loaded.text), hash=recipe_hash),
        seq_len=recipe.seq_len,
        seed=recipe.seed,
        tokenizer=tok_plan,
        inputs=inputs,
        tasks={
            n: TaskPlan(
                columns=checked.columns[n],
                templates=[TemplatePlan(name=t.name, sha256=t.sha256, source=t.text) for t in checked.templates[n]],
            )
            for n in checked.used_tasks()
        },
        stages=stages,
    )
    _write_manifest(out)
    _atomic_write(out / PLAN_FILE, canonical_json(plan.model_dump(mode="json")))
    return plan


# ----------------------------------------------------------------- output folder


def _check_out(out: Path, loaded: LoadedRecipe, force: bool) -> str | None:
    """Refuse a folder holding something else; return the recipe of the build it holds."""
    marker = out / MARKER_FILE
    if out.exists() and not out.is_dir():
        raise TunecError(f"output {out} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return None
    if not marker.is_file():
        raise TunecError(
            f"output folder {out} is not empty and is not a tunec build folder; "
            "choose an empty or new folder"
        )
    try:
        previous = json.loads(marker.read_text(encoding="utf-8")).get("recipe")
    except (json.JSONDecodeError, AttributeError):
        previous = None
    if previous != str(loaded.path) and not force:
        raise TunecError(
            f"output folder {out} holds the build of another recipe ({previous}); "
            "pass --force to replace it, or choose another folder"
        )
    return previous


def _prepare_out(out: Path, loaded: LoadedRecipe, force: bool) -> None:
    """Clear a previous build of ours (its `runs/` stay when the recipe is the same)."""
    marker = out / MARKER_FILE
    previous = _check_out(out, loaded, force)
    if out.is_dir():
        # Commit marker first: from here on the folder is an unfinished build.
        (out / PLAN_FILE).unlink(missing_ok=True)
        for name in COMPILED:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        if force and previous != str(loaded.path):
            shutil.rmtree(out / "runs", ignore_errors=True)  # trained on another recipe's data
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"recipe": str(loaded.path)}) + "\n", encoding="utf-8")


def _save_tokenizer(tok, folder: Path) -> None:
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    os.replace(tmp, folder)


def _write_manifest(out: Path) -> None:
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        if rel.split("/")[0] in COMPILED:
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    _atomic_write(out / MANIFEST_FILE, canonical_json({"format_version": FORMAT_VERSION, "files": files}))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------- workers


def _run_chunks(chunks: list[Chunk], info, specs, workers: int) -> Iterator[tuple[Chunk, UnitResult]]:
    workers = min(workers, len(chunks))  # a process per chunk at most: spawning costs ~1 s
    try:
        if workers <= 1:
            with _single_threaded_tokenizers():
                init_worker(info, specs, single_thread=True)
                for chunk in chunks:
                    yield chunk, compile_chunk(chunk)
            return
        # spawn: a clean interpreter per worker (fork after the tokenizer's thread
        # pool has started can deadlock), importing only the light worker modules.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=init_worker, initargs=(info, specs, True)) as pool:
            for chunk, result in zip(chunks, pool.imap(compile_chunk, chunks, chunksize=1)):
                yield chunk, result
    except RowError as exc:
        part = "eval" if exc.part == "eval" else "train"
        where = f" [{exc.file}:{exc.line}]" if exc.line else (f" [{exc.file}]" if exc.file else "")
        raise TunecError(Problem(f"task '{exc.task}', {part} row {exc.row}: {exc.message}{where}")) from None


@contextmanager
def _single_threaded_tokenizers():
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


@contextmanager
def _progress(enabled: bool, total: int, desc: str) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda n: None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="rows", disable=None, leave=False) as bar:
        yield bar.update


# ----------------------------------------------------------------- linking


def _link_stage(stage: Stage, units, checked: Checked, out: Path, pad_id: int, options: Options, loaded) -> StagePlan:
    objective = stage.objective.kind
    seq_len = checked.recipe.seq_len
    base = Path("stages") / stage.name

    train_units = [(t, units[(t, "train")]) for t in stage.tasks]
    docs, _, counts = _gather(train_units, objective, checked)
    train = _pack_and_write(docs, seq_len, pad_id, out, base / "train", options.shard_rows, stage.name)

    evals = {}
    for t in stage.tasks:
        if (t, "eval") not in units:
            continue
        edocs, _, ecounts = _gather([(t, units[(t, "eval")])], objective, checked)
        data = _pack_and_write(edocs, seq_len, pad_id, out, base / "eval" / t, options.shard_rows, stage.name)
        evals[t] = EvalSet(counts=ecounts[t], data=data)

    settings = stage
    if isinstance(stage.model, LocalModel):
        settings = stage.model_copy(update={"model": LocalModel(kind="local", path=str(loaded.resolve(stage.model.path)))})
    return StagePlan(name=stage.name, settings=settings, train=train, tasks=counts, eval=evals)


def _gather(task_units: list[tuple[str, UnitResult]], objective: str, checked: Checked):
    """Labels per document; drop documents with nothing to train; count per task."""
    ids_parts, offsets_parts, label_parts, task_of_doc = [], [np.zeros(1, np.int64)], [], []
    counts: dict[str, TaskCounts] = {}
    base = 0
    for ti, (task, unit) in enumerate(task_units):
        labels = doc_labels(unit.ids, unit.offsets, unit.spans, objective)
        trained_per_doc = np.add.reduceat((labels != IGNORE).astype(np.int64), unit.offsets[:-1]) if unit.docs else np.zeros(0, np.int64)
        keep = trained_per_doc > 0
        lengths = unit.lengths[keep]
        token_mask = np.repeat(keep, unit.lengths)
        ids_parts.append(unit.ids[token_mask])
        label_parts.append(labels[token_mask])
        offsets_parts.append(base + np.cumsum(lengths))
        base += int(lengths.sum())
        task_of_doc.append(np.full(int(keep.sum()), ti, dtype=np.int32))
        names = [t.name for t in checked.templates[task]]
        per_template = np.bincount(unit.template[keep], minlength=len(names))
        counts[task] = TaskCounts(
            examples=int(keep.sum()),
            tokens=int(lengths.sum()),
            trained_tokens=int(trained_per_doc[keep].sum()),
            truncated=unit.truncated,
            dropped=unit.dropped + int((~keep).sum()),
            boundary_merges=unit.straddles,
            templates=_template_counts(names, per_template),
        )
        if counts[task].examples == 0:
            raise TunecError(f"task '{task}': no example left to train on (all {counts[task].dropped} dropped); "
                             "check `truncation` and `seq_len`")
    docs = Docs(
        ids=np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int32),
        offsets=np.concatenate(offsets_parts).astype(np.int64),
        labels=np.concatenate(label_parts) if label_parts else np.zeros(0, np.int32),
    )
    return docs, np.concatenate(task_of_doc) if task_of_doc else np.zeros(0, np.int32), counts


def _template_counts(names: list[str], per_template: np.ndarray) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, n in zip(names, per_template.tolist()):
        key, k = name, 2
        while key in out:  # two templates of one task may share a name (e.g. two inline ones)
            key, k = f"{name}#{k}", k + 1
        out[key] = int(n)
    return out


def _pack_and_write(docs: Docs, seq_len: int, pad_id: int, out: Path, rel: Path,
                    shard_rows: int, stage: str) -> PackedSet:
    bins = best_fit_decreasing(docs.lengths, seq_len)
    shards = []
    for s, lo in enumerate(range(0, len(bins), shard_rows)):
        arrays = build_rows(docs, bins[lo : lo + shard_rows], seq_len, pad_id)
        path = rel / f"{s:05d}.safetensors"
        written = write_shard(out / path, arrays, {"stage": stage, "seq_len": seq_len})
        real = int(sum(int(docs.lengths[d]) for b in bins[lo : lo + shard_rows] for d in b))
        shards.append(ShardEntry(
            path=path.as_posix(), sha256=written.sha256, bytes=written.bytes, rows=written.rows,
            tokens=real, trained_tokens=int((arrays["labels"] != IGNORE).sum()),
        ))
    rows = len(bins)
    tokens = int(docs.lengths.sum())
    return PackedSet(
        rows=rows, seq_len=seq_len, tokens=tokens,
        trained_tokens=sum(s.trained_tokens for s in shards),
        fill_rate=round(tokens / (rows * seq_len), 6) if rows else 0.0,
        shards=shards,
    )


def _versions() -> dict[str, str]:
    out = {"tunec": __version__}
    for dist in ("tokenizers", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def _sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()

