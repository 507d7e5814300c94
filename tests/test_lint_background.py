"""The compile's prompt lint runs in a thread while the units compile: the same findings as the lint run
alone, and its errors are the compile's."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from tunec.compiler import lint
from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.check import check
from tunec.compiler.errors import TunecError
from tunec.compiler.load import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "recipes" / "demo" / "tokenizer"


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    """Two tasks: one whose template ends its prompt in a space (a `separator` finding), one with
    repeated rows (a `duplicates` finding)."""
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"q": f"What is {i}?", "a": str(i)}) + "\n" for i in range(12)), encoding="utf-8")
    rep = tmp_path / "rep.jsonl"
    rep.write_text("".join(json.dumps({"q": f"Say {i % 3}", "a": str(i % 3)}) + "\n" for i in range(12)),
                   encoding="utf-8")
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""tokenizer: {{kind: local, path: {TOKENIZER}}}
seq_len: 128
tasks:
  qa:
    source: {{kind: jsonl, path: {qa}}}
    templates: [{{kind: inline, name: spaced, prompt: "Q: {{{{ q }}}} A: ", completion: " {{{{ a }}}}"}}]
  rep:
    source: {{kind: jsonl, path: {rep}}}
    templates: [{{kind: inline, name: plain, prompt: "{{{{ q }}}}:", completion: " {{{{ a }}}}"}}]
stages:
  - {{name: s, objective: sft, tasks: [qa, rep], model: {{kind: config, config: {{model_type: llama}}}}}}
""", encoding="utf-8")
    return path


def test_the_lint_beside_the_units_finds_what_the_lint_alone_finds(recipe, tmp_path, monkeypatch):
    ran_in = []
    real = lint.lint_recipe

    def recorded(*a, **k):
        ran_in.append(threading.current_thread().name)
        return real(*a, **k)

    monkeypatch.setattr(lint, "lint_recipe", recorded)
    plan = compile_recipe(recipe, tmp_path / "out", Options(workers=1, use_cache=False))
    assert ran_in == ["tunec-lint"]
    alone = [lint.LintFinding.model_validate(f.as_dict()) for f in real(check(load_recipe(recipe)))]
    assert plan.lint == alone
    assert {f.id for f in plan.lint} >= {"separator", "duplicate-examples"}


def test_an_error_in_the_lint_thread_is_the_compiles(recipe, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise TunecError("the lint could not read a row")

    monkeypatch.setattr(lint, "_task_findings", broken)
    out = tmp_path / "out"
    with pytest.raises(TunecError, match="the lint could not read a row"):
        compile_recipe(recipe, out, Options(workers=1, use_cache=False))
    assert not (out / "plan.json").exists()


def test_the_duplicate_rule_reads_the_digests_the_compile_took_and_its_own_rows_when_not(recipe, tmp_path,
                                                                                         monkeypatch):
    """The compile feeds each linted part's row digests as it converts the rows for its chunks: the rule
    then converts no row again. A part whose unit comes from the cache is not streamed: the rule reads
    its rows itself. Either way, the findings are the lint's alone."""
    given = []
    real = lint._duplicates

    def recorded(rows, digests=None):
        given.append(digests is not None)
        return real(rows, digests)

    monkeypatch.setattr(lint, "_duplicates", recorded)
    cache = tmp_path / "cache"
    alone = [lint.LintFinding.model_validate(f.as_dict()) for f in lint.lint_recipe(check(load_recipe(recipe)))]
    given.clear()
    for workers in (1, 2):
        plan = compile_recipe(recipe, tmp_path / f"out{workers}", Options(workers=workers, use_cache=False))
        assert given == [True, True] and plan.lint == alone
        given.clear()
    compile_recipe(recipe, tmp_path / "out", Options(workers=1, cache=cache))
    assert given == [True, True]
    given.clear()
    for entry in (cache / "lint").rglob("*.json"):
        entry.unlink()  # the units stay cached: none is streamed, so the rule reads the rows
    plan = compile_recipe(recipe, tmp_path / "out", Options(workers=1, cache=cache))
    assert given == [False, False] and plan.lint == alone


def test_a_tap_gives_its_digests_only_when_it_had_every_row_in_order():
    def fed(*slices, count=4, whole=True):
        tap = lint.DigestTap(count)
        for lo, columns in slices:
            tap.feed(lo, columns)
        tap.close(whole)
        tap.close(not whole)  # only the first close counts
        return tap.wait()

    a, b = {"q": ["x", "y"]}, {"q": ["x", "z"]}
    assert fed((0, a), (2, b)) is not None
    assert fed((0, a), (2, b), whole=False) is None  # the compile failed half way
    assert fed((0, a)) is None  # rows missing
    assert fed((2, b), (0, a)) is None  # out of order
    assert fed((0, a), (2, b), (4, a)) is None  # more rows than the part has
    assert fed((0, {}), count=0) is None  # no column to tell rows apart by


def test_duplicates_from_digests_are_those_of_the_rows_themselves():
    """Any rows (strings, numbers, nulls, lists; repeats anywhere; a selection of the source's rows): the
    count, the first repeat and the row it repeats are the same from the tap's digests."""
    from dataclasses import dataclass

    import numpy as np
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @dataclass
    class Part:  # what the rule reads of a part: its rows' index, and its columns a slice at a time
        index: np.ndarray
        columns: dict

        @property
        def count(self):
            return len(self.index)

        def slices(self, step=3):
            for lo in range(0, self.count, step):
                yield lo, {k: v[lo:lo + step] for k, v in self.columns.items()}

    value = st.one_of(st.sampled_from(["a", "b", "1"]), st.integers(0, 2), st.none(), st.lists(st.sampled_from("ab"),
                                                                                              max_size=2))

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(value, value), min_size=1, max_size=30), st.integers(1, 7), st.integers(0, 5))
    def check_rows(rows, step, start):
        part = Part(np.arange(start, start + len(rows)) * 2, {"q": [r[0] for r in rows], "a": [r[1] for r in rows]})
        tap = lint.DigestTap(part.count)
        for lo, columns in part.slices(step):
            tap.feed(lo, columns)
        tap.close(True)
        assert lint._duplicates(part, tap.wait()) == lint._duplicates(part)

    check_rows()
