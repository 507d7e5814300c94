"""Generation metrics for eval sets without answer choices (`tunec eval --generate`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_eval_auto import RECIPE, compiled

from tunec.cli import main
from tunec.compiler.plan import read_plan
from tunec.compiler.tokens import load_local_tokenizer
from tunec.runtime import eval_generate
from tunec.runtime.generate import render_prompt
from tunec.runtime.genmetrics import exact_match, f1, normalise
from tunec.runtime.run import RunOptions, run


@pytest.mark.parametrize("prediction, reference, em, f", [
    ("Paris", "paris", 1.0, 1.0),                              # case
    ("  The  Paris. ", "paris", 1.0, 1.0),                     # article, punctuation, spaces
    ("an apple a day", "apple day", 1.0, 1.0),                 # every article, as a word only
    ("theatre", "atre", 0.0, 0.0),                             # ... not inside a word
    ("a black cat sat", "the cat", 0.0, 0.5),                  # precision 1/3, recall 1
    ("cat cat dog", "cat dog dog", 0.0, 2 / 3),                # words counted as multisets
    ("", "", 1.0, 1.0),                                        # both empty
    ("the", "", 1.0, 1.0),                                     # only an article: empty after normalising
    ("", "cat", 0.0, 0.0),
    ("U.S.A.", "usa", 1.0, 1.0),
])
def test_exact_match_and_f1_normalise_as_squad(prediction, reference, em, f):
    assert exact_match(prediction, reference) == em
    assert f1(prediction, reference) == pytest.approx(f)


def test_normalise():
    assert normalise("The Quick,  brown\tFOX!") == "quick brown fox"


def test_documents_split_at_the_last_trained_run():
    #            doc 1: 3 prompt, 2 trained | doc 2 (chat): 2 prompt, 1 trained, 1 prompt, 2 trained | padding
    ids = np.array([5, 6, 7, 8, 0, 9, 9, 4, 3, 5, 6, 1, 1])
    labels = np.array([-100, -100, -100, 8, 0, -100, -100, 4, -100, 5, 6, -100, -100])
    positions = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1])
    docs = eval_generate.split_documents(ids, labels, positions)
    assert docs == [{"prompt": [5, 6, 7], "reference": [8, 0]}, {"prompt": [9, 9, 4, 3], "reference": [5, 6]}]


class Oracle(torch.nn.Module):
    """Answers every prompt with the reference the documents hold, then stops (or not, ``stop=False``)."""

    def __init__(self, docs: list[dict], eos: int, stop: bool = True):
        super().__init__()
        self.answers = {tuple(d["prompt"]): d["reference"] for d in docs}
        self.eos, self.stop = eos, stop

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, do_sample):
        assert not do_sample and self.eos in eos_token_id
        answer = [t for t in self.answers[tuple(input_ids[0].tolist())] if t != self.eos]
        new = (answer + [self.eos] if self.stop else answer + [answer[-1]] * max_new_tokens)[:max_new_tokens]
        return torch.tensor([input_ids[0].tolist() + new])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = compiled(tmp_path_factory.mktemp("gen"))
    run(out, RunOptions(progress=False, device="cpu", eval_accuracy=False))
    return out


def test_an_oracle_scores_one_and_the_stop_rule_is_kept(trained):
    plan = read_plan(trained)
    sp = plan.stage("first")
    tokenizer = load_local_tokenizer(trained / plan.tokenizer.path)
    docs = eval_generate.documents(trained, plan, sp, "plurals", plan.tokenizer.eos_id)
    assert len(docs) == 5 and all(d["reference"][-1] == plan.tokenizer.eos_id for d in docs)
    stop = eval_generate.stop_ids(plan, "plurals", tokenizer)
    assert stop == [plan.tokenizer.eos_id]
    found = eval_generate.predict(Oracle(docs, plan.tokenizer.eos_id), tokenizer, docs, stop, 16,
                                  plan.tokenizer.pad_id, torch.device("cpu"))
    assert eval_generate.summarise(found) == {"n": 5, "exact_match": 1.0, "f1": 1.0, "unstopped": 0}
    rows = [json.loads(line) for line in (Path(__file__).parents[1] / "recipes/demo/data/plurals/test.jsonl")
            .read_text().splitlines()[:5]]
    assert sorted(p["reference"].strip() for p in found) == sorted(r["plural"] for r in rows)
    babble = eval_generate.predict(Oracle(docs, plan.tokenizer.eos_id, stop=False), tokenizer, docs, stop, 16,
                                   plan.tokenizer.pad_id, torch.device("cpu"))
    assert eval_generate.summarise(babble)["unstopped"] == 5 and eval_generate.summarise(babble)["exact_match"] < 1


def test_tunec_eval_generate_writes_metrics_and_predictions(trained, tmp_path):
    out = tmp_path / "build"
    shutil.copytree(trained, out)
    result = CliRunner().invoke(main, ["eval", str(out), "--stage", "first", "--generate", "--max-new-tokens", "6",
                                       "--device", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "runs" / "first" / "eval.json").read_text())["stage"]
    assert set(saved["tasks"]) == {"reviews", "critic"} and set(saved["generation"]["tasks"]) == {"plurals"}
    found = [json.loads(line) for line in (out / "runs/first/predictions/plurals.jsonl").read_text().splitlines()]
    assert len(found) == 5
    rows = [json.loads(line) for line in (Path(__file__).parents[1] / "recipes/demo/data/plurals/test.jsonl")
            .read_text().splitlines()[:5]]
    plan = read_plan(out)
    rendered = {render_prompt(plan, "plurals", None, {k: str(v) for k, v in r.items()}): r["plural"] for r in rows}
    for p in found:
        assert rendered[p["prompt"]] == p["reference"].strip()  # the very prompt compiled for that row
        assert p["exact_match"] == exact_match(p["generated"], p["reference"])
        assert p["f1"] == f1(p["generated"], p["reference"])
    metrics = saved["generation"]["tasks"]["plurals"]
    assert metrics["f1"] == pytest.approx(sum(p["f1"] for p in found) / 5)
    assert metrics["group"] == "trained" and saved["generation"]["max_new_tokens"] == 6
    lines = result.output.splitlines()
    assert any(line.split()[:3] == ["task", "group", "n"] and "exact_match" in line for line in lines)


def test_generate_errors_are_one_line(trained, tmp_path):
    result = CliRunner().invoke(main, ["eval", str(trained), "--stage", "first", "--generate", "--tasks", "nope",
                                       "--device", "cpu"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "nope" in result.output, result.output
    lm = compiled(tmp_path, RECIPE.replace("objective: sft", "objective: lm"))
    result = CliRunner().invoke(main, ["eval", str(lm), "--stage", "first", "--base", "--generate",
                                       "--device", "cpu"])
    assert result.exit_code == 1 and "generation needs an `sft` stage" in result.output, result.output


def test_the_docstring_examples_hold():
    import doctest

    from tunec.runtime import genmetrics

    result = doctest.testmod(genmetrics)
    assert result.attempted == 3 and result.failed == 0
