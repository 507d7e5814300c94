"""`tunec eval --shots K`: exemplars from the task's train rows, made by the compiler's few-shot."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from test_eval_auto import RECIPE, compiled

from tunec.cli import main


def cli(*args: str):
    return CliRunner().invoke(main, [*args], catch_exceptions=False)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_k_shot_prompts_end_with_the_zero_shot_prompt_after_k_train_exemplars(tmp_path):
    # room for two exemplars: none is dropped to fit
    out = compiled(tmp_path, RECIPE.replace("seq_len: 128", "seq_len: 256").replace("positions: 128", "positions: 256")
                   .replace("max_position_embeddings: 128", "max_position_embeddings: 256"))
    base = ["eval", str(out), "--stage", "first", "--base", "--tasks", "reviews", "--limit", "4", "--device", "cpu"]
    assert cli(*base).exit_code == 0
    result = cli(*base, "--shots", "2")
    assert result.exit_code == 0, result.output
    assert f"stage first: accuracy by rank classification, 2-shot ({out}/runs/first/eval-2shot.json)" in result.output
    rd = out / "runs" / "first"
    zero = {p["row"]: p for p in lines(rd / "predictions" / "base" / "reviews.jsonl")}
    two = lines(rd / "predictions-2shot" / "base" / "reviews.jsonl")
    train = [json.loads(line) for line in (Path(__file__).parents[1] / "recipes/demo/data/reviews/train.jsonl")
             .read_text().splitlines()[:60]]
    assert len(two) == 4
    for p in two:
        shots, _, example = p["prompt"].rpartition("\n\n")
        assert example == zero[p["row"]]["prompt"]  # the same example, after its exemplars
        exemplars = shots.split("\n\n")
        assert len(exemplars) == 2
        for e in exemplars:  # each a whole training document of the task: one of its train rows, answered
            assert any(e == f"Review: {r['review']}\nIs this review positive or negative?\nAnswer: {r['sentiment']}"
                       for r in train), e
    saved = json.loads((rd / "eval-2shot.json").read_text())
    assert saved["base"]["shots"] == 2 and saved["base"]["tasks"]["reviews"]["n"] == 4
    assert json.loads((rd / "eval.json").read_text())["base"]["shots"] == 0  # the zero-shot file is untouched


def test_shots_need_the_recipe_as_compiled(tmp_path):
    out = compiled(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe.read_text() + "\n# edited\n")
    result = CliRunner().invoke(main, ["eval", str(out), "--stage", "first", "--base", "--shots", "1",
                                       "--device", "cpu"])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "changed since" in result.output and "compile it again" in result.output
    recipe.unlink()
    result = CliRunner().invoke(main, ["eval", str(out), "--stage", "first", "--base", "--shots", "1",
                                       "--device", "cpu"])
    assert result.exit_code == 1 and "is gone" in result.output, result.output
