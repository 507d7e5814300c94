"""Sources: local files of every kind load into the same rows; selections, field maps, located faults."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tunec.compiler.errors import TunecError
from tunec.compiler.load import load_recipe
from tunec.compiler.sources import Rows, check_files, fingerprint, load_part, peek_columns

pytestmark = pytest.mark.usefixtures("hf_cache")


def tiny_rows(tiny_task_dir: Path, name: str = "train.jsonl") -> list[dict]:
    return [json.loads(line) for line in (tiny_task_dir / name).read_text().splitlines()]


def write_as(kind: str, rows: list[dict], path: Path) -> Path:
    """The same rows in another file format."""
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows, indent=1))
    elif kind == "csv":
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def task(write_recipe, tiny_task_dir):
    """``task(source_yaml, extra="")`` -> (loaded, name, Task) for a one-task recipe.

    ``source_yaml`` is on line 5; ``extra`` lines (task keys) start on line 7.
    The recipe sits next to ``tiny/`` (see ``tiny_task_dir``).
    """

    def make(source: str, extra: str = ""):
        text = (
            "tokenizer: {kind: local, path: tok}\n"
            "seq_len: 64\n"
            "tasks:\n"
            "  sums:\n"
            f"    source: {source}\n"
            "    templates: [arithmetic/qa]\n"
            f"{extra}"
            "stages:\n"
            "  - {name: sft, objective: sft, tasks: [sums], model: {kind: hub, id: org/model}}\n"
        )
        loaded = load_recipe(write_recipe(text))
        return loaded, "sums", loaded.recipe.tasks["sums"]

    return make


def load(task_tuple, part: str = "train") -> Rows:
    loaded, name, t = task_tuple
    return load_part(loaded, name, t, part)


def error_lines(exc_info, loaded) -> list[str]:
    return [str(p).replace(loaded.display, "R", 1) for p in exc_info.value.problems]


# ----------------------------------------------------------------- every file kind


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
def test_every_file_kind_loads_the_same_rows(kind, task, tiny_task_dir):
    rows = tiny_rows(tiny_task_dir)
    write_as(kind, rows, tiny_task_dir / f"data.{kind}")
    t = task(f"{{kind: {kind}, path: tiny/data.{kind}}}")
    got = load(t)
    assert got.count == 20 and got.index.tolist() == list(range(20))
    # a csv has no types: `datasets` reads the digit strings back as integers
    # (a template prints them the same)
    answers = [int(r["a"]) if kind == "csv" else r["a"] for r in rows]
    assert got.columns == {"q": [r["q"] for r in rows], "a": answers}
    loaded, name, tk = t
    assert peek_columns(loaded, tk, "train") == ["q", "a"]


def test_named_splits(task, tiny_task_dir):
    t = task(
        "{kind: jsonl, path: {train: tiny/train.jsonl, test: tiny/test.jsonl}}",
        "    eval: {split: test, stop: 2}\n",
    )
    ev = load(t, "eval")
    assert ev.columns["q"] == ["What is 100 plus 103?", "What is 101 plus 104?"]
    assert ev.count == 2
    assert load(t).count == 20


# ----------------------------------------------------------------- selection and field map


@pytest.mark.parametrize(
    "selection, first, count",
    [
        ("{start: 5, stop: 8}", 5, 3),
        ("{start: 18}", 18, 2),
        ("{stop: 1}", 0, 1),
        ("{start: 3, stop: 500}", 3, 17),  # stop past the end is clipped
    ],
)
def test_selection_start_stop(task, tiny_task_dir, selection, first, count):
    rows = tiny_rows(tiny_task_dir)
    got = load(task("{kind: jsonl, path: tiny/train.jsonl}", f"    train: {selection}\n"))
    assert (int(got.index[0]), got.count) == (first, count)
    assert got.columns["q"] == [r["q"] for r in rows[first : first + count]]
    assert got.columns["a"] == [r["a"] for r in rows[first : first + count]]


def test_field_map_renames_and_selects(task, tiny_task_dir):
    rows = tiny_rows(tiny_task_dir)
    for r in rows:
        r["id"] = f"sum-{r['a']}"  # an extra column the map leaves out
    write_as("jsonl", rows, tiny_task_dir / "ids.jsonl")
    got = load(
        task(
            "{kind: jsonl, path: tiny/ids.jsonl}",
            "    fields: {answer: a, question: q, question_again: q}\n    train: {start: 1, stop: 3}\n",
        )
    )
    # exactly the mapped columns, in the map's order; one source column may feed two
    assert list(got.columns) == ["answer", "question", "question_again"]
    assert got.columns["question"] == got.columns["question_again"] == [rows[1]["q"], rows[2]["q"]]
    assert got.columns["answer"] == [rows[1]["a"], rows[2]["a"]]


def test_empty_selection(task):
    t = task("{kind: jsonl, path: tiny/train.jsonl}", "    train: {start: 20}\n")
    with pytest.raises(TunecError) as info:
        load(t)
    assert error_lines(info, t[0]) == [
        "R:7:5: tasks.sums.train: the train selection is empty: split 'train' has 20 rows, selected rows 20..end"
    ]
    t = task("{kind: jsonl, path: tiny/train.jsonl}", "    train: {start: 30, stop: 40}\n")
    with pytest.raises(TunecError, match=r"has 20 rows, selected rows 30\.\.40"):
        load(t)


def test_missing_column_at_load_time(task):
    t = task("{kind: jsonl, path: tiny/train.jsonl}", "    fields: {question: q, answer: answer}\n")
    with pytest.raises(TunecError) as info:
        load(t)
    assert error_lines(info, t[0]) == [
        "R:7:27: tasks.sums.fields.answer: column `answer` is not in the source; columns: q, a"
    ]


def test_missing_column_at_load_time_suggests(task):
    t = task("{kind: jsonl, path: tiny/train.jsonl}", "    fields: {question: qq, answer: a}\n")
    with pytest.raises(TunecError) as info:
        load(t)
    assert error_lines(info, t[0]) == [
        "R:7:14: tasks.sums.fields.question: column `qq` is not in the source (did you mean 'q'?); columns: q, a"
    ]


# ----------------------------------------------------------------- faulty files


def test_malformed_jsonl_line_is_located(task, tiny_task_dir):
    lines = (tiny_task_dir / "train.jsonl").read_text().splitlines()
    lines[6] = lines[6].replace('", "a"', '" "a"')  # drop a comma on line 7
    (tiny_task_dir / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(TunecError) as info:
        load(task("{kind: jsonl, path: tiny/bad.jsonl}"))
    (p,) = info.value.problems
    assert (p.file, p.line, p.col) == (str(tiny_task_dir / "bad.jsonl"), 7, 27)
    assert p.message == "malformed JSON line: Expecting ',' delimiter (column 27)"


def test_jsonl_line_that_is_not_an_object(task, tiny_task_dir):
    lines = (tiny_task_dir / "train.jsonl").read_text().splitlines()
    lines[2] = '["What is 2 plus 5?", "7"]'
    (tiny_task_dir / "list.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(TunecError) as info:
        load(task("{kind: jsonl, path: tiny/list.jsonl}"))
    assert [str(p) for p in info.value.problems] == [
        f"{tiny_task_dir / 'list.jsonl'}:3:1: each JSONL line must be an object, got list"
    ]


def test_blank_jsonl_lines_are_skipped(task, tiny_task_dir):
    text = (tiny_task_dir / "train.jsonl").read_text().replace("\n", "\n\n", 3)
    (tiny_task_dir / "gaps.jsonl").write_text(text)
    assert load(task("{kind: jsonl, path: tiny/gaps.jsonl}")).count == 20


@pytest.mark.parametrize(
    "content",
    ['{"q": "What is 1 plus 4?", "a": "5"}', '["What is 1 plus 4?", "5"]', '{"rows": [{"q": "x", "a": "y"}]}'],
    ids=["object", "list-of-strings", "wrapped"],
)
def test_json_that_is_not_a_list_of_objects(task, tiny_task_dir, content):
    (tiny_task_dir / "odd.json").write_text(content)
    t = task("{kind: json, path: tiny/odd.json}")
    for call in (lambda: load(t), lambda: peek_columns(t[0], t[2], "train")):
        with pytest.raises(TunecError) as info:
            call()
        assert [str(p) for p in info.value.problems] == [
            f"{tiny_task_dir / 'odd.json'}:1:1: a `json` source holds a list of objects"
        ]


def test_malformed_json_is_located(task, tiny_task_dir):
    (tiny_task_dir / "broken.json").write_text('[\n  {"q": "x", "a": "1"},\n  {"q": "y" "a": "2"}\n]\n')
    with pytest.raises(TunecError) as info:
        load(task("{kind: json, path: tiny/broken.json}"))
    (p,) = info.value.problems
    assert (p.line, p.col) == (3, 13)
    assert p.message.startswith("malformed JSON: Expecting ','")


def test_missing_and_empty_files(task, tiny_task_dir):
    t = task("{kind: jsonl, path: tiny/none.jsonl}")
    with pytest.raises(TunecError) as info:
        load(t)
    assert error_lines(info, t[0]) == [f"R:5:27: tasks.sums.source.path: file not found: {tiny_task_dir / 'none.jsonl'}"]
    (tiny_task_dir / "empty.jsonl").write_text("")
    t = task("{kind: jsonl, path: tiny/empty.jsonl}")
    assert [str(p).replace(t[0].display, "R") for p in check_files(*t)] == [
        f"R:5:27: tasks.sums.source.path: file is empty: {tiny_task_dir / 'empty.jsonl'}"
    ]
    assert peek_columns(t[0], t[2], "train") is None


def test_split_not_among_the_files(task):
    t = task("{kind: jsonl, path: {train: tiny/train.jsonl}}", "    eval: {split: test}\n")
    assert [str(p).replace(t[0].display, "R") for p in check_files(*t)] == [
        "R:7:12: tasks.sums.eval.split: split 'test' is not among the source's splits (train)"
    ]


# ----------------------------------------------------------------- columns and fingerprints


def test_hub_source_columns_are_what_the_recipe_declares(task):
    loaded, _, t = task("{kind: hub, id: org/data, columns: [q, a]}")
    assert peek_columns(loaded, t, "train") == ["q", "a"]
    assert check_files(loaded, "sums", t) == []
    assert fingerprint(loaded, t) == {"hub": "org/data", "name": "", "revision": ""}
    loaded, _, t = task("{kind: hub, id: org/data}")
    assert peek_columns(loaded, t, "train") is None


def test_peek_columns_unions_keys_of_the_first_rows(task, tiny_task_dir):
    rows = tiny_rows(tiny_task_dir)
    rows[1]["hint"] = "add them"
    write_as("jsonl", rows, tiny_task_dir / "hint.jsonl")
    loaded, _, t = task("{kind: jsonl, path: tiny/hint.jsonl}")
    assert peek_columns(loaded, t, "train") == ["q", "a", "hint"]


def test_fingerprint_follows_file_content(task, tiny_task_dir):
    loaded, _, t = task("{kind: jsonl, path: {train: tiny/train.jsonl, test: tiny/test.jsonl}}")
    before = fingerprint(loaded, t)
    assert list(before) == ["test", "train"] and all(len(h) == 64 for h in before.values())
    with (tiny_task_dir / "test.jsonl").open("a") as fh:
        fh.write(json.dumps({"q": "What is 1 plus 1?", "a": "2"}) + "\n")
    after = fingerprint(loaded, t)
    assert after["train"] == before["train"] and after["test"] != before["test"]


# ----------------------------------------------------------------- damaged files, through the CLI


def _cli(*args: str) -> tuple[int, list[str], str]:
    from click.testing import CliRunner

    from tunec.cli import main

    result = CliRunner().invoke(main, list(args))
    return result.exit_code, [l for l in result.output.splitlines() if l.startswith("error:")], result.output


def _one_file_recipe(tmp_path: Path, kind: str, name: str, data: bytes) -> Path:
    (tmp_path / name).write_bytes(data)
    tokenizer = Path(__file__).resolve().parents[1] / "recipes" / "demo" / "tokenizer"
    path = tmp_path / "r.yaml"
    path.write_text(
        f"tokenizer: {{kind: local, path: {tokenizer}}}\n"
        "seq_len: 64\n"
        "tasks:\n"
        "  t:\n"
        f"    source: {{kind: {kind}, path: {name}}}\n"
        "    templates: [{kind: inline, name: x, prompt: '{{ q }}', completion: ' {{ a }}'}]\n"
        "stages:\n"
        "  - {name: s, objective: sft, tasks: [t], model: {kind: config, config: {model_type: llama}}}\n"
    )
    return path


def _jsonl_bytes(n: int) -> bytes:
    return "".join(json.dumps({"q": f"q{i}", "a": str(i)}) + "\n" for i in range(n)).encode()


def _csv_bytes(n: int) -> bytes:
    return ("q,a\n" + "".join(f"q{i},{i}\n" for i in range(n))).encode()


DAMAGED = [
    # kind, file, bytes, the error after `error: <file>`
    ("jsonl", "d.jsonl", _jsonl_bytes(5).replace(b'"q2"', b'"q\xff2"'),
     ":3:9: not valid UTF-8: byte 0xff (invalid start byte); save the file as UTF-8"),
    ("json", "d.json", json.dumps([{"q": f"q{i}", "a": str(i)} for i in range(5)], indent=1).encode()
     .replace(b'"q3"', b'"q\xc3\x283"'),
     ":15:10: not valid UTF-8: byte 0xc3 (invalid continuation byte); save the file as UTF-8"),
    ("csv", "d.csv", _csv_bytes(5).replace(b"q2,", b"\xe9t\xe9,"),
     ":4:1: not valid UTF-8: byte 0xe9 (invalid continuation byte); save the file as UTF-8"),
    ("csv", "d.csv", _csv_bytes(5).replace(b"q1,", b'"q1,'),
     ":3: malformed CSV: a quoted field that starts on this line is never closed (a `\"` is missing)"),
    ("parquet", "d.parquet", b"PAR1 not parquet at all",
     ": not a readable parquet file: Parquet magic bytes not found in footer. Either the file is corrupted or "
     "this is not a parquet file."),
    ("parquet", "d.parquet", _csv_bytes(5),
     ": not a readable parquet file: Parquet magic bytes not found in footer. Either the file is corrupted or "
     "this is not a parquet file."),
]


@pytest.mark.parametrize("kind,name,data,expected", DAMAGED,
                         ids=["jsonl-utf8", "json-utf8", "csv-utf8", "csv-quote", "parquet-junk", "parquet-csv"])
def test_damaged_file_is_one_located_line_in_validate_and_compile(tmp_path, kind, name, data, expected):
    path = _one_file_recipe(tmp_path, kind, name, data)
    for args in (["validate", str(path)], ["compile", str(path), "-o", str(tmp_path / "out"), "-j", "1"]):
        code, errors, output = _cli(*args)
        assert "Traceback" not in output, output
        assert (code, errors) == (1, [f"error: {tmp_path / name}{expected}"]), output


@pytest.mark.parametrize("kind,name,data,expected", [
    ("jsonl", "d.jsonl", _jsonl_bytes(300).replace(b'"q250"', b'"q\xff250"'),
     ":251:9: not valid UTF-8: byte 0xff (invalid start byte); save the file as UTF-8"),
    ("csv", "d.csv", _csv_bytes(300).replace(b"q250,", b"q\xff250,"),
     ":252:2: not valid UTF-8: byte 0xff (invalid start byte); save the file as UTF-8"),
    ("csv", "d.csv", _csv_bytes(300).replace(b"q250,", b'"q250,'),
     ":252: malformed CSV: a quoted field that starts on this line is never closed (a `\"` is missing)"),
], ids=["jsonl-utf8", "csv-utf8", "csv-quote"])
def test_damage_past_the_rows_validate_reads_is_located_by_compile(tmp_path, kind, name, data, expected):
    path = _one_file_recipe(tmp_path, kind, name, data)
    code, errors, output = _cli("validate", str(path))
    assert code == 0, output  # validate reads the first rows only
    code, errors, output = _cli("compile", str(path), "-o", str(tmp_path / "out"), "-j", "1")
    assert "Traceback" not in output, output
    assert (code, errors) == (1, [f"error: {tmp_path / name}{expected}"]), output


def test_a_parquet_file_damaged_inside_is_one_line_naming_it(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist([{"q": f"q{i}", "a": str(i)} for i in range(50)]), good)
    data = bytearray(good.read_bytes())
    data[8:40] = b"\x00" * 32  # the first column chunk's bytes; the footer (schema) stays readable
    path = _one_file_recipe(tmp_path, "parquet", "d.parquet", bytes(data))
    code, errors, output = _cli("validate", str(path))
    assert code == 0, output
    code, errors, output = _cli("compile", str(path), "-o", str(tmp_path / "out"), "-j", "1")
    assert "Traceback" not in output, output
    assert code == 1 and len(errors) == 1 and "\n" not in errors[0]
    assert errors[0].startswith(f"error: {tmp_path / 'd.parquet'}: cannot read parquet file: "), errors


@pytest.mark.parametrize("where", ["split", "after_ascii", "cut_at_block_end", "last_byte"])
def test_the_utf8_check_reads_in_blocks_yet_finds_every_fault_and_accepts_split_characters(tmp_path, where):
    from tunec.compiler.sources import _check_utf8

    block = 1 << 16
    line = b'{"q": "' + b"a" * 40 + b'", "a": "1"}\n'
    ascii_part = line * (2 * block // len(line) + 3)  # more than two blocks of ASCII
    path = tmp_path / "d.jsonl"
    if where == "split":  # "é" (2 bytes) and "€" (3 bytes) each cut by a block boundary: valid
        head = b'{"q": "' + b"a" * (block - 8)
        path.write_bytes(head + "é".encode() + b'", "a": "1"}\n' + ascii_part[: block - 30] + b'{"q": "\xe2\x82\xac"}\n')
        assert path.read_bytes()[block - 1:block + 1] == "é".encode()
        _check_utf8(path)
        return
    if where == "after_ascii":
        data, line_no = ascii_part + b'{"q": "\xff"}\n', ascii_part.count(b"\n") + 1
    elif where == "cut_at_block_end":  # a character's first byte ends a block, a block of ASCII follows,
        # then a byte that would end that character: not UTF-8 (the ASCII between breaks it)
        pad = b'{"q": "' + b"a" * (block - 8)
        data, line_no = pad + b"\xc3" + b"b" * block + b"\xa9\"}\n", 1
    else:
        data, line_no = ascii_part + b"\xe2\x82", ascii_part.count(b"\n") + 1
    path.write_bytes(data)
    with pytest.raises(TunecError, match=rf"d\.jsonl:{line_no}:\d+: not valid UTF-8"):
        _check_utf8(path)
