"""Sources: where a task's rows come from, loaded through ``datasets``.

Local files (jsonl, json, csv, parquet) and hub datasets. Malformed input is
diagnosed down to the file and line, since ``datasets`` itself reports only a
byte position.
"""

from __future__ import annotations

import csv
import zlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import Problem, TunecError, did_you_mean
from .load import LoadedRecipe
from .fileio import sha256_file
from .recipe import FILE_KINDS, FileEval, FractionEval, HubSource, Selection, Task

PEEK_ROWS = 100  # rows read by `tunec validate` to learn a file's columns


@dataclass(frozen=True)
class Rows:
    """The selected rows of one part of a task, column-major, after the field map."""

    columns: dict[str, list[Any]]
    index: np.ndarray  # each row's index in its split or file (for messages)

    @property
    def count(self) -> int:
        return len(self.index)


def source_files(loaded: LoadedRecipe, task: Task) -> dict[str, Path]:
    if task.source.kind not in FILE_KINDS:
        return {}
    return {split: loaded.resolve(p) for split, p in task.source.files().items()}


def check_files(loaded: LoadedRecipe, name: str, task: Task) -> list[Problem]:
    """Every file the task names exists and is not empty; its splits cover train/eval."""
    problems = []
    files = source_files(loaded, task)
    loc = ("tasks", name, "source", "path")
    for split, path in files.items():
        where = loc if isinstance(task.source.path, str) else loc + (split,)
        if not path.is_file():
            problems.append(loaded.problem(where, f"file not found: {path}"))
        elif path.stat().st_size == 0:
            problems.append(loaded.problem(where, f"file is empty: {path}"))
    if files:
        for part in ("train", "eval"):
            sel = getattr(task, part)
            if isinstance(sel, Selection) and sel.split not in files:
                problems.append(
                    loaded.problem(
                        ("tasks", name, part, "split"),
                        f"split '{sel.split}' is not among the source's splits ({', '.join(files)})",
                    )
                )
    return problems


def peek_columns(loaded: LoadedRecipe, task: Task, split: str) -> list[str] | None:
    """Columns a source provides, read cheaply from its first rows (None if unknown offline)."""
    source = task.source
    if isinstance(source, HubSource):
        return list(source.columns) if source.columns is not None else None
    path = source_files(loaded, task).get(split)
    if path is None or not path.is_file() or path.stat().st_size == 0:
        return None
    if source.kind == "jsonl":
        cols: dict[str, None] = {}
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if lineno > PEEK_ROWS:
                    break
                if line.strip():
                    row = _parse_jsonl_line(path, lineno, line)
                    cols.update(dict.fromkeys(row))
        return list(cols)
    if source.kind == "json":
        rows = _read_json(path)
        cols = {}
        for row in rows[:PEEK_ROWS]:
            cols.update(dict.fromkeys(row))
        return list(cols)
    if source.kind == "csv":
        with path.open(encoding="utf-8", newline="") as fh:
            return next(csv.reader(fh), [])
    if source.kind == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    return None


def _parse_jsonl_line(path: Path, lineno: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TunecError(
            Problem(f"malformed JSON line: {exc.msg} (column {exc.colno})", str(path), lineno, exc.colno)
        ) from None
    if not isinstance(row, dict):
        raise TunecError(
            Problem(f"each JSONL line must be an object, got {type(row).__name__}", str(path), lineno, 1)
        )
    return row


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TunecError(Problem(f"malformed JSON: {exc.msg}", str(path), exc.lineno, exc.colno)) from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise TunecError(Problem("a `json` source holds a list of objects", str(path), 1, 1))
    return data


def diagnose_file(kind: str, path: Path) -> None:
    """Re-read a file that ``datasets`` failed on, raising a located error if we find the fault."""
    if kind == "jsonl":
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    _parse_jsonl_line(path, lineno, line)
    elif kind == "json":
        _read_json(path)


def fingerprint(loaded: LoadedRecipe, task: Task) -> dict[str, str]:
    """What identifies the source's content: file hashes, or hub id and revision."""
    source = task.source
    if isinstance(source, HubSource):
        return {"hub": source.id, "name": source.name or "", "revision": source.revision or ""}
    return {split: sha256_file(path) for split, path in sorted(source_files(loaded, task).items())}


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # our own errors say it better
    return datasets


def holdout(seed: int, task: str, count: int, fraction: float) -> np.ndarray:
    """Sorted positions (within the train selection) held out for eval: seeded, a pure function of its inputs."""
    rng = np.random.default_rng([seed, zlib.crc32(task.encode("utf-8"))])
    n_eval = min(count - 1, max(1, round(count * fraction)))
    return np.sort(rng.permutation(count)[:n_eval])


def _load(loaded: LoadedRecipe, name: str, task: Task, split: str, path: Path | None = None):
    """One split of the source (or one file read like it) as a ``datasets.Dataset``."""
    datasets = _quiet_datasets()
    source = task.source
    if isinstance(source, HubSource):
        try:
            return datasets.load_dataset(source.id, source.name, revision=source.revision, split=split)
        except Exception as exc:  # network, unknown id, unknown split: all user-facing
            raise TunecError(
                loaded.problem(("tasks", name, "source", "id"), f"cannot load hub dataset '{source.id}': {exc}")
            ) from None
    if path is None:
        problems = check_files(loaded, name, task)
        if problems:
            raise TunecError(problems)
        path = source_files(loaded, task)[split]
    builder = {"jsonl": "json"}.get(source.kind, source.kind)
    if source.kind == "json":
        # `datasets` reads a bare object as one row and a list of scalars as a
        # `text` column, without complaint; a `json` source is a list of objects.
        _read_json(path)
    try:
        return datasets.load_dataset(builder, data_files={"rows": str(path)}, split="rows")
    except Exception as exc:
        diagnose_file(source.kind, path)
        raise TunecError(Problem(f"cannot read {source.kind} file: {exc}", str(path))) from None


def load_part(loaded: LoadedRecipe, name: str, task: Task, part: str) -> Rows:
    """Load the rows of ``part`` ('train' or 'eval') of task ``name``, field map applied.

    An eval ``fraction`` is taken from the train selection (seeded) and the
    train part then excludes those rows; an eval ``file`` is read like the source.
    """
    ev = task.eval
    if part == "eval" and isinstance(ev, FileEval):
        path = loaded.resolve(ev.file)
        if not path.is_file() or path.stat().st_size == 0:
            why = "not found" if not path.is_file() else "empty"
            raise TunecError(loaded.problem(("tasks", name, "eval", "file"), f"eval file {why}: {path}"))
        ds = _load(loaded, name, task, "eval", path)
        index = np.arange(len(ds))
        where, what = ("tasks", name, "eval"), f"eval file {path}"
    else:
        sel: Selection = task.train if part == "train" or isinstance(ev, FractionEval) else ev
        ds = _load(loaded, name, task, sel.split)
        total = len(ds)
        stop = total if sel.stop is None else min(sel.stop, total)
        index = np.arange(sel.start, max(stop, sel.start))
        where = ("tasks", name, part)
        what = f"split '{sel.split}' has {total} rows, selected rows {sel.start}..{'end' if sel.stop is None else sel.stop}"
        if isinstance(ev, FractionEval) and len(index):
            held = holdout(loaded.recipe.seed, name, len(index), ev.fraction)
            keep = np.zeros(len(index), dtype=bool)
            keep[held] = True
            index = index[keep] if part == "eval" else index[~keep]
    if len(index) == 0:
        raise TunecError(loaded.problem(where, f"the {part} selection is empty: {what}"))

    mapping = task.fields if task.fields is not None else {c: c for c in ds.column_names}
    missing = [(new, old) for new, old in mapping.items() if old not in ds.column_names]
    if missing:
        raise TunecError(
            [
                loaded.problem(
                    ("tasks", name, "fields", new),
                    f"column `{old}` is not in the source{did_you_mean(old, ds.column_names)}; "
                    f"columns: {', '.join(ds.column_names)}",
                )
                for new, old in missing
            ]
        )
    wanted = sorted(set(mapping.values()))
    subset = ds.select_columns(wanted)
    if len(index) != len(ds) or (len(index) and index[0] != 0):
        subset = subset.select(index.tolist())
    raw = subset.to_dict()
    columns = {new: raw[old] for new, old in mapping.items()}
    return Rows(columns=columns, index=index.astype(np.int64))
