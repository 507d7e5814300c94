"""What `check` remembers in the compile cache: templates found without problems (by everything the
analysis reads) and the columns peeked in a file (by its bytes). A change to any of those checks again;
a problem is never remembered."""

from __future__ import annotations

import pytest

from tunec.compiler import check as check_module
from tunec.compiler.check import check
from tunec.compiler.errors import TunecError
from tunec.compiler.load import load_recipe

RECIPE = """\
tokenizer: {kind: local, path: tok}
seq_len: 64
tasks:
  sums:
    source: {kind: jsonl, path: {train: tiny/train.jsonl, test: tiny/test.jsonl}}
    fields: {question: q, answer: a}
    templates: [arithmetic/qa, {kind: inline, name: mine, prompt: "{{ question }} =", completion: " {{ answer }}"}]
    eval: {split: test}
stages:
  - {name: sft, objective: sft, tasks: [sums], model: {kind: hub, id: org/model}}
"""


@pytest.fixture
def recipe(write_recipe, tiny_task_dir, tmp_path):
    (tmp_path / "tok").mkdir()
    return write_recipe(RECIPE)


def counting(monkeypatch, name: str) -> list:
    calls: list = []
    real = getattr(check_module, name)
    monkeypatch.setattr(check_module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_a_second_check_parses_no_template_and_reads_no_data(recipe, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = check(load_recipe(recipe), cache)
    analysed, peeked = counting(monkeypatch, "analyse"), counting(monkeypatch, "peek_columns")
    again = check(load_recipe(recipe), cache)
    assert analysed == [] and peeked == []
    assert again.columns == first.columns and again.templates == first.templates
    check(load_recipe(recipe))  # without a cache: everything checked
    assert len(analysed) == 2 and len(peeked) == 1


def test_a_template_edit_or_other_columns_check_again_and_problems_are_never_remembered(recipe, tmp_path,
                                                                                       monkeypatch):
    cache = tmp_path / "cache"
    check(load_recipe(recipe), cache)
    analysed = counting(monkeypatch, "analyse")
    recipe.write_text(RECIPE.replace("{{ question }} =", "{{ question }} = ?"), encoding="utf-8")
    check(load_recipe(recipe), cache)
    assert len(analysed) == 1  # the edited template only
    # the field map renames `question`: the remembered clean results do not apply to these columns
    recipe.write_text(RECIPE.replace("{question: q, answer: a}", "{query: q, answer: a}"), encoding="utf-8")
    for _ in range(2):
        with pytest.raises(TunecError, match="uses `question`, which the task does not provide"):
            check(load_recipe(recipe), cache)


def test_new_bytes_in_the_data_file_are_peeked_again(recipe, tmp_path, tiny_task_dir, monkeypatch):
    cache = tmp_path / "cache"
    check(load_recipe(recipe), cache)
    train = tiny_task_dir / "train.jsonl"
    train.write_text('{"q": "1 + 1?", "a": "2", "extra": 1}\n' + train.read_text(), encoding="utf-8")
    peeked = counting(monkeypatch, "peek_columns")
    checked = check(load_recipe(recipe), cache)
    assert len(peeked) == 1
    assert checked.columns["sums"] == ["question", "answer"]
    train.write_bytes(b'{"q": "\xff", "a": "2"}\n')  # not UTF-8: located, each time
    for _ in range(2):
        with pytest.raises(TunecError, match=r"train.jsonl:1:.*not valid UTF-8"):
            check(load_recipe(recipe), cache)
