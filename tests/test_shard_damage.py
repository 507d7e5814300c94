"""Damaged shards are refused with one ShardError, never a traceback or a silently wrong array.

Every single-bit flip of a real shard's header is tried: each one either gives a
``ShardError`` from ``open_shard``/``check_values`` or leaves the arrays exactly
as written (a flip in a metadata value nothing reads).
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from tunec.compiler.pack import Docs, best_fit_decreasing, build_rows
from tunec.compiler.shards import ShardError, check_values, open_shard, write_shard

VOCAB = 50


def packed(seq_len=8):
    """Three documents packed the way the compiler packs them (first token of each untrained)."""
    ids = np.array([5, 6, 7, 8, 9, 10, 11, 12, 13], dtype=np.int32)
    labels = np.array([-100, 6, 7, -100, 9, -100, 11, 12, 13], dtype=np.int32)
    docs = Docs(ids=ids, offsets=np.array([0, 3, 5, 9]), labels=labels)
    return build_rows(docs, best_fit_decreasing(docs.lengths, seq_len), seq_len, pad_id=0)


def write(tmp_path, arrays=None):
    path = tmp_path / "s.safetensors"
    write_shard(path, packed() if arrays is None else arrays, {"stage": "sft", "seq_len": 8})
    return path


def test_a_packed_shard_passes_every_check(tmp_path):
    path = write(tmp_path)
    arrays = open_shard(path, path.stat().st_size, seq_len=8)
    check_values(path, arrays, VOCAB)
    with pytest.raises(ShardError, match="rows of 8 tokens, the plan says 16"):
        open_shard(path, seq_len=16)


def test_every_single_bit_flip_of_the_header_is_refused_or_harmless(tmp_path):
    path = write(tmp_path)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    original = {k: np.array(v) for k, v in open_shard(path).items()}
    refused = harmless = 0
    for byte in range(8 + n):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[byte] ^= 1 << bit
            path.write_bytes(bytes(damaged))
            try:
                arrays = open_shard(path, len(data), seq_len=8)
                check_values(path, arrays, VOCAB)
            except ShardError:
                refused += 1
                continue
            assert all(np.array_equal(arrays[k], original[k]) for k in original), (byte, bit)
            harmless += 1
    print(f"{refused} refused, {harmless} harmless of {(8 + n) * 8} flips")
    assert refused + harmless == (8 + n) * 8 and refused > harmless


def _header(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _rewrite(path, header, body):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def test_labels_and_positions_swapped_in_a_valid_header_are_caught(tmp_path):
    path = write(tmp_path)
    header, body = _header(path)
    header["labels"]["data_offsets"], header["position_ids"]["data_offsets"] = (
        header["position_ids"]["data_offsets"], header["labels"]["data_offsets"])
    _rewrite(path, header, body)
    arrays = open_shard(path)  # the header itself is consistent
    with pytest.raises(ShardError, match="label"):
        check_values(path, arrays, VOCAB)


@pytest.mark.parametrize("change, message", [
    (lambda h: h["labels"].update(dtype="I64"), "dtype 'I64'"),
    (lambda h: h["labels"].update(shape=[80, 65]), "do not hold shape"),
    (lambda h: h["labels"].update(shape=["2", 8]), "damaged shape"),
    (lambda h: h["labels"].update(data_offsets=[0, -4]), "do not hold"),
    (lambda h: h.pop("position_ids"), "holds exactly"),
    (lambda h: h.update(extra=h["labels"]), "holds exactly"),
    (lambda h: h["labels"].pop("dtype"), "damaged header entry"),
    (lambda h: h.update(__metadata__={"tunec": "{\"format\": \"tunec.shard\", \"format_version\": 99}"}),
     "format version 99"),
    (lambda h: h.update(__metadata__=[]), "not a tunec shard"),
], ids=["dtype", "shape", "shape-type", "offsets", "missing", "extra", "entry", "version", "metadata"])
def test_damaged_headers_name_what_is_wrong(tmp_path, change, message):
    path = write(tmp_path)
    header, body = _header(path)
    change(header)
    _rewrite(path, header, body)
    with pytest.raises(ShardError, match=message):
        open_shard(path)


def test_overlapping_offsets_and_trailing_bytes_are_refused(tmp_path):
    path = write(tmp_path)
    header, body = _header(path)
    header["labels"]["data_offsets"] = header["input_ids"]["data_offsets"]
    _rewrite(path, header, body)
    with pytest.raises(ShardError, match="overlap or leave gaps"):
        open_shard(path)
    path = write(tmp_path)
    path.write_bytes(path.read_bytes() + b"\0\0\0\0")
    with pytest.raises(ShardError, match="trailing bytes"):
        open_shard(path)


@pytest.mark.parametrize("tensor, at, value, message", [
    ("input_ids", (0, 1), VOCAB, "outside the vocabulary"),
    ("input_ids", (1, 0), -3, "outside the vocabulary"),
    ("labels", (0, 2), 3, "neither -100 nor the token"),
    ("position_ids", (0, 2), 5, "breaks the document layout"),
    ("position_ids", (1, 0), 1, "breaks the document layout"),
])
def test_damaged_values_are_caught(tmp_path, tensor, at, value, message):
    arrays = {k: v.copy() for k, v in packed().items()}
    arrays[tensor][at] = value
    path = write(tmp_path, arrays)
    with pytest.raises(ShardError, match=message):
        check_values(path, open_shard(path), VOCAB)


def test_a_label_on_a_documents_first_token_is_caught(tmp_path):
    arrays = {k: v.copy() for k, v in packed().items()}
    row, col = np.argwhere(arrays["position_ids"] == 0)[1]
    arrays["labels"][row, col] = arrays["input_ids"][row, col]
    path = write(tmp_path, arrays)
    with pytest.raises(ShardError, match="first token has no label"):
        check_values(path, open_shard(path), VOCAB)


# ----------------------------------------------------------------- through the CLI


def test_inspect_show_on_damaged_builds_says_one_line(tmp_path):
    import shutil
    from pathlib import Path

    from click.testing import CliRunner

    from tunec.cli import main

    demo = Path(__file__).resolve().parents[1] / "recipes" / "demo" / "demo.yaml"
    out = tmp_path / "out"
    runner = CliRunner()
    assert runner.invoke(main, ["compile", str(demo), "-o", str(out), "-j", "1"]).exit_code == 0
    plan = json.loads((out / "plan.json").read_text())
    shard = out / plan["stages"][0]["train"]["shards"][0]["path"]
    data = bytearray(shard.read_bytes())

    (n,) = struct.unpack("<Q", bytes(data[:8]))
    damaged = bytearray(data)
    damaged[8 + n + 4 * 3] = 0xFF  # a token id far outside the vocabulary, header intact
    damaged[8 + n + 4 * 3 + 3] = 0x7F
    shard.write_bytes(bytes(damaged))
    result = runner.invoke(main, ["inspect", str(out), "--show", "1", "--no-color"])
    assert result.exit_code == 1 and "outside the vocabulary" in result.output, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in result.output and len(errors) == 1 and result.output.strip().endswith(errors[0][-40:])

    shard.write_bytes(bytes(data))
    shutil.rmtree(out / plan["tokenizer"]["path"])
    result = runner.invoke(main, ["inspect", str(out), "--show", "1", "--no-color"])
    assert result.exit_code == 1 and "tokenizer folder is missing" in result.output, result.output
    assert "hub" not in result.output.lower()


def test_a_plan_that_is_not_utf8_is_one_line(tmp_path):
    from click.testing import CliRunner

    from tunec.cli import main

    (tmp_path / "plan.json").write_bytes(b'{"format": "tunec.plan", "x": "\xff\xfe"}')
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 1 and "plan.json: corrupted plan: not UTF-8" in result.output, result.output
