"""Compile only the units whose inputs changed; read the others from the cache.

Each unit's key (:func:`.cache.unit_key`) is computed before any data is
loaded: it needs the content hashes of the files a part reads, not their rows.
A unit found intact in the cache is reused as stored; only the parts of missing
units are loaded, rendered and tokenized, and each is stored once compiled.
The leakage check's hashed keys of a part are cached the same way (keyed by the
unit and the task's ``leakage`` options), so a build whose units are all cached
loads no data at all.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

import numpy as np

from . import leakage
from .cache import Cache, code_versions, derived_key, tokenizer_hash, touch, unit_key
from .check import Checked
from .errors import TunecError
from .executors import Workers, run_local, run_ray
from .fileio import atomic_write_text, canonical_json, compact_json, on_two_threads, sha256_text
from .link import leak_reports
from .plan import LeakReport
from .recipe import HubSource
from .sources import Rows, load_part, part_inputs, source_files
from .tokens import TokenizerInfo
from .units import CHUNK_ROWS, Chunk, UnitResult, UnitSpec, plan_docs
from .unitstore import UnitWriter, open_unit

if TYPE_CHECKING:
    from .lint import DigestTap

Part = tuple[str, str]  # (task, "train" | "eval")

# Data per worker below which the units compile here rather than in worker processes (source bytes
# before the rows load, when the workers may be spawned early; the rows' share of their Arrow files
# after): about 1,300 rows of instruction data, two chunks (CHUNK_ROWS) or more for each worker.
EARLY_SPAWN_BYTES = 1 << 20
logger = logging.getLogger(__name__)


@dataclass
class LeakKeys:
    """A part's hashed leakage keys, one per row, and each row's index in its split."""

    index: np.ndarray
    keys: leakage.Hashed

    def rows(self, rows: np.ndarray) -> leakage.Hashed:
        """The keys of the given split rows (each once, in order)."""
        rows = np.unique(rows)
        pos = np.searchsorted(self.index, rows)
        if len(rows) and (pos.max() >= len(self.index) or not np.array_equal(self.index[pos], rows)):
            raise AssertionError("a compiled row is not in its part")  # index is sorted and holds every row
        return self.keys.take(pos)


@dataclass
class Compiled:
    units: dict[Part, UnitResult]
    keys: dict[Part, str]
    leak: dict[Part, LeakKeys]
    reused: list[Part] = field(default_factory=list)
    rebuilt: list[Part] = field(default_factory=list)
    rows: dict[Part, Rows] = field(default_factory=dict)  # the parts whose rows were loaded (read on demand)
    # with `keep_workers`: the worker processes that compiled the units, still running (the caller closes them)
    workers: Workers | None = None


@dataclass(frozen=True)
class Keys:
    """Per part, its unit's cache key and the key of its rows (:func:`rows_key`): known before any data
    or unit is read."""

    units: dict[Part, str]
    rows: dict[Part, str]


def unit_keys(checked: Checked, specs: list[UnitSpec], info: TokenizerInfo) -> Keys:
    loaded = checked.loaded
    tasks = loaded.recipe.tasks
    keys: dict[Part, str] = {}
    rows_keys: dict[Part, str] = {}
    tok = tokenizer_hash(info)
    for s in specs:
        options, content = part_inputs(loaded, s.task, tasks[s.task], s.part)
        keys[(s.task, s.part)] = unit_key(s, options, content, tok)
        rows_keys[(s.task, s.part)] = rows_key(s.part, options, content, loaded.recipe.seed)
    return Keys(keys, rows_keys)


def compile_units(checked: Checked, specs: list[UnitSpec], info: TokenizerInfo, cache: Cache | None,
                  leak_parts: set[Part], workers: int, scratch: Path, executor: str = "local",
                  ray_address: str | None = None, progress: Callable[[int], None] = lambda n: None,
                  keyed: Keys | None = None,
                  on_rows: Callable[[dict[Part, Rows]], Mapping[Part, DigestTap] | None] | None = None,
                  keep_workers: bool = False, ahead: Workers | None = None) -> Compiled:
    """Every unit of ``specs``: read from ``cache``, else compiled (and stored there; without a cache,
    into the folder ``scratch``, which the caller removes once the units are linked). ``keyed``: the
    keys of :func:`unit_keys`, when the caller has them already. ``on_rows``: called with the parts
    whose rows are loaded, once all of them are and before they are compiled here (not on Ray, and
    not when no unit is compiled), e.g. to start reading them in another thread meanwhile; it may
    return taps for some of them, fed each part's rows as its chunks are made, and closed (whole or not)
    before this returns (see :class:`.lint.DigestTap`).
    ``keep_workers``: the worker processes spawned for the units are left running and handed back in
    :attr:`Compiled.workers` (the caller closes them), for the linker's shards. ``ahead``: worker processes
    started before the tokenizer was loaded (:meth:`.executors.Workers.ahead`), used (handed the units'
    setup) when this compile spawns that many, closed otherwise."""
    loaded = checked.loaded
    tasks = loaded.recipe.tasks
    keyed = keyed if keyed is not None else unit_keys(checked, specs, info)
    keys, rows_keys = dict(keyed.units), keyed.rows

    units: dict[Part, UnitResult] = _cached_units(cache, specs, keys) if cache is not None else {}
    missing = [i for i, s in enumerate(specs) if (s.task, s.part) not in units]

    parts: dict[Part, Rows] = {}

    def part(task: str, which: str) -> Rows:
        if (task, which) not in parts:
            parts[(task, which)] = load_part(loaded, task, tasks[task], which, cache.root if cache else None)
        return parts[(task, which)]

    run_specs = [specs[i] for i in missing]
    pools = {s.task: part(s.task, "train").columns for s in run_specs if s.few_shot is not None}
    # Spawned now (for source files large enough to give each worker chunks of its own), the worker
    # processes start while the rows load and the leakage keys are hashed. A small compile does not
    # spawn them (each costs ~0.5 s of CPU to start): its chunks run here, e.g. those of the one small
    # task whose template was edited. A hub dataset's size is not known before it loads: with one, as
    # many units to build as workers suffice.
    early = executor == "local" and workers > 1 and (
        _source_bytes(loaded, run_specs) >= EARLY_SPAWN_BYTES * workers
        or (len(run_specs) >= workers and any(isinstance(tasks[s.task].source, HubSource) for s in run_specs)))
    if ahead is not None and early and ahead.workers == workers and ahead.pool is not None:
        ahead.hand_over(info, run_specs, pools)
        started = ahead
    else:
        if ahead is not None:
            ahead.close()
        started = Workers(info, run_specs, pools, workers if early else 1)
    try:
        leak: dict[Part, LeakKeys] = {}
        for p in sorted(leak_parts):
            task = tasks[p[0]]
            lkey = derived_key(rows_keys[p], "leakage", task.leakage)  # the rows, not the templates, decide them
            entry = cache.get_arrays("leak", lkey) if cache is not None else None
            if entry is not None and all(k in entry[0] for k in ("index", "example", "text_offsets", "texts")):
                a = entry[0]
                leak[p] = LeakKeys(a["index"], leakage.Hashed(a["example"], a["text_offsets"], a["texts"]))
                continue
            rows = part(*p)
            hashed = leakage.Hashed.concat([leakage.hash_columns(cols, task.leakage.key, task.leakage.context)
                                            for _, cols in rows.slices()])
            leak[p] = LeakKeys(rows.index, hashed)
            if cache is not None:
                cache.put_arrays("leak", lkey, {"index": rows.index, "example": hashed.example,
                                                "text_offsets": hashed.text_offsets, "texts": hashed.texts}, {})

        if run_specs and executor == "ray":
            assert cache is not None, "the CLI refuses --executor ray with --no-cache"
            # a unit's chunks are made when its task is submitted (run_ray keeps a few in flight)
            run_ray(((keys[(s.task, s.part)], s, list(_chunks(j, s, part(s.task, s.part), pools)))
                     for j, s in enumerate(run_specs)), info, pools, cache.root, ray_address, progress)
            for s in run_specs:
                unit = cache.get_unit(keys[(s.task, s.part)])
                if unit is None:
                    raise AssertionError(f"a Ray task stored no unit for {s.task}/{s.part}")
                units[(s.task, s.part)] = unit
        elif run_specs:
            for s in run_specs:
                part(s.task, s.part)  # as _run_local would first: every part's row count is needed there
            taps = dict(on_rows(dict(parts)) or {}) if on_rows is not None else {}
            # Not spawned early: in worker processes only when the rows are worth starting them for.
            many = early or _worth_workers([part(s.task, s.part) for s in run_specs], workers)
            try:
                units.update(_run_local(run_specs, keys, part, pools, info, cache, Cache(scratch),
                                        workers if many else 1, progress, started if early else None, taps))
            finally:
                for tap in taps.values():  # a part no unit streamed (its unit was cached), or a failed compile
                    tap.close(whole=False)
    except BaseException:
        started.close()
        raise
    kept = started if keep_workers and started.pool is not None else None
    if kept is None:
        started.close()
    order = [(s.task, s.part) for s in specs]
    rebuilt = [order[i] for i in missing]
    return Compiled(units={p: units[p] for p in order}, keys=keys, leak=leak,
                    reused=[p for p in order if p not in rebuilt], rebuilt=rebuilt, rows=parts, workers=kept)


def _source_bytes(loaded, specs: list[UnitSpec]) -> int:
    """Bytes of the local files the tasks of ``specs`` read (a hub dataset counts for nothing)."""
    files = {path for s in specs for path in source_files(loaded, loaded.recipe.tasks[s.task]).values()}
    return sum(path.stat().st_size for path in files if path.is_file())


def _worth_workers(parts: list[Rows], workers: int) -> bool:
    """Whether rows to compile are worth starting ``workers`` processes for (each costs ~0.5 s of CPU to
    start, what ~2,000 rows of instructions take to compile): at least ``EARLY_SPAWN_BYTES`` of data per
    worker, counted as the share of their splits' Arrow files that the parts select. Parts not read from
    Arrow files are not measured: for them, workers are started (as many as there are chunks)."""
    total = 0
    for rows in parts:
        if rows.files is None or rows.total <= 0:
            return True
        try:
            size = sum(os.path.getsize(f) for f in rows.files)
        except OSError:
            return True
        total += size * rows.count // rows.total
    return workers > 1 and total >= EARLY_SPAWN_BYTES * workers


def _cached_units(cache: Cache, specs: list[UnitSpec], keys: dict[Part, str]) -> dict[Part, UnitResult]:
    """The units of ``specs`` found intact in ``cache``, read on two threads (each is checked against
    its sha256 as it is read, and hashlib lets go of the GIL while it hashes)."""
    found: dict[Part, UnitResult | None] = {}

    def read(s: UnitSpec) -> None:
        found[(s.task, s.part)] = cache.get_unit(keys[(s.task, s.part)])

    on_two_threads(specs, read, "tunec-units")
    return {(s.task, s.part): unit for s in specs if (unit := found.get((s.task, s.part))) is not None}


def _run_local(specs: list[UnitSpec], keys: dict[Part, str], part: Callable[[str, str], Rows],
               pools: dict[str, dict[str, list]], info: TokenizerInfo, cache: Cache | None, scratch: Cache,
               workers: int, progress: Callable[[int], None], started: Workers | None = None,
               taps: Mapping[Part, DigestTap] | None = None) -> dict[Part, UnitResult]:
    """Compile the units here (or in worker processes), one after the other, their rows read from Arrow
    a chunk at a time and each chunk's result appended to the unit's file as it comes back: what the
    main process holds grows with a chunk, not with the data. Each unit is read back memory-mapped.
    Units go into ``cache``, or into ``scratch`` without one or when the cache folder cannot be written."""
    writers: dict[int, UnitWriter] = {}
    left = [-(-part(s.task, s.part).count // CHUNK_ROWS) for s in specs]
    out: dict[Part, UnitResult] = {}

    def writer(j: int) -> UnitWriter:
        s = specs[j]
        if cache is not None:
            try:
                return cache.unit_writer(keys[(s.task, s.part)], len(s.templates))
            except OSError as exc:  # a read-only or full cache costs a rebuild next time, never the compile
                logger.warning(f"cache: cannot write in {cache.root} ({exc}); keeping {s.task}/{s.part} for "
                               "this compile only")
        return scratch.unit_writer(keys[(s.task, s.part)], len(s.templates), durable=False)

    def failed(j: int, w: UnitWriter, exc: OSError) -> TunecError:
        s = specs[j]
        return TunecError(f"cannot write the compiled unit {s.task}/{s.part} to {w.path.parent} ({exc}); "
                          "free some space there, or give the cache another folder with --cache DIR")

    def finish(j: int) -> None:
        s = specs[j]
        w = writers.pop(j) if j in writers else writer(j)
        try:
            w.finish()
        except OSError as exc:
            raise failed(j, w, exc) from None
        unit = open_unit(w.path, verify=False)  # written just now by this process
        if unit is None:
            raise AssertionError(f"the unit just written to {w.path} does not read back")
        out[(s.task, s.part)] = unit

    try:
        for j, n in enumerate(left):
            if n == 0:  # a unit with no rows at all
                finish(j)
        chunks = (c for j, s in enumerate(specs)
                  for c in _chunks(j, s, part(s.task, s.part), pools, (taps or {}).get((s.task, s.part))))
        for chunk, result in run_local(chunks, sum(left), info, specs, pools, workers, started):
            j = chunk.unit
            if j not in writers:
                writers[j] = writer(j)
            try:
                writers[j].add(result)
            except OSError as exc:
                raise failed(j, writers[j], exc) from None
            progress(len(chunk.rows))
            left[j] -= 1
            if left[j] == 0:
                finish(j)
    finally:
        for w in writers.values():  # a failed compile leaves no partial unit behind
            w.abort()
    return out


def rows_key(part: str, options: dict, content: dict[str, str], seed: int) -> str:
    """sha256 of what decides a part's rows (after the field map), less what decides its documents
    (templates, format, few-shot, truncation): the source, the field map, the selections, the content
    of the files read, the seed (a held-out eval fraction is drawn with it) and the code."""
    return sha256_text(compact_json({
        "code": code_versions(), "what": "rows", "part": part, "seed": seed, "content": content,
        "options": {k: options.get(k) for k in ("source", "fields", "train", "eval")},
    }))


def _chunks(j: int, spec: UnitSpec, rows: Rows, pools: dict[str, dict[str, list]],
            tap: DigestTap | None = None) -> Iterator[Chunk]:
    """A unit's chunks (``CHUNK_ROWS`` rows each, cut the same whatever the number of workers), their rows
    read from Arrow a chunk at a time, their document plans drawn as they go; ``tap``: fed each chunk's
    rows, and closed once it has them all."""
    pool = pools.get(spec.task)
    plans = plan_docs(spec, rows.count, len(next(iter(pool.values()))) if pool else 0)
    index = rows.index
    for lo, columns in rows.slices(CHUNK_ROWS):
        hi = min(lo + CHUNK_ROWS, rows.count)
        if tap is not None:
            tap.feed(lo, columns)
        yield Chunk(j, index[lo:hi].tolist(), columns, list(itertools.islice(plans, hi - lo)))
    if tap is not None:
        tap.close(whole=True)


def cache_of(root: Path | None) -> Cache | None:
    return None if root is None else Cache(root)


LEAK_REPORTS = "leakreports"  # the cache's folder of leakage reports


def leak_reports_cached(cache: Cache | None, train: dict[str, leakage.Hashed],
                        evals: dict[str, leakage.Hashed]) -> dict[str, LeakReport]:
    """:func:`.link.leak_reports`, kept in the cache under a sha256 of exactly its inputs (every hash
    array of both sides, in order, with the tasks' names) and the code's version: a rebuild whose
    mixtures and parts are unchanged compares nothing again."""
    if cache is None:
        return leak_reports(train, evals)
    digest = hashlib.sha256(compact_json({"code": code_versions(), "what": "leak-reports"}).encode("utf-8"))
    for side, parts in (("train", train), ("eval", evals)):
        for name, h in parts.items():
            digest.update(compact_json([side, name]).encode("utf-8"))
            for a in (h.example, h.text_offsets, h.texts):
                a = np.ascontiguousarray(a)
                digest.update(f"{a.dtype.str}{a.shape}".encode("ascii"))
                digest.update(a.tobytes())
    key = digest.hexdigest()
    path = cache.path(LEAK_REPORTS, key).with_suffix(".json")
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(stored, list):
            found = {str(t): LeakReport.model_validate(r) for t, r in stored}
            touch(path)
            return found
    except (OSError, ValueError, TypeError):
        pass  # absent or damaged: compare again
    found = leak_reports(train, evals)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, canonical_json([[t, r.model_dump(mode="json")] for t, r in found.items()]))
    except OSError:
        pass  # a cache that cannot be written only costs time
    return found
