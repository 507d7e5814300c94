"""Units on disk (compiler/unitstore.py), rows streamed out of Arrow (compiler/sources.py), and the linker
gathering a stage's documents from stored units (compiler/link.py): each equals the in-memory way."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tunec.compiler.link import Selected
from tunec.compiler.pack import IGNORE, Docs, build_rows, doc_labels
from tunec.compiler.sources import Rows
from tunec.compiler.units import UnitResult
from tunec.compiler.unitstore import UnitWriter, open_unit, take_tokens


def summed(counts: list[dict]) -> dict:
    out: dict = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


def join(results: list[UnitResult], n_templates: int) -> UnitResult:
    """The chunks of one unit concatenated in memory: what the writer must store, computed apart from it."""
    if not results:
        empty = np.zeros(0, dtype=np.int32)
        return UnitResult(empty, np.zeros(1, dtype=np.int64), np.zeros((0, 3), np.int32),
                          np.zeros(0, np.int16), empty.copy(), np.zeros(max(n_templates, 1), np.int64),
                          np.zeros(0, np.int16), empty.copy(), np.zeros(0, np.int64))
    ids = np.concatenate([r.ids for r in results])
    offsets, spans, base_tok, base_doc = [np.zeros(1, np.int64)], [], 0, 0
    for r in results:
        offsets.append(r.offsets[1:] + base_tok)
        s = r.spans.copy()
        s[:, 0] += base_doc
        spans.append(s)
        base_tok += int(r.offsets[-1])
        base_doc += r.docs
    choices: list[dict | None] | None = None
    if results[0].choices is not None:
        choices = []
        for r in results:
            assert r.choices is not None, "every chunk of a unit records choices, or none does"
            choices.extend(r.choices)
    return UnitResult(
        ids=ids,
        offsets=np.concatenate(offsets),
        spans=np.concatenate(spans).astype(np.int32),
        template=np.concatenate([r.template for r in results]),
        row=np.concatenate([r.row for r in results]),
        skipped=np.sum([r.skipped for r in results], axis=0),
        shots=np.concatenate([r.shots for r in results]),
        sft_labels=np.concatenate([r.sft_labels for r in results]),
        sft_trained=np.concatenate([r.sft_trained for r in results]),
        truncated=sum(r.truncated for r in results),
        dropped=sum(r.dropped for r in results),
        straddles=sum(r.straddles for r in results),
        cut=np.concatenate([r.cut if r.cut is not None else np.zeros(r.docs, bool) for r in results]),
        choices=choices,
        spaced=summed([r.spaced for r in results]),
        side=None if results[0].side is None else np.concatenate([r.side for r in results if r.side is not None]),
        group=results[0].group,
        checks=summed([r.checks for r in results]),
        audit_failed=None if all(r.audit_failed is None for r in results) else np.concatenate(
            [r.audit_failed if r.audit_failed is not None else np.zeros(r.docs, bool) for r in results]),
        audit_example=next((r.audit_example for r in results if r.audit_example), None),
    )


def write_unit(path: Path, unit: UnitResult) -> None:
    w = UnitWriter(path, len(unit.skipped))
    w.add(unit)
    w.finish()


def chunk(rng: np.random.Generator, docs: int, templates: int = 2, choices: bool = False, side: bool = False,
          failed: bool = False, base_row: int = 0) -> UnitResult:
    lengths = rng.integers(1, 40, docs)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = rng.integers(0, 1000, int(offsets[-1])).astype(np.int32)
    # zero to two trained spans per document, labelled as the workers label them
    spans = np.array([[d, a, b] for d, n in enumerate(lengths.tolist())
                      for a, b in sorted(tuple(sorted(rng.integers(0, n + 1, 2).tolist()))
                                         for _ in range(int(rng.integers(0, 3))))],
                     np.int32).reshape(-1, 3)
    labels = doc_labels(ids, offsets, spans, "sft")
    return UnitResult(
        ids=ids, offsets=offsets, spans=spans, template=rng.integers(0, templates, docs).astype(np.int16),
        row=(np.arange(docs) + base_row).astype(np.int32), skipped=rng.integers(0, 3, templates).astype(np.int64),
        shots=rng.integers(0, 2, docs).astype(np.int16), sft_labels=labels,
        sft_trained=(labels != IGNORE).astype(np.int64)[offsets[:-1]] + 1, truncated=int(rng.integers(3)),
        dropped=int(rng.integers(3)), straddles=1, cut=rng.random(docs) < 0.1 if docs % 2 else None,
        choices=[{"row": int(i), "choices": ["a", "b"]} if i % 3 else None for i in range(docs)] if choices else None,
        spaced={0: 1}, side=(np.arange(docs) % 2).astype(np.int8) if side else None, group=2 if side else 1,
        checks={"identical": 1} if side else {}, audit_failed=(rng.random(docs) < 0.2) if failed else None,
        audit_example="row 3, template 't': mask audit" if failed else None,
    )


def same(a: UnitResult, b: UnitResult) -> None:
    for f in dataclasses.fields(UnitResult):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(y, np.ndarray):
            assert isinstance(x, np.ndarray) and x.dtype == y.dtype and x.shape == y.shape, f.name
            assert np.array_equal(x, y), f.name
        else:
            assert x == y, f.name


@pytest.mark.parametrize("kind", ["plain", "choices", "pairs", "audit", "empty", "one"])
def test_a_unit_written_a_chunk_at_a_time_reads_back_as_the_joined_chunks(tmp_path, kind):
    rng = np.random.default_rng(len(kind))
    n = {"empty": 0, "one": 1}.get(kind, 5)
    parts = [chunk(rng, int(rng.integers(1, 30)) * (2 if kind == "pairs" else 1), choices=kind == "choices",
                   side=kind == "pairs", failed=kind == "audit" and i == 2, base_row=100 * i) for i in range(n)]
    w = UnitWriter(tmp_path / "u", 2)
    for p in parts:
        w.add(p)
    w.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u"]  # no temporary file left
    unit = open_unit(tmp_path / "u")
    assert unit is not None
    same(unit, join(parts, 2))
    for name in ("ids", "sft_labels"):
        assert isinstance(getattr(unit, name), np.ndarray) and not getattr(unit, name).flags.writeable


def test_a_damaged_or_cut_unit_file_does_not_read(tmp_path):
    rng = np.random.default_rng(0)
    write_unit(tmp_path / "u", chunk(rng, 20))
    data = (tmp_path / "u").read_bytes()
    assert open_unit(tmp_path / "u") is not None
    for bad in (data[:-1], data[: len(data) // 2], data[:10], b"",
                data[:200] + bytes([data[200] ^ 1]) + data[201:]):
        (tmp_path / "u").write_bytes(bad)
        assert open_unit(tmp_path / "u") is None


def test_a_change_of_any_byte_of_a_unit_file_or_bytes_after_it_are_found(tmp_path):
    # the digest covers the header and each array; what lies between the arrays must be zeros
    rng = np.random.default_rng(3)
    w = UnitWriter(tmp_path / "u", 2)
    for _ in range(3):
        w.add(chunk(rng, 7, choices=True))
    w.finish()
    data = (tmp_path / "u").read_bytes()
    for at in range(len(data)):
        (tmp_path / "u").write_bytes(data[:at] + bytes([data[at] ^ 0x20]) + data[at + 1:])
        assert open_unit(tmp_path / "u") is None, at
    for extra in (b"\0", b"\0" * 64, b"x"):
        (tmp_path / "u").write_bytes(data + extra)
        assert open_unit(tmp_path / "u") is None
    (tmp_path / "u").write_bytes(data)
    assert open_unit(tmp_path / "u") is not None


def test_without_a_kernel_copy_the_unit_file_is_the_same(tmp_path, monkeypatch):
    import os

    def write(name: str) -> bytes:
        rng = np.random.default_rng(5)
        w = UnitWriter(tmp_path / name, 2)
        for _ in range(4):
            w.add(chunk(rng, 9))
        w.finish()
        return (tmp_path / name).read_bytes()

    kernel = write("a")

    def refused(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refused, raising=False)
    assert write("b") == kernel
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    assert write("c") == kernel
    assert open_unit(tmp_path / "c") is not None


def test_an_aborted_writer_leaves_nothing(tmp_path):
    w = UnitWriter(tmp_path / "u", 2)
    w.add(chunk(np.random.default_rng(1), 4))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_take_tokens_reads_what_indexing_gives(tmp_path):
    rng = np.random.default_rng(2)
    memory = join([chunk(rng, 30), chunk(rng, 17)], 2)
    write_unit(tmp_path / "u", memory)
    stored = open_unit(tmp_path / "u")
    assert stored is not None
    docs = rng.integers(0, memory.docs, 60)
    starts, lengths = memory.offsets[:-1][docs], memory.lengths[docs]
    src = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)])
    for name in ("ids", "sft_labels"):
        want = getattr(memory, name)[src]
        assert np.array_equal(take_tokens(stored, name, starts, lengths), want)
        assert np.array_equal(take_tokens(memory, name, starts, lengths), want)


@pytest.mark.parametrize("objective", ["sft", "lm"])
def test_a_stage_gathered_from_stored_units_packs_as_the_concatenated_documents(tmp_path, objective):
    rng = np.random.default_rng(3)
    units = []
    for i in range(3):
        write_unit(tmp_path / f"u{i}", join([chunk(rng, 25), chunk(rng, 9)], 2))
        u = open_unit(tmp_path / f"u{i}")
        assert u is not None
        units.append(u)
    picks = [np.sort(rng.integers(0, u.docs, 40)) for u in units]  # repeats, as a mixture draws them
    stage = Selected.of(list(zip(units, picks)), objective)
    # the same documents copied into memory, labels as the objective decides
    ids, labels, lengths = [], [], []
    for u, idx in zip(units, picks):
        for d in idx.tolist():
            a, b = int(u.offsets[d]), int(u.offsets[d + 1])
            ids.append(np.array(u.ids[a:b]))
            lab = np.array(u.ids[a:b]) if objective == "lm" else np.array(u.sft_labels[a:b])
            lab[:1] = IGNORE
            labels.append(lab)
            lengths.append(b - a)
    flat = Docs(np.concatenate(ids), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                np.concatenate(labels))
    assert np.array_equal(stage.lengths, flat.lengths)
    order = rng.permutation(len(lengths))
    bins = [order[i:i + 3].tolist() for i in range(0, len(order), 3)]
    got, want = build_rows(stage, bins, 128, 0), build_rows(flat, bins, 128, 0)
    assert got.keys() == want.keys()
    for k in got:
        assert np.array_equal(got[k], want[k]), k


def test_rows_stream_out_of_arrow_as_datasets_slices_them(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "rows.arrow"
    schema = pa.schema([("q", pa.string()), ("n", pa.int64()), ("tags", pa.list_(pa.string()))])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for lo in range(0, 103, 10):  # record batches of 10 rows: slices cross them
            hi = min(lo + 10, 103)
            writer.write_batch(pa.record_batch([pa.array([f"q{i}" for i in range(lo, hi)]),
                                                pa.array(list(range(lo, hi))),
                                                pa.array([[str(i)] * (i % 3) for i in range(lo, hi)])], schema=schema))
    ds = datasets.Dataset.from_file(str(path))
    rng = np.random.default_rng(4)
    for index in (np.arange(103), np.arange(7, 90), np.sort(rng.choice(103, 41, replace=False))):
        table = ds.select_columns(["n", "q", "tags"]).select(index.tolist())
        mapping = {"question": "q", "number": "n", "labels": "tags"}

        def convert(new, values, rows):  # a value map sees the right rows
            return [(int(r), v) for r, v in zip(rows, values)] if new == "number" else values

        streamed = Rows(index, table, mapping, convert, files=(str(path),), total=len(ds))
        plain = Rows(index, table, mapping, convert)
        for step in (1, 4, 16, 512):
            got, want = list(streamed.slices(step)), list(plain.slices(step))
            assert [lo for lo, _ in got] == [lo for lo, _ in want]
            assert [c for _, c in got] == [c for _, c in want]


def test_the_stream_refuses_files_that_do_not_hold_the_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "rows.arrow"
    schema = pa.schema([("q", pa.string())])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(pa.record_batch([pa.array(["a", "b"])], schema=schema))
    ds = datasets.Dataset.from_file(str(path))
    rows = Rows(np.arange(2), ds, {"q": "q"}, files=(str(path),), total=5)
    with pytest.raises(AssertionError, match="hold 2 rows, not 5"):
        list(rows.slices())


def test_open_unit_of_a_missing_file_is_none(tmp_path):
    assert open_unit(Path(tmp_path / "absent")) is None


def test_a_unit_that_cannot_be_written_stops_the_compile_in_one_line_and_leaves_no_part_of_it(
        tmp_path, unit_cache, monkeypatch):
    import errno

    from tiny import DEMO

    from tunec.compiler import unitstore
    from tunec.compiler.build import Options, compile_recipe
    from tunec.compiler.errors import TunecError

    out = tmp_path / "out"
    compile_recipe(DEMO / "demo.yaml", out, Options(workers=1, use_cache=False))
    def files() -> dict:
        return {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.name.startswith(".tunec.lock")}

    before = files()
    calls = []

    def full(self, result):
        calls.append(1)
        if len(calls) > 1:  # the second chunk: the first one is already in a temporary file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, result)

    real = unitstore.UnitWriter.add
    monkeypatch.setattr(unitstore.UnitWriter, "add", full)
    monkeypatch.setattr("tunec.compiler.incremental.CHUNK_ROWS", 8)  # several chunks per unit
    with pytest.raises(TunecError, match=r"cannot write the compiled unit \S+ to .*No space left on device.*"
                                         r"--cache DIR"):
        compile_recipe(DEMO / "demo.yaml", out, Options(workers=1))
    assert [p for p in unit_cache.rglob("*") if p.is_file() and p.parts[len(unit_cache.parts)] == "units"] == []
    assert files() == before  # the previous build is whole


def test_a_scratch_unit_is_the_same_file_without_the_sync_a_cached_one_gets(tmp_path, monkeypatch):
    """A unit in a compile's scratch folder (``--no-cache``: read once, removed with the staging folder)
    is not synced to disk; one kept in the cache is. The bytes are the same either way."""
    from tunec.compiler import unitstore
    from tunec.compiler.cache import Cache

    synced: list[str] = []  # the unit files synced (the cache syncs files of its own too)
    real = os.fsync

    def fsync(fd: int) -> None:
        if sys._getframe(1).f_code.co_name == "_write":
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(unitstore.os, "fsync", fsync)
    rng = np.random.default_rng(7)
    parts = [chunk(rng, 30), chunk(rng, 12)]
    for durable in (True, False):
        w = Cache(tmp_path / str(durable)).unit_writer("ab" * 32, 2, durable=durable)
        for r in parts:
            w.add(r)
        w.finish()
    assert len(synced) == 1 and "/True/" in synced[0]  # the durable one only
    kept, scratch = (tmp_path / str(d) / "units" for d in (True, False))
    files = [next(p for p in root.rglob("*") if p.is_file()) for root in (kept, scratch)]
    assert files[0].read_bytes() == files[1].read_bytes()
    unit = open_unit(files[1])
    assert unit is not None and np.array_equal(unit.ids, np.concatenate([r.ids for r in parts]))
