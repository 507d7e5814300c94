"""`tunec eval`: content-free calibration (``acc_cal``) and ``--model PATH_OR_STAGE``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_eval_auto import compiled

from tunec.cli import main
from tunec.compiler.plan import read_plan
from tunec.compiler.tokens import load_local_tokenizer
from tunec.runtime.accuracy import CONTENT_FREE, content_free_prompts
from tunec.runtime.generate import render_prompt
from tunec.runtime.run import RunOptions, run


def cli(*args: str):
    return CliRunner().invoke(main, [*args], catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = compiled(tmp_path_factory.mktemp("calibration"))
    run(out, RunOptions(progress=False, device="cpu", eval_accuracy=False))
    return out


@pytest.fixture
def build(trained, tmp_path) -> Path:
    out = tmp_path / "build"
    shutil.copytree(trained, out)
    return out


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_content_free_prompt_is_the_template_on_na(trained):
    plan = read_plan(trained)
    tokenizer = load_local_tokenizer(trained / plan.tokenizer.path)
    found = content_free_prompts(plan, plan.stage("first"), "reviews", tokenizer)
    assert found == {"sentiment/review_short": render_prompt(plan, "reviews", None, {"text": CONTENT_FREE,
                                                                                     "label": CONTENT_FREE})}
    assert CONTENT_FREE in found["sentiment/review_short"]


def test_calibrated_predictions_subtract_the_content_free_likelihoods(build):
    assert cli("eval", str(build), "--stage", "first", "--device", "cpu").exit_code == 0
    saved = json.loads((build / "runs" / "first" / "eval.json").read_text())["stage"]
    for task in ("reviews", "critic"):
        found = lines(build / "runs" / "first" / "predictions" / f"{task}.jsonl")
        baselines = {tuple(p["content_free"]) for p in found}
        assert len(baselines) == 1  # one template, one choice list: one content-free score per choice
        for p in found:
            shifted = [a - b for a, b in zip(p["loglikelihoods"], p["content_free"])]
            assert p["predicted_calibrated"] == max(range(len(shifted)), key=lambda i: (shifted[i], -i))
        acc = sum(p["predicted_calibrated"] == p["answer"] for p in found) / len(found)
        assert saved["tasks"][task]["acc_calibrated"] == acc
    assert saved["groups"]["held-out"]["acc_calibrated"] == saved["tasks"]["critic"]["acc_calibrated"]


def test_model_scores_a_folder_or_a_stage_beside_the_stage(build):
    assert cli("eval", str(build), "--stage", "first", "--device", "cpu", "--limit", "5").exit_code == 0
    folder = build / "runs" / "first" / "model"
    result = cli("eval", str(build), "--stage", "first", "--model", str(folder), "--device", "cpu", "--limit", "5")
    assert result.exit_code == 0, result.output
    saved = json.loads((build / "runs" / "first" / "eval.json").read_text())
    assert saved["model"]["model"] == f"folder {folder.resolve()}"
    for t, m in saved["stage"]["tasks"].items():  # the same weights: the same scores
        assert {k: v for k, v in saved["model"]["tasks"][t].items()} == m
    assert "model acc" in result.output and "models: model = folder" in result.output
    assert len(lines(build / "runs" / "first" / "predictions" / "model" / "reviews.jsonl")) == 5

    result = cli("eval", str(build), "--stage", "second", "--model", "first", "--device", "cpu", "--limit", "5")
    assert result.exit_code == 0, result.output
    on_second = json.loads((build / "runs" / "second" / "eval.json").read_text())["model"]
    assert on_second["model"] == "stage first" and on_second["fingerprint"] is not None


def test_model_errors(build):
    result = CliRunner().invoke(main, ["eval", str(build), "--model", "nowhere", "--device", "cpu"])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "--model nowhere: neither a stage of the plan nor a folder" in result.output
    result = CliRunner().invoke(main, ["eval", str(build), "--model", "first", "--base"])
    assert result.exit_code == 2 and "--base and --model exclude each other" in result.output
