"""One command at a time per build folder: `tunec compile` and `tunec run` share a lock.

The subprocess test starts a real `tunec run`, and while it trains, a second `tunec run` and a
`tunec compile` into the same folder are refused with one line that names the first process;
once the first is killed (-9), the folder is free again.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import DEMO, tiny_llama

from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.errors import TunecError
from tunec.compiler.lock import HOLDER_FILE, LOCK_FILE, BuildLock

RECIPE = f"""
tokenizer: {{kind: local, path: {DEMO}/tokenizer}}
seq_len: 128
seed: 3
tasks:
  arithmetic:
    source: {{kind: jsonl, path: {{train: {DEMO}/data/arithmetic/train.jsonl}}}}
    templates: [arithmetic/qa]
    train: {{stop: 40}}
stages:
  - name: base
    objective: sft
    tasks: [arithmetic]
    model: {tiny_llama()}
    lr: 0.01
    batch_tokens: 256
    max_steps: 4
"""


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


def test_a_held_folder_is_refused_with_its_holder(tmp_path, recipe):
    out = tmp_path / "build"
    with BuildLock(out, "test"):
        holder = json.loads((out / HOLDER_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(TunecError) as err:  # the second compile into one folder
            compile_recipe(recipe, out, Options(workers=1))
        message = str(err.value)
        assert message.startswith(f"{out} is in use by `"), message
        assert f"(pid {os.getpid()} on {socket.gethostname()}, since " in message
        assert "\n" not in message
    assert not out.exists()  # the folder the lock made is gone with it

    compile_recipe(recipe, out, Options(workers=1))  # free again
    assert (out / "plan.json").is_file()
    assert not (out / HOLDER_FILE).exists() and not (out / LOCK_FILE).exists()
    compile_recipe(recipe, out, Options(workers=1))  # a rebuild over a build still works
    (tmp_path / "file").write_text("x")
    with pytest.raises(TunecError, match="exists and is not a folder"):
        compile_recipe(recipe, tmp_path / "file", Options(workers=1))
    with pytest.raises(TunecError, match=r"output .*/file/build: .*/file is a file, not a folder$"):
        compile_recipe(recipe, tmp_path / "file" / "build", Options(workers=1))  # said before any work
    with pytest.raises(TunecError, match=r"file/build: cannot lock the folder for `tunec run` \(\[Errno 20\]"):
        BuildLock(tmp_path / "file" / "build", "run").acquire()


def test_a_folder_with_only_a_stale_holder_file_counts_as_empty(tmp_path, recipe):
    out = tmp_path / "build"
    out.mkdir()
    (out / HOLDER_FILE).write_text('{"pid": 1}')  # left by a process killed with -9; its lock died with it
    compile_recipe(recipe, out, Options(workers=1))
    assert (out / "plan.json").is_file()


ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _tunec(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunec", *args], env=ENV, capture_output=True, text=True,
                          timeout=240)


@pytest.mark.slow
def test_run_holds_the_folder_against_a_second_run_and_a_compile(tmp_path, recipe):
    out = tmp_path / "build"
    compile_recipe(recipe, out, Options(workers=1))
    plan = (out / "plan.json").read_bytes()
    # long enough to be caught training: far more steps than the plan's
    first = subprocess.Popen([sys.executable, "-m", "tunec", "run", str(out), "--device", "cpu", "--no-progress",
                              "--set", "stages.base.max_steps=100000", "--set", "stages.base.checkpoint_every_steps=1"],
                             env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        checkpoints = out / "runs" / "base" / "checkpoints"
        while not list(checkpoints.glob("step-*")):  # it holds the lock, trains and has checkpointed
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
            time.sleep(0.05)
        holder = f"(pid {first.pid} on {socket.gethostname()}, since "

        second = _tunec("run", str(out), "--resume", "--device", "cpu", "--no-progress")
        assert second.returncode == 1, second.stdout + second.stderr
        assert second.stderr.startswith(f"error: {out} is in use by `tunec run {out} --device cpu")
        assert holder in second.stderr and len(second.stderr.splitlines()) == 1, second.stderr

        again = _tunec("compile", str(recipe), "-o", str(out), "--workers", "1")
        assert again.returncode == 1, again.stdout + again.stderr
        assert holder in again.stderr and "Traceback" not in again.stderr, again.stderr
        assert (out / "plan.json").read_bytes() == plan  # nothing the training reads was touched
        assert first.poll() is None  # and it still trains
    finally:
        first.kill()
        first.communicate()
    assert first.returncode == -signal.SIGKILL

    # the lock died with its holder: the folder is free, and the interrupted stage resumes
    done = _tunec("run", str(out), "--device", "cpu", "--no-progress", "--resume", "--set",
                  "stages.base.max_steps=100000", "--set", "stages.base.checkpoint_every_steps=1", "--max-steps", "1")
    assert done.returncode == 1, done.stdout + done.stderr
    assert ("saved for other run-time options (--set checkpoint_every_steps=1 --set max_steps=100000; "
            "this command: --set checkpoint_every_steps=1 --set max_steps=100000 --max-steps 1)") in done.stderr
    done = _tunec("run", str(out), "--device", "cpu", "--no-progress", "--force", "--max-steps", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((out / "runs" / "base" / "result.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_torchrun_ranks_all_stop_when_rank_0_cannot_lock(tmp_path, recipe):
    out = tmp_path / "build"
    compile_recipe(recipe, out, Options(workers=1))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tunec", "run", str(out), "--device", "cpu", "--no-progress"]
    with BuildLock(out, "test"):
        # a session of its own, so that a hang kills the launcher and both workers
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            output = proc.communicate(timeout=180)[0]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"a rank hung:\n{proc.communicate()[0]}") from None
    assert proc.returncode != 0, output
    assert f"error: {out} is in use by " in output and f"(pid {os.getpid()} on " in output, output
    assert f"error: {out}: rank 0 could not lock the build folder" in output, output  # rank 1 did not hang
    assert not (out / "runs").exists()


def test_the_lock_holds_the_new_folder_across_the_compile_swap(tmp_path, recipe, monkeypatch):
    from tunec.compiler import build as build_mod

    out = tmp_path / "build"
    compile_recipe(recipe, out, Options(workers=1))
    exchange = build_mod._exchange
    seen = []

    def exchange_then_try(a, b):
        exchange(a, b)  # the new folder is at `out` now, the lock not yet released
        holder = json.loads((out / HOLDER_FILE).read_text())
        with pytest.raises(TunecError, match=r"is in use by `.* \(pid \d+ on "):
            BuildLock(out, "run").acquire()
        seen.append(holder["pid"])

    monkeypatch.setattr(build_mod, "_exchange", exchange_then_try)
    compile_recipe(recipe, out, Options(workers=1))
    assert seen == [os.getpid()]
    assert not (out / HOLDER_FILE).exists()  # released from the new folder
    with BuildLock(out, "run"):  # and free again
        pass


def test_without_an_atomic_exchange_three_renames_swap_the_folders(tmp_path, recipe, monkeypatch):
    from tunec.compiler import build as build_mod

    class NoRenameat2:  # a C library or kernel without renameat2 (macOS, old glibc)
        def __init__(self, *args, **kwargs):
            pass

    out = tmp_path / "build"
    compile_recipe(recipe, out, Options(workers=1))
    (out / "runs").mkdir()
    (out / "runs" / "kept").write_text("x")
    monkeypatch.setattr(build_mod.ctypes, "CDLL", NoRenameat2)
    plan = compile_recipe(recipe, out, Options(workers=1), overrides=("seed=8",))
    assert plan.seed == 8 and json.loads((out / "plan.json").read_text())["seed"] == 8
    assert (out / "runs" / "kept").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build", "recipe.yaml"]
