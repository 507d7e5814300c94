"""`tunec eval`: accuracy by rank classification on the compiled `choices.jsonl`.

A small recipe over the demo data: `reviews` trained (answer choices, 30 eval
rows), `chatty` trained in chat format (the demo tokenizer's ChatML template) and `critic` held out (the reviews test file under another template,
answer choices too); a tiny llama trained for a few steps. The demo recipe
itself is trained in the slow test.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from tiny import DEMO, QUIET, tiny_llama, torchrun

from tunec.cli import main
from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.tokens import load_local_tokenizer, tokenizer_info
from tunec.runtime.accuracy import evaluate_task
from tunec.runtime.run import RunOptions, run

RECIPE = f"""
tokenizer: {{kind: local, path: {DEMO}/tokenizer}}
seq_len: 128
seed: 3
tasks:
  reviews:
    source: {{kind: jsonl, path: {{train: {DEMO}/data/reviews/train.jsonl, test: {DEMO}/data/reviews/test.jsonl}}}}
    fields: {{text: review, label: sentiment}}
    templates: [sentiment/review_short]
    answer_choices: [negative, positive]
    train: {{split: train, stop: 80}}
    eval: {{split: test, stop: 30}}
  chatty:
    source: {{kind: jsonl, path: {{train: {DEMO}/data/reviews/train.jsonl, test: {DEMO}/data/reviews/test.jsonl}}}}
    fields: {{text: review, label: sentiment}}
    format: {{kind: chat}}
    templates: [sentiment/one_word]
    answer_choices: [negative, positive]
    train: {{split: train, stop: 40}}
    eval: {{split: test, stop: 10}}
  critic:
    source: {{kind: jsonl, path: {DEMO}/data/reviews/test.jsonl}}
    fields: {{text: review, label: sentiment}}
    templates: [sentiment/one_word]
    answer_choices: [negative, positive]
    train: {{start: 30, stop: 50}}
  plurals:
    source: {{kind: jsonl, path: {{train: {DEMO}/data/plurals/train.jsonl, test: {DEMO}/data/plurals/test.jsonl}}}}
    templates: [plural/plain]
    train: {{stop: 40}}
    eval: {{split: test, stop: 10}}
stages:
  - name: sft
    objective: sft
    tasks: [reviews, chatty, plurals]
    held_out: [critic]
    model: {tiny_llama(layers=2)}
    lr: 0.01
    batch_tokens: 1024
    max_steps: 3
"""


def cli(*args: str):
    return CliRunner().invoke(main, [*args], catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("accuracy")
    (folder / "recipe.yaml").write_text(RECIPE)
    out = folder / "build"
    compile_recipe(folder / "recipe.yaml", out, Options(workers=1))
    run(out, RunOptions(**QUIET))
    return out


@pytest.fixture
def build(trained, tmp_path) -> Path:
    out = tmp_path / "build"
    shutil.copytree(trained, out)
    return out


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("task", ["reviews", "chatty"])
def test_scores_equal_a_plain_transformers_forward(build, task):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = cli("eval", str(build), "--device", "cpu", "--tasks", task, "--limit", "10")
    assert result.exit_code == 0, result.output
    predictions = lines(build / "runs" / "sft" / "predictions" / f"{task}.jsonl")
    assert len(predictions) == 10
    if task == "chatty":  # the conversation up to the reply, as the chat template rendered it in training
        assert predictions[0]["prompt"].endswith("<|im_start|>assistant\n")

    tok = AutoTokenizer.from_pretrained(str(build / "tokenizer"))
    model = AutoModelForCausalLM.from_pretrained(str(build / "runs" / "sft" / "model")).eval()
    for p in predictions:
        mine = []
        for choice in p["choices"]:
            prompt = p["prompt"]
            # a chat prompt holds its special tokens as text: nothing is added to it
            enc = tok(prompt + p["choice_prefix"] + choice, return_offsets_mapping=True,
                      add_special_tokens=task != "chatty")
            ids = enc["input_ids"]
            # the choice's tokens: every token holding a character after the prompt
            first = next(i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > len(prompt) and e > s)
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0]
            logprobs = torch.log_softmax(logits.double(), dim=-1)
            mine.append(sum(float(logprobs[i - 1, ids[i]]) for i in range(first, len(ids))))
        assert p["loglikelihoods"] == pytest.approx(mine, abs=1e-5)
        assert p["predicted"] == max(range(len(mine)), key=lambda i: (mine[i], -i))
        norm = [ll / len(c) for ll, c in zip(mine, p["choices"])]
        assert p["predicted_norm"] == max(range(len(norm)), key=lambda i: (norm[i], -i))
    saved = json.loads((build / "runs" / "sft" / "eval.json").read_text())
    acc = sum(p["predicted"] == p["answer"] for p in predictions) / 10
    assert saved["stage"]["tasks"][task]["acc"] == acc
    assert saved["stage"]["tasks"][task]["n"] == 10


class Uniform(torch.nn.Module):
    """A language model that finds every token equally likely: a choice's log-likelihood is
    -(its tokens) * log(vocab), so the summed score favours few tokens, the normalised one few
    tokens per character."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, **kwargs):  # no key/value cache: the scorer makes one pass per choice
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_acc_norm_differs_from_acc_when_choice_lengths_differ():
    tok = load_local_tokenizer(DEMO / "tokenizer")
    info = tokenizer_info(tok)
    choices = ["a", "negative"]
    counts = [len(tok.backend_tokenizer.encode(" " + c, add_special_tokens=False).ids) for c in choices]
    assert counts[0] < counts[1] and counts[0] / 1 > counts[1] / 8  # the crafted case: short wins summed only
    records = [{"row": i, "template": "t", "prompt": "Is it good? Answer:", "choice_prefix": " ", "target": " negative",
                "choices": choices, "answer": 1} for i in range(3)]
    metrics, predictions = evaluate_task(Uniform(info.vocab_size), tok.backend_tokenizer, info, records, False, 128,
                                         torch.device("cpu"))
    assert metrics["acc"] == 0.0 and metrics["acc_norm"] == 1.0
    assert metrics["chance"] == 0.5 and metrics["majority"] == 1.0 and metrics["n"] == 3
    assert predictions[0]["loglikelihoods"] == pytest.approx([-n * math.log(info.vocab_size) for n in counts])
    assert predictions[0]["tokens"] == counts


def test_held_out_tasks_are_only_in_the_held_out_group(build):
    result = cli("eval", str(build), "--device", "cpu", "--limit", "8")
    assert result.exit_code == 0, result.output
    saved = json.loads((build / "runs" / "sft" / "eval.json").read_text())
    tasks, groups = saved["stage"]["tasks"], saved["stage"]["groups"]
    assert {t: m["group"] for t, m in tasks.items()} == {"reviews": "trained", "chatty": "trained",
                                                         "critic": "held-out"}
    assert groups["held-out"]["tasks"] == 1 and groups["held-out"]["acc"] == tasks["critic"]["acc"]
    assert groups["trained"]["tasks"] == 2
    assert groups["trained"]["acc"] == pytest.approx((tasks["reviews"]["acc"] + tasks["chatty"]["acc"]) / 2)
    assert [row[:2] for row in table(result.output)[1:]] == [
        ["chatty", "trained"], ["reviews", "trained"], ["mean", "trained"], ["critic", "held-out"],
        ["mean", "held-out"]]
    assert len(lines(build / "runs" / "sft" / "predictions" / "critic.jsonl")) == 8


def test_base_results_sit_beside_the_stage_and_give_the_delta(build):
    assert cli("eval", str(build), "--device", "cpu", "--limit", "6").exit_code == 0
    result = cli("eval", str(build), "--device", "cpu", "--limit", "6", "--base")
    assert result.exit_code == 0, result.output
    saved = json.loads((build / "runs" / "sft" / "eval.json").read_text())
    assert saved["base"]["model"] == "config" and "stage" in saved
    header, *rows = table(result.output)
    assert header[-4:] == ["delta", "acc", "delta", "acc_norm"]
    (reviews,) = [row for row in rows if row[0] == "reviews"]
    delta = saved["stage"]["tasks"]["reviews"]["acc"] - saved["base"]["tasks"]["reviews"]["acc"]
    assert reviews[-2] == f"{delta:+.3f}"
    assert len(lines(build / "runs" / "sft" / "predictions" / "base" / "reviews.jsonl")) == 6

    result = cli("eval", str(build), "--device", "cpu", "--limit", "4", "--base")
    assert "note: scored with different --limit values (base 4, stage 6)" in result.output


def table(output: str) -> list[list[str]]:
    """The cells of the result table's rows, header first (log lines before it left out)."""
    rows = output.splitlines()
    start = next(i for i, line in enumerate(rows) if line.startswith("task "))
    found = []
    for line in rows[start:]:
        if not line.strip() or line.startswith(("note:", "models:")):
            break
        found.append(line.split())
    return found


def one_error(result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    out = result.output.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for w in words:
        assert w in out[0], out[0]


def test_bad_input_is_one_line_each(build, tmp_path):
    one_error(cli("eval", str(tmp_path)), "not a tunec build folder")
    one_error(cli("eval", str(build), "--tasks", "reviewz", "--device", "cpu"), "reviewz", "did you mean", "reviews")
    one_error(cli("eval", str(build), "--tasks", "plurals", "--device", "cpu"), "plurals", "no answer choices")
    one_error(cli("eval", str(build), "--stage", "nope", "--device", "cpu"), "nope")

    fresh = tmp_path / "fresh"
    shutil.copytree(build, fresh)
    shutil.rmtree(fresh / "runs")
    one_error(cli("eval", str(fresh), "--stage", "sft", "--device", "cpu"), "has not run", "--base")
    one_error(cli("eval", str(fresh), "--device", "cpu"), "no stage has run")

    bare = tmp_path / "bare"
    (tmp_path / "bare.yaml").write_text(RECIPE.replace("    answer_choices: [negative, positive]\n", ""))
    compile_recipe(tmp_path / "bare.yaml", bare, Options(workers=1))
    one_error(cli("eval", str(bare), "--stage", "sft", "--base", "--device", "cpu"), "no eval set with answer choices")
    result = cli("run", str(bare), "--device", "cpu", "--no-progress", "--eval-accuracy")
    assert result.exit_code == 0 and "--eval-accuracy: no stage run has an eval set with answer choices" in result.output
    assert not (bare / "runs" / "sft" / "eval.json").exists()


@pytest.mark.slow
def test_the_trained_demo_beats_chance_and_the_untrained_one_does_not(tmp_path):
    """README command 1's recipe and its 100 steps, with answer choices for reviews (at 60 steps the
    model's reviews accuracy is still near chance, on some runs below it)."""
    out = tmp_path / "demo"
    compile_recipe(DEMO / "demo.yaml", out, Options(workers=1),
                   ("tasks.reviews.answer_choices=[negative, positive]",))
    run(out, RunOptions(**QUIET))
    assert cli("eval", str(out), "--device", "cpu").exit_code == 0
    result = cli("eval", str(out), "--device", "cpu", "--base")
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "runs" / "sft" / "eval.json").read_text())
    trained, untrained = saved["stage"]["tasks"]["reviews"], saved["base"]["tasks"]["reviews"]
    n, chance = trained["n"], trained["chance"]
    assert n == 200 and chance == 0.5
    sigma = math.sqrt(chance * (1 - chance) / n)  # of an accuracy that is chance's
    assert abs(untrained["acc"] - chance) <= 3 * sigma, untrained
    assert trained["acc"] > chance + 3 * sigma, trained
    assert trained["acc_norm"] > chance + 3 * sigma, trained


def test_run_with_eval_accuracy_scores_each_stage_as_tunec_eval_does(build):
    result = cli("run", str(build), "--device", "cpu", "--force", "--no-progress", "--eval-accuracy")
    assert result.exit_code == 0, result.output
    assert table(result.output)[0][:4] == ["task", "group", "n", "chance"]
    done = json.loads((build / "runs" / "sft" / "result.json").read_text())
    during = json.loads((build / "runs" / "sft" / "eval.json").read_text())
    assert during["stage"]["fingerprint"] == done["fingerprint"]
    assert set(during["stage"]["tasks"]) == {"reviews", "chatty", "critic"}
    scored = lines(build / "runs" / "sft" / "predictions" / "critic.jsonl")

    assert cli("eval", str(build), "--device", "cpu").exit_code == 0
    after = json.loads((build / "runs" / "sft" / "eval.json").read_text())
    assert after["stage"] == during["stage"]
    assert lines(build / "runs" / "sft" / "predictions" / "critic.jsonl") == scored


@pytest.mark.slow
def test_eval_accuracy_under_torchrun_equals_one_process(build):
    stdout, stderr = torchrun(build, "--force", "--eval-accuracy", timeout=240)
    assert stdout.count("stage sft: accuracy by rank classification") == 1  # rank 0 prints, and writes, once
    assert "2 ranks" in stdout + stderr
    rd = build / "runs" / "sft"
    two = {t: lines(rd / "predictions" / f"{t}.jsonl") for t in ("reviews", "chatty", "critic")}
    shared = json.loads((rd / "eval.json").read_text())["stage"]

    assert cli("eval", str(build), "--device", "cpu").exit_code == 0
    one = {t: lines(rd / "predictions" / f"{t}.jsonl") for t in two}
    for t in two:
        assert [p["row"] for p in two[t]] == [p["row"] for p in one[t]]  # every record once, in order
        for a, b in zip(two[t], one[t]):
            assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-5)
            assert a["predicted"] == b["predicted"]
    assert shared["tasks"] == json.loads((rd / "eval.json").read_text())["stage"]["tasks"]


def test_choices_continue_the_prompt_pass_and_score_as_whole_passes(build):
    from transformers import AutoModelForCausalLM

    from tunec.compiler.plan import read_plan
    from tunec.runtime.accuracy import encode_choices, read_choices, score

    plan = read_plan(build)
    tok = load_local_tokenizer(build / "tokenizer")
    info = tokenizer_info(tok)
    model = AutoModelForCausalLM.from_pretrained(str(build / "runs" / "sft" / "model")).eval()
    lengths: list[int] = []
    real = model.forward

    @functools.wraps(real)  # the same signature: the scorer looks for its cache argument
    def counted(*args, **kwargs):
        lengths.append(kwargs["input_ids"].shape[1])
        return real(*args, **kwargs)

    class Whole(torch.nn.Module):  # the same model, taking no cache: one whole pass per choice
        def forward(self, input_ids):
            return real(input_ids=input_ids)

    model.forward = counted
    for record in read_choices(build, plan.stage("sft"), "reviews")[:5]:
        lengths.clear()
        cached = score(model, tok.backend_tokenizer, info, record, False, plan.seq_len, torch.device("cpu"))
        ids = [e.ids for e in encode_choices(tok.backend_tokenizer, info, record, False)]
        shared = lengths[0]
        assert all(i[:shared] == ids[0][:shared] for i in ids) and lengths[1:] == [len(i) - shared for i in ids]
        whole = score(Whole(), tok.backend_tokenizer, info, record, False, plan.seq_len, torch.device("cpu"))
        assert cached.loglikelihoods == pytest.approx(whole.loglikelihoods, abs=1e-5)
