"""The unit cache: compiled units stored by the hash of everything that can change them.

A compile unit (one task part, train or eval) is a pure function of its
inputs: the bytes of the source files it reads, the typed unit specification
(templates' texts, template policy, few-shot, answer choices, format,
truncation, seq_len, seed), the task options that select and map its rows, the
tokenizer (its JSON, chat template and special tokens) and the version of the
code that compiles it. :func:`unit_key` hashes exactly those, serialised by
:func:`plain` from the typed objects themselves (no hand-kept list of fields,
so an option added to the spec or the task is covered as soon as it exists);
only fields that locate an error message and never reach the output are left
out (:data:`LOCATION_FIELDS`).

An entry is one file, ``units/<key[:2]>/<key>``: a magic line, the sha256 of
the rest, then the unit's arrays laid out to be memory-mapped
(:mod:`.unitstore`; other entries, such as the leakage keys, hold a
safetensors blob instead). It is written atomically (temporary name, fsync,
rename), and every read checks the magic and the hash: a damaged or cut entry
is removed and rebuilt, never used. A hit touches the file, so ``tunec cache
prune --older-than`` removes what no compile has used for that long.

>>> plain({"a": (1, 2), "b": None})
{'a': [1, 2], 'b': None}
>>> parse_age("36h"), parse_age("2d"), parse_age("90s")
(129600.0, 172800.0, 90.0)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import BaseModel

from . import __version__
from .errors import TunecError
from .fileio import atomic_write_bytes, compact_json, sha256_bytes, sha256_text
from .units import UnitResult
from .unitstore import UnitWriter, open_unit
from .versions import dist_version

logger = logging.getLogger(__name__)

# Bump when the arrays a unit holds, or what they mean, change: older entries are then never read.
UNIT_FORMAT_VERSION = 2
ENV = "TUNEC_CACHE"
MAGIC = b"tunec.unit/1\n"
# Dataclass fields that only say where an error is (file, lines): they never change a unit's output,
# and an edit above a template in the recipe moves them.
LOCATION_FIELDS = frozenset({"filename", "first_line", "lines"})


def default_dir() -> Path:
    """``$TUNEC_CACHE``, else ``$XDG_CACHE_HOME/tunec``, else ``~/.cache/tunec``."""
    env = os.environ.get(ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "tunec"


def plain(obj: Any) -> Any:
    """A typed value as plain JSON data, for hashing: dataclasses field by field (less
    :data:`LOCATION_FIELDS`), pydantic models by ``model_dump``. An unknown type is an error,
    never silently left out of a key."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name not in LOCATION_FIELDS}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    raise TypeError(f"cannot put a {type(obj).__name__} in a unit key")


@functools.lru_cache(maxsize=1)
def _tokenizers_version() -> str:
    return dist_version("tokenizers")


@functools.lru_cache(maxsize=1)
def _compiler_digest() -> str:
    """sha256 of the compiler's own source files: a changed compiler (a development checkout, a
    patched install) never reuses what an older one built under the same release number."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def code_versions() -> dict[str, Any]:
    """The versions of what compiles a unit: tunec's unit format, release and compiler source, and
    the tokenizer library."""
    return {"unit_format": UNIT_FORMAT_VERSION, "tunec": __version__, "compiler": _compiler_digest(),
            "tokenizers": _tokenizers_version()}


def tokenizer_hash(info: Any) -> str:
    """sha256 of everything of the tokenizer a unit uses: its JSON, special ids, chat template (as the
    tokenizer cache stored it with the tokenizer, when it did: see :func:`remember_tokenizer_hash`)."""
    known = _TOKENIZER_HASHES.get(info)
    return known if known is not None else sha256_text(compact_json(plain(info)))


_TOKENIZER_HASHES: dict[Any, str] = {}  # TokenizerInfo -> its tokenizer_hash, for the few last read back


def remember_tokenizer_hash(info: Any, value: str) -> None:
    """``value`` is :func:`tokenizer_hash` of ``info``, computed when ``info`` was stored in the cache (the
    entry, checked against its sha256 when read, holds both): not computed again over megabytes of JSON."""
    if len(_TOKENIZER_HASHES) >= 4:
        _TOKENIZER_HASHES.pop(next(iter(_TOKENIZER_HASHES)))
    _TOKENIZER_HASHES[info] = value


def unit_key(spec: Any, task: dict, source: dict[str, str], tokenizer: Any) -> str:
    """sha256 of a unit's inputs: its spec, the task options that select its rows (``task``,
    as plain data), the content hashes of the files it reads (``source``), the tokenizer (its
    ``TokenizerInfo``, or :func:`tokenizer_hash` of it, computed once per compile), the code."""
    return sha256_text(compact_json({
        "code": code_versions(),
        "spec": plain(spec),
        "task": task,
        "source": source,
        "tokenizer": tokenizer if isinstance(tokenizer, str) else tokenizer_hash(tokenizer),
    }))


def derived_key(key: str, what: str, options: Any) -> str:
    """The key of something computed from a unit's rows under other options (the leakage keys)."""
    return sha256_text(compact_json({"unit": key, "what": what, "options": plain(options),
                                       "code": code_versions()}))


# ----------------------------------------------------------------- entries


def _encode(arrays: dict[str, np.ndarray], meta: dict) -> bytes:
    from safetensors.numpy import save

    payload = save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata={"tunec": compact_json(meta)})
    return MAGIC + sha256_bytes(payload).encode("ascii") + b"\n" + payload


def _decode(data: bytes) -> tuple[dict[str, np.ndarray], dict] | None:
    """Arrays and metadata of an entry's bytes; None when they are not a whole, intact entry."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 65:
        return None
    digest, payload = data[len(MAGIC): len(MAGIC) + 64], data[len(MAGIC) + 65:]
    if data[len(MAGIC) + 64: len(MAGIC) + 65] != b"\n" or sha256_bytes(payload).encode("ascii") != digest:
        return None
    from safetensors.numpy import load

    try:
        (n,) = struct.unpack("<Q", payload[:8])
        meta = json.loads(json.loads(payload[8: 8 + n])["__metadata__"]["tunec"])
        return load(payload), meta
    except Exception:  # the hash matched, yet it does not parse: written by something else; not used
        return None


@dataclass(frozen=True)
class CacheInfo:
    root: Path
    entries: int
    bytes: int
    oldest: float | None  # last use (mtime) of the least recently used entry
    newest: float | None


class Cache:
    """A folder of content-addressed entries (``units/``: compiled units; ``leak/``: leakage keys)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / key

    def get_arrays(self, kind: str, key: str) -> tuple[dict[str, np.ndarray], dict] | None:
        def read(path: Path) -> tuple[dict[str, np.ndarray], dict] | None:
            try:
                return _decode(path.read_bytes())
            except OSError as exc:
                logger.warning(f"cache: cannot read {path} ({exc}); rebuilding it")
                raise _Unreadable from None

        return self._read(self.path(kind, key), read)

    def _read(self, path: Path, read: Callable[[Path], Any]) -> Any:
        """``read(path)`` of an entry that is there and whole: used and touched (its last use, for
        ``prune --older-than``); None when absent or unreadable, and when damaged (removed, to be rebuilt)."""
        if not path.is_file():
            return None
        try:
            entry = read(path)
        except _Unreadable:
            return None
        if entry is None:
            _damaged(path)
            return None
        touch(path)
        return entry

    def put_arrays(self, kind: str, key: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
        path = self.path(kind, key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, _encode(arrays, meta))
        except OSError as exc:  # a full or read-only cache costs a rebuild next time, never the compile
            logger.warning(f"cache: cannot write {path} ({exc}); continuing without caching it")

    def get_unit(self, key: str) -> UnitResult | None:
        """The unit stored under ``key``, memory-mapped (:func:`.unitstore.open_unit`), after its sha256
        matched; None when absent, and when damaged (the entry is then removed, to be rebuilt)."""
        return self._read(self.path("units", key), open_unit)

    def unit_writer(self, key: str, n_templates: int, durable: bool = True) -> UnitWriter:
        """A writer that stores a unit under ``key`` a chunk at a time (:class:`.unitstore.UnitWriter`): the
        local executor's and each Ray task's. ``durable``: synced to disk when laid out (not for a compile's
        scratch folder, whose units are read once and removed with it)."""
        return UnitWriter(self.path("units", key), n_templates, durable)

    def entries(self) -> list[Path]:
        """Every entry in the folder: units, leakage keys, and what other steps keep here (lint findings
        per task, model configs, config checks, templates found clean and files' columns, the tokenizer,
        leakage reports)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.rglob("*") if p.is_file() and not p.name.startswith("."))

    def info(self) -> CacheInfo:
        stats = [p.stat() for p in self.entries()]
        times = [s.st_mtime for s in stats]
        return CacheInfo(self.root, len(stats), sum(s.st_size for s in stats),
                         min(times) if times else None, max(times) if times else None)

    def prune(self, older_than: float | None = None, now: float | None = None) -> tuple[int, int]:
        """Remove entries not used for ``older_than`` seconds (all of them when None), and the
        temporary files of writes a kill cut short; the count and bytes removed."""
        now = time.time() if now is None else now
        removed = size = 0
        for path in self.entries():
            st = path.stat()
            if older_than is None or now - st.st_mtime > older_than:
                path.unlink(missing_ok=True)
                removed, size = removed + 1, size + st.st_size
        for tmp in self.root.rglob(".*.tmp") if self.root.is_dir() else ():
            if tmp.is_file() and now - tmp.stat().st_mtime > 3600:  # an hour: no write takes that long
                tmp.unlink(missing_ok=True)
        return removed, size


class _Unreadable(Exception):
    """An entry that is there but cannot be read now (not damaged: left in place)."""


def _damaged(path: Path) -> None:
    """Remove an entry that is not whole and intact (it is rebuilt), saying so."""
    logger.warning(f"cache: entry {path} is damaged (hash mismatch or cut short); rebuilding it")
    path.unlink(missing_ok=True)


def touch(path: Path) -> None:
    """Mark an entry used now (its mtime), for ``tunec cache prune --older-than``."""
    try:
        os.utime(path)
    except OSError:
        pass


def describe(info: CacheInfo) -> list[str]:
    """``tunec cache info``'s lines."""
    def when(t: float | None) -> str:
        return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))

    return [f"cache: {info.root}", f"entries: {info.entries}", f"bytes: {info.bytes:,}",
            f"least recently used: {when(info.oldest)}", f"most recently used: {when(info.newest)}"]


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(text: str) -> float:
    """``90s``, ``30m``, ``36h``, ``7d``, ``2w`` in seconds."""
    m = _AGE.match(text)
    if m is None:
        raise TunecError(f"--older-than: '{text}' is not a duration; write a number and a unit, e.g. 7d, 12h, 30m")
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
