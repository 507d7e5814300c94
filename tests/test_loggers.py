"""Where metrics and messages go: metrics.jsonl always, TensorBoard / W&B / MLflow when asked for
(read back from what each wrote, and compared with metrics.jsonl), ``logging`` instead of print,
and the ``tunec`` command showing the same lines as before."""

from __future__ import annotations

import ast
import json
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny import DEMO, QUIET, tiny_llama

from tunec.cli import main
from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.errors import TunecError
from tunec.runtime import loggers
from tunec.runtime.run import RunOptions, run

ROOT = Path(__file__).resolve().parents[1]
RECIPE = f"""
tokenizer: {{kind: local, path: {DEMO}/tokenizer}}
seq_len: 128
seed: 5
tasks:
  plurals:
    source: {{kind: jsonl, path: {{train: {DEMO}/data/plurals/train.jsonl, test: {DEMO}/data/plurals/test.jsonl}}}}
    templates: [plural/plain]
    train: {{stop: 80}}
    eval: {{split: test, stop: 10}}
stages:
  - name: s
    objective: sft
    tasks: [plurals]
    model: {tiny_llama()}
    lr: 0.01
    batch_tokens: 512
    max_steps: 5
    eval_every_steps: 2
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("loggers")
    (folder / "recipe.yaml").write_text(RECIPE)
    compile_recipe(folder / "recipe.yaml", folder / "build", Options(workers=1))
    return folder / "build"


@pytest.fixture
def build(compiled, tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv(loggers.ENV, raising=False)
    out = tmp_path / "build"
    shutil.copytree(compiled, out)
    return out


def expected_scalars(out: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as ``{tag: {step: value}}``, tags named as every tracker names them."""
    found: dict[str, dict[int, float]] = {}
    for line in (out / "runs" / "s" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for tag, value in loggers.scalars(record).items():
            found.setdefault(tag, {})[record["step"]] = value
    assert {"train/loss", "train/lr", "eval_loss/plurals", "eval_loss/all", "eval_tokens/plurals"} <= set(found)
    return found


def assert_same(got: dict[str, dict[int, float]], expected: dict[str, dict[int, float]]) -> None:
    assert got.keys() == expected.keys()
    for tag in expected:
        assert got[tag].keys() == expected[tag].keys(), tag
        for step, value in expected[tag].items():
            assert got[tag][step] == pytest.approx(value, rel=1e-6), (tag, step)  # TensorBoard keeps float32


# ----------------------------------------------------------------- choosing trackers


def test_requested_merges_flags_and_environment(monkeypatch):
    monkeypatch.delenv(loggers.ENV, raising=False)
    assert loggers.requested(()) == []
    assert loggers.requested(("tensorboard", "tensorboard")) == ["tensorboard"]
    monkeypatch.setenv(loggers.ENV, "mlflow, tensorboard")
    assert loggers.requested(("wandb",)) == ["wandb", "mlflow", "tensorboard"]
    monkeypatch.setenv(loggers.ENV, "tensorbord")
    with pytest.raises(TunecError, match="unknown logger 'tensorbord' \\(did you mean 'tensorboard'\\?\\)"):
        loggers.requested(())


def test_a_tracker_that_is_not_installed_stops_the_run_before_training(build, monkeypatch):
    # A module name that exists nowhere stands for the tracker's package being absent.
    monkeypatch.setitem(loggers.PACKAGES, "wandb", "tunec_test_no_such_module")
    with pytest.raises(TunecError) as err:
        run(build, RunOptions(log=("wandb",), **QUIET))
    assert len(err.value.problems) == 1
    assert "--log wandb: the `tunec_test_no_such_module` package is not installed; `pip install wandb`" in str(err.value)
    assert not (build / "runs").exists()
    result = CliRunner().invoke(main, ["run", str(build), "--device", "cpu", "--no-progress", "--log", "wandb"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "Traceback" not in result.output
    assert not (build / "runs").exists()


def test_a_tracker_that_cannot_start_is_one_line(build, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (blocker / "mlruns").as_uri())  # under a file: cannot be made
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    with pytest.raises(TunecError, match="^--log mlflow: cannot start it: ") as err:
        run(build, RunOptions(log=("mlflow",), **QUIET))
    assert len(err.value.problems) == 1 and "\n" not in str(err.value)
    assert not (build / "runs" / "s" / "result.json").exists()


def test_no_tracker_unless_asked_for(build):
    run(build, RunOptions(**QUIET))
    assert sorted(p.name for p in (build / "runs" / "s").iterdir()) == [
        "checkpoints", "metrics.jsonl", "model", "result.json"]


# ----------------------------------------------------------------- the trackers, read back


def test_tensorboard_events_equal_metrics_jsonl(build):
    pytest.importorskip("tensorboard")  # a dev dependency
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = CliRunner().invoke(main, ["run", str(build), "--device", "cpu", "--no-progress", "--log", "tensorboard"])
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(build / "runs" / "s" / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    got = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    assert_same(got, expected_scalars(build))


def test_tensorboard_after_resume_reads_as_one_run(tmp_path, monkeypatch):
    """Events the interrupted run logged after its checkpoint are purged, as metrics.jsonl's records are."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv(loggers.ENV, raising=False)
    (tmp_path / "recipe.yaml").write_text(RECIPE.replace("eval_every_steps: 2", "eval_every_steps: 2\n"
                                                                                  "    checkpoint_every_steps: 2"))
    out = tmp_path / "build"
    compile_recipe(tmp_path / "recipe.yaml", out, Options(workers=1))
    with pytest.raises(RuntimeError, match="stop at 3"):
        run(out, RunOptions(log=("tensorboard",), on_step=_stop_at(3), **QUIET))
    run(out, RunOptions(log=("tensorboard",), resume=True, **QUIET))
    events = EventAccumulator(str(out / "runs" / "s" / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    got = {}
    for tag in events.Tags()["scalars"]:
        steps = [e.step for e in events.Scalars(tag)]
        assert len(steps) == len(set(steps)), (tag, steps)  # no step twice
        got[tag] = {e.step: e.value for e in events.Scalars(tag)}
    assert_same(got, expected_scalars(out))


def _wandb_records(path: Path):
    """The records of a ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then 32 KiB
    blocks of chunks, each with a 7-byte header (crc32, little-endian length, type: 1 whole,
    2 first, 3 middle, 4 last), whose payloads are ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_holds_the_metrics(build, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv(loggers.ENV, "wandb")  # the environment alone asks for it
    run(build, RunOptions(**QUIET))
    (file,) = (build / "runs" / "s" / "wandb").glob("offline-run-*/run-*.wandb")
    got: dict[str, dict[int, float]] = {}
    config = {}
    for record in _wandb_records(file):
        if record.WhichOneof("record_type") == "history":
            step = record.history.step.num
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    got.setdefault(key, {})[step] = json.loads(item.value_json)
        elif record.WhichOneof("record_type") == "run":  # the run's start carries its config
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    assert_same(got, expected_scalars(build))
    assert config["lr"] == 0.01 and config["max_steps"] == 5


def test_mlflow_run_holds_the_metrics(build, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database; a folder is enough here
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tunec-test")
    run(build, RunOptions(log=("mlflow",), **QUIET))
    client = MlflowClient(uri)
    (mlrun,) = client.search_runs([client.get_experiment_by_name("tunec-test").experiment_id])
    assert mlrun.info.run_name == "s" and mlrun.info.status == "FINISHED"
    assert mlrun.data.params["lr"] == "0.01" and mlrun.data.params["batch_tokens"] == "512"
    got = {tag: {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, tag)}
           for tag in mlrun.data.metrics}
    assert_same(got, expected_scalars(build))

    # a run that stops with an error is marked so
    with pytest.raises(RuntimeError, match="stop at 2"):
        run(build, RunOptions(log=("mlflow",), force=True, on_step=_stop_at(2), **QUIET))
    statuses = sorted(r.info.status for r in client.search_runs([mlrun.info.experiment_id]))
    assert statuses == ["FAILED", "FINISHED"]


def _stop_at(step: int):
    def hook(s: int) -> None:
        if s == step:
            raise RuntimeError(f"stop at {s}")
    return hook


# ----------------------------------------------------------------- logging, not print


def test_library_code_never_prints():
    """compiler/ and runtime/ report through `logging`; only the command line writes to the console."""
    calls = []
    for folder in ("compiler", "runtime"):
        for path in sorted((ROOT / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                    calls.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert calls == []


def test_cli_shows_the_progress_lines_on_stdout(build, caplog):
    result = CliRunner().invoke(main, ["run", str(build), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("stage s: ") and "trainable parameters, 5 steps" in lines[0]
    assert [line.split(":")[0] for line in lines if line.startswith("step ") and ": loss " in line] == [
        f"step {i}/5" for i in range(1, 6)]
    assert any(line.startswith("step 5: eval loss plurals ") for line in lines)
    assert lines[-1].startswith("stage s: done in ") and "model in " in lines[-1]
    assert result.stderr == ""
    # the same lines are logging records, for a program that embeds tunec
    assert any(r.name == "tunec.runtime.log" and r.getMessage().startswith("step 5/5: loss") for r in caplog.records)


def test_cli_shows_warnings_on_stderr(tmp_path):
    # `again` trains on the arithmetic questions `arithmetic` evaluates on
    arithmetic = DEMO / "data" / "arithmetic"
    recipe = RECIPE.split("tasks:")[0] + f"""tasks:
  arithmetic:
    source: {{kind: jsonl, path: {{train: {arithmetic}/train.jsonl, test: {arithmetic}/test.jsonl}}}}
    templates: [arithmetic/qa]
    train: {{stop: 20}}
    eval: {{split: test, stop: 5}}
  again:
    source: {{kind: jsonl, path: {arithmetic}/test.jsonl}}
    templates: [arithmetic/qa]
    train: {{stop: 3}}
stages:
  - {{name: s, objective: sft, tasks: [arithmetic, again], model: {{kind: hub, id: unused/model}}}}
leakage: warn
"""
    (tmp_path / "recipe.yaml").write_text(recipe)
    result = CliRunner().invoke(main, ["compile", str(tmp_path / "recipe.yaml"), "-o", str(tmp_path / "out"), "-j", "1"])
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("warning: stage 's': 3 of 5 eval examples of task 'arithmetic' also appear")
    assert "warning:" not in result.stdout and "plan: " in result.stdout
