"""The ids `tunec eval` scores are the ids the compiler put in the eval shards, for the same examples.

For every record of a task's ``choices.jsonl``, the right choice's text
(``prompt + choice_prefix + choice``) tokenized as the scorer tokenizes it must
be, token for token, one of the documents of the task's compiled eval shards
without what the compiler appends after the answer (the EOS; for a chat task,
the end-of-turn text), and its scored tokens must start exactly where that
document's trained tokens start. Checked on a completion task with a few-shot
prefix and BOS, a chat task (the demo tokenizer's ChatML template) and a
held-out task under another template.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from tiny import DEMO

from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.plan import read_plan
from tunec.compiler.tokens import load_local_tokenizer, tokenizer_info
from tunec.runtime.accuracy import encode_choices, read_choices
from tunec.runtime.eval_generate import documents

RECIPE = f"""
tokenizer: {{kind: local, path: {DEMO}/tokenizer}}
seq_len: 256
seed: 9
tasks:
  reviews:
    source: {{kind: jsonl, path: {{train: {DEMO}/data/reviews/train.jsonl, test: {DEMO}/data/reviews/test.jsonl}}}}
    fields: {{text: review, label: sentiment}}
    templates: [sentiment/review_short, sentiment/one_word]
    answer_choices: [negative, positive]
    few_shot: {{shots: 2, min_shots: 0, share: 0.5}}
    train: {{split: train, stop: 60}}
    eval: {{split: test, stop: 25}}
  chatty:
    source: {{kind: jsonl, path: {{train: {DEMO}/data/reviews/train.jsonl, test: {DEMO}/data/reviews/test.jsonl}}}}
    fields: {{text: review, label: sentiment}}
    format: {{kind: chat, system: "You rate reviews."}}
    templates: [sentiment/one_word]
    answer_choices: [negative, positive]
    train: {{split: train, start: 60, stop: 100}}
    eval: {{split: test, start: 25, stop: 40}}
  critic:
    source: {{kind: jsonl, path: {DEMO}/data/reviews/test.jsonl}}
    fields: {{text: review, label: sentiment}}
    templates: [sentiment/choices]
    answer_choices: [negative, positive]
    train: {{start: 40, stop: 55}}
stages:
  - name: sft
    objective: sft
    tasks: [reviews, chatty]
    held_out: [critic]
    model: {{kind: config, config: {{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
             num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 1024}}}}
"""


def with_bos(folder: Path) -> Path:
    """The demo tokenizer, made to start every text with BOS (``<|endoftext|>``) as Llama's do."""
    shutil.copytree(DEMO / "tokenizer", folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["post_processor"] = {"type": "Sequence", "processors": [data["post_processor"], {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}}]}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder


@pytest.fixture(scope="module", params=["plain", "bos"])
def build(tmp_path_factory, request) -> Path:
    folder = tmp_path_factory.mktemp("ids")
    text = RECIPE
    if request.param == "bos":
        text = text.replace(f"{DEMO}/tokenizer", str(with_bos(folder / "tokenizer")))
    (folder / "recipe.yaml").write_text(text)
    compile_recipe(folder / "recipe.yaml", folder / "build", Options(workers=1))
    return folder / "build"


@pytest.mark.parametrize("task", ["reviews", "chatty", "critic"])
def test_scored_ids_are_the_compiled_eval_documents(build, task):
    plan = read_plan(build)
    sp = plan.stage("sft")
    tokenizer = load_local_tokenizer(build / plan.tokenizer.path)
    info = tokenizer_info(tokenizer)
    chat = plan.tasks[task].format == "chat"
    records = [r for r in read_choices(build, sp, task) if r["answer"] >= 0]
    assert records and len(records) == sp.eval[task].choices.count  # type: ignore[union-attr]
    if task == "reviews":
        assert any(r["prompt"].count("Answer:") > 1 for r in records)  # some carry few-shot exemplars

    # every compiled document of the task, whole: prompt ids + trained ids (answer, then EOS / end of turn)
    compiled = Counter()
    for doc in documents(build, plan, sp, task, info.eos_id):
        compiled[(tuple(doc["prompt"]), tuple(doc["reference"]))] += 1
    scored = Counter()
    for r in records:
        enc = encode_choices(tokenizer.backend_tokenizer, info, r, chat)[r["answer"]]
        (first, end) = enc.spans[0]
        assert end == len(enc.ids)  # the choice runs to the end of the scored text
        scored[(tuple(enc.ids[:first]), tuple(enc.ids[first:]))] += 1

    tail = Counter()  # what the compiler appends after the answer, per document
    matched = Counter()
    for (prompt, answer), n in scored.items():
        found = [ref for (p, ref) in compiled if p == prompt and ref[:len(answer)] == answer]
        assert len(found) == 1, (task, tokenizer.decode(list(prompt)), tokenizer.decode(list(answer)))
        matched[(prompt, found[0])] += n
        tail[tokenizer.decode(list(found[0][len(answer):]))] += n
    assert matched == compiled  # one compiled document per record, and no other
    if chat:
        assert set(tail) == {"<|im_end|>"} or set(tail) == {"<|im_end|>\n"}, tail
        assert all(tokenizer.decode(list(p)).startswith("<|im_start|>system\nYou rate reviews.") for p, _ in matched)
    else:
        assert set(tail) == {tokenizer.decode([info.eos_id])}, tail
        if tokenizer.backend_tokenizer.encode("x").ids[0] == info.bos_id:  # the `bos` tokenizer: one BOS each
            assert all(p[0] == info.bos_id and p[1] != info.bos_id for p, _ in matched)
        else:
            assert all(p[0] != info.bos_id for p, _ in matched)


def test_the_right_choice_after_its_prefix_is_the_target(build):
    plan = read_plan(build)
    path = build / plan.stage("sft").eval["reviews"].choices.path  # type: ignore[union-attr]
    first = json.loads(path.read_text().splitlines()[0])
    assert first["prompt"] + first["choice_prefix"] + first["choices"][first["answer"]] == \
        first["prompt"] + first["target"]
