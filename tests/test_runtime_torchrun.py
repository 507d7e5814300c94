"""`torchrun --nproc_per_node 2` on CPU (gloo, DDP): disjoint rows per rank, one saved result,
and the same weights as one process training on the same global batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import DEMO, tiny_llama, torchrun

from tunec.compiler.build import Options, compile_recipe
from tunec.runtime.data import RowStream, plan_batching, step_rows
from tunec.runtime.run import RunOptions, run

pytestmark = pytest.mark.slow  # two processes, each importing torch and transformers

RECIPE = f"""
tokenizer: {{kind: local, path: {DEMO}/tokenizer}}
seq_len: 128
seed: 11
tasks:
  arithmetic:
    source: {{kind: jsonl, path: {{train: {DEMO}/data/arithmetic/train.jsonl, test: {DEMO}/data/arithmetic/test.jsonl}}}}
    templates: [arithmetic/qa, arithmetic/equation]
    train: {{stop: 150}}
    eval: {{split: test, stop: 30}}
stages:
  - name: ddp
    objective: sft
    tasks: [arithmetic]
    model: {tiny_llama(layers=2)}
    lr: 0.01
    batch_tokens: 768
    micro_batch_rows: 2
    max_steps: 4
    checkpoint_every_steps: 2
"""


def _trace(out: Path) -> dict[int, dict[int, list[int]]]:
    """rank -> step -> rows, from TUNEC_TRACE_ROWS files."""
    found = {}
    for f in sorted((out / "runs" / "ddp" / "trace").glob("rank-*.txt")):
        rank = int(f.stem.split("-")[1])
        found[rank] = {int(line.split()[0]): [int(x) for x in line.split()[1:]] for line in f.read_text().splitlines()}
    return found


def test_torchrun_two_processes_match_one(tmp_path, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    one, two = tmp_path / "one", tmp_path / "two"
    plan = compile_recipe(recipe, one, Options(workers=1))
    compile_recipe(recipe, two, Options(workers=1))

    stdout, stderr = torchrun(two, env={"TUNEC_TRACE_ROWS": "1"}, timeout=240)
    assert stdout.count("stage ddp: done") == 1  # rank 0 reports, and saves, once

    # the ranks read disjoint halves of every step; together, the rows one process reads
    ranks = _trace(two)
    assert sorted(ranks) == [0, 1]
    sp = plan.stages[0]
    batching = plan_batching(sp.train.rows, 128, 768, 2, 1.0, 4, world_size=1)
    stream = RowStream(plan.seed, sp.train.rows)
    for step in range(4):
        r0, r1 = ranks[0][step], ranks[1][step]
        assert len(r0) == len(r1) == 3 and not set(r0) & set(r1)
        assert sorted(r0 + r1) == sorted(step_rows(stream, batching, step, 0).tolist())

    runs = two / "runs" / "ddp"
    result = json.loads((runs / "result.json").read_text())
    assert result["steps"] == 4 and result["rows_per_step"] == 6
    assert sorted(p.name for p in (runs / "checkpoints" / "step-00000004").glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]
    steps = [json.loads(line)["step"] for line in (runs / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]  # written once, not once per rank

    # one process, same global batches: the loss is normalised over the global batch, so the
    # gradients (and the weights) are the same up to float summation order
    monkeypatch.setenv("TUNEC_TRACE_ROWS", "1")
    run(one, RunOptions(progress=False, device="cpu"))
    a = load_file(str(one / "runs" / "ddp" / "model" / "model.safetensors"))
    b = load_file(str(runs / "model" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
