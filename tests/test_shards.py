"""The shard format: atomic writes, memory-mapped reads, and refusals of damaged files."""

from __future__ import annotations

import numpy as np
import pytest

from tunec.compiler.fileio import sha256_file
from tunec.compiler.shards import ShardError, open_shard, write_shard


def arrays(rows=3, seq_len=8):
    ids = np.arange(rows * seq_len, dtype=np.int32).reshape(rows, seq_len)
    return {"input_ids": ids, "labels": ids.copy(), "position_ids": np.zeros_like(ids)}


def test_round_trip_is_memory_mapped_and_hashed(tmp_path):
    path = tmp_path / "s" / "00000.safetensors"
    written = write_shard(path, arrays(), {"stage": "x"})
    assert written.rows == 3 and written.bytes == path.stat().st_size
    assert written.sha256 == sha256_file(path)
    assert not list(path.parent.glob(".*.tmp"))  # the temporary name is gone
    back = open_shard(path, written.bytes)
    assert isinstance(back["input_ids"], np.memmap) or isinstance(back["input_ids"].base, np.memmap)
    for k, v in arrays().items():
        assert np.array_equal(back[k], v) and back[k].dtype == np.int32


def test_same_arrays_give_the_same_bytes(tmp_path):
    a = write_shard(tmp_path / "a.safetensors", arrays(), {"stage": "x", "seq_len": 8})
    b = write_shard(tmp_path / "b.safetensors", arrays(), {"seq_len": 8, "stage": "x"})
    assert a.sha256 == b.sha256


def test_damaged_shards_are_refused(tmp_path):
    path = tmp_path / "s.safetensors"
    written = write_shard(path, arrays())
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ShardError, match="bytes, the plan says"):
        open_shard(path, written.bytes)
    with pytest.raises(ShardError, match="truncated"):
        open_shard(path)
    path.write_bytes(b"\x05\x00")
    with pytest.raises(ShardError, match="too short"):
        open_shard(path)
    with pytest.raises(ShardError, match="missing"):
        open_shard(tmp_path / "nope.safetensors")

    from safetensors.numpy import save_file

    save_file(arrays(), str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ShardError, match="not a tunec shard"):
        open_shard(tmp_path / "foreign.safetensors")


@pytest.mark.parametrize("stage", ["sft", 'quote " back \\ slash /', "üñí 中文 😀", "ctl \x01\x1f\x7f \b\f\n\r\t",
                                   "\u2028\u2029 <>&'"])
@pytest.mark.parametrize("rows", [0, 1, 3])
def test_the_bytes_are_those_the_safetensors_library_writes(tmp_path, stage, rows):
    """The writer is tunec's own (written from memory, hashed as it goes); the file must not differ by a
    byte from the library's for the same arrays and metadata, pair tensors included, any stage name."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from tunec.compiler.fileio import compact_json
    from tunec.compiler.shards import META_KEY, SHARD_FORMAT

    packed = arrays(rows, 5)
    packed.update(pair_ids=np.full((rows, 5), -1, np.int32), sides=np.ones((rows, 5), np.int32))
    metadata = {"stage": stage, "seq_len": 5}
    ours = write_shard(tmp_path / "ours.safetensors", packed, metadata)
    meta = {"format": SHARD_FORMAT, "format_version": 2, **metadata}
    save_file(packed, str(tmp_path / "lib.safetensors"), metadata={META_KEY: compact_json(meta)})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()
    assert ours.sha256 == sha256_file(tmp_path / "ours.safetensors") and ours.rows == rows
    with safe_open(str(tmp_path / "ours.safetensors"), "numpy") as f:
        assert sorted(f.keys()) == sorted(packed) and all(np.array_equal(f.get_tensor(k), v) for k, v in packed.items())


def test_a_shard_of_another_dtype_is_refused_before_anything_is_written(tmp_path):
    bad = {"input_ids": np.zeros((2, 4), np.int64)}
    with pytest.raises(AssertionError, match="int64"):
        write_shard(tmp_path / "s.safetensors", bad)
    assert not list(tmp_path.iterdir())
