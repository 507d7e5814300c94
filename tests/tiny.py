"""What the training tests share: the demo assets, a tiny llama built from a config, quiet run options.

A plain module (not a fixture) because recipes are f-strings written at import time.
"""

from __future__ import annotations

from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo"
QUIET = dict(progress=False, device="cpu")


def tiny_llama(layers: int = 1, positions: int = 128) -> str:
    """A recipe `model:` value: a 32-wide llama over the demo tokenizer's 1,024 ids (trains in seconds on a CPU)."""
    return ("{kind: config, config: {model_type: llama, hidden_size: 32, intermediate_size: 64, "
            f"num_hidden_layers: {layers}, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 1024, "
            f"max_position_embeddings: {positions}}}}}")


class Interrupt(Exception):
    """Raised by :func:`interrupt_after`: a run stopped at an exact step, as Ctrl-C would stop it."""


def interrupt_after(step: int):
    """A ``RunOptions.on_step`` hook that stops the run after optimizer step ``step``."""
    def hook(s: int) -> None:
        if s == step:
            raise Interrupt(s)
    return hook


def torchrun(out: Path, *args: str, nproc: int = 2, env: dict[str, str] | None = None,
             timeout: float = 300) -> tuple[str, str]:
    """``torchrun -m tunec run OUT --device cpu --no-progress ARGS`` on ``nproc`` CPU processes (gloo);
    its (stdout, stderr). It runs in a session of its own, so a hang kills the launcher and every worker;
    a timeout or a failure is an AssertionError holding both outputs."""
    import os
    import signal
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "tunec", "run", str(out), "--device", "cpu", "--no-progress", *args]
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"torchrun timed out\n{stdout}\n{stderr}") from None
    assert proc.returncode == 0, stdout + stderr
    return stdout, stderr
