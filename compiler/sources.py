"""Sources: where a task's rows come from, loaded through ``datasets``.

Local files (jsonl, json, csv, parquet) and hub datasets. Malformed input is
diagnosed down to the file and line, since ``datasets`` itself reports only a
byte position.
"""

from __future__ import annotations

import atexit
import codecs
import csv
import functools
import json
import os
import subprocess
import sys
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .errors import Problem, TunecError, did_you_mean
from .fileio import atomic_write_text, sha256_file, sha256_text
from .load import LoadedRecipe
from .recipe import FieldMap, FileEval, FractionEval, HubSource, Selection, Task, field_column

PEEK_ROWS = 100  # rows read by `tunec validate` to learn a file's columns


SLICE_ROWS = 4096  # rows converted from Arrow to Python at a time


@dataclass(frozen=True)
class Rows:
    """The selected rows of one part of a task, after the field map.

    The rows stay in ``datasets``' Arrow table until asked for: :meth:`slice`
    converts a range of them to Python lists, column-major; :meth:`slices`
    walks them all in order, reading the table's Arrow files a record batch at
    a time into memory that is freed after each slice (a memory-mapped table
    would keep every page it touched resident); :attr:`columns` converts them
    all (few-shot pools).
    """

    index: np.ndarray  # each row's index in its split or file (for messages); also its position in `table`'s source
    table: Any  # a datasets.Dataset holding exactly the selected rows, source column names (None: `files` only)
    mapping: dict[str, str]  # new name -> source column
    convert: Callable[[str, list, np.ndarray], list] | None = None  # a field's value map, located errors
    # the Arrow stream files of the whole split, in order, and its row count (None: read through `table`)
    files: tuple[str, ...] | None = None
    total: int = 0

    @property
    def count(self) -> int:
        return len(self.index)

    def slice(self, lo: int, hi: int) -> dict[str, list[Any]]:
        """Rows ``lo:hi`` (positions in the part) as Python lists, column-major, value maps applied."""
        if self.table is None:  # only the Arrow files: read from the start
            out: dict[str, list[Any]] = {new: [] for new in self.mapping}
            for start, columns in self._stream(hi - lo if lo == 0 and hi > 0 else SLICE_ROWS):
                if start >= hi:
                    break
                for k, values in columns.items():
                    out[k].extend(values[max(lo - start, 0): hi - start])
            return out
        raw = self.table[lo:hi] if hi > lo else {c: [] for c in self.table.column_names}
        return self._mapped(raw, lo, hi)

    def _mapped(self, raw: dict[str, list], lo: int, hi: int) -> dict[str, list[Any]]:
        columns = {new: raw[old] for new, old in self.mapping.items()}
        if self.convert is not None:
            columns = {new: self.convert(new, values, self.index[lo:hi]) for new, values in columns.items()}
        return columns

    def slices(self, step: int = SLICE_ROWS) -> Iterator[tuple[int, dict[str, list[Any]]]]:
        """Every row, ``step`` at a time, in order: ``(position of the first, columns)``."""
        if self.files is None:
            for lo in range(0, self.count, step):
                yield lo, self.slice(lo, min(lo + step, self.count))
            return
        yield from self._stream(step)

    def _stream(self, step: int) -> Iterator[tuple[int, dict[str, list[Any]]]]:
        import pyarrow as pa

        assert self.files is not None
        wanted = sorted(set(self.mapping.values()))
        index = self.index  # ascending positions in the split
        pending: list[Any] = []  # Arrow record batches taken, not yet handed out
        have = done = k = base = 0

        def emit(n: int) -> dict[str, list[Any]]:
            nonlocal pending, have
            table = pa.Table.from_batches(pending)
            out, rest = table.slice(0, n), table.slice(n)
            pending, have = rest.to_batches(), have - n
            return out.to_pydict()

        for path in self.files:
            with pa.OSFile(path) as fh:
                for batch in pa.ipc.open_stream(fh):
                    n = batch.num_rows
                    upto = int(np.searchsorted(index, base + n, "left"))
                    if upto > k:
                        take = index[k:upto] - base
                        part = batch.select(wanted)
                        contiguous = int(take[-1]) - int(take[0]) == len(take) - 1
                        if contiguous:
                            pending.append(part.slice(int(take[0]), len(take)))
                        else:  # indices from a buffer: handing numpy to pyarrow would import pandas
                            take = np.ascontiguousarray(take, np.int64)
                            pending.append(part.take(pa.Array.from_buffers(pa.int64(), len(take),
                                                                           [None, pa.py_buffer(take)])))
                        have, k = have + len(take), upto
                    base += n
                    while have >= step:
                        yield done, self._mapped(emit(step), done, done + step)
                        done += step
        if base != self.total or k != len(index):
            raise AssertionError(f"the split's Arrow files hold {base} rows, not {self.total}")
        if have:
            n = have
            yield done, self._mapped(emit(n), done, done + n)

    @functools.cached_property
    def columns(self) -> dict[str, list[Any]]:
        return self.slice(0, self.count)


def _stream_files(ds: Any) -> tuple[str, ...] | None:
    """The Arrow files of a dataset as ``datasets`` loaded it (no index mapping, no feature that needs
    decoding), to be read batch by batch; None: read it through ``datasets``."""
    from datasets.features.features import require_decoding

    files = tuple(f["filename"] for f in ds.cache_files)
    if not files or ds._indices is not None or any(require_decoding(f) for f in ds.features.values()):
        return None
    return files


def source_files(loaded: LoadedRecipe, task: Task) -> dict[str, Path]:
    source = task.source
    if isinstance(source, HubSource):
        return {}
    return {split: loaded.resolve(p) for split, p in source.files().items()}


def check_files(loaded: LoadedRecipe, name: str, task: Task) -> list[Problem]:
    """Every file the task names exists and is not empty; its splits cover train/eval."""
    problems = []
    files = source_files(loaded, task)
    loc = ("tasks", name, "source", "path")
    single = not isinstance(task.source, HubSource) and isinstance(task.source.path, str)
    for split, path in files.items():
        where = loc if single else loc + (split,)
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
        for lineno, line in _text_lines(path, PEEK_ROWS):
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
        return _read_csv(path, PEEK_ROWS)[0]
    if source.kind == "parquet":
        return _parquet_columns(path)
    return None


def _text_lines(path: Path, limit: int | None = None) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 file's first ``limit`` lines; a located error at a byte that is not UTF-8.

    Lines are split on the byte ``\\n``, which no multi-byte UTF-8 character
    contains, so each line decodes alone.
    """
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if limit is not None and lineno > limit:
                return
            yield lineno, _decode(path, lineno, raw)


def _decode(path: Path, lineno: int, raw: bytes, shown: str | None = None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        col = len(raw[: exc.start].decode("utf-8", errors="replace")) + 1
        raise TunecError(Problem(
            f"not valid UTF-8: byte 0x{raw[exc.start]:02x} ({exc.reason}); save the file as UTF-8",
            shown or str(path), lineno, col)) from None


def _check_utf8(path: Path) -> None:
    """A located error at the first byte of ``path`` that is not UTF-8 (a fast pass; lines only on failure)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as fh:
            # Blocks of 64 KiB: decoded several times faster than blocks of megabytes (each block's
            # text stays in the processor's cache). ASCII is UTF-8, and telling it is faster still (while
            # no character is left open by the block before: its last bytes then need this block's).
            while block := fh.read(1 << 16):
                if not (block.isascii() and not decoder.getstate()[0]):
                    decoder.decode(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        for _ in _text_lines(path):  # raises at the line that holds the byte
            pass
        raise


def read_utf8(path: Path, shown: str | None = None) -> str:
    """A user's text file (data, a template), with a located error at a byte that is not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        start = raw.rfind(b"\n", 0, exc.start) + 1
        end = raw.find(b"\n", exc.start)
        _decode(path, raw.count(b"\n", 0, exc.start) + 1, raw[start: end + 1 if end >= 0 else len(raw)], shown)
        raise  # not reached: that line holds the bad byte


def _read_csv(path: Path, limit: int | None = None) -> tuple[list[str], int]:
    """The header and the number of records read (at most ``limit``), with located faults.

    Only what ``datasets`` would refuse too is an error here: bytes that are
    not UTF-8, and a quoted field that is never closed (it would swallow the
    rest of the file); other oddities are left to the loader.
    """
    lines = (text for _, text in _text_lines(path))
    reader = csv.reader(lines, strict=True)
    header: list[str] = []
    records = 0
    while limit is None or records <= limit:
        start = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            if "unexpected end of data" in str(exc):
                raise TunecError(Problem("malformed CSV: a quoted field that starts on this line is never "
                                         "closed (a `\"` is missing)", str(path), start)) from None
            break
        if records == 0:
            header = record
        records += 1
    return header, records


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(path).names)
    except Exception as exc:  # pyarrow says ArrowInvalid, OSError...: all mean "not a parquet file we can read"
        raise TunecError(Problem(f"not a readable parquet file: {_one_line(exc)}", str(path))) from None


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (one problem, one line)."""
    return " ".join(str(exc).split()) or type(exc).__name__


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
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as exc:
        raise TunecError(Problem(f"malformed JSON: {exc.msg}", str(path), exc.lineno, exc.colno)) from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise TunecError(Problem("a `json` source holds a list of objects", str(path), 1, 1))
    return data


def diagnose_file(kind: str, path: Path) -> None:
    """Re-read a file that ``datasets`` failed on, raising a located error if we find the fault."""
    if kind == "jsonl":
        for lineno, line in _text_lines(path):
            if line.strip():
                _parse_jsonl_line(path, lineno, line)
    elif kind == "json":
        _read_json(path)
    elif kind == "csv":
        _read_csv(path)
    elif kind == "parquet":
        _parquet_columns(path)


def fingerprint(loaded: LoadedRecipe, task: Task) -> dict[str, str]:
    """What identifies the source's content: file hashes, or hub id and revision."""
    source = task.source
    if isinstance(source, HubSource):
        return {"hub": source.id, "name": source.name or "", "revision": source.revision or ""}
    return {split: file_hash(path) for split, path in sorted(source_files(loaded, task).items())}


_HASHES: dict[tuple[str, int, int], str] = {}


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes, remembered for as long as its size and mtime stay the same (one compile
    hashes each source once, for the unit keys and the plan alike)."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _HASHES:
        _HASHES[memo] = sha256_file(path)
    return _HASHES[memo]


def part_inputs(loaded: LoadedRecipe, name: str, task: Task, part: str) -> tuple[dict, dict[str, str]]:
    """What of task ``name`` decides the rows of its ``part`` ('train' or 'eval'), for the part's cache key.

    The task's options as plain data, less what only the leakage check reads,
    less the eval selection for a train part that does not take its eval rows
    from the train split, and less file paths (their content stands in for them);
    and the content of each file the part reads: the split it selects, the
    train split when few-shot exemplars come from it, an eval file. A hub
    source is identified by id, config, revision and the loaded split's
    ``datasets`` fingerprint.
    """
    options = task.model_dump(mode="json", exclude={"leakage"})
    ev = task.eval
    if part == "train" and not isinstance(ev, FractionEval):
        options.pop("eval", None)
    options["source"].pop("path", None)
    if isinstance(ev, FileEval) and isinstance(options.get("eval"), dict):
        options["eval"].pop("file", None)
    splits = {task.train.split} if part == "train" or isinstance(ev, FractionEval) or task.few_shot else set()
    if part == "eval" and isinstance(ev, Selection):
        splits.add(ev.split)
    content: dict[str, str] = {}
    source = task.source
    if isinstance(source, HubSource):
        for split in sorted(splits):
            content[f"hub:{split}"] = str(getattr(_load(loaded, name, task, split), "_fingerprint", ""))
    else:
        files = source_files(loaded, task)
        for split in sorted(splits):
            path = files.get(split)
            # a missing file fails in load_part with its located error; no entry is ever stored under it
            content[f"split:{split}"] = file_hash(path) if path is not None and path.is_file() else "missing"
    if part == "eval" and isinstance(ev, FileEval):
        path = loaded.resolve(ev.file)
        content["eval_file"] = file_hash(path) if path.is_file() else "missing"
    return options, content


def quiet_datasets():
    """``datasets``, imported (~0.4 s the first time), its progress bars and logging off."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # our own errors say it better
    return datasets


def holdout(seed: int, task: str, count: int, fraction: float) -> np.ndarray:
    """Sorted positions (within the train selection) held out for eval: seeded, a pure function of its inputs."""
    rng = np.random.default_rng([seed, zlib.crc32(task.encode("utf-8"))])
    n_eval = min(count - 1, max(1, round(count * fraction)))
    return np.sort(rng.permutation(count)[:n_eval])


def _load(loaded: LoadedRecipe, name: str, task: Task, split: str, path: Path | None = None,
          cache: Path | None = None):
    """One split of the source (or one file read like it) as a ``datasets.Dataset``; or, for a local
    file ``datasets`` converted before (``cache``: the compile cache, which remembers where to), as
    the :class:`ArrowSplit` of its Arrow files, found without importing ``datasets``."""
    source = task.source
    if not isinstance(source, HubSource):
        if path is None and not check_files(loaded, name, task):
            path = source_files(loaded, task)[split]
        found = _find_arrow(cache, source.kind, path) if path is not None and cache is not None else None
        if found is None and path is not None:
            found = _prefetched(source.kind, path)
            if found is not None and cache is not None:
                _remember_arrow(cache, source.kind, path, found)
        if found is not None:
            return found
    datasets = quiet_datasets()
    if isinstance(source, HubSource):
        try:
            return datasets.load_dataset(source.id, source.name, revision=source.revision, split=split)
        except Exception as exc:  # network, unknown id, unknown split: all user-facing
            raise TunecError(
                loaded.problem(("tasks", name, "source", "id"),
                               f"cannot load hub dataset '{source.id}': {_one_line(exc)}")
            ) from None
    if path is None:
        problems = check_files(loaded, name, task)
        if problems:
            raise TunecError(problems)
        path = source_files(loaded, task)[split]
    builder = {"jsonl": "json"}.get(source.kind, source.kind)
    if source.kind in ("jsonl", "json", "csv"):
        # `datasets` may read bytes that are not UTF-8 without complaint and fail
        # later, far from the file, when a row is converted to Python.
        _check_utf8(path)
    if source.kind == "json":
        # `datasets` reads a bare object as one row and a list of scalars as a
        # `text` column, without complaint; a `json` source is a list of objects.
        _read_json(path)
    try:
        ds = datasets.load_dataset(builder, data_files={"rows": str(path)}, split="rows")
    except Exception as exc:
        diagnose_file(source.kind, path)
        raise TunecError(Problem(f"cannot read {source.kind} file: {_one_line(exc)}", str(path))) from None
    if cache is not None:
        files = _stream_files(ds)
        if files is not None:
            _remember_arrow(cache, source.kind, path, ArrowSplit(files, len(ds), list(ds.column_names)))
    return ds


@dataclass(frozen=True)
class ArrowSplit:
    """A local file's rows as ``datasets`` converted them once: its Arrow stream files, row count and
    columns, read again without ``datasets`` (which costs more to import than a small part to compile)."""

    files: tuple[str, ...]
    total: int
    column_names: list[str]

    def __len__(self) -> int:
        return self.total


ARROW_POINTERS = "arrow"  # the cache's folder of where `datasets` keeps each local file's rows


def _arrow_pointer(cache: Path, kind: str, path: Path) -> Path:
    from .versions import dist_version

    key = sha256_text(json.dumps({"what": "arrow-files", "format": 1, "kind": kind, "file": file_hash(path),
                                  "datasets": dist_version("datasets")}, sort_keys=True))
    return cache / ARROW_POINTERS / key[:2] / f"{key}.json"


def _find_arrow(cache: Path, kind: str, path: Path) -> ArrowSplit | None:
    """The Arrow files ``datasets`` made of a file with these bytes, when they are still as they were
    (size and modification time); None otherwise (``datasets`` loads it again)."""
    if not path.is_file():
        return None
    pointer = _arrow_pointer(cache, kind, path)
    try:
        found = _unchanged(json.loads(pointer.read_text(encoding="utf-8")))
        if found is not None:
            os.utime(pointer)  # last use, for `tunec cache prune --older-than`
        return found
    except (OSError, ValueError):
        return None


def _unchanged(data: dict) -> ArrowSplit | None:
    """The split recorded in ``data`` (a cache pointer, or the prefetch child's answer: its Arrow files,
    each with its size and modification time, its row count and columns) when every file is still as
    recorded; None otherwise, or when ``data`` is not such a record."""
    try:
        if any(_stat(f["path"]) != {"size": f["size"], "mtime_ns": f["mtime_ns"]} for f in data["files"]):
            return None
        return ArrowSplit(tuple(f["path"] for f in data["files"]), int(data["total"]), list(data["columns"]))
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _remember_arrow(cache: Path, kind: str, path: Path, split: ArrowSplit) -> None:
    try:
        stats = [os.stat(f) for f in split.files]
        pointer = _arrow_pointer(cache, kind, path)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(pointer, json.dumps({
            "files": [{"path": f, "size": st.st_size, "mtime_ns": st.st_mtime_ns} for f, st in zip(split.files, stats)],
            "total": split.total, "columns": list(split.column_names)}, sort_keys=True) + "\n")
    except OSError:
        pass  # a cache that cannot be written only costs the next compile an import


# ------------------------------------------------------- local files converted beside the compile
#
# A compile's first look at a local file goes through ``datasets`` (its import alone is ~0.5 s, more than
# reading the rows it converted before). :func:`prefetch_arrow`, called as the compile starts, has a
# child process do that (checks, import, conversion or lookup in datasets' own cache) while this process
# loads the tokenizer; :func:`_load` then reads the Arrow files the child names, without ``datasets``.
# The child's answer is only a shortcut: a file it could not read, or that changed since, is loaded here
# as before, and its error (if any) is this process's own, located as always.

_ARROW_CHILD = """
import json, sys
sys.path.pop(0)  # not the working folder: it may hold a `tunec` folder that is not the installed package
from tunec.compiler.sources import arrow_of_file
print(json.dumps([arrow_of_file(kind, path) for kind, path in json.load(sys.stdin)]))
"""

_arrows: dict[tuple[str, str], dict] = {}  # (kind, path) -> what the child found (see arrow_of_file)
_arrow_threads: dict[tuple[str, str], threading.Thread] = {}
_arrow_lock = threading.Lock()


def _stat(path: str | Path) -> dict[str, int]:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def arrow_of_file(kind: str, path: str) -> dict:
    """(In the prefetch's child) a local file read as :func:`_load` reads it: its Arrow stream files
    (each with its size and modification time), row count and columns, and the file's own size and
    modification time when read; ``{"error": ...}`` when it cannot be read that way."""
    try:
        before = _stat(path)
        if kind in ("jsonl", "json", "csv"):
            _check_utf8(Path(path))
        if kind == "json":
            _read_json(Path(path))
        datasets = quiet_datasets()
        ds = datasets.load_dataset({"jsonl": "json"}.get(kind, kind), data_files={"rows": path}, split="rows")
        files = _stream_files(ds)
        if files is None or _stat(path) != before:
            return {"error": "not streamable, or changed while read"}
        return {"source": before, "files": [{"path": f, **_stat(f)} for f in files], "total": len(ds),
                "columns": list(ds.column_names)}
    except Exception as exc:  # noqa: BLE001 - the compile reads the file itself, and says what is wrong
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def _unconverted(loaded: LoadedRecipe, cache: Path | None) -> tuple[list[tuple[str, str]], bool]:
    """The local files the recipe's stages read that neither the cache nor the prefetch knows as Arrow
    (``(kind, path)``, each once), and whether a stage reads a hub dataset."""
    recipe = loaded.recipe
    wanted: list[tuple[str, str]] = []
    hub = False
    for name in dict.fromkeys(t for s in recipe.stages for t in (*s.tasks, *s.held_out)):
        task = recipe.tasks.get(name)
        if task is None:
            continue
        if isinstance(task.source, HubSource):
            hub = True
            continue
        files = source_files(loaded, task)
        paths = [files.get(sel.split) for sel in (task.train, task.eval) if isinstance(sel, Selection)]
        if isinstance(task.eval, FileEval):
            paths.append(loaded.resolve(task.eval.file))
        for path in paths:
            try:
                if path is None or not path.is_file() or path.stat().st_size == 0:
                    continue  # the compile says what is wrong with it
                if cache is not None and _find_arrow(cache, task.source.kind, path) is not None:
                    continue
            except OSError:  # unreadable: the compile reads it itself, and says so, located
                continue
            key: tuple[str, str] = (task.source.kind, str(path))
            with _arrow_lock:  # the prefetch's thread moves its keys from one to the other when done
                prefetched = key in _arrows or key in _arrow_threads
            if key not in wanted and not prefetched:
                wanted.append(key)
    return wanted, hub


def unconverted_bytes(loaded: LoadedRecipe, cache: Path | None) -> tuple[int, bool]:
    """The bytes of the local files the recipe's stages read that neither the cache nor the prefetch
    knows as Arrow (so ``datasets`` will convert them here, and their units are new), and whether a stage
    reads a hub dataset (``datasets`` loads it)."""
    wanted, hub = _unconverted(loaded, cache)
    return sum(_size(path) for _, path in wanted), hub


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def prefetch_arrow(loaded: LoadedRecipe, cache: Path | None) -> int:
    """Start converting the local files the recipe's stages read (see above) in a child process, unless
    ``datasets`` is loaded here already (then it costs nothing here) or every file is known to the
    cache; the bytes of the files the child was given (0: none started)."""
    if "datasets" in sys.modules:
        return 0
    wanted, _ = _unconverted(loaded, cache)
    if not wanted:
        return 0
    size = sum(_size(path) for _, path in wanted)
    thread = threading.Thread(target=_run_arrow_child, args=(wanted,), name="tunec-arrow", daemon=True)
    with _arrow_lock:
        for item in wanted:
            _arrow_threads[item] = thread
    thread.start()
    return size


_arrow_children: set[subprocess.Popen] = set()


@atexit.register
def _end_arrow_children() -> None:
    """A compile that ends (an error, Ctrl-C) before its child is done ends the child too: a large file's
    conversion could otherwise go on long after."""
    for child in list(_arrow_children):
        child.kill()


def _run_arrow_child(wanted: list[tuple[str, str]]) -> None:
    try:
        child = subprocess.Popen([sys.executable, "-c", _ARROW_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        _arrow_children.add(child)
        try:
            stdout, _ = child.communicate(json.dumps(wanted))
        finally:
            _arrow_children.discard(child)
        answers = json.loads(stdout.strip().splitlines()[-1])
        found = dict(zip(wanted, answers)) if isinstance(answers, list) and len(answers) == len(wanted) else {}
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        found = {}
    with _arrow_lock:
        for key in wanted:
            _arrows[key] = found.get(key) or {"error": "no answer"}
            _arrow_threads.pop(key, None)


def _prefetched(kind: str, path: Path) -> ArrowSplit | None:
    """The Arrow files the prefetch's child found for this file (waiting for it if it is still at work),
    when the file and those files are still as the child saw them; None otherwise."""
    key = (kind, str(path))
    with _arrow_lock:
        thread = _arrow_threads.get(key)
    if thread is not None:
        thread.join()
    with _arrow_lock:
        found = _arrows.get(key)
    if found is None or "error" in found:
        return None
    try:
        if _stat(path) != found["source"]:
            return None
    except (OSError, KeyError):
        return None
    return _unchanged(found)


def load_part(loaded: LoadedRecipe, name: str, task: Task, part: str, cache: Path | None = None) -> Rows:
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
        ds = _load(loaded, name, task, "eval", path, cache)
        index = np.arange(len(ds))
        where, what = ("tasks", name, "eval"), f"eval file {path}"
    else:
        if part == "train" or isinstance(ev, FractionEval):
            sel = task.train
        else:
            assert isinstance(ev, Selection), f"task {name} has no eval part to load"  # build asks only for parts
            sel = ev
        ds = _load(loaded, name, task, sel.split, cache=cache)
        total = len(ds)
        stop = total if sel.stop is None else min(sel.stop, total)
        index = np.arange(sel.start, max(stop, sel.start))
        where = ("tasks", name, part)
        upto = "end" if sel.stop is None else sel.stop
        what = f"split '{sel.split}' has {total} rows, selected rows {sel.start}..{upto}"
        if isinstance(ev, FractionEval) and len(index):
            held = holdout(loaded.recipe.seed, name, len(index), ev.fraction)
            keep = np.zeros(len(index), dtype=bool)
            keep[held] = True
            index = index[keep] if part == "eval" else index[~keep]
    if len(index) == 0:
        raise TunecError(loaded.problem(where, f"the {part} selection is empty: {what}"))

    fields = task.fields if task.fields is not None else {c: c for c in ds.column_names}
    mapping = {new: field_column(spec) for new, spec in fields.items()}
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
    files: tuple[str, ...] | None
    if isinstance(ds, ArrowSplit):
        subset, files = None, ds.files
    else:
        subset, files = ds.select_columns(wanted), _stream_files(ds)
        if len(index) != len(ds) or (len(index) and index[0] != 0):
            subset = subset.select(index.tolist())
    maps = {new: spec for new, spec in fields.items() if isinstance(spec, FieldMap)}

    def convert(new: str, values: list, rows: np.ndarray) -> list:
        return _mapped(loaded, name, part, new, maps[new], values, rows) if new in maps else values

    return Rows(index=index.astype(np.int64), table=subset, mapping=mapping, convert=convert if maps else None,
                files=files, total=len(ds))


def _mapped(loaded: LoadedRecipe, name: str, part: str, new: str, spec: FieldMap, values: list,
            index: np.ndarray) -> list:
    """A column's values through the field's value map; a value the map lacks is an error naming its row.

    Missing values (null) stay missing, so a template that uses one still fails loudly.
    """
    out: list[Any] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        key = v if isinstance(v, (str, int)) and not isinstance(v, bool) else None
        if key is None or key not in spec.map:
            known = ", ".join(repr(k) for k in list(spec.map)[:10])
            raise TunecError(loaded.problem(
                ("tasks", name, "fields", new, "map"),
                f"{part} row {int(index[i])}: value {v!r} of column `{spec.column}` is not in the map "
                f"(it maps {known}); add it to `map`"))
        out.append(spec.map[key])
    return out
