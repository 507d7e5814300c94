"""Compiled units on disk: written a chunk at a time, read back memory-mapped.

A unit's token arrays (``ids`` and ``sft_labels``) grow with its data, so a
compile never holds them whole: :class:`UnitWriter` appends each chunk's
arrays to temporary files as the chunk arrives, then lays the unit out as one
file, and :func:`open_unit` maps that file back, its arrays views of the
mapping. The linker reads the documents a shard needs through the views and
calls :func:`release` after each shard, which hands the mapped pages back to
the page cache: the compile's resident memory stays at what one chunk and one
shard need, whatever the size of the data.

The file (``unit format 3``)::

    tunec.unit/3\\n
    <sha256 hex of the header block, then of each array's own sha256 (32 bytes), in name order>\\n
    <header block: 8-byte little-endian length H, then H bytes of JSON: every array's dtype,
    shape and offset in the file; the unit's other fields>
    <the arrays, in name order, each starting at a multiple of 64 bytes in the file, zero-padded between>

Each array is hashed as its chunks are appended, so laying the file out is a copy
the kernel makes (``copy_file_range``), not a read, hash and write of every byte.
Written under a temporary name and renamed when whole (fsync first); read only
after its digest matched (every array hashed again, streamed in blocks: hashing
maps nothing).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
import struct
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .units import UnitResult

MAGIC = b"tunec.unit/3\n"
ALIGN = 64
BLOCK = 1 << 22  # bytes copied or hashed at a time
_PREFIX = len(MAGIC) + 65  # magic, digest, newline


class UnitWriter:
    """One unit's chunks, in order, into a unit file at ``path`` (see the module's docstring).

    Every array of each chunk is appended to a temporary file beside ``path``
    as the chunk comes (offsets and spans rebased to the whole unit),
    so a writer holds only counts and, for eval units, the answer-choice records.
    :meth:`finish` lays the file out; :meth:`abort` removes what was written.
    """

    def __init__(self, path: Path, n_templates: int, durable: bool = True):
        self.path = Path(path)
        self.n_templates = n_templates
        self.durable = durable  # synced to disk before the rename (a scratch unit, read once and removed: not)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._streams: dict[str, _Stream] = {}
        self._tokens = self._docs = self._chunks = 0
        self._failed = False  # any chunk with mask audit failures (`audit: warn`)
        self._first: UnitResult | None = None
        self._skipped: np.ndarray | None = None
        self._counts = {"truncated": 0, "dropped": 0, "straddles": 0}
        self._spaced: list[dict] = []
        self._checks: list[dict] = []
        self._choices: list | None = None
        self._example: str | None = None

    def _put(self, name: str, array: np.ndarray) -> None:
        stream = self._streams.get(name)
        if stream is None:
            p = self.path.with_name(f".{self.path.name}.{os.getpid()}.{name}.tmp")
            stream = self._streams[name] = _Stream(p, open(p, "wb"), array.dtype, array.shape[1:])
        if array.dtype != stream.dtype or array.shape[1:] != stream.tail:
            raise AssertionError(f"unit array {name}: a chunk of {array.dtype}{array.shape}, not {stream.dtype}")
        data = np.ascontiguousarray(array).tobytes()
        stream.fh.write(data)
        stream.sha256.update(data)
        stream.count += len(array)

    def add(self, r: UnitResult) -> None:
        """Append one chunk's result (chunks in order)."""
        if self._first is None:
            self._first = r
            self._choices = None if r.choices is None else []
            self._put("offsets", np.zeros(1, np.int64))
        elif (r.side is None) != (self._first.side is None) or (r.choices is None) != (self._choices is None):
            raise AssertionError("every chunk of a unit has pair sides and answer choices, or none has")
        docs = r.docs
        self._put("ids", r.ids)
        self._put("sft_labels", r.sft_labels)
        self._put("offsets", r.offsets[1:] + self._tokens)
        spans = r.spans.astype(np.int32).reshape(-1, 3)
        spans[:, 0] += self._docs
        self._put("spans", spans)
        for name in ("template", "row", "shots", "sft_trained"):
            self._put(name, getattr(r, name))
        self._put("cut", r.cut if r.cut is not None else np.zeros(docs, bool))
        if r.side is not None:
            self._put("side", r.side)
        self._put("audit_failed", r.audit_failed if r.audit_failed is not None else np.zeros(docs, bool))
        self._failed |= r.audit_failed is not None
        self._skipped = r.skipped.copy() if self._skipped is None else self._skipped + r.skipped
        for k in self._counts:
            self._counts[k] += getattr(r, k)
        self._spaced.append(r.spaced)
        self._checks.append(r.checks)
        if self._choices is not None and r.choices is not None:
            self._choices.extend(r.choices)
        self._example = self._example or r.audit_example
        self._tokens += int(r.offsets[-1])
        self._docs += docs
        self._chunks += 1

    def finish(self) -> None:
        """Lay the unit out at ``path`` (atomically); the temporary files are removed."""
        try:
            for stream in self._streams.values():
                stream.fh.close()
            if self._first is None:
                empty = np.zeros(0, np.int32)
                arrays, values = split_fields(UnitResult(
                    empty, np.zeros(1, np.int64), np.zeros((0, 3), np.int32), np.zeros(0, np.int16), empty,
                    np.zeros(max(self.n_templates, 1), np.int64), np.zeros(0, np.int16), empty, np.zeros(0, np.int64)))
                streamed = {}
            else:
                assert self._skipped is not None
                arrays = {"skipped": self._skipped}
                values = {"truncated": self._counts["truncated"], "dropped": self._counts["dropped"],
                          "straddles": self._counts["straddles"], "choices": _enc(self._choices),
                          "spaced": _enc(_summed(self._spaced)), "group": self._first.group,
                          "checks": _enc(_summed(self._checks)), "audit_example": self._example}
                streamed = {n: s for n, s in self._streams.items() if n != "audit_failed" or self._failed}
                for name in ("side", "audit_failed"):  # None unless a chunk had them
                    if name not in streamed:
                        values[name] = None
            _write(self._tmp, arrays, values, streamed, self.durable)
            os.replace(self._tmp, self.path)
        finally:
            self.abort()

    def abort(self) -> None:
        for stream in self._streams.values():
            stream.fh.close()
            stream.path.unlink(missing_ok=True)
        self._tmp.unlink(missing_ok=True)


@dataclass
class _Stream:
    """One array of a unit being written: its temporary file, dtype, shape past the first axis, length."""

    path: Path
    fh: BinaryIO
    dtype: np.dtype
    tail: tuple
    count: int = 0
    sha256: Any = dataclasses.field(default_factory=hashlib.sha256)  # of the bytes written so far


def split_fields(unit: UnitResult) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A unit's numpy arrays, and its other fields encoded as JSON (field by field from the dataclass,
    so a field added to ``UnitResult`` is stored too)."""
    arrays, values = {}, {}
    for f in dataclasses.fields(unit):
        v = getattr(unit, f.name)
        if isinstance(v, np.ndarray):
            arrays[f.name] = v
        else:
            values[f.name] = _enc(v)
    return arrays, values


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _write(tmp: Path, arrays: dict[str, np.ndarray], values: dict[str, Any], streamed: dict[str, "_Stream"],
           sync: bool = True) -> None:
    """The unit file at ``tmp``: ``arrays`` from memory, ``streamed`` ones copied from their files; synced to
    disk (``sync``) before it is renamed into place."""
    arrays = {k: v for k, v in arrays.items() if k not in streamed}
    names = sorted([*arrays, *streamed])
    layout: dict[str, dict[str, Any]] = {}
    for name in names:
        if name in streamed:
            st = streamed[name]
            shape = [st.count, *st.tail]
            layout[name] = {"dtype": st.dtype.str, "shape": shape, "nbytes": int(np.prod(shape)) * st.dtype.itemsize}
        else:
            a = arrays[name]
            layout[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "nbytes": a.nbytes}
    # the header's length decides where the data starts, and the offsets are in the header: grow until stable
    width = 0
    while True:
        at = _align(_PREFIX + 8 + width)
        for name in names:
            layout[name]["offset"] = at
            at = _align(at + layout[name]["nbytes"])
        header = json.dumps({"arrays": layout, "fields": values}, sort_keys=True, separators=(",", ":"))
        raw = header.encode("utf-8")
        if len(raw) <= width:
            raw = raw + b" " * (width - len(raw))
            break
        width = _align(len(raw) + 32)
    block = struct.pack("<Q", len(raw)) + raw
    digests = {name: streamed[name].sha256.digest() if name in streamed
               else hashlib.sha256(np.ascontiguousarray(arrays[name]).tobytes()).digest() for name in names}
    with open(tmp, "wb", buffering=0) as fh:  # unbuffered: the copies below write at the file's offset
        _write_all(fh, MAGIC + _digest(block, [digests[n] for n in names]).encode("ascii") + b"\n" + block)
        pos = _PREFIX + len(block)
        for name in names:
            start = layout[name]["offset"]
            _write_all(fh, b"\0" * (start - pos))
            if name in streamed:
                _copy(streamed[name].path, fh, layout[name]["nbytes"])
            else:
                _write_all(fh, np.ascontiguousarray(arrays[name]).tobytes())
            pos = start + layout[name]["nbytes"]
        _write_all(fh, b"\0" * (_align(pos) - pos))
        if sync:
            os.fsync(fh.fileno())


def _digest(block: bytes, arrays: list[bytes]) -> str:
    """A unit file's digest: sha256 of its header block, then of its arrays' sha256 digests in order."""
    h = hashlib.sha256(block)
    for d in arrays:
        h.update(d)
    return h.hexdigest()


def _copy(src: Path, dst: Any, nbytes: int) -> None:
    """Append the ``nbytes`` bytes of file ``src`` to the unbuffered file ``dst``: in the kernel when it
    can (``copy_file_range``), else read and written in blocks."""
    with open(src, "rb", buffering=0) as fh:
        done = 0
        if hasattr(os, "copy_file_range"):
            try:
                while done < nbytes:
                    n = os.copy_file_range(fh.fileno(), dst.fileno(), nbytes - done)
                    if n == 0:
                        break
                    done += n
            except OSError:  # not on this filesystem or kernel: the plain copy below, from where it stopped
                pass
        fh.seek(done)
        while done < nbytes:
            data = fh.read(min(BLOCK, nbytes - done))
            if not data:
                raise OSError(f"{src}: shorter than the {nbytes} bytes written to it")
            _write_all(dst, data)
            done += len(data)


def _write_all(fh: Any, data: bytes) -> None:
    """``data`` written whole to the unbuffered file ``fh`` (a write may take only part of it)."""
    view = memoryview(data)
    while view:
        view = view[fh.write(view):]


def open_unit(path: Path, verify: bool = True) -> UnitResult | None:
    """The unit in ``path``, its arrays views of a read-only mapping of the file; None when the file is
    not a whole, intact unit of this format (its sha256 is checked first, unless ``verify`` is False:
    a file this process just wrote)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_PREFIX + 8)
            if len(head) < _PREFIX + 8 or not head.startswith(MAGIC) or head[_PREFIX - 1:_PREFIX] != b"\n":
                return None
            digest = head[len(MAGIC):_PREFIX - 1].decode("ascii", "replace")
            (n,) = struct.unpack("<Q", head[_PREFIX:])
            size = os.fstat(fh.fileno()).st_size
            if n > size:
                return None
            raw = fh.read(n)
            header = json.loads(raw)
            if verify and not _intact(fh, head[_PREFIX:] + raw, header, digest, size):
                return None
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    except (OSError, ValueError, UnicodeDecodeError, struct.error, RecursionError):
        return None
    try:
        layout, values = header["arrays"], header["fields"]
        names = {f.name for f in dataclasses.fields(UnitResult)}
        if set(layout) | set(values) != names or set(layout) & set(values):
            return None
        fields: dict[str, Any] = {k: _dec(v) for k, v in values.items()}
        for name, a in layout.items():
            dtype, shape = np.dtype(a["dtype"]), tuple(a["shape"])
            count = int(np.prod(shape)) if shape else 1
            if a["offset"] + count * dtype.itemsize > size:
                return None
            if count == 0 or mapped is None:
                fields[name] = np.zeros(shape, dtype)
                fields[name].flags.writeable = False  # as a mapped one is
            else:
                fields[name] = np.frombuffer(mapped, dtype, count, a["offset"]).reshape(shape)
        unit = UnitResult(**fields)
        unit._stored = _Stored(Path(path), {k: int(a["offset"]) for k, a in layout.items()})  # type: ignore[attr-defined]
        return unit
    except (KeyError, TypeError, ValueError):
        return None


def _intact(fh: BinaryIO, block: bytes, header: Any, digest: str, size: int) -> bool:
    """Whether the file is whole and hashes to its ``digest`` (see :func:`_digest`): its arrays where the
    header puts them, nothing but zeros between and after them, up to the file's aligned end."""
    try:
        layout = header["arrays"]
        regions = sorted((int(a["offset"]), int(a["nbytes"]), name) for name, a in layout.items())
    except (KeyError, TypeError, ValueError, AttributeError):
        return False
    digests: dict[str, bytes] = {}
    pos = _PREFIX + len(block)
    for at, nbytes, name in regions:
        if at < pos or nbytes < 0 or (at - pos and fh.read(at - pos) != b"\0" * (at - pos)):
            return False  # overlapping, or something other than padding between two arrays
        h = hashlib.sha256()
        left = nbytes
        while left:
            data = fh.read(min(BLOCK, left))
            if not data:
                return False
            h.update(data)
            left -= len(data)
        digests[name] = h.digest()
        pos = at + nbytes
    tail = _align(pos) - pos
    if size != pos + tail or fh.read(tail) != b"\0" * tail:
        return False
    return _digest(block, [digests[n] for n in sorted(digests)]) == digest


@dataclass
class _Stored:
    """Where a unit read by :func:`open_unit` lies: its file and each array's byte offset in it."""

    path: Path
    at: dict[str, int]
    fd: int | None = None


def take_tokens(unit: UnitResult, name: str, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Tokens ``starts[i] : starts[i] + lengths[i]`` of the unit's per-token array ``name`` (``ids`` or
    ``sft_labels``), one range after the other.

    A unit read from its file is read with ``pread``, not through its mapping: the kernel maps many
    pages around each one touched, so gathering scattered documents through the mapping would make
    the whole file resident; a read costs a system call per document and keeps only what was read.
    """
    total = int(lengths.sum())
    stored: _Stored | None = getattr(unit, "_stored", None)
    if stored is None:  # a unit in memory
        src = np.repeat(starts, lengths) + (np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths))
        return np.asarray(getattr(unit, name)[src], np.int32)
    if stored.fd is None:
        stored.fd = os.open(stored.path, os.O_RDONLY)
        weakref.finalize(stored, os.close, stored.fd)
    out = np.empty(total, np.int32)
    view = out.data.cast("B")
    base, fd, pos = stored.at[name], stored.fd, 0
    for start, n in zip(starts.tolist(), lengths.tolist()):
        if n:
            data = os.pread(fd, n * 4, base + start * 4)
            if len(data) != n * 4:
                raise OSError(f"{stored.path}: cut short while it was being read")
            view[pos:pos + n * 4] = data
            pos += n * 4
    return out


def release(*units: UnitResult) -> None:
    """Hand the pages of the units' mapped files that this process touched back to the page cache
    (they are read again from there when next used): resident memory stays bounded by what one step
    of the linker reads."""
    for unit in units:
        seen: set[int] = set()
        for f in dataclasses.fields(unit):
            base = getattr(unit, f.name)
            while isinstance(base, np.ndarray):
                base = base.base
            if isinstance(base, memoryview):
                base = base.obj
            if isinstance(base, mmap.mmap) and id(base) not in seen and hasattr(mmap, "MADV_DONTNEED"):
                seen.add(id(base))
                try:
                    base.madvise(mmap.MADV_DONTNEED)
                except (OSError, ValueError):
                    pass  # a closed or unusual mapping: its pages stay until it is unmapped


# ----------------------------------------------------------------- non-array fields as JSON


def _exact(value: Any) -> bool:
    """Whether JSON gives ``value`` back as it is (no tuple, no dict key that is not a string)."""
    if value is None or isinstance(value, (bool, str, int, float)):
        return type(value) in (bool, str, int, float, type(None))
    if isinstance(value, list):
        return all(_exact(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _exact(v) for k, v in value.items())
    return False


def _enc(value: Any) -> Any:
    """A unit's non-array value as JSON that decodes to the same types (int dict keys stay ints); a
    list that JSON gives back as it is (the answer-choice records) goes as it is, read back at once."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, list) and _exact(value):
        return {"j": value}
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, dict):
        return {"d": [[_enc(k), _enc(v)] for k, v in value.items()]}
    if isinstance(value, list):
        return {"l": [_enc(v) for v in value]}
    if isinstance(value, tuple):
        return {"t": [_enc(v) for v in value]}
    raise TypeError(f"cannot store a {type(value).__name__} in a unit entry")


def _dec(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    (tag, items), = value.items()
    if tag == "j":
        return items
    if tag == "d":
        return {_dec(k): _dec(v) for k, v in items}
    return [_dec(v) for v in items] if tag == "l" else tuple(_dec(v) for v in items)


def _summed(counts: list[dict]) -> dict:
    """Per-key sums of count dictionaries, keys sorted."""
    out: dict = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))
