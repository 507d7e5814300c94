"""Memory settings end to end: they change what a step needs, never what it computes.

A stage trained with the full-logits loss, with the chunked loss (the
default), and with activation checkpointing gives the same losses and weights
(to 1e-5); a run interrupted and resumed with other memory settings
(`--set micro_batch_rows=1 --set activation_checkpointing=true`, as the
out-of-memory message suggests) finishes with the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import DEMO, QUIET, Interrupt, interrupt_after, tiny_llama

from tunec.compiler.build import Options, compile_recipe
from tunec.runtime.run import RunOptions, run

RECIPE = f"""
tokenizer: {{kind: local, path: {DEMO}/tokenizer}}
seq_len: 128
seed: 3
tasks:
  arithmetic:
    source: {{kind: jsonl, path: {DEMO}/data/arithmetic/train.jsonl}}
    templates: [arithmetic/qa]
    train: {{stop: 80}}
stages:
  - name: sft
    objective: sft
    tasks: [arithmetic]
    model: {tiny_llama(layers=2)}
    lr: 0.01
    batch_tokens: 1024
    micro_batch_rows: 4
    max_steps: 4
    checkpoint_every_steps: 2
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("memory")
    (folder / "recipe.yaml").write_text(RECIPE)
    compile_recipe(folder / "recipe.yaml", folder / "build", Options(workers=1))
    return folder / "build"


def trained(compiled: Path, into: Path, *overrides: str, resume_with: tuple[str, ...] | None = None, caplog=None):
    out = into / "build"
    shutil.copytree(compiled, out)
    if resume_with is None:
        run(out, RunOptions(overrides=overrides, **QUIET))
    else:
        with pytest.raises(Interrupt):
            run(out, RunOptions(overrides=overrides, on_step=interrupt_after(3), **QUIET))
        with caplog.at_level("INFO"):
            run(out, RunOptions(overrides=resume_with, resume=True, **QUIET))
        assert any("resuming at step 2" in r.getMessage() for r in caplog.records)  # not a fresh start
    losses = [json.loads(line)["loss"] for line in (out / "runs/sft/metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    return losses, load_file(str(out / "runs/sft/model/model.safetensors"))


def same(a, b) -> None:
    assert len(a[0]) == 4
    assert a[0] == pytest.approx(b[0], rel=1e-5, abs=1e-5)
    assert set(a[1]) == set(b[1])
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.slow
def test_memory_settings_do_not_change_what_is_trained(compiled, tmp_path, caplog):
    chunked = trained(compiled, tmp_path / "chunked")
    full = trained(compiled, tmp_path / "full", "stages.sft.chunked_loss=false")
    recomputed = trained(compiled, tmp_path / "ckpt", "stages.sft.activation_checkpointing=true",
                         "stages.sft.micro_batch_rows=1")
    same(chunked, full)
    same(chunked, recomputed)
    resumed = trained(compiled, tmp_path / "resumed", resume_with=(
        "stages.sft.micro_batch_rows=1", "stages.sft.activation_checkpointing=true", "stages.sft.chunked_loss=false"),
        caplog=caplog)
    same(chunked, resumed)


def test_the_start_line_says_how_memory_is_used(compiled, tmp_path, caplog):
    out = tmp_path / "build"
    shutil.copytree(compiled, out)
    with caplog.at_level("INFO"):
        run(out, RunOptions(max_steps=1, overrides=("stages.sft.activation_checkpointing=true",
                                                    "stages.sft.micro_batch_rows=auto"), **QUIET))
    line = next(r.getMessage() for r in caplog.records if "trainable parameters" in r.getMessage())
    assert "float32, activation checkpointing on (as the stage asks); micro_batch_rows auto: 4 on the CPU, " \
           "chunked loss" in line
    assert "micro-batch(es) of <= 4 rows per rank" in line
