"""Run-time options of `tunec run` (`--max-steps`, `--set`), and `run`/`generate` without the training extra."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny import DEMO, QUIET, Interrupt, tiny_llama

from tunec.cli import main
from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.errors import TunecError
from tunec.runtime.run import RunOptions, run

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only wait
MODEL = tiny_llama()
RECIPE = f"""
tokenizer: {{kind: local, path: {DEMO}/tokenizer}}
seq_len: 128
seed: 9
tasks:
  arithmetic:
    source: {{kind: jsonl, path: {{train: {DEMO}/data/arithmetic/train.jsonl}}}}
    templates: [arithmetic/qa]
    train: {{stop: 40}}
stages:
  - name: base
    objective: sft
    tasks: [arithmetic]
    model: {MODEL}
    lr: 0.01
    batch_tokens: 256
    max_steps: 6
    checkpoint_every_steps: 2
  - name: next
    objective: sft
    tasks: [arithmetic]
    model: {{kind: stage, stage: base}}
    lr: 0.001
    batch_tokens: 256
    epochs: 1
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("options")
    (folder / "recipe.yaml").write_text(RECIPE)
    compile_recipe(folder / "recipe.yaml", folder / "build", Options(workers=1))
    return folder / "build"


@pytest.fixture
def build(compiled, tmp_path) -> Path:
    out = tmp_path / "build"
    shutil.copytree(compiled, out)
    return out


def train_records(out: Path, stage: str) -> list[dict]:
    lines = (out / "runs" / stage / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def test_max_steps_caps_every_stage_and_is_recorded(build):
    base, nxt = run(build, RunOptions(max_steps=3, **QUIET))
    assert base.steps == 3 and nxt.steps == 3
    rows = json.loads((build / "plan.json").read_text())["stages"][1]["train"]["rows"]
    assert rows > 3 * 2  # uncapped, `next` (one epoch, 2 rows a step) would take more than 3 steps
    assert base.run_options == {"max_steps": 3}
    saved = json.loads((build / "runs" / "base" / "result.json").read_text())
    assert saved["run_options"] == {"max_steps": 3} and saved["steps"] == 3
    assert [r["step"] for r in train_records(build, "base")] == [1, 2, 3]
    # the cosine reaches 0 at the capped end, as for a stage planned with 3 steps
    assert train_records(build, "base")[-1]["lr"] < 0.01 * 0.3

    # another setting is another run: --resume refuses to skip (or continue) it, and says why
    with pytest.raises(TunecError, match=r"trained with other run-time options \(--max-steps 3; "
                                         r"this command: no --set or --max-steps\); --force"):
        run(build, RunOptions(stage="base", resume=True, **QUIET))
    run(build, RunOptions(stage="base", resume=True, max_steps=3, **QUIET))  # the same: skipped


def test_resuming_a_checkpoint_with_other_options_is_refused(build):
    def stop(step: int) -> None:
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(build, RunOptions(stage="base", overrides=("lr=0.002",), on_step=stop, **QUIET))
    with pytest.raises(TunecError, match=r"step-00000002: saved for other run-time options \(--set lr=0.002; "
                                         r"this command: --max-steps 5\); resume with the options"):
        run(build, RunOptions(stage="base", resume=True, max_steps=5, **QUIET))
    (done,) = run(build, RunOptions(stage="base", resume=True, overrides=("lr=2e-3",), **QUIET))
    assert done.steps == 6 and done.run_options == {"set": {"lr": 0.002}}


def test_set_changes_training_settings(build):
    (done,) = run(build, RunOptions(stage="base", overrides=("stages.base.lr=1e-4", "warmup_steps=2",
                                                             "max_steps=4", "stages.0.log_every_steps=2"), **QUIET))
    assert done.steps == 4
    assert done.run_options == {"set": {"lr": 1e-4, "warmup_steps": 2, "max_steps": 4, "log_every_steps": 2}}
    records = train_records(build, "base")
    assert [r["step"] for r in records] == [2, 4]
    assert records[0]["lr"] == pytest.approx(1e-4)  # step 2 is the last warmup step: the peak
    plan = json.loads((build / "plan.json").read_text())
    assert plan["stages"][0]["settings"]["lr"] == 0.01  # the plan itself is not changed


def test_bad_overrides_are_all_reported_each_naming_itself(build):
    with pytest.raises(TunecError) as err:
        run(build, RunOptions(overrides=(
            "stages.base.lr=fast", "stages.base.micro_batch_rows=0", "stages.base.tasks=[plurals]",
            "stages.base.peft=lora", "stages.base.lrr=1", "stages.nope.lr=1", "lr=1", "stages.base.lr",
        ), **QUIET))
    problems = [str(p) for p in err.value.problems]
    assert problems == [
        "--set stages.base.tasks=[plurals]: `tasks` is fixed by the compiled build; change it in the recipe and "
        "compile again (at run time only these can be set: lr, batch_tokens, epochs, max_steps, warmup_steps, "
        "weight_decay, max_grad_norm, micro_batch_rows, eval_every_steps, checkpoint_every_steps, log_every_steps, "
        "chunked_loss, activation_checkpointing, compile)",
        "--set stages.base.peft=lora: `peft` is fixed by the compiled build; change it in the recipe and compile "
        "again (at run time only these can be set: lr, batch_tokens, epochs, max_steps, warmup_steps, "
        "weight_decay, max_grad_norm, micro_batch_rows, eval_every_steps, checkpoint_every_steps, log_every_steps, "
        "chunked_loss, activation_checkpointing, compile)",
        "--set stages.base.lrr=1: stages have no setting `lrr` (did you mean 'lr'?)",
        "--set stages.nope.lr=1: no stage 'nope' in the plan",
        "--set lr=1: which stage? write stages.STAGE.lr=VALUE, or add --stage STAGE",
        "--set stages.base.lr: expected SETTING=VALUE (with --stage) or stages.STAGE.SETTING=VALUE",
        "--set stages.base.lr=fast: Input should be a valid number, unable to parse string as a number",
        "--set stages.base.micro_batch_rows=0: Input should be greater than 0",
    ]
    with pytest.raises(TunecError, match=r"--set stages.next.lr=1: stage `next` is not run by this command "
                                         r"\(--stage base\)"):
        run(build, RunOptions(stage="base", overrides=("stages.next.lr=1",), **QUIET))
    assert not (build / "runs").exists()


def test_cli_run_options(build):
    runner = CliRunner()
    result = runner.invoke(main, ["run", str(build), "--stage", "base", "--device", "cpu", "--no-progress",
                                  "--set", "epochs=x", "--set", "lr=-1"])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "error: --set epochs=x: Input should be a valid number, unable to parse string as a number",
        "error: --set lr=-1: Input should be greater than 0",
        "2 problems",
    ]
    result = runner.invoke(main, ["run", str(build), "--stage", "base", "--device", "cpu", "--no-progress",
                                  "--max-steps", "2", "--set", "lr=0.005"])
    assert result.exit_code == 0, result.output
    saved = json.loads((build / "runs" / "base" / "result.json").read_text())
    assert saved["steps"] == 2 and saved["run_options"] == {"max_steps": 2, "set": {"lr": 0.005}}
    result = runner.invoke(main, ["run", str(build), "--max-steps", "0"])
    assert result.exit_code == 2  # a usage error


# ----------------------------------------------------------------- without the training extra

# Python where package `HIDDEN` cannot be found, as when it is not installed, then tunec's CLI:
# every finder is wrapped so that it does not see it.
WITHOUT = r"""
import sys

class Hide:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == HIDDEN or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)

HIDDEN = sys.argv.pop(1)
sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
sys.argv[0] = "tunec"
from tunec.cli import main
main()
"""


@pytest.mark.parametrize("command", ["run", "generate"])
@pytest.mark.parametrize("missing", ["torch", "peft"])
def test_run_and_generate_without_the_training_extra(tmp_path, command, missing):
    args = [command, str(tmp_path / "build")] + (["--prompt", "x"] if command == "generate" else [])
    proc = subprocess.run([sys.executable, "-c", WITHOUT, missing, *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr == (f"error: `tunec {command}` needs {missing}, which is not installed; install the "
                           "training extra: pip install 'tunec[train]'\n")


def test_the_compiler_needs_no_training_extra(tmp_path):
    """The blocker only refuses what it names: the compiler works under it (it never imports torch)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    proc = subprocess.run([sys.executable, "-c", WITHOUT, "torch", "compile", str(recipe), "-o",
                           str(tmp_path / "build"), "--workers", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "build" / "plan.json").is_file()
