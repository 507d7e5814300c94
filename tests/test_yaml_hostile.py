"""Hostile or broken YAML ends in located problems and exit 1, never a traceback, hang or object.

Each case goes through the CLI (`tunec validate`), as a user would meet it.
"""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

from tunec.cli import main

HEAD = "tokenizer: {kind: local, path: tok}\nseq_len: 64\n"


def _bomb(levels: int, width: int = 10) -> str:
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def _merge_bomb(levels: int, width: int = 10) -> str:
    lines = ["m0: &m0 {a: 1, b: 2}"]
    for i in range(1, levels):
        lines.append(f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * width)}]}}")
    return "\n".join(lines) + "\n"


CASES = [
    # (name, text after HEAD (line 3 on), expected line:col, words in the message)
    ("nul", "seed: 1\x00\n", "3:8", "character U+0000 is not allowed"),
    ("escape", "tasks: {a: \x1b}\n", "3:12", "character U+001B is not allowed"),
    ("unknown tag", "seed: !seed 1\n", "3:7", "unsupported YAML tag `!seed`"),
    ("python object", "seed: !!python/object/apply:os.system [echo hi]\n", "3:7",
     "unsupported YAML tag `!!python/object/apply:os.system`"),
    ("python name", "seed: !!python/name:os.system\n", "3:7", "unsupported YAML tag `!!python/name:os.system`"),
    ("binary", "seed: !!binary aGk=\n", "3:7", "unsupported YAML tag `!!binary`"),
    ("bad explicit int", "seed: !!int ten\n", "3:7", "`ten` is not a valid !!int"),
    ("bad explicit bool", "seed: !!bool maybe\n", "3:7", "`maybe` is not a valid !!bool"),
    ("tag of the wrong kind", "tasks: !!seq {a: 1}\n", "3:8", "unsupported YAML tag `!!seq`"),
    ("recursive sequence", "tasks: &t [1, *t]\n", "3:8", "recursive alias"),
    ("recursive mapping", "tasks: &t {a: *t}\n", "3:12", "recursive alias"),
    ("recursive merge", "tasks: &t {a: 1, <<: *t}\n", "3:8", "recursive alias"),
    ("alias bomb", _bomb(9), "7:1", "expands to more than 100,000 values"),
    ("merge bomb", _merge_bomb(9), "8:1", "expands to more than 100,000 values"),
    ("merge of a scalar", "tasks:\n  <<: 5\n", "4:7", "a merge key `<<` takes a mapping or a list of mappings"),
    ("merge of a list of scalars", "tasks:\n  <<: [{a: 1}, x]\n", "4:16", "a merge key `<<` takes a mapping"),
    ("deep nesting", "tasks: " + "[" * 3000 + "]" * 3000 + "\n", "3:107", "nested more than 100 levels deep"),
    ("non-scalar key", "? [a, b]\n: 1\n", "3:3", "mapping keys must be plain scalars"),
]


@pytest.mark.parametrize("name, body, place, words", CASES, ids=[c[0] for c in CASES])
def test_hostile_yaml_is_a_located_error(tmp_path, monkeypatch, name, body, place, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(HEAD + body, encoding="utf-8")
    start = time.monotonic()
    result = CliRunner().invoke(main, ["validate", "r.yaml"])
    assert time.monotonic() - start < 10
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    first = result.output.splitlines()[0]
    assert first.startswith(f"error: r.yaml:{place}: "), result.output
    assert words in first, result.output


def test_no_tag_ever_constructs_an_object(tmp_path):
    # SafeLoader refuses python tags already; `!!set` / `!!timestamp`-style tags must not slip through either.
    from tunec.compiler.errors import TunecError
    from tunec.compiler.yamlpos import load_yaml_text

    texts = ("a: !!set {x, y}\n", "a: !!timestamp 2024-01-01\n", "a: !!omap [{x: 1}]\n", "a: !!str 1\nb: !!float 1\n")
    for text in texts:
        try:
            data, _ = load_yaml_text(text, "r.yaml")
        except TunecError as exc:
            assert "unsupported YAML tag" in str(exc)
        else:
            assert data == {"a": "1", "b": 1.0}
