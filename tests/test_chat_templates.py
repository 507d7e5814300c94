"""Chat templates in wide use, written from the formats their models document: every assistant
reply and its end-of-turn token trained, nothing else, whatever the template does to the rest of the
conversation (system prompt folded into a user turn, a reasoning block on the final reply only, a
trailer after the conversation, `{% generation %}` blocks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.chat import ChatError, assistant_spans, end_tokens, prompt_before_reply
from tunec.compiler.errors import TunecError
from tunec.compiler.pack import IGNORE
from tunec.compiler.shards import open_shard
from tunec.compiler.tokens import tokenizer_info

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "recipes" / "demo" / "tokenizer"
MODEL = "{kind: config, config: {model_type: llama}}"

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Mistral: no system role; the system prompt is put before the content of the LAST user turn.
MISTRAL = (
    "{% if messages[0].role == 'system' %}{% set system = messages[0].content %}{% set msgs = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set msgs = messages %}{% endif %}"
    "{% set ns = namespace(last=-1) %}{% for m in msgs %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}"
    "{% endif %}{% endfor %}"
    "{{ bos_token }}{% for m in msgs %}{% if m.role == 'user' %}[INST] "
    "{% if loop.index0 == ns.last and system %}{{ system }}\n\n{% endif %}{{ m.content }}[/INST]"
    "{% else %} {{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
)
# Gemma: no system role (folded into the first user turn), the assistant is the "model", text trimmed.
GEMMA = (
    "{{ bos_token }}{% if messages[0].role == 'system' %}{% set first = messages[0].content + '\n\n' %}"
    "{% set msgs = messages[1:] %}{% else %}{% set first = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
    "{{ (first if loop.first else '') + m.content | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# Qwen3: an (empty) reasoning block before the final reply only; earlier replies lose their reasoning.
QWEN3 = (
    "{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n"
    "{% if loop.last %}<think>\n\n</think>\n\n{{ m.content }}"
    "{% else %}{{ m.content.split('</think>')[-1].lstrip('\n') }}{% endif %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Phi-3: the conversation ends with EOS when no generation prompt follows.
PHI3 = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
)
TRAILER = CHATML + "{% if not add_generation_prompt %}<|endoftext|>\n(end of conversation){% endif %}"
GENERATION = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
    "{{ m.content }}<|im_end|>{% endgeneration %}{% else %}{{ m.content }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# name: (template, special tokens it needs, normal tokens it needs, text before a reply, end of turn)
TEMPLATES = {
    "chatml": (CHATML, [], [], "", "<|im_end|>"),
    "llama3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], [], "", "<|eot_id|>"),
    "mistral": (MISTRAL, ["[INST]", "[/INST]"], [], " ", "<|endoftext|>"),
    "gemma": (GEMMA, ["<start_of_turn>", "<end_of_turn>"], [], "", "<end_of_turn>"),
    "qwen3": (QWEN3, [], ["<think>", "</think>"], "", "<|im_end|>"),
    "phi3": (PHI3, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], [], "", "<|end|>"),
    "trailer": (TRAILER, [], [], "", "<|im_end|>"),
    "generation": (GENERATION, [], [], "", "<|im_end|>"),
}

# Replies whose text also appears in the user's turns and the system prompt, and repeats.
ROWS = [
    {"messages": [
        {"role": "user", "content": "Please say hello"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Again: say hello, then goodbye."}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "And now goodbye"}, {"role": "assistant", "content": "goodbye"}]},
    {"messages": [
        {"role": "user", "content": "What is 2 + 2? Answer 4 or 5."}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 2 + 3?"}, {"role": "assistant", "content": "5, since 2 + 3 = 5."}]},
    {"messages": [{"role": "user", "content": "Say: answer briefly"}, {"role": "assistant", "content": "Answer briefly."}]},
]
SYSTEM = "Answer briefly. Say hello when greeted."


def make_tokenizer(folder: Path, template: str, special: list[str], normal: list[str]) -> Path:
    tok = PreTrainedTokenizerFast.from_pretrained(str(TOKENIZER))
    if special:
        tok.add_tokens(special, special_tokens=True)
    if normal:
        tok.add_tokens(normal)
    tok.chat_template = template
    tok.save_pretrained(str(folder))
    return folder


def compile_messages(tmp_path: Path, name: str, rows=ROWS, fmt: str = f"system: '{SYSTEM}'"):
    template, special, normal, _, _ = TEMPLATES[name]
    tok_dir = make_tokenizer(tmp_path / "tok", template, special, normal)
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "recipe.yaml").write_text(
        f"tokenizer: {{kind: local, path: {tok_dir}}}\nseq_len: 512\n"
        "tasks:\n  chat:\n    source: {kind: jsonl, path: chat.jsonl}\n"
        f"    format: {{kind: chat, messages: messages, {fmt}}}\n"
        f"stages:\n  - {{name: s, objective: sft, tasks: [chat], model: {MODEL}}}\n")
    plan = compile_recipe(tmp_path / "recipe.yaml", tmp_path / "out", Options(workers=1))
    tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "out" / "tokenizer"))
    docs = []
    for shard in plan.stages[0].train.shards:
        arrays = open_shard(tmp_path / "out" / shard.path, shard.bytes)
        for ids, labels, pos in zip(arrays["input_ids"], arrays["labels"], arrays["position_ids"]):
            starts = list(np.flatnonzero(pos == 0)) + [len(ids)]
            for lo, hi in zip(starts[:-1], starts[1:]):
                if np.any(labels[lo:hi] != IGNORE):
                    docs.append((np.asarray(ids[lo:hi]), np.asarray(labels[lo:hi])))
    return tok, docs


def trained_runs(tok, ids, labels) -> list[str]:
    """Decoded runs of consecutive trained tokens (labels are the ids themselves, as checked)."""
    assert np.all((labels == IGNORE) | (labels == ids))
    runs, cur = [], []
    for i, lab in zip(ids.tolist(), labels.tolist()):
        if lab != IGNORE:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_reply_and_its_end_of_turn_is_trained_and_nothing_else(tmp_path, name):
    template, _, _, before, eot = TEMPLATES[name]
    tok, docs = compile_messages(tmp_path, name)
    assert len(docs) == len(ROWS)
    got = sorted((tok.decode(ids.tolist()), trained_runs(tok, ids, labels)) for ids, labels in docs)
    want = []
    for row in ROWS:
        messages = [{"role": "system", "content": SYSTEM}] + row["messages"]
        text = tok.apply_chat_template(messages, tokenize=False)
        # the document is the template's text, and its runs are the replies, in order
        want.append((text, [before + m["content"] + eot for m in row["messages"] if m["role"] == "assistant"]))
    assert got == sorted(want)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_train_on_last_trains_the_final_reply_only(tmp_path, name):
    _, _, _, before, eot = TEMPLATES[name]
    tok, docs = compile_messages(tmp_path, name, fmt="train_on: last")
    got = sorted(run for ids, labels in docs for run in trained_runs(tok, ids, labels))
    assert got == sorted(before + r["messages"][-1]["content"] + eot for r in ROWS)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_the_prompt_before_a_reply_is_the_training_text_up_to_it(tmp_path, name):
    template, special, normal, before, _ = TEMPLATES[name]
    tok = PreTrainedTokenizerFast.from_pretrained(str(make_tokenizer(tmp_path, template, special, normal)))
    info = tokenizer_info(tok)
    messages = [{"role": "system", "content": SYSTEM}] + ROWS[0]["messages"]
    text, spans = assistant_spans(template, messages, dict(info.special_tokens), [True] * len(messages),
                                  end_tokens(info.json, info.special_tokens))
    prompt, space = prompt_before_reply(template, messages[:-1], dict(info.special_tokens))
    assert (prompt, space) == (text[: spans[-1][0]], before) and text[spans[-1][0]:].startswith(before + "goodbye")


def test_a_template_that_changes_an_earlier_reply_cannot_be_located():
    # Qwen3 drops the reasoning of earlier replies: the text trained would not be the text seen
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>x</think>hello"},
                {"role": "user", "content": "bye"}, {"role": "assistant", "content": "bye"}]
    with pytest.raises(ChatError, match=r"assistant turn 1 cannot be located: the chat template changes its text"):
        assistant_spans(QWEN3, messages, {}, [True] * 4, ("<|im_end|>",))


def test_a_reply_without_an_end_of_turn_token_is_an_error():
    plain = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(ChatError, match=r"assistant turn 1: the chat template writes no end-of-turn token"):
        assistant_spans(plain, messages, {}, [False, True], ("<|endoftext|>",))


def test_generation_blocks_are_honoured_as_the_template_marks_them():
    # the block holds the newline after the end-of-turn token too: the template's choice, kept
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
                "{{ m.content }}<|im_end|>\n{% endgeneration %}{% else %}{{ m.content }}<|im_end|>\n{% endif %}"
                "{% endfor %}")
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello"}]
    text, spans = assistant_spans(template, messages, {}, [False, True])
    assert [text[s:e] for s, e in spans] == ["hello<|im_end|>\n"]
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"


def test_generation_blocks_that_miss_a_reply_are_an_error():
    template = GENERATION.replace("{% generation %}{{ m.content }}", "{{ m.content }}{% generation %}")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(ChatError, match=r"assistant turn 1 cannot be located: the chat template's \{% generation %\} "
                                        r"block does not hold its text"):
        assistant_spans(template, messages, {}, [False, True])


def test_an_empty_assistant_turn_is_an_error_naming_the_row_and_turn(tmp_path):
    rows = [ROWS[0], {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                   {"role": "user", "content": "c"}, {"role": "assistant", "content": "  "}]}]
    with pytest.raises(TunecError, match=r"task 'chat', train row 1: chat: assistant turn 2 is empty"):
        compile_messages(tmp_path, "chatml", rows=rows)


def test_turns_are_counted_as_assistant_replies_whatever_the_system_turn(tmp_path):
    # not prefix-stable (it counts the turns) and the replies are not shown verbatim; the system
    # turn is message 0, the first reply message 2: still "assistant turn 1" to the reader
    hidden = "{{ messages | length }}\n{% for m in messages %}{{ m.role }}: {{ m.content | upper }}<|im_end|>{% endfor %}"
    TEMPLATES["hidden"] = (hidden, [], [], "", "<|im_end|>")
    try:
        with pytest.raises(TunecError, match=r"train row 0: chat: assistant turn 1 cannot be located"):
            compile_messages(tmp_path, "hidden")
    finally:
        del TEMPLATES["hidden"]
