"""The leakage check: whole examples at any length, long texts alone, per-task key and context fields."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tunec.compiler import leakage
from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.errors import TunecError

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "recipes" / "demo" / "tokenizer"
MODEL = "{kind: config, config: {model_type: llama}}"
QA = '{kind: inline, name: qa, prompt: "{{ story }} Q: {{ q }}\\nA:", completion: " {{ a }}"}'
STORY = "Once upon a time a small brown fox lived by the old river."


def jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def build(tmp_path: Path, train: list[dict], test: list[dict], task_extra: str = "", extra: str = ""):
    a, b = jsonl(tmp_path / "train.jsonl", train), jsonl(tmp_path / "test.jsonl", test)
    text = f"tokenizer: {{kind: local, path: {TOKENIZER}}}\nseq_len: 256\nseed: 3\n{extra}" + textwrap.dedent(f"""
        tasks:
          t:
            source: {{kind: jsonl, path: {{train: {a}, test: {b}}}}}
            templates: [{QA}]
            eval: {{split: test}}{task_extra}
        stages:
          - {{name: s, objective: sft, tasks: [t], model: {MODEL}}}
        """)
    (tmp_path / "recipe.yaml").write_text(text, encoding="utf-8")
    return compile_recipe(tmp_path / "recipe.yaml", tmp_path / "out", Options())


def questions(n: int, offset: int = 0) -> list[dict]:
    return [{"story": STORY, "q": f"Who {i + offset}?", "a": f"fox {i + offset}"} for i in range(n)]


def test_a_short_duplicated_example_is_reported_as_a_whole_example(tmp_path):
    train, test = questions(8), questions(4, offset=100)
    test[1] = {"story": STORY, "q": "WHO 3 ?", "a": "Fox 3"}  # train[3], other case and spacing: two-word fields
    with pytest.raises(TunecError) as err:
        build(tmp_path, train, test, "\n            leakage: {context: [story]}")
    assert "1 of 4 eval examples of task 't' also appear in the training mixture: t (1) (1 as whole examples)" \
        in str(err.value)


def test_shared_context_alone_is_not_a_leak(tmp_path):
    """Every question asks about the same story: with `story` as context, only the questions count."""
    plan = build(tmp_path, questions(8), questions(4, offset=100), "\n            leakage: {context: [story]}")
    assert plan.stages[0].leakage == {}


def test_without_context_the_shared_story_is_a_long_text_leak(tmp_path):
    plan = build(tmp_path, questions(8), questions(4, offset=100), extra="leakage: warn\n")
    leak = plan.stages[0].leakage["t"]
    assert (leak.leaked, leak.by_kind) == (4, {"text": 4})
    from tunec.compiler.inspection import summary_lines

    assert "  LEAK t: 4 of 4 eval examples appear in training (t 4; 4 by a shared long text)" in summary_lines(plan)


def test_key_fields_say_what_identifies_an_example(tmp_path):
    """Another id, same question and answer: a leak under `key: [q, a]`, not when the id is part of it."""
    train = [dict(r, id=i) for i, r in enumerate(questions(8))]
    test = [dict(r, id=100 + i) for i, r in enumerate(questions(4, offset=100))]
    test[2] = dict(train[5], id=999)
    plan = build(tmp_path, train, test, "\n            leakage: {context: [story]}", extra="leakage: warn\n")
    assert plan.stages[0].leakage == {}
    plan = build(tmp_path, train, test, "\n            leakage: {key: [q, a], context: [story]}", extra="leakage: warn\n")
    leak = plan.stages[0].leakage["t"]
    assert (leak.examples, leak.leaked, leak.by_kind, leak.by_task) == (4, 1, {"example": 1}, {"t": 1})


def test_a_leakage_field_that_is_not_a_column_is_located(tmp_path):
    with pytest.raises(TunecError) as err:
        build(tmp_path, questions(4), questions(2, offset=100), "\n            leakage: {key: [q, answer], context: [stroy]}")
    lines = str(err.value).splitlines()
    assert any(":10:24:" in ln and "tasks.t.leakage.key[1]: `answer` is not a column of task `t`" in ln for ln in lines)
    assert any("tasks.t.leakage.context[0]: `stroy` is not a column of task `t` (did you mean 'story'?)" in ln
               for ln in lines)


def test_a_field_both_key_and_context_is_an_error(tmp_path):
    with pytest.raises(TunecError, match=r"tasks.t.leakage: .*field\(s\) story cannot be both `key` and `context`"):
        build(tmp_path, questions(4), questions(2, offset=100), "\n            leakage: {key: [q, story], context: [story]}")


def test_keys_compare_whole_examples_and_long_texts():
    a = leakage.keys({"q": "2 + 2?", "a": "4"})
    assert a.example == ("2 2", "4") and a.texts == frozenset()
    evals = [leakage.keys({"q": "2+2 ?", "a": "4"}), leakage.keys({"q": "2 + 2?", "a": "5"})]
    found = leakage.find({"train": leakage.hashed([a])}, {"eval": leakage.hashed(evals)})
    assert (found["eval"].leaked, found["eval"].by_kind) == (1, {"example": 1})


def test_hashed_keys_find_what_string_keys_find():
    """The same findings from 64-bit hashes as from the normalised strings, over many random examples."""
    import random

    rng = random.Random(5)
    words = ["fox", "river", "old", "brown", "cat", "sat", "the", "a", "on", "mat"]

    def row():
        return {"q": " ".join(rng.choice(words) for _ in range(rng.randint(1, 6))), "a": rng.choice(words)}

    train = {"x": [leakage.keys(row()) for _ in range(300)], "y": [leakage.keys(row()) for _ in range(300)]}
    evals = [leakage.keys(row()) for _ in range(300)]
    whole = {t: {k.example for k in rows} for t, rows in train.items()}
    texts = {t: set().union(*(k.texts for k in rows)) for t, rows in train.items()}
    expect = {"leaked": 0, "example": 0, "text": 0, "x": 0, "y": 0}
    for k in evals:
        hits = {t for t in train if k.example in whole[t]}
        kind = "example"
        if not hits:
            hits, kind = {t for t in train if k.texts & texts[t]}, "text"
        if hits:
            expect["leaked"] += 1
            expect[kind] += 1
            for t in hits:
                expect[t] += 1
    found = leakage.find({t: leakage.hashed(rows) for t, rows in train.items()}, {"e": leakage.hashed(evals)})["e"]
    got = {"leaked": found.leaked, **{k: found.by_kind.get(k, 0) for k in ("example", "text")},
           **{t: found.by_task.get(t, 0) for t in ("x", "y")}}
    assert got == expect and expect["example"] > 0 and expect["text"] > 0
