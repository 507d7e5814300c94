"""The trained signal is what the recipe means: `|||` in data, value maps, the mask audit, and a
property test over hostile data values."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.errors import TunecError
from tunec.compiler.recipe import JinjaChoices
from tunec.compiler.templates import Renderer, TemplateSource
from tunec.compiler.units import answer_choices

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "recipes" / "demo" / "tokenizer"
MODEL = "{kind: config, config: {model_type: llama}}"


def jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def build(tmp_path: Path, body: str, extra: str = ""):
    text = f"tokenizer: {{kind: local, path: {TOKENIZER}}}\nseq_len: 256\nseed: 3\n{extra}" + textwrap.dedent(body)
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return compile_recipe(path, tmp_path / "out", Options()), tmp_path / "out"


def ps_source(jinja: str, choices: str | None = None) -> TemplateSource:
    return TemplateSource(name="ps", text=jinja, filename="t.yaml", kind="promptsource", answer_choices=choices)


# ----------------------------------------------------------------- `|||` in data values


def test_separator_inside_a_value_stays_in_the_prompt():
    r = Renderer([ps_source("{{ premise }} True? ||| {{ answer }}")])
    assert r.render(0, {"premise": "12 ||| 3 is a pipe", "answer": "yes"}) == ("12 ||| 3 is a pipe True?", " yes")
    # and in the target too
    assert r.render(0, {"premise": "p", "answer": "a ||| b"}) == ("p True?", " a ||| b")


def test_separator_inside_a_choice_is_one_choice():
    r = Renderer([ps_source("{{ q }} ||| {{ answer_choices[label] }}", "{{ c1 }} ||| {{ c2 }}")])
    row = {"q": "which?", "c1": "x ||| y", "c2": "z", "label": 0}
    assert r.choices(0, row) == ["x ||| y", "z"]
    assert r.render(0, {**row, "answer_choices": r.choices(0, row)}) == ("which?", " x ||| y")
    # a task's `answer_choices: {kind: jinja}` splits the same way
    spec = JinjaChoices(kind="jinja", template="{{ c1 }} ||| {{ c2 }}")
    assert answer_choices(spec, None, Renderer([]), -1, row, 0) == ["x ||| y", "z"]


def test_filters_do_not_break_the_protected_separator():
    r = Renderer([ps_source("{{ premise | upper }} ||| {{ answer | title }}")])
    assert r.render(0, {"premise": "a ||| b", "answer": "c ||| d"}) == ("A ||| B", " C ||| D")


# ----------------------------------------------------------------- value maps in the field map


def nli_rows(labels: list[str]) -> list[dict]:
    return [{"premise": f"Premise {i} says the cat sleeps.", "hypothesis": f"Cat {i} sleeps.", "gold": g}
            for i, g in enumerate(labels)]


PS_NLI = """\
templates:
  a1: !Template
    answer_choices: yes ||| no
    id: a1
    jinja: '{{ premise }} So {{ hypothesis }}? ||| {{ answer_choices[label] }}'
    name: so
"""


def nli_body(tmp_path: Path, labels: list[str], field: str) -> str:
    (tmp_path / "ps.yaml").write_text(PS_NLI)
    data = jsonl(tmp_path / "d.jsonl", nli_rows(labels))
    return f"""
        tasks:
          nli:
            source: {{kind: jsonl, path: {data}}}
            fields:
              premise: premise
              hypothesis: hypothesis
              label: {field}
            templates: [{{kind: promptsource, path: ps.yaml}}]
        stages:
          - {{name: s, objective: sft, tasks: [nli], model: {MODEL}}}
        """


def trained_texts(out: Path, plan) -> list[tuple[str, str]]:
    """Every packed document as (whole text, trained text), decoded with the build's tokenizer."""
    from transformers import AutoTokenizer

    from tunec.compiler.pack import IGNORE
    from tunec.compiler.shards import open_shard

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    docs = []
    for shard in plan.stages[0].train.shards:
        arrays = open_shard(out / shard.path, shard.bytes)
        for ids, labels, pos in zip(arrays["input_ids"], arrays["labels"], arrays["position_ids"]):
            starts = list(np.flatnonzero(pos == 0)) + [len(ids)]
            for lo, hi in zip(starts[:-1], starts[1:]):
                if np.all(labels[lo:hi] == IGNORE):
                    continue
                i, lab = np.asarray(ids[lo:hi]), np.asarray(labels[lo:hi])
                docs.append((tok.decode(i.tolist()), tok.decode(i[lab != IGNORE].tolist())))
    return docs


def test_a_value_map_turns_string_labels_into_indices(tmp_path):
    plan, out = build(tmp_path, nli_body(tmp_path, ["entailment", "not_entailment", "entailment"],
                                         "{column: gold, map: {entailment: 0, not_entailment: 1}}"))
    got = sorted(trained_texts(out, plan))
    assert [t for _, t in got] == [" yes<|endoftext|>", " no<|endoftext|>", " yes<|endoftext|>"]
    assert [d.split(" says")[0] for d, _ in got] == ["Premise 0", "Premise 1", "Premise 2"]


def test_an_unmapped_value_is_an_error_naming_the_row(tmp_path):
    with pytest.raises(TunecError) as err:
        build(tmp_path, nli_body(tmp_path, ["entailment", "entailment", "neutral"],
                                 "{column: gold, map: {entailment: 0, not_entailment: 1}}"))
    assert "recipe.yaml:" in str(err.value)
    assert "tasks.nli.fields.label.map: train row 2: value 'neutral' of column `gold` is not in the map" \
        in str(err.value)


def test_a_value_map_of_a_missing_column_is_located(tmp_path):
    with pytest.raises(TunecError, match=r"tasks.nli.fields.label: column `gld` is not in the source "
                                         r"\(did you mean 'gold'\?\)"):
        build(tmp_path, nli_body(tmp_path, ["entailment"], "{column: gld, map: {entailment: 0}}"))


# ----------------------------------------------------------------- the mask audit


QA = '{kind: inline, name: qa, prompt: "Q: {{ q }}\\nA:", completion: " {{ a }}"}'


def qa_body(tmp_path: Path, rows: list[dict], extra_task: str = "") -> str:
    data = jsonl(tmp_path / "qa.jsonl", rows)
    return f"""
        tasks:
          qa: {{source: {{kind: jsonl, path: {data}}}, templates: [{QA}]{extra_task}}}
        stages:
          - {{name: s, objective: sft, tasks: [qa], model: {MODEL}}}
        """


def test_the_mask_audit_fails_loudly_on_a_wrong_trained_token(tmp_path, monkeypatch):
    """A mask one token too early (the class of bug the audit exists for) stops the compile, naming
    the task, the row and the template."""
    from tunec.compiler import units

    real = units.encode_texts

    def one_token_early(*args, **kw):
        encs = real(*args, **kw)
        for e in encs:
            e.spans = [(max(s - 1, 1), e_) for s, e_ in e.spans]
        return encs

    monkeypatch.setattr(units, "encode_texts", one_token_early)
    rows = [{"q": f"What is {i} plus 1?", "a": str(i + 1)} for i in range(3)]
    with pytest.raises(TunecError) as err:
        build(tmp_path, qa_body(tmp_path, rows))
    message = str(err.value)
    assert "task 'qa'" in message and "row 0" in message and "template 'qa'" in message
    assert "mask audit" in message and "' 1<|endoftext|>'" in message


def test_the_audit_interface_takes_chat_documents():
    """Chat documents: one intended piece per trained assistant turn (its content and end of turn)."""
    from tokenizers import Tokenizer

    from tunec.compiler.audit import Intended, audit

    backend = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    text = "<user>hi</user><bot>hello there</bot><user>bye</user><bot>see you</bot>"
    enc = backend.encode(text, add_special_tokens=False)
    spans = [(text.index("hello"), text.index("<user>bye")), (text.index("see"), len(text))]
    labels = np.full(len(enc.ids), -100)
    for s, e in spans:
        for t in range(enc.char_to_token(s), enc.char_to_token(e - 1) + 1):
            labels[t] = enc.ids[t]
    want = Intended([text[s:e] for s, e in spans], [text[:s] for s, _ in spans])
    assert audit(backend, enc.ids, [0, len(enc.ids)], labels, [want]) is None
    labels[enc.char_to_token(text.index("<user>bye"))] = enc.ids[enc.char_to_token(text.index("<user>bye"))]
    d, got, _ = audit(backend, enc.ids, [0, len(enc.ids)], labels, [want])
    assert d == 0 and "<" in got.split("</bot>")[1]  # a user token trained: caught


def test_a_space_on_both_sides_of_the_boundary_is_warned_about(tmp_path, caplog):
    data = jsonl(tmp_path / "qa.jsonl", [{"q": f"What is {i}?", "a": str(i)} for i in range(3)])
    build(tmp_path, f"""
        tasks:
          qa:
            source: {{kind: jsonl, path: {data}}}
            templates:
              - {{kind: inline, name: spaced, prompt: "Q: {{{{ q }}}} A: ", completion: " {{{{ a }}}}"}}
              - {{kind: inline, name: fine, prompt: "Q: {{{{ q }}}} A:", completion: " {{{{ a }}}}"}}
        stages:
          - {{name: s, objective: sft, tasks: [qa], model: {MODEL}}}
        """)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [w for w in warned if "prompt ending in a space" in w] == [
        "task 'qa', template 'spaced': 3 example(s) have a prompt ending in a space and a completion starting "
        "with one (two spaces at the boundary, the second one trained); end the prompt without the space"]


@pytest.mark.parametrize("budget, unit", [("", "examples"), (", budget: {kind: tokens, count: 400}", "tokens")])
def test_inspect_labels_both_shares_with_their_units(tmp_path, budget, unit):
    from tunec.compiler.inspection import summary_lines

    data = jsonl(tmp_path / "qa.jsonl", [{"q": f"What is {i}?", "a": str(i)} for i in range(6)])
    plan, _ = build(tmp_path, f"""
        tasks:
          qa: {{source: {{kind: jsonl, path: {data}}}, templates: [{QA}]}}
        stages:
          - {{name: s, objective: sft, tasks: [qa], model: {MODEL}{budget}}}
        """)
    lines = summary_lines(plan)
    head = next(line for line in lines if line.strip().startswith("task "))
    assert "% trained tokens" in head and f"% {unit} asked" in head
    assert any(f"% {unit} asked: the share of the mixture's {unit}" in line for line in lines)


@pytest.fixture(scope="module")
def worker():
    from tunec.compiler.tokens import load_local_tokenizer, tokenizer_info
    from tunec.compiler.units import UnitSpec, Worker

    blocks = TemplateSource.inline("qa", "Q: {{ q }}\nA:", " {{ a }}", "r.yaml", 1)
    ps = TemplateSource(name="ps", text="{{ q }} ||| {{ a }}", filename="t.yaml", kind="promptsource")
    spec = UnitSpec(task="hostile", part="train", templates=(blocks, ps), truncation="drop", seq_len=4096, seed=0)
    return Worker(tokenizer_info(load_local_tokenizer(TOKENIZER)), [spec], {})


def test_a_character_split_over_several_tokens_is_trained_whole(worker):
    """`«` has no token of its own in the demo tokenizer: its two bytes are two tokens, and both are
    trained (the last one was left out of the mask, which the audit and the property test found)."""
    from tunec.compiler.pack import IGNORE
    from tunec.compiler.units import Chunk

    result = worker.compile(Chunk(0, [0], {"q": ["quote"], "a": ["«"]}, [[(0, ())]]))
    trained = result.ids[result.sft_labels != IGNORE].tolist()
    assert worker.backend.decode(trained, skip_special_tokens=False) == " «<|endoftext|>"


def test_the_audit_compares_a_normalising_tokenizer_against_its_own_round_trip():
    """A tokenizer that lower-cases does not decode what it encodes: the audit still passes a right
    mask and still catches a wrong one."""
    from tokenizers import Tokenizer, normalizers

    from tunec.compiler.audit import Intended, audit, faithful

    backend = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    backend.normalizer = normalizers.Lowercase()
    assert not faithful(backend)
    text = "Q: Hi there\nA: YES<|endoftext|>"
    enc = backend.encode(text, add_special_tokens=False)
    start = enc.char_to_token(text.index(" YES"))
    labels = np.full(len(enc.ids), -100)
    labels[start:] = enc.ids[start:]
    want = Intended([" YES<|endoftext|>"], [text[: text.index(" YES")]])
    assert audit(backend, enc.ids, [0, len(enc.ids)], labels, [want]) is None
    labels[start - 1] = enc.ids[start - 1]
    assert audit(backend, enc.ids, [0, len(enc.ids)], labels, [want]) is not None
