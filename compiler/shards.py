"""The shard format: safetensors files of fixed-length packed rows (writer and reader).

Each shard holds three ``int32`` tensors of shape ``[rows, seq_len]``:
``input_ids``, ``labels`` (-100 where no loss is taken) and ``position_ids``
(0 at the first token of every document). Shards are written to a temporary
name and renamed, so a shard that exists is complete. The reader memory-maps
the file (no copy, no pickle) and needs only numpy.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import FORMAT_VERSION
from .fileio import atomic_write_bytes, compact_json, sha256_bytes

TENSORS = ("input_ids", "labels", "position_ids")
SHARD_FORMAT = "tunec.shard"
META_KEY = "tunec"


@dataclass(frozen=True)
class WrittenShard:
    path: Path
    sha256: str
    bytes: int
    rows: int


def write_shard(path: Path, arrays: dict[str, np.ndarray], metadata: dict | None = None) -> WrittenShard:
    """Write one shard atomically (temporary name, fsync, rename) and hash it."""
    from safetensors.numpy import save

    meta = {"format": SHARD_FORMAT, "format_version": FORMAT_VERSION}
    meta.update(metadata or {})
    # One metadata key holding canonical JSON: safetensors keeps metadata in a
    # hash map whose order varies between runs, which would break byte-identical builds.
    blob = save(
        {k: np.ascontiguousarray(v) for k, v in arrays.items()},
        metadata={META_KEY: compact_json(meta)},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, blob)
    rows = int(next(iter(arrays.values())).shape[0])
    return WrittenShard(path, sha256_bytes(blob), len(blob), rows)


class ShardError(Exception):
    """A shard is missing, truncated or not a tunec shard."""


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
            header = json.loads(fh.read(n))
    except FileNotFoundError:
        raise ShardError(f"{path}: shard is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ShardError(f"{path}: corrupted safetensors header") from None
    return header, 8 + n


_DTYPES = {"I32": np.int32, "I64": np.int64, "I16": np.int16, "U8": np.uint8, "F32": np.float32}


def open_shard(path: Path, expect_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Memory-map a shard's tensors (read-only numpy arrays), checking its header and size."""
    header, start = read_header(path)
    size = path.stat().st_size
    if expect_bytes is not None and size != expect_bytes:
        raise ShardError(f"{path}: {size} bytes, the plan says {expect_bytes} (truncated or replaced)")
    try:
        meta = json.loads(header.get("__metadata__", {}).get(META_KEY, "{}"))
    except json.JSONDecodeError:
        meta = {}
    if meta.get("format") != SHARD_FORMAT:
        raise ShardError(f"{path}: not a tunec shard")
    out = {}
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        if start + hi > size:
            raise ShardError(f"{path}: tensor `{name}` runs past the end of the file (truncated)")
        dtype = _DTYPES[info["dtype"]]
        out[name] = mm[start + lo : start + hi].view(dtype).reshape(info["shape"])
    missing = [t for t in TENSORS if t not in out]
    if missing:
        raise ShardError(f"{path}: missing tensors {missing}")
    return out

