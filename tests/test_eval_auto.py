"""Accuracy at the end of every stage of `tunec run`, and on the model the run starts from (cached).

Two stages over the demo's reviews (answer choices) and plurals (none): `first`
from a tiny llama config, `second` from `first`'s result; `critic` is held out
of both. A few steps each: these tests check the machinery, not the accuracy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny import DEMO, QUIET, tiny_llama

from tunec.cli import main
from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.errors import TunecError
from tunec.compiler.load import load_recipe
from tunec.runtime.run import RunOptions, run

RECIPE = f"""
tokenizer: {{kind: local, path: {DEMO}/tokenizer}}
seq_len: 128
seed: 5
tasks:
  reviews:
    source: {{kind: jsonl, path: {{train: {DEMO}/data/reviews/train.jsonl, test: {DEMO}/data/reviews/test.jsonl}}}}
    fields: {{text: review, label: sentiment}}
    templates: [sentiment/review_short]
    answer_choices: [negative, positive]
    train: {{split: train, stop: 60}}
    eval: {{split: test, stop: 12}}
  critic:
    source: {{kind: jsonl, path: {DEMO}/data/reviews/test.jsonl}}
    fields: {{text: review, label: sentiment}}
    templates: [sentiment/one_word]
    answer_choices: [negative, positive]
    train: {{start: 30, stop: 40}}
  plurals:
    source: {{kind: jsonl, path: {{train: {DEMO}/data/plurals/train.jsonl, test: {DEMO}/data/plurals/test.jsonl}}}}
    templates: [plural/plain]
    train: {{stop: 40}}
    eval: {{split: test, stop: 5}}
stages:
  - name: first
    objective: sft
    tasks: [reviews, plurals]
    held_out: [critic]
    model: {tiny_llama()}
    lr: 0.01
    batch_tokens: 1024
    max_steps: 2
  - name: second
    objective: sft
    tasks: [reviews]
    held_out: [critic]
    model: {{kind: stage, stage: first}}
    lr: 0.01
    batch_tokens: 1024
    max_steps: 2
"""


def cli(*args: str):
    return CliRunner().invoke(main, [*args], catch_exceptions=False)


def compiled(folder: Path, text: str = RECIPE, *overrides: str) -> Path:
    (folder / "recipe.yaml").write_text(text)
    out = folder / "build"
    compile_recipe(folder / "recipe.yaml", out, Options(workers=1), overrides)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = compiled(tmp_path_factory.mktemp("auto"))
    run(out, RunOptions(**QUIET))
    return out


def read(out: Path, stage: str) -> dict:
    return json.loads((out / "runs" / stage / "eval.json").read_text())


def test_every_stage_is_scored_with_the_starting_model_beside_it(trained):
    for stage in ("first", "second"):
        saved = read(trained, stage)
        done = json.loads((trained / "runs" / stage / "result.json").read_text())
        assert saved["stage"]["fingerprint"] == done["fingerprint"]
        assert set(saved["stage"]["tasks"]) == set(saved["base"]["tasks"]) == {"reviews", "critic"}
        assert saved["base"]["model"] == "config (seeded), where the run starts"
        assert saved["stage"]["tasks"]["critic"]["group"] == "held-out"
    # the base was scored once, at the end of `first`; `second` took it from the cache
    first, second = read(trained, "first")["base"], read(trained, "second")["base"]
    assert first["cached"] == [] and sorted(second["cached"]) == ["critic", "reviews"]
    assert first["tasks"] == second["tasks"]
    cache = trained / "runs" / ".base-eval"
    assert sorted(p.name for p in cache.iterdir()) == ["critic.json", "reviews.json"]
    base = [json.loads(line) for line in
            (trained / "runs" / "second" / "predictions" / "base" / "reviews.jsonl").read_text().splitlines()]
    assert base == json.loads((cache / "reviews.json").read_text())["predictions"] and len(base) == 12


def test_the_cached_base_equals_a_fresh_tunec_eval_of_it(trained, tmp_path):
    out = tmp_path / "build"
    shutil.copytree(trained, out)
    cached = read(out, "first")["base"]["tasks"]
    assert cli("eval", str(out), "--stage", "first", "--base", "--device", "cpu").exit_code == 0
    fresh = read(out, "first")["base"]["tasks"]
    for t in fresh:
        for m in ("acc", "acc_norm", "acc_calibrated", "n"):
            assert fresh[t][m] == cached[t][m], (t, m)


def test_run_prints_the_tables_and_resume_does_not_score_again(trained, tmp_path):
    out = tmp_path / "build"
    shutil.copytree(trained, out)
    result = cli("run", str(out), "--device", "cpu", "--no-progress", "--stage", "second", "--force")
    assert result.exit_code == 0, result.output
    assert "stage second: accuracy by rank classification" in result.output
    assert "models: base = config (seeded), where the run starts; stage = stage second" in result.output
    before = (out / "runs" / "second" / "eval.json").stat().st_mtime_ns
    result = cli("run", str(out), "--device", "cpu", "--no-progress", "--resume")
    assert result.exit_code == 0, result.output
    assert (out / "runs" / "second" / "eval.json").stat().st_mtime_ns == before


def test_the_recipe_switch_and_the_run_flag_turn_it_off(tmp_path):
    off = RECIPE.replace("    max_steps: 2\n  - name: second", "    max_steps: 2\n    eval: {accuracy: false}\n"
                         "  - name: second", 1)
    out = compiled(tmp_path, off)
    run(out, RunOptions(**QUIET))
    assert not (out / "runs" / "first" / "eval.json").exists()
    assert read(out, "second")["stage"]["tasks"]["reviews"]["n"] == 12

    result = cli("run", str(out), "--device", "cpu", "--no-progress", "--force", "--no-eval-accuracy")
    assert result.exit_code == 0 and "accuracy" not in result.output
    assert not (out / "runs" / "second" / "eval.json").exists()
    result = cli("run", str(out), "--device", "cpu", "--no-progress", "--force", "--stage", "first",
                 "--eval-accuracy")  # on for every stage, whatever the recipe says
    assert result.exit_code == 0 and "stage first: accuracy by rank classification" in result.output


def test_the_stage_limit_bounds_the_records(tmp_path):
    out = compiled(tmp_path, RECIPE, "stages.0.eval={limit: 3}", "stages.1.eval={accuracy: false}")
    run(out, RunOptions(**QUIET))
    saved = read(out, "first")
    assert saved["stage"]["limit"] == saved["base"]["limit"] == 3
    assert saved["stage"]["tasks"]["reviews"]["n"] == saved["base"]["tasks"]["critic"]["n"] == 3


@pytest.mark.parametrize("value, message", [
    ("{accuracy: yes}", "stages[0].eval.accuracy: Input should be a valid boolean"),
    ("{accuracy: true, limt: 3}", "stages[0].eval.limt"),
    ("{limit: 0}", "stages[0].eval.limit: Input should be greater than 0"),
])
def test_a_bad_eval_switch_is_located(tmp_path, value, message):
    text = RECIPE.replace("    max_steps: 2\n  - name: second", f"    max_steps: 2\n    eval: {value}\n"
                          "  - name: second", 1)
    line = text.splitlines().index(f"    eval: {value}") + 1
    (tmp_path / "recipe.yaml").write_text(text)
    with pytest.raises(TunecError) as info:
        load_recipe(tmp_path / "recipe.yaml")
    (problem,) = [str(p) for p in info.value.problems]
    assert f"recipe.yaml:{line}:" in problem and message in problem, problem
