"""Atomic writes, content hashes and canonical JSON: the one place tunec does these.

Every file tunec writes that another command reads back (plans, manifests,
shards, choices files, results, checkpoint state) goes through
:func:`atomic_write_bytes` or :func:`atomic_dir`: the content is written under a
hidden temporary name, flushed to disk, and renamed over the final name, so a
reader sees either the old file or the whole new one, never half of it.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> atomic_write_json(d / "a.json", {"b": 1, "a": [1, 2]})
>>> (d / "a.json").read_text()
'{\\n  "a": [\\n    1,\\n    2\\n  ],\\n  "b": 1\\n}\\n'
>>> sha256_text("abc")[:16]
'ba7816bf8f01cfea'
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar


def canonical_json(data: Any) -> str:
    """Sorted keys, two-space indent, UTF-8 kept, one trailing newline: stable bytes for hashing.

    NaN and infinity are refused: they are not JSON, and other tools could not read the file.
    """
    return json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def compact_json(data: Any) -> str:
    """Sorted keys, no spaces: one JSON value per line in ``*.jsonl`` files and shard headers."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def sha256_folder(folder: Path) -> str:
    """sha256 over the (sorted) relative names and contents of every file under ``folder``."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def _tmp_name(path: Path) -> Path:
    # Hidden and unique per process, so two writers never share a temporary file.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is never seen half-written."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, canonical_json(data))


def atomic_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary folder with ``write(tmp)``, then put it at ``final`` (replacing what was there).

    The old folder is moved aside before the rename and removed after it, so a
    crash leaves either the old folder or the new one at ``final``.
    """
    final = Path(final)
    tmp = _tmp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.{os.getpid()}.old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


T = TypeVar("T")


def on_two_threads(items: Sequence[T], work: Callable[[T], None], name: str = "tunec-io") -> None:
    """``work(item)`` for every item, half of them (every other one) on a second thread: for work
    that lets go of the GIL (hashing, reading files), which then takes about half the time on two
    cores. An exception from either half is raised here once both halves are done."""
    failed: list[BaseException] = []

    def run(part: Sequence[T]) -> None:
        try:
            for item in part:
                work(item)
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread below
            failed.append(exc)

    other = threading.Thread(target=run, args=(items[1::2],), name=name)
    other.start()
    try:
        run(items[::2])
    finally:
        other.join()
    if failed:
        raise failed[0]

