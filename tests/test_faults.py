"""Crash safety of `tunec run`: a kill at any moment leaves a state that `--resume` finishes from,
with the same weights, result and metrics as a run that was never interrupted.

The subprocess tests kill real `tunec run` processes with SIGKILL: from outside, when the
metrics file shows a given step; and from inside, at exact moments (half-way through writing a
checkpoint, inside the final model's folder write, just before `result.json`, half-way through
deleting a finished stage for `--force`) by a small wrapper
that this test file passes to `python -c`: it wraps a writer function in the subprocess and
kills its own process there. Nothing in tunec knows about it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import DEMO, QUIET, Interrupt, interrupt_after, tiny_llama

from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.errors import TunecError
from tunec.runtime import checkpoint
from tunec.runtime.run import RunOptions, run

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only wait
DATA = DEMO / "data" / "arithmetic"
RECIPE = f"""
tokenizer: {{kind: local, path: {DEMO}/tokenizer}}
seq_len: 128
seed: 5
tasks:
  arithmetic:
    source: {{kind: jsonl, path: {{train: {DATA}/train.jsonl, test: {DATA}/test.jsonl}}}}
    templates: [arithmetic/qa]
    train: {{stop: 80}}
    eval: {{split: test, stop: 10}}
stages:
  - name: base
    objective: sft
    tasks: [arithmetic]
    model: {tiny_llama()}
    lr: 0.01
    batch_tokens: 512
    micro_batch_rows: 2
    max_steps: 30
    warmup_steps: 2
    checkpoint_every_steps: 5
    eval_every_steps: 10
"""
TIMINGS = {"elapsed_s", "tokens_per_s", "wall_s"}

# Run as `python -c KILLER WHERE tunec-args...`: tunec's CLI, killed by SIGKILL at WHERE.
KILLER = r"""
import os, signal, sys, runpy
from pathlib import Path

where = sys.argv.pop(1)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if where.startswith("checkpoint:"):  # after the weights of checkpoint N, before its optimizer and state
    import safetensors.torch as st
    real_save, tag = st.save_file, ".tmp-step-%08d" % int(where.split(":")[1])
    def save_file(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        if tag in str(filename):
            die()
    st.save_file = save_file
elif where == "rmtree":  # deleting a finished stage's run folder: the model goes, then the process
    import shutil
    real_rmtree = shutil.rmtree
    def rmtree(path, *args, **kwargs):
        if (Path(path) / "result.json").is_file() and (Path(path) / "model").is_dir():
            real_rmtree(Path(path) / "model")
            die()
        return real_rmtree(path, *args, **kwargs)
    shutil.rmtree = rmtree
else:
    import tunec.compiler.fileio as fileio
    real_dir, real_json = fileio.atomic_dir, fileio.atomic_write_json
    def atomic_dir(final, write, *args, **kwargs):
        def writing(tmp):
            write(tmp)
            if where == "model" and Path(final).name == "model":  # the folder is written, not yet renamed
                die()
        return real_dir(final, writing, *args, **kwargs)
    def atomic_write_json(path, data, *args, **kwargs):
        if where == "result" and Path(path).name == "result.json":
            die()
        return real_json(path, data, *args, **kwargs)
    fileio.atomic_dir, fileio.atomic_write_json = atomic_dir, atomic_write_json

sys.argv[0] = "tunec"
runpy.run_module("tunec", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faults")
    (folder / "recipe.yaml").write_text(RECIPE)
    compile_recipe(folder / "recipe.yaml", folder / "build", Options(workers=1))
    return folder / "build"


@pytest.fixture(scope="module")
def reference(compiled, tmp_path_factory) -> Path:
    """The build trained without interruption, in this process."""
    ref = copy(compiled, tmp_path_factory.mktemp("reference") / "build")
    run(ref, RunOptions(**QUIET))
    return ref


def copy(compiled: Path, to: Path) -> Path:
    shutil.copytree(compiled, to)
    return to


def records(out: Path) -> list[dict]:
    lines = (out / "runs" / "base" / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def result(out: Path) -> dict:
    data = json.loads((out / "runs" / "base" / "result.json").read_text())
    return {k: v for k, v in data.items() if k not in TIMINGS}


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical final weights, and the same result and metrics apart from timings."""
    wa = load_file(str(a / "runs" / "base" / "model" / "model.safetensors"))
    wb = load_file(str(b / "runs" / "base" / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert result(a) == result(b)
    assert records(a) == records(b)


# ----------------------------------------------------------------- in process


def test_damaged_latest_checkpoint_and_torn_metrics_line(compiled, reference, tmp_path, caplog, capsys):
    out = copy(compiled, tmp_path / "out")
    with pytest.raises(Interrupt):
        run(out, RunOptions(on_step=interrupt_after(29), **QUIET))
    ckpts = out / "runs" / "base" / "checkpoints"
    assert [p.name for p in checkpoint.all_checkpoints(ckpts)] == ["step-00000020", "step-00000025"]
    weights = ckpts / "step-00000025" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # the disk lost the end of the newest checkpoint
    metrics = out / "runs" / "base" / "metrics.jsonl"
    with metrics.open("a") as fh:
        fh.write('{"elapsed_s": 1.5, "epoch": 0.9, "grad')  # a record cut by a kill

    run(out, RunOptions(resume=True, **QUIET))
    said = caplog.text + "".join(capsys.readouterr())
    assert "step-00000025 is damaged (trainable.safetensors is unreadable" in said
    assert "incomplete last line" in said
    assert_same_run(reference, out)
    assert metrics.read_text().endswith("}\n")


def test_killed_after_the_final_checkpoint_resumes_to_the_same_result(compiled, reference, tmp_path):
    out = copy(compiled, tmp_path / "out")
    with pytest.raises(Interrupt):  # after the final checkpoint, before the model and result.json
        run(out, RunOptions(on_step=interrupt_after(30), **QUIET))
    assert not (out / "runs" / "base" / "result.json").exists()
    run(out, RunOptions(resume=True, **QUIET))
    assert result(out)["train_loss"] is not None
    assert [r["step"] for r in records(out) if "eval_loss" in r] == [10, 20, 30]  # once at the end, not twice
    assert_same_run(reference, out)


def test_a_record_spanning_a_checkpoint_reads_as_uninterrupted(compiled, tmp_path, monkeypatch):
    """Records every 2 steps, checkpoints every 3: the record of steps 3-4 is half before the checkpoint.
    The row trace (an append-only log too) is rewound to the checkpoint as well."""
    monkeypatch.setenv("TUNEC_TRACE_ROWS", "1")
    every = ("stages.base.checkpoint_every_steps=3", "stages.base.log_every_steps=2")
    ref = copy(compiled, tmp_path / "ref")
    run(ref, RunOptions(overrides=every, **QUIET))
    out = copy(compiled, tmp_path / "out")
    with pytest.raises(Interrupt):
        run(out, RunOptions(overrides=every, on_step=interrupt_after(4), **QUIET))
    run(out, RunOptions(overrides=every, resume=True, **QUIET))
    assert [r["step"] for r in records(out) if "loss" in r] == list(range(2, 31, 2))
    assert_same_run(ref, out)
    trace = out / "runs" / "base" / "trace" / "rank-0.txt"
    assert trace.read_text() == (ref / "runs" / "base" / "trace" / "rank-0.txt").read_text()
    assert [int(line.split()[0]) for line in trace.read_text().splitlines()] == list(range(30))


def test_checkpoint_problems_are_named(compiled, tmp_path, caplog, capsys):
    out = copy(compiled, tmp_path / "out")
    with pytest.raises(Interrupt):
        run(out, RunOptions(on_step=interrupt_after(5), **QUIET))
    good = out / "runs" / "base" / "checkpoints" / "step-00000005"
    assert checkpoint.problem(good) is None

    def damaged(change) -> str | None:
        bad = tmp_path / "bad" / good.name
        shutil.rmtree(bad.parent, ignore_errors=True)
        shutil.copytree(good, bad)
        change(bad)
        return checkpoint.problem(bad)

    assert damaged(lambda p: (p / "optimizer.pt").unlink()) == "optimizer.pt is missing"
    assert damaged(lambda p: (p / "state.json").write_text('{"step": 5')).startswith("state.json does not parse")
    assert damaged(lambda p: (p / "state.json").write_text('{"step": 4}')) == "state.json names step 4, not 5"
    cut = damaged(lambda p: (p / "optimizer.pt").write_bytes((p / "optimizer.pt").read_bytes()[:200]))
    assert cut.startswith("optimizer.pt is unreadable")

    def flip(p: Path) -> None:  # one byte of the data, same length: torch.load would load it silently
        data = bytearray((p / "optimizer.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (p / "optimizer.pt").write_bytes(bytes(data))

    flipped = damaged(flip)
    assert flipped.startswith("optimizer.pt is corrupted (") and flipped.endswith(" fails its checksum)")
    for rng in good.glob("rng-*.pt"):
        rng.unlink()
    assert checkpoint.problem(good) == "no rng-<rank>.pt file"

    # the only checkpoint is damaged: still an interrupted run; --resume warns and starts the stage over
    with pytest.raises(TunecError, match="interrupted run"):
        run(out, RunOptions(**QUIET))
    (done,) = run(out, RunOptions(resume=True, **QUIET))
    assert "no usable checkpoint; starting it over" in caplog.text + "".join(capsys.readouterr())
    assert done.steps == 30 and [r["step"] for r in records(out) if "loss" in r] == list(range(1, 31))


# ----------------------------------------------------------------- real processes, killed


def _tunec(out: Path, *args: str, kill_at: str | None = None) -> list[str]:
    lead = [sys.executable, "-c", KILLER, kill_at] if kill_at else [sys.executable, "-m", "tunec"]
    return [*lead, "run", str(out), "--device", "cpu", "--no-progress", *args]


ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _finish(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)


def _kill_at_step(cmd: list[str], metrics: Path, step: int) -> None:
    """Start ``cmd``; SIGKILL it as soon as ``metrics`` shows a training record of ``step`` or later."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            seen = []
            if metrics.is_file():
                for line in metrics.read_text().splitlines():
                    try:
                        seen.append(json.loads(line))
                    except ValueError:  # read half-way through an append
                        pass
            if any("loss" in r and r["step"] >= step for r in seen):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        output = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, output


@pytest.mark.slow
def test_kill_9_at_any_moment_then_resume_matches_an_uninterrupted_run(compiled, reference, tmp_path):
    out = copy(compiled, tmp_path / "out")
    rd = out / "runs" / "base"

    # 1. half-way through writing checkpoint 10: its weights are on disk, its state is not
    killed = _finish(_tunec(out, kill_at="checkpoint:10"))
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    partial = rd / "checkpoints" / ".tmp-step-00000010"
    assert (partial / "trainable.safetensors").is_file() and not (partial / "state.json").exists()
    assert [p.name for p in checkpoint.all_checkpoints(rd / "checkpoints")] == ["step-00000005"]

    # 2. from outside, at the first step the resumed run logs (whatever it is doing by the time the
    # signal lands); then a record cut in half, as a kill in the middle of an append leaves it
    _kill_at_step(_tunec(out, "--resume"), rd / "metrics.jsonl", 6)
    with (rd / "metrics.jsonl").open("a") as fh:
        fh.write('{"elapsed_s": 0.4, "epoch"')

    # 3. inside the final model's folder write: the folder is complete under its temporary name only
    killed = _finish(_tunec(out, "--resume", kill_at="model"))
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert "incomplete last line" in killed.stdout + killed.stderr
    assert not (rd / "model").exists() and list(rd.glob(".model.*.tmp"))

    # 4. after the model, before result.json: the stage is not finished
    killed = _finish(_tunec(out, "--resume", kill_at="result"))
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert (rd / "model").is_dir() and not (rd / "result.json").exists()
    assert not list(rd.glob(".model.*.tmp"))

    done = _finish(_tunec(out, "--resume"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_run(reference, out)
    # nothing half-written is left (.tmp-step-*, .del-step-*, .model.*.tmp)
    assert sorted(p.name for p in (rd / "checkpoints").iterdir()) == ["step-00000025", "step-00000030"]
    assert not [p.name for p in rd.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_kill_9_while_force_deletes_a_finished_stage(reference, tmp_path):
    out = copy(reference, tmp_path / "out")
    rd = out / "runs" / "base"
    killed = _finish(_tunec(out, "--force", kill_at="rmtree"))
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    # the folder was renamed away before its deletion began: no result.json is left beside half a model
    assert not rd.exists()
    done = _finish(_tunec(out, "--resume"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "already trained" not in done.stdout + done.stderr
    assert not (out / "runs" / ".base.deleted").exists()
    assert_same_run(reference, out)
