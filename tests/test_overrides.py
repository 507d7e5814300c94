"""`--set PATH=VALUE` overrides and the recipe's format `version`.

Overrides are applied to the YAML data before validation, so they meet the
same checks as the file; their errors are located at the override.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tunec.cli import main
from tunec.compiler import load as load_module
from tunec.compiler.check import check
from tunec.compiler.errors import TunecError
from tunec.compiler.load import display_path, load_recipe

RECIPE = """
tokenizer: {kind: local, path: TOKENIZER}
seq_len: 64
tasks:
  sums.v1:
    source: {kind: jsonl, path: tiny/train.jsonl}
    fields: {question: q, answer: a}
    templates: [arithmetic/qa]
stages:
  - name: sft
    objective: sft
    tasks: [sums.v1]
    model: {kind: hub, id: org/model}
    lr: 0.001
"""


@pytest.fixture
def recipe(write_recipe, tiny_task_dir, demo_tokenizer):
    return write_recipe(RECIPE.replace("TOKENIZER", str(demo_tokenizer)))


def problems(path, overrides) -> list[str]:
    with pytest.raises(TunecError) as info:
        check(load_recipe(path, overrides))
    return [str(p).replace(display_path(path.resolve()), "R", 1) for p in info.value.problems]


def test_overrides_change_the_validated_recipe(recipe):
    loaded = load_recipe(recipe, ["stages.0.lr=1e-4", "tasks.sums.v1.truncation=error",
                                  "stages.0.peft={kind: lora, r: 8}", "stages.0.held_out=[]"])
    stage = loaded.recipe.stages[0]
    assert stage.lr == 1e-4 and stage.peft.r == 8  # 1e-4 read as a YAML 1.2 float
    assert loaded.recipe.tasks["sums.v1"].truncation == "error"  # a task name holding a dot
    assert [o.path for o in loaded.overrides][:2] == [("stages", 0, "lr"), ("tasks", "sums.v1", "truncation")]
    assert loaded.position(("stages", 0, "lr")) == (None, None)  # no longer the file's value
    assert loaded.position(("stages", 0, "name")) == (9, 5)


def test_override_errors_name_the_override_and_file_errors_keep_their_lines(recipe):
    text = recipe.read_text().replace("seq_len: 64", "seq_len: 4")
    recipe.write_text(text)
    assert problems(recipe, ["stages.0.lr=-1", "stages.0.lrr=1", "stages.0.peft={kind: lora, rr: 8}"]) == [
        "R:2:1: seq_len: Input should be greater than 8 (got 4)",
        "--set stages.0.lr: Input should be greater than 0 (got -1)",
        "--set stages.0.lrr: unknown field `lrr` (did you mean 'lr'?)",
        "--set stages.0.peft: stages[0].peft.rr: unknown field `rr` (did you mean 'r'?)",
    ]


def test_override_errors_found_by_the_static_checks_name_the_override(recipe):
    assert problems(recipe, ["tasks.sums.v1.fields.question=qq"]) == [
        "--set tasks.sums.v1.fields.question: column `qq` is not in the source (did you mean 'q'?); columns: q, a",
    ]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("stages.1.lr=1", "--set stages.1.lr: `stages` is a list of 1 item(s): `1` is not an index (0 to 0)"),
        ("stages.sft.lr=1", "--set stages.sft.lr: `stages` is a list of 1 item(s): `sft` is not an index (0 to 0)"),
        ("seq_len.x=1", "--set seq_len.x: `seq_len` is 64, not a mapping or a list"),
        ("stages.0.lr", "`--set stages.0.lr`: write PATH=VALUE, e.g. `--set stages.0.lr=1e-4`"),
        ("stages.0.lr=[1", "--set stages.0.lr:1:3: invalid YAML: expected ',' or ']', but got '<stream end>'"),
        ("stages.0.lr=!!python/name:os.system", "--set stages.0.lr:1:1: unsupported YAML tag"),
    ],
)
def test_bad_overrides_are_reported(recipe, override, expected):
    (message,) = problems(recipe, [override])
    assert message.startswith(expected), message


def test_cli_validate_and_compile_take_set(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    bad = runner.invoke(main, ["validate", str(recipe), "--set", "stages.0.lr=.inf", "--set", "stages.0.epochs=0"])
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert bad.output.splitlines()[:2] == ["error: --set stages.0.lr: Input should be a finite number (got inf)",
                                           "error: --set stages.0.epochs: Input should be greater than 0 (got 0)"]
    assert runner.invoke(main, ["validate", str(recipe), "--set", "stages.0.lr=1e-4"]).exit_code == 0

    hashes = {}
    for name, sets in (("plain", []), ("lr", ["--set", "stages.0.lr=1e-4"])):
        out = tmp_path / name
        result = runner.invoke(main, ["compile", str(recipe), "-o", str(out), "-j", "1", *sets])
        assert result.exit_code == 0, result.output
        plan = json.loads((out / "plan.json").read_text())
        hashes[name] = plan["recipe"]["hash"]
        assert plan["recipe"]["overrides"] == sets[1:]
        assert plan["stages"][0]["settings"]["lr"] == (1e-4 if sets else 0.001)
    assert hashes["plain"] != hashes["lr"]


# ----------------------------------------------------------------- version


def test_a_newer_format_version_says_to_upgrade(write_recipe):
    path = write_recipe("seq_len: 64\nversion: 7\nstages: {a: 1}\n")
    with pytest.raises(TunecError) as info:
        load_recipe(path)
    (p,) = info.value.problems
    assert (p.line, p.col, p.field) == (2, 1, "version")
    assert "recipe format version 7" in p.message and "upgrade tunec" in p.message


def test_current_version_loads_and_bad_versions_are_schema_errors(recipe):
    text = recipe.read_text()
    recipe.write_text("version: 1\n" + text)
    assert load_recipe(recipe).recipe.version == 1
    recipe.write_text("version: 0\n" + text)
    with pytest.raises(TunecError, match="version: Input should be greater than or equal to 1"):
        load_recipe(recipe)


def test_an_older_version_goes_through_each_migration_step(monkeypatch):
    # Simulate a tunec reading format 3, with steps 1->2 and 2->3.
    monkeypatch.setattr(load_module, "RECIPE_VERSION", 3)
    monkeypatch.setattr(load_module, "MIGRATIONS", {
        1: lambda d: {**{k: v for k, v in d.items() if k != "sequence_length"}, "seq_len": d["sequence_length"]},
        2: lambda d: {**d, "seed": d.get("seed", 0) + 1},
    })
    data = load_module._migrate({"version": 1, "sequence_length": 64}, {}, "r.yaml")
    assert data == {"version": 3, "seq_len": 64, "seed": 1}
    assert load_module._migrate({"version": 2, "seq_len": 8}, {}, "r.yaml") == {"version": 3, "seq_len": 8, "seed": 1}
