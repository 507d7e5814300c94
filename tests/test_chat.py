"""Chat format: conversations through the tokenizer's chat template, loss on assistant turns only."""

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
SHARED_CHAT = ROOT.parent / "shared" / "data" / "chat" / "fastchat_dummy_conversation.json"
MODEL = "{kind: config, config: {model_type: llama}}"

# A Llama-2-like template: the system prompt lives inside the first user block,
# the assistant turn ends with the EOS token.
SYSTEM_BLOCK = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set msgs = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] "
    "{% if loop.first and sys %}<<SYS>>\n{{ sys }}\n<</SYS>>\n\n{% endif %}{{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
)
# Not prefix-stable (the header counts the turns) and the content is not shown verbatim.
HIDDEN = "{{ messages | length }} turns\n{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"

CONVERSATIONS = [
    {"id": "a", "conversations": [
        {"from": "human", "value": "Name a colour of the sky."}, {"from": "gpt", "value": "Blue, on a clear day."},
        {"from": "human", "value": "And at night?"}, {"from": "gpt", "value": "Mostly black."}]},
    {"id": "b", "conversations": [
        {"from": "human", "value": "Count to three."}, {"from": "gpt", "value": "One, two, three."}]},
]
OPENAI = [{"id": "c", "messages": [
    {"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]}]


def compile_chat(tmp_path: Path, task: str, chat_template: str | None = None, rows=CONVERSATIONS):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    override = ""
    if chat_template is not None:
        (tmp_path / "chat.jinja").write_text(chat_template)
        override = ", chat_template: chat.jinja"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"tokenizer: {{kind: local, path: {TOKENIZER}{override}}}\nseq_len: 256\n"
        f"tasks:\n  chat:\n    source: {{kind: jsonl, path: {data}}}\n"
        + textwrap.indent(textwrap.dedent(task).strip("\n"), "    ") + "\n"
        f"stages:\n  - {{name: s, objective: sft, tasks: [chat], model: {MODEL}}}\n"
    )
    plan = compile_recipe(recipe, tmp_path / "out", Options())
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out" / "tokenizer"))
    docs = []
    for shard in plan.stages[0].train.shards:
        arrays = open_shard(tmp_path / "out" / shard.path, shard.bytes)
        for ids, labels, pos in zip(arrays["input_ids"], arrays["labels"], arrays["position_ids"]):
            starts = list(np.flatnonzero(pos == 0)) + [len(ids)]
            for lo, hi in zip(starts[:-1], starts[1:]):
                if np.all(labels[lo:hi] == IGNORE):
                    continue
                docs.append((np.asarray(ids[lo:hi]), np.asarray(labels[lo:hi])))
    return plan, tok, docs


def trained_runs(tok, ids, labels) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    runs, cur = [], []
    for i, l in zip(ids.tolist(), labels.tolist()):
        if l != IGNORE:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_chatml_messages_train_every_assistant_turn_and_its_end_of_turn(tmp_path):
    plan, tok, docs = compile_chat(tmp_path, "format: {kind: chat, messages: conversations}")
    assert plan.stages[0].tasks["chat"].examples == 2
    runs = sorted(r for ids, labels in docs for r in trained_runs(tok, ids, labels))
    assert runs == sorted(["Blue, on a clear day.<|im_end|>", "Mostly black.<|im_end|>", "One, two, three.<|im_end|>"])
    for ids, _ in docs:  # the text is exactly the chat template's rendering
        text = tok.decode(ids.tolist())
        assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n")


def test_train_on_last_assistant_turn_only(tmp_path):
    _, tok, docs = compile_chat(tmp_path, "format: {kind: chat, messages: conversations, train_on: last}")
    runs = sorted(r for ids, labels in docs for r in trained_runs(tok, ids, labels))
    assert runs == ["Mostly black.<|im_end|>", "One, two, three.<|im_end|>"]


def test_template_with_a_system_block_and_openai_shape(tmp_path):
    task = """
        format:
          kind: chat
          messages: messages
          system: "You are terse."
        """
    _, tok, docs = compile_chat(tmp_path, task, chat_template=SYSTEM_BLOCK, rows=OPENAI)
    (ids, labels), = docs
    text = tok.decode(ids.tolist())
    assert text.startswith("<|endoftext|>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nSay hello. [/INST]")
    # content + end of turn (EOS); the template's space before the content rides on the first word's token
    assert trained_runs(tok, ids, labels) == [" Hello! <|endoftext|>"]


def test_prompt_completion_templates_as_a_single_exchange(tmp_path):
    rows = [{"q": "What is two plus two?", "a": "Four."}]
    task = """
        format: chat
        templates: [{kind: inline, prompt: "Question: {{ q }}", completion: " {{ a }}"}]
        """
    _, tok, docs = compile_chat(tmp_path, task, rows=rows)
    (ids, labels), = docs
    assert tok.decode(ids.tolist()) == "<|im_start|>user\nQuestion: What is two plus two?<|im_end|>\n<|im_start|>assistant\nFour.<|im_end|>\n"
    assert trained_runs(tok, ids, labels) == ["Four.<|im_end|>"]


def test_unlocatable_assistant_turn_fails_loudly_naming_the_row(tmp_path):
    with pytest.raises(TunecError, match=r"task 'chat', train row 0: chat: assistant turn 1 cannot be located"):
        compile_chat(tmp_path, "format: {kind: chat, messages: conversations}", chat_template=HIDDEN)
    assert not (tmp_path / "out" / "plan.json").exists()


def test_unknown_speaker_is_an_error_naming_the_row(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "hello"}]}]
    with pytest.raises(TunecError, match=r"train row 0: chat: turn 1: speaker 'robot' is not in `roles`"):
        compile_chat(tmp_path, "format: {kind: chat, messages: conversations}", rows=rows)


@pytest.mark.skipif(not SHARED_CHAT.is_file(), reason="../shared/data is absent (a fresh clone has no ../shared)")
def test_shared_sharegpt_conversations_compile_with_assistant_only_loss(tmp_path):
    rows = json.loads(SHARED_CHAT.read_text())[:60]
    plan, tok, docs = compile_chat(tmp_path, "format: {kind: chat, messages: conversations}", rows=rows)
    expected = sorted(t["value"] + "<|im_end|>" for r in rows for t in r["conversations"] if t["from"] == "gpt")
    got = sorted(r for ids, labels in docs for r in trained_runs(tok, ids, labels))
    assert plan.stages[0].tasks["chat"].dropped == 0 and got == expected


def test_few_shot_in_chat_becomes_untrained_exchanges_dropped_to_fit(tmp_path):
    rows = [{"q": f"What is {i} plus {i}?", "a": f"It is {2 * i}."} for i in range(12)]
    task = """
        format: {kind: chat, system: "Answer briefly."}
        templates: [{kind: inline, prompt: "{{ q }}", completion: " {{ a }}"}]
        few_shot: {shots: 3}
        """
    plan, tok, docs = compile_chat(tmp_path, task, rows=rows)
    assert plan.stages[0].tasks["chat"].fewshot == 12
    for ids, labels in docs:
        text = tok.decode(ids.tolist())
        assert text.count("<|im_start|>user") == 4 and text.startswith("<|im_start|>system\nAnswer briefly.")
        (run,) = trained_runs(tok, ids, labels)  # only the example's own answer is trained
        assert text.rstrip().endswith(run)

    # a row too long for three exemplars keeps fewer, never losing its own exchange
    (tmp_path / "out").rename(tmp_path / "roomy")
    text = (tmp_path / "recipe.yaml").read_text().replace("seq_len: 256", "seq_len: 80")
    (tmp_path / "recipe.yaml").write_text(text)
    plan = compile_recipe(tmp_path / "recipe.yaml", tmp_path / "out", Options())
    counts = plan.stages[0].tasks["chat"]
    assert counts.examples == 12 and counts.dropped == 0 and counts.truncated == 0
    assert counts.tokens <= 12 * 80


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}{{ raise_exception('only one turn, please') }}",
     "chat: the tokenizer's chat template failed: TemplateError: only one turn, please"),
])
def test_a_failing_chat_template_is_one_error_naming_the_row(tmp_path, template, message):
    with pytest.raises(TunecError) as info:
        compile_chat(tmp_path, "format: {kind: chat, messages: conversations}", template)
    assert [str(p) for p in info.value.problems] == [f"task 'chat', train row 0: {message}"]


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}", ":2: chat template: unexpected '}'"),
    ("{% for m in messages %}{{ m['content'] | nosuch }}{% endfor %}", ":1: chat template: No filter named 'nosuch'."),
])
def test_a_chat_template_that_does_not_compile_is_found_before_any_row(tmp_path, template, message):
    with pytest.raises(TunecError) as info:
        compile_chat(tmp_path, "format: {kind: chat, messages: conversations}", template)
    (problem,) = info.value.problems
    assert str(problem).endswith(message) and "row" not in str(problem)
