"""Preference data compiled: pairs of documents, packed together, masks on the responses, located errors.

Every build here uses the demo tokenizer and small JSONL files written by the test.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from tiny import DEMO, tiny_llama
from tokenizers import Tokenizer

from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.check import check
from tunec.compiler.errors import TunecError
from tunec.compiler.load import load_recipe
from tunec.compiler.plan import read_plan
from tunec.compiler.preference import parse_dialogue
from tunec.compiler.recipe import DialogueMarkers
from tunec.compiler.shards import ShardError, check_values, open_shard, read_header

TOKENIZER = Tokenizer.from_file(str(DEMO / "tokenizer" / "tokenizer.json"))
EOS = "<|endoftext|>"
CHAT_TEMPLATE = DEMO.parent / "chat_template.jinja"


def sums(n: int = 24, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(1, 50, size=2))
        rows.append({"q": f"{a}+{b}", "good": f" {a + b}", "bad": f" {a + b + int(rng.integers(1, 9))}"})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


FORMAT = '{kind: preference, prompt: "Q: {{ q }}\\nA:", chosen: good, rejected: bad}'


def recipe(tmp_path: Path, fmt: str = FORMAT, objective: str = "dpo", rows: list[dict] | None = None,
           seq_len: int = 64, extra_task: str = "", task_opts: str = "", stage_opts: str = "",
           tokenizer_opts: str = "", tasks: str = "[pairs]") -> Path:
    write_rows(tmp_path / "pairs.jsonl", sums() if rows is None else rows)
    text = f"""
tokenizer: {{kind: local, path: {DEMO}/tokenizer{tokenizer_opts}}}
seq_len: {seq_len}
tasks:
  pairs:
    source: {{kind: jsonl, path: pairs.jsonl}}
    format: {fmt}
{task_opts}{extra_task}
stages:
  - name: align
    objective: {objective}
    tasks: {tasks}
    model: {tiny_llama()}
{stage_opts}"""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def build(tmp_path: Path, **kw) -> Path:
    out = tmp_path / "out"
    compile_recipe(recipe(tmp_path, **kw), out, Options(workers=1))
    return out


def documents(out: Path, stage: str = "align", part: str = "train") -> list[dict]:
    """Every document of a packed set: row, pair, side, ids, labels (as the shards hold them)."""
    plan = read_plan(out)
    sp = plan.stage(stage)
    packed = sp.train if part == "train" else sp.eval[part].data
    docs = []
    for r, entry in enumerate(packed.shards):
        arrays = open_shard(out / entry.path)
        for row in range(arrays["input_ids"].shape[0]):
            pos = arrays["position_ids"][row]
            starts = list(np.flatnonzero(pos == 0)) + [len(pos)]
            for a, b in zip(starts, starts[1:]):
                if arrays["sides"][row, a] < 0:
                    continue  # padding
                docs.append({"row": (r, row), "pair": int(arrays["pair_ids"][row, a]),
                             "side": int(arrays["sides"][row, a]), "ids": arrays["input_ids"][row, a:b].tolist(),
                             "labels": arrays["labels"][row, a:b].tolist(), "at": a})
    return docs


def decode(ids: list[int]) -> str:
    return TOKENIZER.decode(ids, skip_special_tokens=False)


def errors_of(path: Path, compile_it: bool = False) -> list[str]:
    with pytest.raises(TunecError) as info:
        if compile_it:
            compile_recipe(path, path.parent / "out", Options(workers=1))
        else:
            check(load_recipe(path))
    return [str(p) for p in info.value.problems]


# ----------------------------------------------------------------- compiled pairs


def test_each_pair_is_two_documents_in_one_row_masked_on_response_and_eos(tmp_path):
    rows = sums()
    out = build(tmp_path, rows=rows)
    docs = documents(out)
    by_pair: dict[int, list[dict]] = {}
    for d in docs:
        by_pair.setdefault(d["pair"], []).append(d)
    assert sorted(by_pair) == list(range(len(rows)))  # every row made a pair, ids 0..n-1
    texts = {(r["q"], r["good"], r["bad"]) for r in rows}
    for c, r in by_pair.values():
        assert (c["side"], r["side"]) == (0, 1) and c["row"] == r["row"]  # one row, chosen first
        assert c["at"] + len(c["ids"]) == r["at"]  # side by side
        first_c = next(i for i, x in enumerate(c["labels"]) if x != -100)
        first_r = next(i for i, x in enumerate(r["labels"]) if x != -100)
        assert c["ids"][:first_c] == r["ids"][:first_r]  # the shared prompt, token for token
        chosen = decode([x for x in c["labels"] if x != -100])
        rejected = decode([x for x in r["labels"] if x != -100])
        assert chosen.endswith(EOS) and rejected.endswith(EOS)
        prompt = decode(c["ids"][:first_c])
        assert (prompt.removeprefix("Q: ").removesuffix("\nA:"), chosen[: -len(EOS)], rejected[: -len(EOS)]) in texts
        # labels are exactly the tokens of response + EOS: all of them after the prompt
        assert all(x != -100 for x in c["labels"][first_c:]) and all(x != -100 for x in r["labels"][first_r:])
    plan = read_plan(out)
    counts = plan.stage("align").tasks["pairs"]
    assert counts.pairs == len(rows) and counts.examples == 2 * len(rows)
    assert counts.templates == {"pairs": 2 * len(rows)}  # what `tunec inspect` lists
    train = plan.stage("align").train
    assert 0 < train.fill_rate <= 1 and train.tokens == sum(len(d["ids"]) for d in docs)
    header, _ = read_header(out / train.shards[0].path)
    assert json.loads(header["__metadata__"]["tunec"])["format_version"] == 2


def test_sft_builds_keep_shard_format_version_1(tmp_path):
    fmt = "completion"
    path = recipe(tmp_path, fmt=fmt, objective="sft",
                  task_opts='    templates: [{kind: inline, prompt: "Q: {{ q }}\\nA:", completion: "{{ good }}"}]\n')
    out = tmp_path / "out"
    compile_recipe(path, out, Options(workers=1))
    entry = read_plan(out).stage("align").train.shards[0]
    header, _ = read_header(out / entry.path)
    assert json.loads(header["__metadata__"]["tunec"])["format_version"] == 1
    assert sorted(open_shard(out / entry.path)) == ["input_ids", "labels", "position_ids"]


def test_damaged_pair_tensors_fail_the_shard_check(tmp_path):
    out = build(tmp_path)
    entry = read_plan(out).stage("align").train.shards[0]
    arrays = {k: np.array(v) for k, v in open_shard(out / entry.path).items()}
    check_values(out / entry.path, arrays, 1024)
    arrays["sides"][0, 5] = 1 - arrays["sides"][0, 5]  # one token of a document changes side
    with pytest.raises(ShardError, match="pair layout"):
        check_values(out / entry.path, arrays, 1024)


def test_the_eval_part_is_packed_in_pairs(tmp_path):
    out = build(tmp_path, task_opts="    eval: {fraction: 0.25}\n")
    docs = documents(out, part="pairs")
    assert len(docs) == 2 * 6 and sorted({d["pair"] for d in docs}) == list(range(6))
    assert read_plan(out).stage("align").eval["pairs"].counts.pairs == 6


def test_truncation_drops_or_cuts_the_pair_as_a_whole(tmp_path):
    rows = sums(8)
    rows[3] = {"q": " ".join(["word"] * 60) + " 1+1", "good": " 2", "bad": " 3"}
    out = build(tmp_path, rows=rows, seq_len=48, task_opts="    truncation: drop\n")
    counts = read_plan(out).stage("align").tasks["pairs"]
    assert counts.pairs == 7 and counts.dropped == 2  # both documents of the long pair
    (tmp_path / "t").mkdir()
    out = build(tmp_path / "t", rows=rows, seq_len=48, task_opts="    truncation: truncate\n")
    counts = read_plan(out).stage("align").tasks["pairs"]
    assert counts.pairs == 8 and counts.truncated == 2
    c, r = sorted((d for d in documents(out) if "1+1" in decode(d["ids"])), key=lambda d: d["side"])
    assert 46 <= len(c["ids"]) + len(r["ids"]) <= 48  # the pair fills its row
    for d, reply in ((c, " 2"), (r, " 3")):  # the prompt was cut from the left; the response and EOS are whole
        labelled = decode([x for x in d["labels"] if x != -100])
        assert labelled == reply + EOS
        assert decode(d["ids"]).endswith("word word 1+1\nA:" + labelled)
    assert c["ids"][:-2] == r["ids"][:-2]


def test_identical_pairs_are_an_error_or_dropped_and_counted(tmp_path, caplog):
    rows = sums(6)
    rows[2]["bad"] = rows[2]["good"]
    rows[4]["bad"] = rows[4]["good"] + "  "
    problems = errors_of(recipe(tmp_path, rows=rows), compile_it=True)
    assert problems == ["task 'pairs', train row 2: chosen and rejected are the same text; fix the row, or set "
                        "`format.checks: warn` to drop such pairs (counted in the plan)"]
    fmt = FORMAT[:-1] + ", checks: warn}"
    with caplog.at_level(logging.WARNING, logger="tunec.compiler.preference"):
        out = build(tmp_path, rows=rows, fmt=fmt)
    counts = read_plan(out).stage("align").tasks["pairs"]
    assert counts.pairs == 4 and counts.checks == {"identical": 1, "whitespace_only": 1}
    assert "task 'pairs', train: dropped 2 pair(s): 1 identical, 1 differing only in whitespace " \
        "(`format.checks: warn`)" in caplog.text


# ----------------------------------------------------------------- located errors


def test_a_row_without_rejected_names_the_row(tmp_path):
    rows = sums(5)
    del rows[3]["bad"]
    problems = errors_of(recipe(tmp_path, rows=rows), compile_it=True)
    assert problems == ["task 'pairs', train row 3: format.rejected: the row has no value (null)"]


def test_an_unknown_column_is_located_in_the_recipe(tmp_path):
    fmt = '{kind: preference, prompt: "Q: {{ q }}", chosen: good, rejected: worse}'
    (problem,) = errors_of(recipe(tmp_path, fmt=fmt))
    assert problem.endswith("recipe.yaml:7:68: tasks.pairs.format.rejected: column `worse` is not in the task; "
                            "columns: q, good, bad")


def test_objective_and_task_format_must_match(tmp_path):
    (problem,) = errors_of(recipe(tmp_path, objective="sft"))
    assert problem.endswith("recipe.yaml:12:13: stages[0].tasks[0]: task 'pairs' has `format: preference`, which "
                            "objective `sft` cannot train on; use `objective: dpo` (or simpo, orpo; kto for "
                            "`unpaired`), or give the task another format")
    extra = ('  plain:\n    source: {kind: jsonl, path: pairs.jsonl}\n'
             '    templates: [{kind: inline, prompt: "{{ q }}", completion: "{{ good }}"}]\n')
    (problem,) = errors_of(recipe(tmp_path, extra_task=extra, tasks="[plain]"))
    assert "stages[0].tasks[0]: objective `dpo` trains on `format: preference` tasks, but task 'plain' has " \
           "`format: completion`; give the task `format: {kind: preference, prompt, chosen, rejected}`" in problem
    (problem,) = errors_of(recipe(tmp_path, objective="{kind: kto}"))
    assert "objective `kto` trains on `format: unpaired` tasks" in problem


def test_reference_names_an_earlier_stage(tmp_path):
    (problem,) = errors_of(recipe(tmp_path, objective="{kind: dpo, reference: sft}"))
    assert "recipe.yaml:11:28: stages[0].objective.reference: `reference` is `initial` or an earlier stage's name; 'sft' is not" \
        in problem


def test_bad_objective_values_are_located(tmp_path):
    with pytest.raises(TunecError) as info:
        load_recipe(recipe(tmp_path, objective="{kind: dpo, beta: -1, loss: sigmod}"))
    text = str(info.value)
    assert "recipe.yaml:11:28: stages[0].objective.beta: Input should be greater than 0" in text
    assert "stages[0].objective.loss: Input should be 'sigmoid', 'ipo', 'hinge' or 'robust' (got 'sigmod') " \
        "(did you mean 'sigmoid'?)" in text


# ----------------------------------------------------------------- dialogue and chat shapes


HH = [
    {"chosen": "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: what is 2+2?\n\nAssistant: It is 4.",
     "rejected": "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: what is 2+2?\n\nAssistant: Go away."},
    {"chosen": "\n\nHuman: name a fruit\n\nAssistant: An apple.",
     "rejected": "\n\nHuman: name a fruit\n\nAssistant: A chair."},
]
DIALOGUE = "{kind: preference, chosen: chosen, rejected: rejected, dialogue: {}}"


def test_parse_dialogue_finds_turns():
    turns = parse_dialogue(HH[0]["chosen"], DialogueMarkers())
    assert [r for r, _, _ in turns] == ["user", "assistant", "user", "assistant"]
    assert HH[0]["chosen"][turns[-1][1]:turns[-1][2]] == " It is 4."


def test_raw_dialogues_share_the_prompt_up_to_the_last_assistant_marker(tmp_path):
    out = build(tmp_path, rows=HH, fmt=DIALOGUE, seq_len=128)
    docs = sorted(documents(out), key=lambda d: (d["pair"], d["side"]))
    texts = [(decode(d["ids"]), decode([x for x in d["labels"] if x != -100])) for d in docs]
    replies = {(t, lab) for t, lab in texts}
    assert (HH[0]["chosen"] + EOS, " It is 4." + EOS) in replies
    assert (HH[0]["rejected"] + EOS, " Go away." + EOS) in replies
    assert (HH[1]["rejected"] + EOS, " A chair." + EOS) in replies


def test_dialogue_errors_name_the_row(tmp_path):
    rows = [dict(HH[0]), dict(HH[1])]
    rows[1]["rejected"] = "\n\nUser: name a fruit\n\nBot: A chair."
    (problem,) = errors_of(recipe(tmp_path, rows=rows, fmt=DIALOGUE, seq_len=128), compile_it=True)
    assert problem == ("task 'pairs', train row 1: preference: rejected: the dialogue starts with '\\n\\nUser: name a "
                       "fruit\\n\\nBot: A chair.', not with a speaker marker ('\\n\\nHuman:' or '\\n\\nAssistant:'); set "
                       "`format.dialogue.user` / `assistant` to the data's markers")
    rows[1]["rejected"] = "\n\nHuman: name a vegetable\n\nAssistant: A chair."
    (problem,) = errors_of(recipe(tmp_path, rows=rows, fmt=DIALOGUE, seq_len=128), compile_it=True)
    assert problem == ("task 'pairs', train row 1: preference: chosen and rejected share no prefix (their first turns "
                       "differ); they must be one conversation with two final replies")
    rows = [dict(HH[0])]
    rows[0]["rejected"] = rows[0]["rejected"].replace("hello", "hey")
    (problem,) = errors_of(recipe(tmp_path, rows=rows, fmt=DIALOGUE, seq_len=128), compile_it=True)
    assert problem == ("task 'pairs', train row 0: preference: chosen and rejected differ at turn 1, before the "
                       "last assistant turn; they must share every turn but the final reply")


def test_custom_markers(tmp_path):
    rows = [{k: v.replace("Human:", "User:").replace("Assistant:", "Bot:") for k, v in r.items()} for r in HH]
    fmt = '{kind: preference, chosen: chosen, rejected: rejected, dialogue: {user: "\\n\\nUser:", assistant: "\\n\\nBot:"}}'
    out = build(tmp_path, rows=rows, fmt=fmt, seq_len=128)
    assert read_plan(out).stage("align").tasks["pairs"].pairs == 2


CONVERSATIONS = [
    {"chosen": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}],
     "rejected": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "No."}],
     "messages": [{"from": "human", "value": "Say hi"}], "ask": "Say hi", "good": "Hi!", "bad": "No."},
]


@pytest.mark.parametrize("fmt", [
    "{kind: preference, chosen: chosen, rejected: rejected}",
    "{kind: preference, messages: messages, chosen: good, rejected: bad}",
    "{kind: preference, prompt: ask, chosen: good, rejected: bad, chat: true}",
    "{kind: preference, chosen: chosen, rejected: rejected, dialogue: {}, chat: true}",
])
def test_chat_shapes_render_through_the_chat_template(tmp_path, fmt):
    rows = [dict(CONVERSATIONS[0])]
    if "dialogue" in fmt:
        rows = [{"chosen": "\n\nHuman: Say hi\n\nAssistant: Hi!", "rejected": "\n\nHuman: Say hi\n\nAssistant: No."}]
    out = build(tmp_path, rows=rows, fmt=fmt, seq_len=64, tokenizer_opts=f", chat_template: {CHAT_TEMPLATE}")
    c, r = sorted(documents(out), key=lambda d: d["side"])
    first_c = next(i for i, x in enumerate(c["labels"]) if x != -100)
    first_r = next(i for i, x in enumerate(r["labels"]) if x != -100)
    assert c["ids"][:first_c] == r["ids"][:first_r]
    assert "Say hi" in decode(c["ids"][:first_c])
    assert decode([x for x in c["labels"] if x != -100]).startswith("Hi!")
    assert decode([x for x in r["labels"] if x != -100]).startswith("No.")


def test_two_conversations_must_share_all_but_the_reply(tmp_path):
    rows = [dict(CONVERSATIONS[0])]
    rows[0]["rejected"] = [{"role": "user", "content": "Say bye"}, {"role": "assistant", "content": "No."}]
    path = recipe(tmp_path, rows=rows, fmt="{kind: preference, chosen: chosen, rejected: rejected}",
                  tokenizer_opts=f", chat_template: {CHAT_TEMPLATE}")
    (problem,) = errors_of(path, compile_it=True)
    assert problem.startswith("task 'pairs', train row 0: preference: chosen and rejected share no prefix")
