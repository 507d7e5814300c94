"""`tunec generate` asks the model exactly what training showed it: the prompt's token ids equal the
compiled document's ids up to its first trained token of the final reply, for every task format
(templates with and without answer choices, promptsource, chat from templates and from a messages
column) and for chat templates that render the final reply differently. Chat eval sets with
answer choices get a `choices.jsonl` whose prompts are the same text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from tunec.cli import main
from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.errors import TunecError
from tunec.compiler.pack import IGNORE
from tunec.compiler.shards import open_shard
from tunec.runtime.generate import build_prompt, prompt_ids
from tunec.runtime.run import RunOptions, run

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "recipes" / "demo" / "tokenizer"
MODEL = ("{kind: config, config: {model_type: llama, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, "
         "num_attention_heads: 2, num_key_value_heads: 1, vocab_size: 1024, max_position_embeddings: 512}}")

# Chat templates (from the formats their models document): the tokenizer's ChatML, one that gives only
# the final reply an empty reasoning block, one that folds the system prompt into the last user turn.
CHAT_TEMPLATES = {
    "chatml": None,
    "reasoning": (
        "{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n"
        "{% if loop.last %}<think>\n\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n"
        "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "folded": (
        "{% if messages[0].role == 'system' %}{% set system = messages[0].content %}{% set msgs = messages[1:] %}"
        "{% else %}{% set system = '' %}{% set msgs = messages %}{% endif %}"
        "{% set ns = namespace(last=-1) %}{% for m in msgs %}{% if m.role == 'user' %}"
        "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
        "{% for m in msgs %}{% if m.role == 'user' %}[INST] {% if loop.index0 == ns.last and system %}"
        "{{ system }}\n\n{% endif %}{{ m.content }}[/INST]{% else %} {{ m.content }}{{ eos_token }}{% endif %}"
        "{% endfor %}"),
}

PROMPTSOURCE = """\
dataset: toy
templates:
  a1: !Template
    answer_choices: yes ||| no
    id: a1
    jinja: '{{ premise }} Does it follow that "{{ hypothesis }}"? ||| {{ answer_choices[label] }}'
    metadata: !TemplateMetadata {original_task: true}
    name: follows
    reference: ''
"""

FACTS = [{"q": f"What is {i} plus {i}?", "a": f"{2 * i}", "topic": "sums", "mood": "good" if i % 2 else "bad",
          "premise": f"There are {i} cats.", "hypothesis": "There are cats." if i else "There are no cats.",
          "label": 0 if i else 1} for i in range(10)]
TALKS = [{"turns": [{"from": "human", "value": f"Say hello {i} times"}, {"from": "gpt", "value": "hello " * i},
                    {"from": "human", "value": "Now say bye"}, {"from": "gpt", "value": f"bye {i}"}]}
         for i in range(1, 7)]


def recipe(folder: Path, chat_template: str | None) -> Path:
    (folder / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in FACTS))
    (folder / "talks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TALKS))
    (folder / "ps.yaml").write_text(PROMPTSOURCE)
    override = ""
    if chat_template is not None:
        (folder / "chat.jinja").write_text(chat_template)
        override = ", chat_template: chat.jinja"
    (folder / "recipe.yaml").write_text(f"""
tokenizer: {{kind: local, path: {TOKENIZER}{override}}}
seq_len: 512
leakage: ignore   # the tasks share their rows on purpose
tasks:
  plain:
    source: {{kind: jsonl, path: facts.jsonl}}
    templates: [{{kind: inline, name: qa, prompt: "Q: {{{{ q }}}}\\nA:", completion: " {{{{ a }}}}"}}]
  picked:
    source: {{kind: jsonl, path: facts.jsonl}}
    templates: [{{kind: inline, name: pick, prompt: "{{{{ q }}}} ({{{{ answer_choices | join(', ') }}}})",
                 completion: " {{{{ mood }}}}"}}]
    answer_choices: [bad, good]
  ps:
    source: {{kind: jsonl, path: facts.jsonl}}
    templates: [{{kind: promptsource, path: ps.yaml, names: [follows]}}]
  asked:
    source: {{kind: jsonl, path: facts.jsonl}}
    format: {{kind: chat, system: "Answer about {{{{ topic }}}} in one word."}}
    templates: [{{kind: inline, name: ask, prompt: "{{{{ q }}}}", completion: " {{{{ mood }}}}"}}]
    answer_choices: [bad, good]
    eval: {{fraction: 0.3}}
  talk:
    source: {{kind: jsonl, path: talks.jsonl}}
    format: {{kind: chat, messages: turns, system: "Be brief."}}
stages:
  - name: s
    objective: sft
    tasks: [plain, picked, ps, asked, talk]
    model: {MODEL}
    batch_tokens: 1024
    max_steps: 1
""")
    return folder / "recipe.yaml"


def documents(out: Path, packed) -> list[tuple[list[int], list[int]]]:
    docs = []
    for shard in packed.shards:
        arrays = open_shard(out / shard.path, shard.bytes)
        for ids, labels, pos in zip(arrays["input_ids"], arrays["labels"], arrays["position_ids"]):
            starts = list(np.flatnonzero(pos == 0)) + [len(ids)]
            for lo, hi in zip(starts[:-1], starts[1:]):
                if np.any(labels[lo:hi] != IGNORE):
                    docs.append((ids[lo:hi].tolist(), labels[lo:hi].tolist()))
    return docs


@pytest.fixture(scope="module", params=sorted(CHAT_TEMPLATES))
def build(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    out = folder / "out"
    plan = compile_recipe(recipe(folder, CHAT_TEMPLATES[request.param]), out, Options(workers=1))
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    stage = plan.stages[0]  # a row is in the training or the eval part
    return out, plan, tok, documents(out, stage.train) + [d for e in stage.eval.values() for d in documents(out, e.data)]


def the_reply_starts_after(prompt: list[int], docs) -> bool:
    """Some compiled document holds ``prompt`` as its first ids and trains the very next token."""
    n = len(prompt)
    return any(ids[:n] == prompt and len(ids) > n and labels[n] != IGNORE and labels[n - 1] == IGNORE
               for ids, labels in docs)


ASKS = {
    "plain": lambda r: {"values": {"q": r["q"]}},
    "picked": lambda r: {"values": {"q": r["q"]}},
    "ps": lambda r: {"values": {k: r[k] for k in ("premise", "hypothesis", "label")}},
    "asked": lambda r: {"values": {"q": r["q"], "topic": r["topic"]}},
}


@pytest.mark.parametrize("task", sorted(ASKS))
def test_generate_prompt_ids_are_the_compiled_ids_up_to_the_reply(build, task):
    out, plan, tok, docs = build
    for row in FACTS[1:6]:
        asked = build_prompt(plan, "s", task=task, **ASKS[task](row))
        text, ids = prompt_ids(asked, tok)
        assert the_reply_starts_after(ids, docs), (task, text)


def test_generate_prompt_of_a_conversation_is_the_compiled_one_up_to_the_final_reply(build):
    out, plan, tok, docs = build
    for talk in TALKS[:4]:
        asked = build_prompt(plan, "s", task="talk", conversation=talk["turns"][:-1])
        _, ids = prompt_ids(asked, tok)
        assert the_reply_starts_after(ids, docs)
        # with --message ROLE=TEXT turns, the same
        turns = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                 for t in talk["turns"][:-1]]
        assert prompt_ids(build_prompt(plan, "s", task="talk", conversation=turns), tok)[1] == ids


def test_prompt_on_a_chat_task_has_the_task_system_prompt(build):
    out, plan, tok, docs = build
    row = FACTS[3]
    by_values = prompt_ids(build_prompt(plan, "s", task="asked", values={"q": row["q"], "topic": "sums"}), tok)
    # --prompt on a chat task: the task's system prompt (its columns from --set), not the template's default
    by_prompt = prompt_ids(build_prompt(plan, "s", prompt=row["q"], task="asked", values={"topic": "sums"}), tok)
    assert by_prompt == by_values and the_reply_starts_after(by_prompt[1], docs)
    # --chat without --task: the stage's (first) chat task gives the system prompt
    assert prompt_ids(build_prompt(plan, "s", prompt=row["q"], chat=True, values={"topic": "sums"}), tok) == by_values
    assert "Answer about sums in one word." in by_prompt[0]


def test_chat_eval_sets_with_answer_choices_write_choices(build):
    out, plan, tok, _ = build
    evals = plan.stages[0].eval["asked"]
    assert evals.choices is not None and evals.choices.count == evals.counts.examples == 3
    records = [json.loads(line) for line in (out / evals.choices.path).read_text().splitlines()]
    eval_docs = documents(out, evals.data)
    for rec in records:
        row = FACTS[rec["row"]]
        assert (rec["target"], rec["choices"], rec["template"]) == (row["mood"], ["bad", "good"], "ask")
        assert rec["answer"] == ["bad", "good"].index(row["mood"])
        # the prompt is what generate asks, and the eval document continues it with the target
        asked = build_prompt(plan, "s", task="asked", values={"q": row["q"], "topic": row["topic"]})
        text, ids = prompt_ids(asked, tok)
        assert rec["prompt"] == text and the_reply_starts_after(ids, eval_docs)
        assert any(tok.decode(d).startswith(rec["prompt"] + rec["choice_prefix"] + rec["target"]) for d, _ in eval_docs)


def test_a_conversation_must_end_with_a_user_turn_and_belong_to_a_chat_task(build):
    _, plan, _, _ = build
    with pytest.raises(TunecError, match="--messages/--message: the conversation ends with the assistant's turn"):
        build_prompt(plan, "s", task="talk", conversation=TALKS[0]["turns"])
    with pytest.raises(TunecError, match="task `plain` is not a chat task"):
        build_prompt(plan, "s", task="plain", conversation=TALKS[0]["turns"][:1])
    with pytest.raises(TunecError, match=r"task `talk` reads its conversations from a column; give one with "
                                         r"--messages FILE.json or --message ROLE=TEXT"):
        build_prompt(plan, "s", task="talk", values={"turns": "hello"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained")
    out = folder / "out"
    compile_recipe(recipe(folder, None), out, Options(workers=1))
    run(out, RunOptions(progress=False, device="cpu"))
    return out


def test_cli_generate_from_a_conversation(trained, tmp_path):
    runner = CliRunner()
    base = ["generate", str(trained), "--task", "talk", "--max-new-tokens", "2", "--no-color", "--device", "cpu"]
    result = runner.invoke(main, base + ["--set", "turns=hello"])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        "error: task `talk` reads its conversations from a column; give one with --messages FILE.json "
        "or --message ROLE=TEXT (repeated)"]
    file = tmp_path / "talk.json"
    file.write_text(json.dumps(TALKS[0]["turns"][:-1]))
    by_file = runner.invoke(main, base + ["--messages", str(file)])
    assert by_file.exit_code == 0, by_file.output
    assert by_file.output.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hello 1 times")
    by_turns = runner.invoke(main, base + ["--message", "user=Say hello 1 times", "--message", "assistant=hello ",
                                           "--message", "user=Now say bye"])
    assert by_turns.exit_code == 0 and by_turns.output == by_file.output
    bad = runner.invoke(main, base + ["--message", "user"])
    assert bad.exit_code == 2 and "'user' is not ROLE=TEXT" in bad.output
    file.write_text("[{")
    broken = runner.invoke(main, base + ["--messages", str(file)])
    assert broken.exit_code == 1 and broken.output.startswith(f"error: --messages {file}:1:3: not JSON")


def test_a_conversation_task_held_out_with_answer_choices_writes_its_final_reply_as_target(tmp_path):
    quiz = [{"turns": [{"from": "human", "value": f"Is {i} even? Answer yes or no."},
                       {"from": "gpt", "value": "yes" if i % 2 == 0 else "no"}]} for i in range(4)]
    (tmp_path / "quiz.jsonl").write_text("".join(json.dumps(r) + "\n" for r in quiz))
    (tmp_path / "talks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TALKS))
    (tmp_path / "recipe.yaml").write_text(f"""
tokenizer: {{kind: local, path: {TOKENIZER}}}
seq_len: 256
tasks:
  talk: {{source: {{kind: jsonl, path: talks.jsonl}}, format: {{kind: chat, messages: turns}}}}
  quiz:
    source: {{kind: jsonl, path: quiz.jsonl}}
    format: {{kind: chat, messages: turns, system: "Be brief."}}
    answer_choices: ["no", "yes"]
stages:
  - {{name: s, objective: sft, tasks: [talk], held_out: [quiz], model: {MODEL}}}
""")
    plan = compile_recipe(tmp_path / "recipe.yaml", tmp_path / "out", Options(workers=1))
    choices = plan.stages[0].eval["quiz"].choices
    assert choices is not None and choices.count == 4
    records = [json.loads(line) for line in (tmp_path / "out" / choices.path).read_text().splitlines()]
    for rec in records:
        i = rec["row"]
        assert rec["prompt"] == (f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nIs {i} even? Answer "
                                 "yes or no.<|im_end|>\n<|im_start|>assistant\n")
        assert (rec["target"], rec["answer"], rec["template"]) == (["yes", "no"][i % 2], 1 - i % 2, "messages")


def test_chat_choices_prompt_keeps_the_exemplars_its_document_kept(tmp_path):
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in FACTS))
    (tmp_path / "recipe.yaml").write_text(f"""
tokenizer: {{kind: local, path: {TOKENIZER}}}
seq_len: SEQ
tasks:
  asked:
    source: {{kind: jsonl, path: facts.jsonl}}
    format: {{kind: chat, system: "Say good or bad."}}
    templates: [{{kind: inline, name: ask, prompt: "{{{{ q }}}}", completion: " {{{{ mood }}}}"}}]
    answer_choices: [bad, good]
    few_shot: {{shots: 3}}
    eval: {{fraction: 0.3}}
stages:
  - {{name: s, objective: sft, tasks: [asked], model: {MODEL}}}
""")
    recipe_text = (tmp_path / "recipe.yaml").read_text()
    kept = {}
    for seq in (256, 72):  # roomy: every exemplar kept; tight: some dropped to fit
        (tmp_path / "recipe.yaml").write_text(recipe_text.replace("SEQ", str(seq)))
        out = tmp_path / f"out{seq}"
        plan = compile_recipe(tmp_path / "recipe.yaml", out, Options(workers=1))
        evals = plan.stages[0].eval["asked"]
        tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
        texts = [tok.decode(ids) for ids, _ in documents(out, evals.data)]
        records = [json.loads(line) for line in (out / evals.choices.path).read_text().splitlines()]
        assert len(records) == len(texts) == 3
        for rec in records:  # each record's prompt is its own document's text up to the reply
            assert sum(t.startswith(rec["prompt"] + rec["target"] + "<|im_end|>") and
                       len(t) == len(rec["prompt"] + rec["target"] + "<|im_end|>\n") for t in texts) == 1
        kept[seq] = sum(rec["prompt"].count("<|im_start|>user") for rec in records)
    assert kept[256] == 12 and 3 <= kept[72] < 12
