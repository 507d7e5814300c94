"""DPO under `torchrun --nproc_per_node 2` on CPU (gloo, DDP): every pair whole on one rank, and the
same losses, rewards and weights as one process training on the same global batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_preference import recipe, sums
from tiny import torchrun

from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.plan import read_plan
from tunec.runtime.data import ShardSet
from tunec.runtime.run import RunOptions, run

pytestmark = pytest.mark.slow  # two processes, each importing torch and transformers


def test_torchrun_dpo_matches_one_process_and_keeps_pairs_whole(tmp_path):
    path = recipe(tmp_path, rows=sums(40), stage_opts="    batch_tokens: 512\n    micro_batch_rows: 2\n"
                  "    max_steps: 3\n    lr: 1.0e-2\n")
    one, two = tmp_path / "one", tmp_path / "two"
    compile_recipe(path, one, Options(workers=1))
    compile_recipe(path, two, Options(workers=1))
    stdout, stderr = torchrun(two, env={"TUNEC_TRACE_ROWS": "1"})
    run(one, RunOptions(progress=False, device="cpu"))

    # each rank's rows of a step hold whole pairs, and no pair is on both ranks
    data = ShardSet(two, read_plan(two).stage("align").train)
    traces = {}
    for f in sorted((two / "runs" / "align" / "trace").glob("rank-*.txt")):
        traces[f.stem] = {int(line.split()[0]): [int(x) for x in line.split()[1:]]
                          for line in f.read_text().splitlines()}
    assert sorted(traces) == ["rank-0", "rank-1"]
    for step in range(3):
        seen = []
        for rows in (traces["rank-0"][step], traces["rank-1"][step]):
            batch = data.gather(np.asarray(rows))
            keys = batch["pair_ids"] * 2 + batch["sides"]
            pairs = set(batch["pair_ids"][batch["labels"] != -100].tolist())
            assert all({2 * p, 2 * p + 1} <= set(keys.reshape(-1).tolist()) for p in pairs)
            seen.append(pairs)
        assert not seen[0] & seen[1]

    def records(out: Path) -> list[dict]:
        lines = (out / "runs" / "align" / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if "loss" in r]

    for a, b in zip(records(one), records(two), strict=True):
        for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    wa = load_file(one / "runs" / "align" / "model" / "model.safetensors")
    wb = load_file(two / "runs" / "align" / "model" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
