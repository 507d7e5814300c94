"""Prompt lint (compiler/lint.py): every rule fires on a template made to break it, at the recipe line
that names the template, stays quiet on the library's templates and on every recipe in recipes/, and
each one can be switched off in the recipe."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from tunec.cli import main
from tunec.compiler.check import check
from tunec.compiler.errors import TunecError
from tunec.compiler.lint import RULES, lint_recipe
from tunec.compiler.load import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "recipes" / "demo" / "tokenizer"
MODEL = "{kind: config, config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, " \
        "num_attention_heads: 4, vocab_size: 1024}}"
WORDS = ["wonderful", "dull", "moving", "clumsy", "bright", "tedious", "tender", "noisy", "gentle", "sloppy"]


def reviews(n: int = 20, negative_every: int = 2) -> list[dict]:
    return [{"text": f"Review {i}: the film was {WORDS[i % len(WORDS)]} and the cast did scene {i} well.",
             "label": "negative" if i % negative_every == 0 else "positive"} for i in range(n)]


def write(tmp_path: Path, templates: str, rows: list[dict] | None = None, extra: str = "",
          task_extra: str = "") -> Path:
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (rows or reviews())))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        tokenizer: {{kind: local, path: {TOKENIZER}}}
        seq_len: 256
        {extra}
        tasks:
          reviews:
            source: {{kind: jsonl, path: {data}}}
            {task_extra}
            templates:
        """) + textwrap.indent(textwrap.dedent(templates), " " * 6) + textwrap.dedent(f"""\
        stages:
          - {{name: s, objective: sft, tasks: [reviews], model: {MODEL}}}
        """))
    return recipe


def findings(recipe: Path):
    return lint_recipe(check(load_recipe(recipe)))


GOOD = '- {kind: inline, name: good, prompt: "Review: {{ text }}\\nIs this review positive or negative?\\nAnswer:", ' \
       'completion: " {{ label }}"}\n'

BAD = {
    "label-in-prompt": ('- {kind: inline, name: t, prompt: "Review: {{ text }} (rated {{ label }})\\nIs it good or '
                        'bad?\\nAnswer:", completion: " {{ label }}"}\n', {}),
    "constant-prompt": ('- {kind: inline, name: t, prompt: "Is this review positive or negative?\\nAnswer:", '
                        'completion: " {{ label }}"}\n', {}),
    "choices-not-in-prompt": ('- {kind: inline, name: t, prompt: "Review: {{ text }}\\nWhat does the reviewer think?'
                              '\\nAnswer:", completion: " {{ label }}"}\n',
                              {"task_extra": "answer_choices: [positive, negative]"}),
    "separator": ('- {kind: inline, name: t, prompt: "Review: {{ text }}\\nPositive or negative? Answer:", '
                  'completion: "{{ label }}"}\n', {}),
    "whitespace-variant": (GOOD + '- {kind: inline, name: t, prompt: "Review:  {{ text }}\\nIs this review positive '
                           'or  negative?\\nAnswer:", completion: " {{ label }}"}\n', {}),
    "short-instruction": ('- {kind: inline, name: t, prompt: "{{ text }} =>", completion: " {{ label }}"}\n', {}),
    "label-imbalance": (GOOD, {"rows": reviews(40, negative_every=20)}),
    "duplicate-examples": (GOOD, {"rows": reviews(10) + reviews(3)}),
}


@pytest.mark.parametrize("rule", list(BAD))
def test_each_rule_fires_on_a_crafted_template_at_its_recipe_line(tmp_path, rule):
    templates, kw = BAD[rule]
    recipe = write(tmp_path, templates, **kw)
    found = [f for f in findings(recipe) if f.id == rule]
    assert found, f"{rule} did not fire"
    text = recipe.read_text().splitlines()
    f = found[0]
    assert f.task == "reviews" and f.location is not None
    file, line, col = f.location.rsplit(":", 2)
    assert Path(file).resolve() == recipe.resolve()
    if f.template is not None:  # the line of the template's own entry in the recipe
        assert f"name: {f.template}" in text[int(line) - 1]
    else:
        assert text[int(line) - 1].strip().startswith("source:")
    # switched off in the recipe, it is gone and the other rules are not
    quiet = write(tmp_path, templates, extra=f"lint: {{disable: [{rule}]}}", **kw)
    assert not [g for g in findings(quiet) if g.id == rule]


def test_the_separator_rule_also_catches_two_spaces(tmp_path):
    recipe = write(tmp_path, '- {kind: inline, name: t, prompt: "Review: {{ text }}\\nPositive or negative? Answer: ",'
                             ' completion: " {{ label }}"}\n')
    (f,) = [f for f in findings(recipe) if f.id == "separator"]
    assert "end in whitespace" in f.message and "20 of 20" in f.message


def test_a_good_template_is_quiet_and_thresholds_are_settable(tmp_path):
    assert findings(write(tmp_path, GOOD)) == []
    rows = reviews(40, negative_every=20)  # 38 positive, 2 negative: ratio 19
    assert [f.id for f in findings(write(tmp_path, GOOD, rows))] == ["label-imbalance"]
    assert findings(write(tmp_path, GOOD, rows, extra="lint: {label_ratio: 20}")) == []


def test_a_bad_rule_id_is_a_located_error(tmp_path):
    recipe = write(tmp_path, GOOD, extra="lint: {disable: [label-in-promt]}")
    with pytest.raises(TunecError) as err:
        load_recipe(recipe)
    (problem,) = err.value.problems
    assert problem.field == "lint.disable[0]" and problem.line == 3 and "label-in-prompt" in problem.message


def test_a_bad_threshold_is_a_located_error(tmp_path):
    recipe = write(tmp_path, GOOD, extra="lint: {leak_share: 2}")
    with pytest.raises(TunecError) as err:
        load_recipe(recipe)
    (problem,) = err.value.problems
    assert problem.field == "lint.leak_share" and problem.line == 3


# A family's rows, as a dataset would hold them: distinct, balanced, labels from the family's own words.
def _rows(family: str, i: int) -> dict:
    w = WORDS[i % len(WORDS)]
    return {
        "arithmetic": {"question": f"What is {i + 2} plus {i + 5}?", "answer": str(2 * i + 7)},
        "dialogue": {"context": f"A: I saw a {w} play on day {i}.\nB: Which one?", "response": f"It was number {i}."},
        "extractive_qa": {"context": f"The river Avon{i} runs past the town of Leck{i}. It floods in spring.",
                          "question": f"Which town does the river Avon{i} run past?", "answer": f"Leck{i}"},
        "ner": {"text": f"Maria{i} moved to Porto{i} last year.", "entities": f"Maria{i}: PER; Porto{i}: LOC"},
        "nli": {"premise": f"A {w} dog runs in park {i}.", "hypothesis": f"An animal is outside near {i}.",
                "label": ["entailment", "neutral", "contradiction"][i % 3]},
        "plural": {"word": ["cat", "box", "child", "mouse", "city", "leaf", "foot", "bus"][i % 8] + ("" if i < 8 else
                   "kin" * (i // 8)),
                   "plural": ["cats", "boxes", "children", "mice", "cities", "leaves", "feet", "buses"][i % 8]
                   + ("" if i < 8 else "kins" * (i // 8))},
        "qa": {"instruction": f"Name a colour that rhymes with word {i}.", "input": f"Word {i}: {w}",
               "output": f"Colour {i * 7} of the list"},
        "sentiment": {"text": f"Review {i}: a {w} film.", "label": ["positive", "negative"][i % 2]},
        "summarization": {"document": f"On day {i} the council met for hours and argued about {w} roads, then "
                                      f"voted to repair them by spring.", "summary": f"Council {i} agrees repairs."},
        "topic": {"text": f"Match {i} ended with a {w} goal.", "label": ["sports", "politics"][i % 2]},
        "translation": {"source": f"The {w} house {i}.", "source_lang": "English", "target": f"La maison {i}.",
                        "target_lang": "French"},
        "yes_no_qa": {"passage": f"Lake {i} is deep and {w}.", "question": f"is lake {i} deep",
                      "answer": ["yes", "no"][i % 2]},
    }[family]


CHOICES = {"nli": "[entailment, neutral, contradiction]", "sentiment": "[positive, negative]",
           "topic": "[sports, politics]"}


def test_the_library_templates_are_quiet(tmp_path):
    from tunec.compiler import library
    from tunec.compiler.templates import LIBRARY_DIR

    # a family's templates that read `answer_choices` get a task that has them; the others (written to
    # be "usable without that column") one that has none
    by_task: dict[tuple[str, bool], list[str]] = {}
    for e in library.entries([LIBRARY_DIR]):
        family = e.name.split("/")[0]
        by_task.setdefault((family, family in CHOICES and "answer_choices" in e.variables), []).append(e.name)
    tasks = []
    for (family, with_choices), names in sorted(by_task.items()):
        data = tmp_path / f"{family}.jsonl"
        data.write_text("".join(json.dumps(_rows(family, i)) + "\n" for i in range(24)))
        choices = f", answer_choices: {CHOICES[family]}" if with_choices else ""
        name = family + ("_choices" if with_choices else "")
        tasks.append(f"  {name}: {{source: {{kind: jsonl, path: {data}}}, templates: [{', '.join(names)}]{choices}}}")
    recipe = tmp_path / "library.yaml"
    recipe.write_text(f"tokenizer: {{kind: local, path: {TOKENIZER}}}\nseq_len: 512\ntasks:\n" + "\n".join(tasks)
                      + f"\nstages:\n  - {{name: s, objective: sft, tasks: [{', '.join(t.split(':')[0].strip() for t in tasks)}], "
                      f"model: {MODEL}}}\n")
    assert [str(f) for f in findings(recipe)] == []
    # and not because nothing rendered: every template rendered every row
    from tunec.compiler.lint import _render
    from tunec.compiler.sources import load_part

    checked = check(load_recipe(recipe))
    for name, task in checked.recipe.tasks.items():
        rendered = _render(task, checked.templates[name], load_part(checked.loaded, name, task, "train"))
        assert [len(r) for r in rendered] == [24] * len(checked.templates[name]), name


RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "templates" not in p.parts)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_lints_clean(recipe):
    if "../shared/data" in recipe.read_text() or "shared/data" in recipe.read_text():
        if not (ROOT.parent / "shared" / "data").is_dir():
            pytest.skip("needs ../shared/data")
    assert [str(f) for f in findings(recipe)] == []


def test_validate_lint_prints_findings_and_compile_keeps_them_in_the_plan(tmp_path):
    templates, kw = BAD["choices-not-in-prompt"]
    recipe = write(tmp_path, templates, **kw)
    result = CliRunner().invoke(main, ["validate", str(recipe), "--lint"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("lint: ")]
    assert len(lines) == 1 and "[choices-not-in-prompt]" in lines[0] and f"{recipe}:" in lines[0].replace(
        str(recipe.resolve()), str(recipe))
    assert "lint:" not in CliRunner().invoke(main, ["validate", str(recipe)]).output

    from tunec.compiler.build import Options, compile_recipe

    compile_recipe(recipe, tmp_path / "out", Options(workers=1))
    saved = json.loads((tmp_path / "out" / "plan.json").read_text())["lint"]
    assert [(f["id"], f["task"], f["template"]) for f in saved] == [("choices-not-in-prompt", "reviews", "t")]
    assert set(saved[0]) == {"id", "message", "location", "task", "template"}
    assert saved[0]["location"].split(":")[-2:] == lines[0].split(": [")[0].split(":")[-2:]


def test_the_rule_ids_are_the_schema_s():
    from typing import get_args

    from tunec.compiler.recipe import LintRule

    assert tuple(get_args(LintRule)) == RULES


PROMPTSOURCE = """\
dataset: toy
templates:
  a1: !Template
    answer_choices: positive ||| negative
    id: a1
    jinja: 'Review: {{ text }} Is it positive or negative? ||| {{ answer_choices[label] }}'
    metadata: !TemplateMetadata {original_task: true}
    name: fine
    reference: ''
  b2: !Template
    answer_choices: positive ||| negative
    id: b2
    jinja: 'Review: {{ text }} What does the reviewer think? ||| {{ answer_choices[label] }}'
    metadata: !TemplateMetadata {original_task: true}
    name: no choices
    reference: ''
"""


def test_a_promptsource_template_is_located_at_its_own_line(tmp_path):
    (tmp_path / "templates.yaml").write_text(PROMPTSOURCE)
    rows = [dict(r, label=int(r["label"] == "negative")) for r in reviews()]
    recipe = write(tmp_path, f"- {{kind: promptsource, path: {tmp_path / 'templates.yaml'}}}\n", rows)
    (f,) = findings(recipe)
    assert (f.id, f.template) == ("choices-not-in-prompt", "no choices")
    file, line = f.location.rsplit(":", 1)
    assert Path(file).resolve() == (tmp_path / "templates.yaml").resolve()
    assert "name: no choices" in "\n".join(PROMPTSOURCE.splitlines()[int(line) - 1:int(line) + 5])


def test_a_recompile_reads_the_findings_from_the_cache(tmp_path, monkeypatch):
    from tunec.compiler import lint as lint_mod
    from tunec.compiler.build import Options, compile_recipe

    templates, kw = BAD["choices-not-in-prompt"]
    recipe = write(tmp_path, templates, **kw)
    first = compile_recipe(recipe, tmp_path / "out", Options(workers=1)).lint
    assert [f.id for f in first] == ["choices-not-in-prompt"]

    def no_data(*args):
        raise AssertionError("the task was linted again")

    monkeypatch.setattr(lint_mod, "_task_findings", no_data)
    assert compile_recipe(recipe, tmp_path / "out", Options(workers=1)).lint == first
    recipe.write_text(recipe.read_text() + "# changed\n")  # moves nothing the findings say: still cached
    assert compile_recipe(recipe, tmp_path / "out", Options(workers=1)).lint == first
    recipe.write_text("# a line above everything\n" + recipe.read_text())  # every location moves: lint again
    with pytest.raises(AssertionError, match="linted again"):
        compile_recipe(recipe, tmp_path / "out", Options(workers=1))
    data = tmp_path / "reviews.jsonl"
    recipe.write_text(recipe.read_text().removeprefix("# a line above everything\n"))
    assert compile_recipe(recipe, tmp_path / "out", Options(workers=1)).lint == first
    data.write_text(data.read_text() + json.dumps(reviews(1)[0]) + "\n")  # the rows changed: lint again
    with pytest.raises(AssertionError, match="linted again"):
        compile_recipe(recipe, tmp_path / "out", Options(workers=1))


CLEAN = "{% block prompt %}Review: {{ text }}\nIs this review positive or negative?\nAnswer:{% endblock %}" \
        "{% block completion %} {{ label }}{% endblock %}\n"
LEAKY = "{% block prompt %}Review: {{ text }} ({{ label }})\nWhat does the reviewer think of it?\nAnswer:" \
        "{% endblock %}{% block completion %} {{ label }}{% endblock %}\n"


def _three_tasks(tmp_path: Path) -> tuple[Path, Path]:
    """A recipe of three tasks, each with its own template file; the second one's template leaks its label."""
    tasks = []
    for i, name in enumerate(("a", "b", "c")):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in reviews(20 + i)))
        template = tmp_path / f"{name}.j2"
        template.write_text(LEAKY if name == "b" else CLEAN)
        tasks.append(f"  {name}: {{source: {{kind: jsonl, path: {data}}}, templates: [{{kind: file, path: {template}}}]}}")
    recipe = tmp_path / "three.yaml"
    recipe.write_text(f"tokenizer: {{kind: local, path: {TOKENIZER}}}\nseq_len: 256\ntasks:\n" + "\n".join(tasks)
                      + f"\nstages:\n  - {{name: s, objective: sft, tasks: [a, b, c], model: {MODEL}}}\n")
    return recipe, tmp_path / "c.j2"


def test_a_one_template_edit_lints_only_that_task_with_the_findings_of_a_full_lint(tmp_path, monkeypatch):
    from tunec.compiler import lint as lint_mod

    recipe, template = _three_tasks(tmp_path)
    cache = tmp_path / "cache"
    linted: list[str] = []
    real = lint_mod._task_findings

    def counting(checked, name, *args):
        linted.append(name)
        return real(checked, name, *args)

    monkeypatch.setattr(lint_mod, "_task_findings", counting)
    first = lint_recipe(check(load_recipe(recipe)), cache)
    assert linted == ["a", "b", "c"] and [(f.id, f.task) for f in first] == [("label-in-prompt", "b")]
    linted.clear()
    assert lint_recipe(check(load_recipe(recipe)), cache) == first and linted == []  # nothing changed
    template.write_text(LEAKY)
    edited = lint_recipe(check(load_recipe(recipe)), cache)
    assert linted == ["c"]  # one task linted again, by its content key
    assert [(f.id, f.task) for f in edited] == [("label-in-prompt", "b"), ("label-in-prompt", "c")]
    linted.clear()
    assert edited == lint_recipe(check(load_recipe(recipe))) and linted == ["a", "b", "c"]  # a full lint agrees


def test_a_damaged_lint_entry_is_linted_again(tmp_path):
    recipe, _ = _three_tasks(tmp_path)
    cache = tmp_path / "cache"
    first = lint_recipe(check(load_recipe(recipe)), cache)
    entries = sorted((cache / "lint").rglob("*.json"))
    assert len(entries) == 3
    for e in entries:
        e.write_text('[{"id": "label-in-prompt"')  # cut short
    assert lint_recipe(check(load_recipe(recipe)), cache) == first
    assert all(json.loads(e.read_text()) is not None for e in entries)  # rewritten whole


def _regex_mentions(text: str, word: str) -> bool:
    """The rule's definition, as a regex: what the ASCII fast path must agree with."""
    import re

    word = word.strip()
    if not word:
        return False
    pattern = re.escape(word)
    if re.match(r"\w", word[0]):
        pattern = r"(?<!\w)" + pattern
    if re.match(r"\w", word[-1]):
        pattern += r"(?!\w)"
    return re.search(pattern, text, flags=re.IGNORECASE) is not None


def test_mentions_without_a_regex_agrees_with_the_regex():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from tunec.compiler.lint import _mentions

    # non-ASCII: letters the regex matches with ASCII ones (Kelvin sign, long s, dotted I, dotless i),
    # other word characters (é, an Arabic-Indic digit), a non-word one (an em dash)
    alphabet = st.sampled_from(list("aAbBsSkKiI_ 1.,:-\n\0") + ["\u00e9", "\u017f", "\u212a", "\u0130", "\u0131",
                                                                 "\u0663", "\u2014"])

    @settings(max_examples=2000, deadline=None)
    @given(st.text(alphabet, max_size=12), st.text(alphabet, min_size=1, max_size=4))
    def agree(text: str, word: str) -> None:
        assert _mentions(text, word) == _regex_mentions(text, word)

    agree()
    assert _mentions("The answer is Positive.", "positive") and not _mentions("positively", "positive")
    assert _mentions("x (a+b) y", "(a+b)") and not _mentions("a_b", "b")


def test_the_lint_reads_rows_the_compile_hands_it_and_finds_the_same(tmp_path, monkeypatch):
    from tunec.compiler import lint as lint_mod
    from tunec.compiler.sources import load_part

    recipe, _ = _three_tasks(tmp_path)
    checked = check(load_recipe(recipe))
    alone = lint_recipe(checked)
    given = {(n, "train"): load_part(checked.loaded, n, checked.recipe.tasks[n], "train") for n in ("a", "b")}
    read: list[str] = []
    real = lint_mod.load_part

    def counting(loaded, name, *args):
        read.append(name)
        return real(loaded, name, *args)

    monkeypatch.setattr(lint_mod, "load_part", counting)
    assert lint_recipe(checked, rows=given) == alone and [(f.id, f.task) for f in alone] == [("label-in-prompt", "b")]
    assert read == ["c"]  # a and b came from the compile; c was not handed over


def test_rows_have_one_digest_exactly_when_their_values_print_as_the_same_json():
    """The duplicate rule's row digest agrees with comparing the rows' JSON texts (its definition)."""
    import datetime

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from tunec.compiler.lint import _row_digest

    day = datetime.date(2024, 1, 2)
    value = st.one_of(st.sampled_from(["", "a", "1", "true", '"a"', "2024-01-02", "é\n", 1, 1.0, True, None, day,
                                       [1], ["a"], {"k": "a"}, [day], False, 0, 10**20, "100000000000000000000"]),
                      st.text(max_size=3), st.integers(-2, 2))

    def as_json(row: tuple) -> str:
        return json.dumps(list(row), default=str, ensure_ascii=False)

    rows = st.integers(1, 3).flatmap(lambda n: st.tuples(*[st.tuples(value, value)] * n))  # two rows, n columns

    @settings(max_examples=1500, deadline=None)
    @given(rows)
    def agree(pairs: tuple) -> None:
        a, b = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
        assert (_row_digest(a) == _row_digest(b)) == (as_json(a) == as_json(b))

    agree()
    assert _row_digest(("2024-01-02",)) == _row_digest((day,))  # a date prints as its string
    assert _row_digest((1,)) != _row_digest((1.0,)) != _row_digest((True,))
    assert _row_digest(("a", "bc")) != _row_digest(("ab", "c"))


def test_a_scalar_is_digested_as_the_json_encoder_prints_it():
    """The digest's shortcut for ints, bools and None gives what encoding them as JSON gives."""
    from tunec.compiler.lint import _json_value

    encode = json.JSONEncoder(default=str, ensure_ascii=False).encode

    class Count(int):
        def __repr__(self) -> str:
            return "a count"

    for value in (0, -7, 2**70, True, False, None, Count(3), 1.5, float("nan")):
        assert _json_value(value) == ("json", encode(value)), value
