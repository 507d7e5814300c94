"""The shard format: safetensors files of fixed-length packed rows (writer and reader).

Each shard holds three ``int32`` tensors of shape ``[rows, seq_len]``:
``input_ids``, ``labels`` (-100 where no loss is taken) and ``position_ids``
(0 at the first token of every document). Shards of preference stages
(format version 2) add ``pair_ids`` and ``sides`` (see docs/build-format.md);
version-1 shards are read as before. Shards are written to a temporary
name and renamed, so a shard that exists is complete. The reader memory-maps
the file (no copy, no pickle) and needs only numpy.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import FORMAT_VERSION
from .errors import TunecError
from .fileio import compact_json

TENSORS = ("input_ids", "labels", "position_ids")
PAIR_TENSORS = ("pair_ids", "sides")
# shard format version -> the tensors a shard of that version holds (the plan has its own version)
SHARD_VERSIONS = {FORMAT_VERSION: TENSORS, 2: TENSORS + PAIR_TENSORS}
SHARD_FORMAT = "tunec.shard"
META_KEY = "tunec"


@dataclass(frozen=True)
class WrittenShard:
    path: Path
    sha256: str
    bytes: int
    rows: int


def write_shard(path: Path, arrays: dict[str, np.ndarray], metadata: dict | None = None) -> WrittenShard:
    """Write one shard atomically (temporary name, fsync, rename), hashed from memory as it is written.

    The bytes are those ``safetensors.numpy.save_file`` writes for the same arrays and metadata (the
    tests compare them), written straight from the arrays: no copy of the shard in memory, and no
    second read of the file for its sha256."""
    # version 1 unless the rows carry preference pairs, so SFT builds stay byte-identical
    version = 2 if set(PAIR_TENSORS) <= set(arrays) else FORMAT_VERSION
    meta = {"format": SHARD_FORMAT, "format_version": version}
    meta.update(metadata or {})
    # One metadata key holding canonical JSON: safetensors keeps metadata in a
    # hash map whose order varies between runs, which would break byte-identical builds.
    names = sorted(arrays)
    tensors = [np.ascontiguousarray(arrays[k]) for k in names]
    head = _header(names, tensors, {META_KEY: compact_json(meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb", buffering=0) as fh:
            for view in (memoryview(head), *(t.reshape(-1).view(np.uint8).data for t in tensors)):
                for lo in range(0, len(view), _PIECE):  # hashed while the piece is still in the CPU's cache
                    piece = view[lo:lo + _PIECE]
                    digest.update(piece)
                    while piece:  # a raw write may take less than it is given
                        piece = piece[fh.write(piece):]
            os.fsync(fh.fileno())
            size = fh.tell()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    rows = int(tensors[0].shape[0]) if tensors else 0
    return WrittenShard(path, digest.hexdigest(), size, rows)


_PIECE = 1 << 22  # bytes hashed and written at a time
_DTYPES = {np.dtype(np.int32): "I32"}  # what shards hold (safetensors' names)


def _header(names: list[str], tensors: list[np.ndarray], metadata: dict[str, str]) -> bytes:
    """The safetensors header of ``tensors`` (named ``names``, sorted), as the library writes it: the
    8-byte little-endian length, then compact JSON (metadata first, then each tensor's dtype, shape
    and data offsets in name order, which is the library's order for tensors of one dtype), padded
    with spaces to a multiple of 8 bytes."""
    entries: dict[str, object] = {"__metadata__": metadata}
    at = 0
    for name, t in zip(names, tensors):
        if t.dtype not in _DTYPES:
            raise AssertionError(f"shard tensor {name}: dtype {t.dtype} (shards hold int32)")
        entries[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + t.nbytes]}
        at += t.nbytes
    text = json.dumps(entries, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class ShardError(TunecError):
    """A shard is missing, truncated, damaged or not a tunec shard (a user-facing error: one line)."""


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors JSON header and the byte offset where tensor data starts."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ShardError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise ShardError(f"{path}: not a safetensors file (header size {n})")
            text = fh.read(n)
            header = json.loads(text)
    except FileNotFoundError:
        raise ShardError(f"{path}: shard is missing") from None
    except IsADirectoryError:
        raise ShardError(f"{path}: is a folder, not a shard") from None
    except PermissionError:
        raise ShardError(f"{path}: not readable (permission denied)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ShardError(f"{path}: corrupted safetensors header") from None
    if len(text) != n:
        raise ShardError(f"{path}: truncated safetensors header")
    if not isinstance(header, dict):
        raise ShardError(f"{path}: corrupted safetensors header (not a JSON object)")
    return header, 8 + n


_ITEM_BYTES = 4  # every tensor is int32


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _metadata(path: Path, header: dict) -> dict:
    raw = header.get("__metadata__")
    text = raw.get(META_KEY) if isinstance(raw, dict) else None
    try:
        meta = json.loads(text) if isinstance(text, str) else None
    except (json.JSONDecodeError, RecursionError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT:
        raise ShardError(f"{path}: not a tunec shard")
    if meta.get("format_version") not in SHARD_VERSIONS:
        raise ShardError(f"{path}: shard format version {meta.get('format_version')!r}, this tunec reads "
                         f"{', '.join(map(str, SHARD_VERSIONS))} (compile the recipe again)")
    return meta


def _layout(path: Path, header: dict, start: int, size: int,
            tensors: tuple[str, ...] = TENSORS) -> dict[str, tuple[int, int, tuple[int, int]]]:
    """Each tensor's (begin, end, shape), checked: int32, one shape, contiguous, exactly filling the file."""
    names = sorted(k for k in header if k != "__metadata__")
    if names != sorted(tensors):
        raise ShardError(f"{path}: tensors {names}, a tunec shard holds exactly {sorted(tensors)}")
    out = {}
    for name in names:
        info = header[name]
        if not isinstance(info, dict) or sorted(info) != ["data_offsets", "dtype", "shape"]:
            raise ShardError(f"{path}: tensor `{name}`: damaged header entry")
        shape, offsets = info["shape"], info["data_offsets"]
        if info["dtype"] != "I32":
            raise ShardError(f"{path}: tensor `{name}` has dtype {info['dtype']!r}, tunec shards hold I32")
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(d) and d >= 0 for d in shape)):
            raise ShardError(f"{path}: tensor `{name}`: damaged shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise ShardError(f"{path}: tensor `{name}`: damaged data offsets {offsets!r}")
        lo, hi = offsets
        if not 0 <= lo <= hi or hi - lo != shape[0] * shape[1] * _ITEM_BYTES:
            raise ShardError(f"{path}: tensor `{name}`: offsets {offsets} do not hold shape {shape} of int32")
        out[name] = (lo, hi, (shape[0], shape[1]))
    if len({v[2] for v in out.values()}) != 1:
        raise ShardError(f"{path}: tensors of different shapes {[list(v[2]) for v in out.values()]}")
    spans = sorted((lo, hi) for lo, hi, _ in out.values())
    if spans[0][0] != 0 or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        raise ShardError(f"{path}: tensor data offsets overlap or leave gaps")
    if start + spans[-1][1] != size:
        what = "truncated" if start + spans[-1][1] > size else "trailing bytes"
        raise ShardError(f"{path}: {size} bytes, the header describes {start + spans[-1][1]} ({what})")
    return out


def open_shard(path: Path, expect_bytes: int | None = None, seq_len: int | None = None) -> dict[str, np.ndarray]:
    """Memory-map a shard's tensors (read-only numpy arrays), checking its header and size.

    Every field of the header is checked (tensor names, dtype, shapes, offsets
    contiguous and inside the file, tunec's metadata), so a damaged file is a
    :class:`ShardError`, never a wrong array. The values are checked by
    :func:`check_values`.
    """
    path = Path(path)
    header, start = read_header(path)
    size = path.stat().st_size
    if expect_bytes is not None and size != expect_bytes:
        raise ShardError(f"{path}: {size} bytes, the plan says {expect_bytes} (truncated or replaced)")
    meta = _metadata(path, header)
    layout = _layout(path, header, start, size, SHARD_VERSIONS[meta["format_version"]])
    if seq_len is not None and next(iter(layout.values()))[2][1] != seq_len:
        raise ShardError(f"{path}: rows of {next(iter(layout.values()))[2][1]} tokens, the plan says {seq_len}")
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    return {name: mm[start + lo : start + hi].view(np.int32).reshape(shape) for name, (lo, hi, shape) in layout.items()}


def check_values(path: Path, arrays: dict[str, np.ndarray], vocab_size: int) -> None:
    """The invariants every packed row holds (see :mod:`tunec.compiler.pack`), checked in one pass.

    Token ids lie in ``[0, vocab_size)``; a label is ``-100`` or the token at its
    position (labels are not shifted); positions start at 0 in every row and
    either count up by one or restart at 0 (a new document), whose first token
    carries no label. A shard whose tensors were swapped or whose values were
    damaged fails here, before any training step.
    """
    ids, labels, pos = arrays["input_ids"], arrays["labels"], arrays["position_ids"]
    if ids.size == 0:
        return
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ShardError(f"{path}: row {row}, token {col}: id {int(ids[row, col])} outside the vocabulary "
                         f"(0..{vocab_size - 1})")
    bad = (labels != -100) & (labels != ids)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ShardError(f"{path}: row {row}, token {col}: label {int(labels[row, col])} is neither -100 nor "
                         f"the token there ({int(ids[row, col])})")
    bad = np.zeros(pos.shape, dtype=bool)
    bad[:, 0] = pos[:, 0] != 0
    bad[:, 1:] = (pos[:, 1:] != 0) & (pos[:, 1:] != pos[:, :-1] + 1)
    bad |= (pos == 0) & (labels != -100)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ShardError(f"{path}: row {row}, token {col}: position {int(pos[row, col])} breaks the "
                         "document layout (positions restart at 0, count up by one, a first token has no label)")
    if "sides" in arrays:
        _check_pairs(path, arrays)


def _check_pairs(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Version 2: sides are -1, 0 or 1; a pair id and a side hold for a whole document; labels only in pairs."""
    pair, side, pos, labels = arrays["pair_ids"], arrays["sides"], arrays["position_ids"], arrays["labels"]
    bad = (side < -1) | (side > 1) | ((side == -1) != (pair == -1)) | ((side == -1) & (labels != -100))
    same = np.zeros(pos.shape, dtype=bool)
    same[:, 1:] = (pos[:, 1:] != 0) & ((pair[:, 1:] != pair[:, :-1]) | (side[:, 1:] != side[:, :-1]))
    bad |= same
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ShardError(f"{path}: row {row}, token {col}: pair id {int(pair[row, col])}, side {int(side[row, col])} "
                         "break the pair layout (sides -1, 0 or 1, one pair id and side per document, labels only "
                         "inside pairs)")
