"""Instruction-tuning collections: template policies, few-shot, answer choices, mixtures,
held-out tasks, eval selections, leakage, promptsource. Exact counts on small fixtures."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.errors import TunecError
from tunec.compiler.pack import IGNORE
from tunec.compiler.shards import open_shard

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "recipes" / "demo" / "tokenizer"
EOS = "<|endoftext|>"


def jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def facts(n: int, offset: int = 0, answer: str | None = None) -> list[dict]:
    """Rows whose question text is unique and long enough for the leakage check."""
    return [{"id": i, "q": f"How many wheels do {i + offset} old red bicycles have?",
             "a": answer or str(2 * (i + offset))} for i in range(n)]


def recipe(tmp_path: Path, body: str, seq_len: int = 256, extra: str = "") -> Path:
    text = f"tokenizer: {{kind: local, path: {TOKENIZER}}}\nseq_len: {seq_len}\nseed: 3\n{extra}" + textwrap.dedent(body)
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


MODEL = "{kind: config, config: {model_type: llama}}"
QA = '{kind: inline, name: qa, prompt: "Q: {{ q }}\\nA:", completion: " {{ a }}"}'
QA2 = '{kind: inline, name: ask, prompt: "Question: {{ q }}\\nAnswer:", completion: " {{ a }}"}'
QA3 = "{kind: inline, name: terse, prompt: '{{ q }} =', completion: ' {{ a }}'}"


def build(tmp_path: Path, body: str, **kw):
    out = tmp_path / "out"
    plan = compile_recipe(recipe(tmp_path, body, **kw), out, Options())
    return plan, out


def docs_of(out: Path, packed, pad_id: int):
    """Every packed document as (ids, labels) arrays."""
    for shard in packed.shards:
        arrays = open_shard(out / shard.path, shard.bytes)
        for ids, labels, pos in zip(arrays["input_ids"], arrays["labels"], arrays["position_ids"]):
            starts = list(np.flatnonzero(pos == 0)) + [len(ids)]
            for lo, hi in zip(starts[:-1], starts[1:]):
                if np.all(labels[lo:hi] == IGNORE) and np.all(ids[lo:hi] == pad_id):
                    continue
                yield np.asarray(ids[lo:hi]), np.asarray(labels[lo:hi])


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TOKENIZER))


# ----------------------------------------------------------------- template policies


@pytest.mark.parametrize("policy, expected", [
    ("all", {"qa": 10, "ask": 10, "terse": 10}),
    ("round_robin", {"qa": 4, "ask": 3, "terse": 3}),
])
def test_template_policies_exact_counts(tmp_path, policy, expected):
    data = jsonl(tmp_path / "d.jsonl", facts(10))
    plan, _ = build(tmp_path, f"""
        tasks:
          t:
            source: {{kind: jsonl, path: {data}}}
            templates: [{QA}, {QA2}, {QA3}]
            template_policy: {policy}
        stages:
          - {{name: s, objective: sft, tasks: [t], model: {MODEL}}}
        """)
    assert plan.stages[0].tasks["t"].templates == expected


def test_sample_policy_is_one_seeded_template_per_example(tmp_path):
    data = jsonl(tmp_path / "d.jsonl", facts(300))
    body = f"""
        tasks:
          t:
            source: {{kind: jsonl, path: {data}}}
            templates: [{QA}, {QA2}, {QA3}]
            template_policy: sample
        stages:
          - {{name: s, objective: sft, tasks: [t], model: {MODEL}}}
        """
    plan, _ = build(tmp_path, body)
    counts = plan.stages[0].tasks["t"].templates
    assert sum(counts.values()) == 300 and plan.stages[0].tasks["t"].examples == 300
    assert all(60 < n < 140 for n in counts.values()), counts  # each template about a third
    again = compile_recipe(tmp_path / "recipe.yaml", tmp_path / "again", Options(workers=2))
    assert again.stages[0].tasks["t"].templates == counts  # seeded: same draw whatever the workers


# ----------------------------------------------------------------- few-shot


def test_few_shot_exemplars_come_from_train_rows_never_the_example_itself(tmp_path, tok):
    train = facts(30)
    test = facts(10, offset=1000)
    data = jsonl(tmp_path / "train.jsonl", train)
    held = jsonl(tmp_path / "test.jsonl", test)
    plan, out = build(tmp_path, f"""
        tasks:
          t:
            source: {{kind: jsonl, path: {{train: {data}, test: {held}}}}}
            templates: [{QA}]
            few_shot: {{shots: 3, separator: "\\n\\n"}}
            eval: {{split: test}}
        stages:
          - {{name: s, objective: sft, tasks: [t], model: {MODEL}}}
        """)
    stage = plan.stages[0]
    assert stage.tasks["t"].fewshot == 30
    train_questions = {r["q"] for r in train}
    for packed, is_eval in ((stage.train, False), (stage.eval["t"].data, True)):
        n = 0
        for ids, labels in docs_of(out, packed, plan.tokenizer.pad_id):
            text = tok.decode(ids.tolist())
            blocks = text[: -len(EOS)].split("\n\n")
            assert len(blocks) == 4  # three exemplars, then the example
            own_q = blocks[-1].split("\n")[0][len("Q: "):]
            shots = [b.split("\n")[0][len("Q: "):] for b in blocks[:-1]]
            assert own_q not in shots
            assert all(s in train_questions for s in shots)  # never an eval row
            trained = tok.decode(ids[labels != IGNORE].tolist())
            own_a = blocks[-1].split("A:")[1]
            assert trained == own_a + EOS  # exemplar answers carry no loss
            n += 1
        assert n == (10 if is_eval else 30)


def test_few_shot_drops_exemplars_to_fit_never_the_target(tmp_path, tok):
    data = jsonl(tmp_path / "d.jsonl", facts(20))
    plan, out = build(tmp_path, f"""
        tasks:
          t:
            source: {{kind: jsonl, path: {data}}}
            templates: [{QA}]
            few_shot: {{shots: 8}}
            truncation: error
        stages:
          - {{name: s, objective: sft, tasks: [t], model: {MODEL}}}
        """, seq_len=64)
    counts = plan.stages[0].tasks["t"]
    assert counts.examples == 20 and counts.truncated == 0 and counts.dropped == 0
    for ids, labels in docs_of(out, plan.stages[0].train, plan.tokenizer.pad_id):
        assert len(ids) <= 64
        text = tok.decode(ids.tolist())
        assert 1 <= text.count("Q: ") < 8  # some exemplars kept, the rest dropped
        assert tok.decode(ids[labels != IGNORE].tolist()).endswith(EOS)


def test_few_shot_share_and_range_mix_zero_and_few_shot(tmp_path):
    data = jsonl(tmp_path / "d.jsonl", facts(200))
    plan, _ = build(tmp_path, f"""
        tasks:
          t:
            source: {{kind: jsonl, path: {data}}}
            templates: [{QA}]
            few_shot: {{shots: 2, min_shots: 0, share: 0.5}}
        stages:
          - {{name: s, objective: sft, tasks: [t], model: {MODEL}}}
        """, seq_len=512)
    fewshot = plan.stages[0].tasks["t"].fewshot
    # half asked for exemplars, a third of those drew 0 shots: about 200 * 0.5 * 2/3
    assert 40 < fewshot < 95


# ----------------------------------------------------------------- answer choices


def test_answer_choices_are_shown_and_recorded_for_eval(tmp_path):
    rows = [{"text": f"Review number {i}: the product was {'great' if i % 2 else 'awful'} to use.",
             "label": "positive" if i % 2 else "negative"} for i in range(12)]
    data = jsonl(tmp_path / "d.jsonl", rows)
    plan, out = build(tmp_path, f"""
        tasks:
          t:
            source: {{kind: jsonl, path: {data}}}
            templates: [sentiment/choices]
            answer_choices: [negative, positive]
            train: {{stop: 8}}
            eval: {{start: 8}}
        stages:
          - {{name: s, objective: sft, tasks: [t], model: {MODEL}}}
        """)
    ev = plan.stages[0].eval["t"]
    assert ev.choices is not None and ev.choices.count == 4
    records = [json.loads(l) for l in (out / ev.choices.path).read_text().splitlines()]
    assert [r["row"] for r in records] == [8, 9, 10, 11]
    for r in records:
        assert r["choices"] == ["negative", "positive"]
        assert r["choices"][r["answer"]] == rows[r["row"]]["label"]
        assert "negative, positive" in r["prompt"]  # the template shows the choices
        assert r["choice_prefix"] + r["choices"][r["answer"]] == r["target"]
    assert plan.tasks["t"].answer_choices == ["negative", "positive"]


@pytest.mark.parametrize("spec", ["{kind: column, column: options}", "{kind: jinja, template: '{{ options | join(\"|||\") }}'}"])
def test_answer_choices_from_the_row(tmp_path, spec):
    rows = [{"q": f"Which colour is item {i} painted today?", "options": ["red", "blue", f"shade{i}"], "a": f"shade{i}"}
            for i in range(6)]
    data = jsonl(tmp_path / "d.jsonl", rows)
    plan, out = build(tmp_path, f"""
        tasks:
          t:
            source: {{kind: jsonl, path: {data}}}
            templates: [{{kind: inline, prompt: "{{{{ q }}}} Options: {{{{ answer_choices | join(', ') }}}}.", completion: " {{{{ a }}}}"}}]
            answer_choices: {spec}
            train: {{stop: 3}}
            eval: {{start: 3}}
        stages:
          - {{name: s, objective: sft, tasks: [t], model: {MODEL}}}
        """)
    records = [json.loads(l) for l in (out / plan.stages[0].eval["t"].choices.path).read_text().splitlines()]
    assert [(r["choices"], r["answer"]) for r in records] == [(["red", "blue", f"shade{i}"], 2) for i in (3, 4, 5)]


# ----------------------------------------------------------------- mixtures


def mixture_body(tmp_path, mixture: str, budget: str = "") -> str:
    # one answer for all: every document trains the same number of tokens
    a = jsonl(tmp_path / "a.jsonl", facts(100, answer="many"))
    b = jsonl(tmp_path / "b.jsonl", facts(10, offset=500, answer="many"))
    return f"""
        tasks:
          big: {{source: {{kind: jsonl, path: {a}}}, templates: [{QA}]}}
          small: {{source: {{kind: jsonl, path: {b}}}, templates: [{QA}]}}
        stages:
          - name: s
            objective: sft
            tasks: [big, small]
            mixture: {mixture}
            {budget}
            model: {MODEL}
        """


@pytest.mark.parametrize("mixture, budget, expected", [
    ("proportional", "", {"big": 100, "small": 10}),
    ("{kind: proportional, cap: 40}", "", {"big": 40, "small": 10}),
    ("{kind: proportional, cap: 40}", "budget: {kind: examples, count: 100}", {"big": 80, "small": 20}),
    # rates ∝ sqrt(100) : sqrt(10) = 0.759747 : 0.240253 of 110 examples
    ("{kind: temperature, temperature: 2}", "", {"big": 84, "small": 26}),
    ("{kind: weights, weights: {big: 1, small: 3}}", "budget: {kind: examples, count: 40}", {"big": 10, "small": 30}),
])
def test_mixture_strategies_exact_counts(tmp_path, mixture, budget, expected):
    plan, _ = build(tmp_path, mixture_body(tmp_path, mixture, budget))
    stage = plan.stages[0]
    assert {t: c.examples for t, c in stage.tasks.items()} == expected
    assert sum(c.trained_share for c in stage.tasks.values()) == pytest.approx(1.0, abs=1e-5)
    for t, c in stage.tasks.items():  # shares after packing: same answers, so they follow the counts
        assert c.trained_share == pytest.approx(expected[t] / sum(expected.values()), abs=1e-5)


def test_a_token_budget_fills_each_task_to_its_rate(tmp_path):
    plan, _ = build(tmp_path, mixture_body(tmp_path, "{kind: weights, weights: {big: 1, small: 1}}",
                                           "budget: {kind: tokens, count: 2000}"))
    stage = plan.stages[0]
    for c in stage.tasks.values():
        assert 1000 <= c.tokens < 1000 + 40  # just past its half of the budget
        assert c.requested_share == 0.5
    assert stage.tasks["small"].examples > 10  # repeated to reach its share


def test_mixture_is_deterministic_and_seeded(tmp_path):
    body = mixture_body(tmp_path, "{kind: proportional, cap: 40}")
    plan, out = build(tmp_path, body)
    compile_recipe(tmp_path / "recipe.yaml", tmp_path / "again", Options(workers=2))
    assert (out / "plan.json").read_bytes() == (tmp_path / "again" / "plan.json").read_bytes()
    reseeded_recipe = tmp_path / "reseeded.yaml"
    reseeded_recipe.write_text((tmp_path / "recipe.yaml").read_text().replace("seed: 3", "seed: 4"))
    reseeded = compile_recipe(reseeded_recipe, tmp_path / "reseeded", Options())
    assert reseeded.stages[0].train.shards[0].sha256 != plan.stages[0].train.shards[0].sha256


# ----------------------------------------------------------------- splits, held-out, leakage


def test_eval_fraction_is_seeded_and_disjoint_from_train(tmp_path, tok):
    data = jsonl(tmp_path / "d.jsonl", facts(50))
    plan, out = build(tmp_path, f"""
        tasks:
          t: {{source: {{kind: jsonl, path: {data}}}, templates: [{QA}], eval: {{fraction: 0.2}}}}
        stages:
          - {{name: s, objective: sft, tasks: [t], model: {MODEL}}}
        """)
    stage = plan.stages[0]
    assert stage.tasks["t"].examples == 40 and stage.eval["t"].counts.examples == 10
    train = {tok.decode(i.tolist()) for i, _ in docs_of(out, stage.train, plan.tokenizer.pad_id)}
    ev = {tok.decode(i.tolist()) for i, _ in docs_of(out, stage.eval["t"].data, plan.tokenizer.pad_id)}
    assert len(train) == 40 and len(ev) == 10 and not train & ev


def test_eval_file_and_held_out_tasks(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", facts(20))
    a_eval = jsonl(tmp_path / "a_eval.jsonl", facts(5, offset=100))
    b = jsonl(tmp_path / "b.jsonl", facts(7, offset=200))
    plan, out = build(tmp_path, f"""
        tasks:
          a: {{source: {{kind: jsonl, path: {a}}}, templates: [{QA}], eval: {{file: {a_eval}}}}}
          b: {{source: {{kind: jsonl, path: {b}}}, templates: [{QA}, {QA2}]}}
        stages:
          - {{name: s, objective: sft, tasks: [a], held_out: [b], model: {MODEL}}}
        """)
    stage = plan.stages[0]
    assert set(stage.tasks) == {"a"}  # b is never trained
    assert stage.eval["a"].counts.examples == 5 and not stage.eval["a"].held_out
    assert stage.eval["b"].held_out and stage.eval["b"].counts.examples == 14
    assert stage.train.tokens == stage.tasks["a"].tokens


def test_a_task_both_trained_and_held_out_is_an_error(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", facts(5))
    with pytest.raises(TunecError, match="held out and also trained"):
        build(tmp_path, f"""
            tasks:
              a: {{source: {{kind: jsonl, path: {a}}}, templates: [{QA}]}}
            stages:
              - {{name: s, objective: sft, tasks: [a], held_out: [a], model: {MODEL}}}
            """)


def leak_body(tmp_path: Path) -> str:
    train = facts(30)
    test = facts(10, offset=1000)
    test[3] = dict(train[17], id=9999)  # a planted duplicate (another id, same text)
    test[6] = dict(train[2], q=train[2]["q"].upper() + "  ")  # same text, other case and spacing
    a = jsonl(tmp_path / "train.jsonl", train)
    b = jsonl(tmp_path / "test.jsonl", test)
    return f"""
        tasks:
          t: {{source: {{kind: jsonl, path: {{train: {a}, test: {b}}}}}, templates: [{QA}], eval: {{split: test}}}}
        stages:
          - {{name: s, objective: sft, tasks: [t], model: {MODEL}}}
        """


def test_leakage_check_catches_a_planted_duplicate(tmp_path):
    with pytest.raises(TunecError) as err:
        build(tmp_path, leak_body(tmp_path))
    assert "2 of 10 eval examples of task 't' also appear in the training mixture: t (2)" in str(err.value)
    assert not (tmp_path / "out" / "plan.json").exists()


def test_leakage_can_be_a_warning_recorded_in_the_plan(tmp_path, caplog):
    plan, _ = build(tmp_path, leak_body(tmp_path), extra="leakage: warn\n")
    leak = plan.stages[0].leakage["t"]
    assert (leak.examples, leak.leaked, leak.by_task) == (10, 2, {"t": 2})
    assert any(r.levelname == "WARNING" and "also appear in the training mixture" in r.getMessage()
               for r in caplog.records)


# ----------------------------------------------------------------- promptsource


PROMPTSOURCE = """\
dataset: toy_nli
templates:
  0b1d: !Template
    answer_choices: yes ||| maybe ||| no
    id: 0b1d
    jinja: '{{ premise }} Question: {{ hypothesis }} {{ ["Yes, no, or maybe?", "Yes, maybe, or no?"] | choice }} ||| {{ answer_choices[label] }}'
    metadata: !TemplateMetadata
      choices_in_prompt: true
      original_task: true
    name: question_choice
    reference: ''
  7a3c: !Template
    answer_choices: null
    id: 7a3c
    jinja: '{% if label == 0 %}{{ premise }} Write a sentence that follows from it. ||| {{ hypothesis }}{% endif %}'
    metadata: !TemplateMetadata {original_task: false}
    name: generate_entailed
    reference: ''
  c9e2: !Template
    answer_choices: null
    id: c9e2
    jinja: '{% for p, h in zip([premise], [hypothesis]) %}{{ p }} / {{ h }}{% endfor %} Most common word: {{ words | most_frequent }} ||| {{ words | most_frequent }}'
    metadata: !TemplateMetadata {original_task: false}
    name: zip_and_frequent
    reference: ''
"""


def test_promptsource_templates_render_unchanged(tmp_path, tok):
    (tmp_path / "ps").mkdir()
    (tmp_path / "ps" / "templates.yaml").write_text(PROMPTSOURCE)
    rows = [{"premise": f"Premise number {i} says the cat sleeps.", "hypothesis": f"Hypothesis {i}.",
             "label": i % 3, "words": ["cat", "dog", "cat"]} for i in range(9)]
    data = jsonl(tmp_path / "d.jsonl", rows)
    plan, out = build(tmp_path, f"""
        tasks:
          nli:
            source: {{kind: jsonl, path: {data}}}
            templates:
              - {{kind: promptsource, path: ps/templates.yaml, names: [question_choice, generate_entailed, zip_and_frequent]}}
        stages:
          - {{name: s, objective: sft, tasks: [nli], model: {MODEL}}}
        """)
    counts = plan.stages[0].tasks["nli"]
    # generate_entailed applies only to label 0 (3 rows): the other 6 are counted, not rendered empty
    assert counts.templates == {"question_choice": 9, "generate_entailed": 3, "zip_and_frequent": 9}
    assert counts.skipped == {"generate_entailed": 6}
    texts = [tok.decode(i.tolist()) for i, _ in docs_of(out, plan.stages[0].train, plan.tokenizer.pad_id)]
    qc = [t for t in texts if "Question:" in t]
    assert len(qc) == 9
    for t in qc:
        assert "Yes, no, or maybe?" in t or "Yes, maybe, or no?" in t  # `choice` filter
        i = int(t.split("Premise number ")[1].split(" ")[0])
        assert t.endswith(" " + ["yes", "maybe", "no"][i % 3] + EOS)  # answer_choices[label]
    zf = [t for t in texts if "Most common word: cat ||| " not in t and "Most common word: cat" in t]
    assert len(zf) == 9 and all(" / Hypothesis" in t and t.endswith(" cat" + EOS) for t in zf)
    again = compile_recipe(tmp_path / "recipe.yaml", tmp_path / "again", Options(workers=2))
    assert again.stages[0].train.shards[0].sha256 == plan.stages[0].train.shards[0].sha256  # `choice` is seeded


def test_promptsource_unknown_template_name_is_located(tmp_path):
    (tmp_path / "templates.yaml").write_text(PROMPTSOURCE)
    data = jsonl(tmp_path / "d.jsonl", [{"premise": "p", "hypothesis": "h", "label": 0, "words": ["a"]}])
    with pytest.raises(TunecError, match=r"recipe.yaml:\d+:\d+: tasks.nli.templates\[0\].names: no promptsource "
                                         r"template named 'question_choise' \(did you mean 'question_choice'\?\)"):
        build(tmp_path, f"""
            tasks:
              nli:
                source: {{kind: jsonl, path: {data}}}
                templates: [{{kind: promptsource, path: templates.yaml, names: [question_choise]}}]
            stages:
              - {{name: s, objective: sft, tasks: [nli], model: {MODEL}}}
            """)


def test_a_task_held_out_then_fine_tuned_leaks_only_into_later_stages(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", facts(20))
    b = jsonl(tmp_path / "b.jsonl", facts(8, offset=300))
    body = f"""
        tasks:
          a: {{source: {{kind: jsonl, path: {a}}}, templates: [{QA}]}}
          b: {{source: {{kind: jsonl, path: {b}}}, templates: [{QA}]}}
        stages:
          - {{name: instruct, objective: sft, tasks: [a], held_out: [b], model: {MODEL}}}
          - {{name: tune, objective: sft, tasks: [b], model: {{kind: stage, stage: instruct}}}}
        """
    plan, _ = build(tmp_path, body)  # b's eval in stage 1 comes before stage 2 trains on it: no leak
    assert plan.stages[0].eval["b"].held_out and plan.stages[0].leakage == {}
    (tmp_path / "recipe.yaml").write_text((tmp_path / "recipe.yaml").read_text().replace(
        "tasks: [b], model: {kind: stage, stage: instruct}", "tasks: [b], held_out: [a], model: {kind: stage, stage: instruct}"))
    with pytest.raises(TunecError, match="stage 'tune': 20 of 20 eval examples of task 'a' also appear"):
        compile_recipe(tmp_path / "recipe.yaml", tmp_path / "out2", Options())
