"""FSDP2 (`parallelism: {kind: fsdp}`) on the CPU with gloo.

- one process sharding over a one-process group trains exactly as DDP's plain path;
- `torchrun --nproc_per_node 2` gives the same losses (1e-5) and final weights as one process, with its
  decoder layers compiled (`compile: true`) too;
- a checkpoint saved by 2 processes (torch.distributed.checkpoint) resumes in 1 and ends identically;
- evaluation keeps ranks in step when one has fewer eval rows (FSDP's forward is collective).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tiny
import torch
from safetensors.torch import load_file
from tiny import DEMO, QUIET, Interrupt, interrupt_after, tiny_llama

from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.errors import TunecError
from tunec.compiler.load import load_recipe
from tunec.runtime import checkpoint
from tunec.runtime.run import RunOptions, run

RECIPE = f"""
tokenizer: {{kind: local, path: {DEMO}/tokenizer}}
seq_len: 128
seed: 5
tasks:
  arithmetic:
    source: {{kind: jsonl, path: {{train: {DEMO}/data/arithmetic/train.jsonl, test: {DEMO}/data/arithmetic/test.jsonl}}}}
    templates: [arithmetic/qa]
    train: {{stop: 120}}
    eval: {{split: test, stop: 45}}
stages:
  - name: sharded
    objective: sft
    tasks: [arithmetic]
    model: {tiny_llama(layers=2)}
    parallelism: fsdp
    lr: 0.01
    batch_tokens: 768
    micro_batch_rows: 2
    max_steps: 4
    checkpoint_every_steps: 2
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, Path]:
    """The build twice: `parallelism: fsdp`, and the same stage with the default (`ddp`)."""
    builds = {}
    for kind in ("fsdp", "ddp"):
        folder = tmp_path_factory.mktemp(kind)
        (folder / "recipe.yaml").write_text(RECIPE.replace("parallelism: fsdp", f"parallelism: {kind}"))
        compile_recipe(folder / "recipe.yaml", folder / "build", Options(workers=1))
        builds[kind] = folder / "build"
    return builds


def outcome(out: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    records = [json.loads(line) for line in (out / "runs/sharded/metrics.jsonl").read_text().splitlines()]
    return records, load_file(str(out / "runs/sharded/model/model.safetensors"))


def assert_same(a, b) -> None:
    la = {r["step"]: r["loss"] for r in a[0] if "loss" in r}
    lb = {r["step"]: r["loss"] for r in b[0] if "loss" in r}
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4]
    for s in la:
        assert la[s] == pytest.approx(lb[s], rel=1e-5, abs=1e-5), s
    ea = [r["eval_loss"]["all"] for r in a[0] if "eval_loss" in r]
    eb = [r["eval_loss"]["all"] for r in b[0] if "eval_loss" in r]
    assert ea and ea[-1] == pytest.approx(eb[-1], rel=1e-5)
    assert set(a[1]) == set(b[1])
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-5, atol=1e-5, msg=name)


def torchrun(out: Path, nproc: int, *extra: str) -> str:
    stdout, stderr = tiny.torchrun(out, *extra, nproc=nproc)
    return stdout + stderr


def resumed(out: Path, caplog, at: int) -> None:
    """``tunec run --resume`` that really continues from checkpoint ``at`` (not a fresh start)."""
    ckpt = out / f"runs/sharded/checkpoints/step-{at:08d}"
    assert checkpoint.problem(ckpt) is None and (ckpt / "dcp" / ".metadata").is_file()
    caplog.clear()
    with caplog.at_level("INFO"):
        run(out, RunOptions(resume=True, **QUIET))
    assert any(f"resuming at step {at}" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_one_process_fsdp_trains_as_ddp_and_resumes_exactly(compiled, tmp_path, caplog):
    shutil.copytree(compiled["ddp"], tmp_path / "ddp")
    run(tmp_path / "ddp", RunOptions(**QUIET))
    shutil.copytree(compiled["fsdp"], tmp_path / "fsdp")
    run(tmp_path / "fsdp", RunOptions(**QUIET))
    fsdp = outcome(tmp_path / "fsdp")
    assert_same(fsdp, outcome(tmp_path / "ddp"))
    assert (tmp_path / "fsdp/runs/sharded/checkpoints/step-00000004/dcp/.metadata").is_file()

    out = shutil.copytree(compiled["fsdp"], tmp_path / "interrupted")
    with pytest.raises(Interrupt):
        run(out, RunOptions(on_step=interrupt_after(3), **QUIET))
    resumed(out, caplog, 2)
    assert_same(outcome(out), fsdp)


@pytest.mark.slow
def test_two_processes_match_one_and_a_two_process_checkpoint_resumes_in_one(compiled, tmp_path, caplog):
    one = shutil.copytree(compiled["fsdp"], tmp_path / "one")
    run(one, RunOptions(**QUIET))
    two = shutil.copytree(compiled["fsdp"], tmp_path / "two")
    log = torchrun(two, 2)
    assert log.count("stage sharded: done") == 1
    assert_same(outcome(two), outcome(one))
    shards = sorted(p.name for p in (two / "runs/sharded/checkpoints/step-00000002/dcp").glob("*.distcp"))
    assert len(shards) == 2  # one file per rank

    # `compile: true` under FSDP: each decoder layer compiled, then sharded; the same training
    compiled_two = shutil.copytree(compiled["fsdp"], tmp_path / "compiled")
    log = torchrun(compiled_two, 2, "--set", "stages.sharded.compile=true")
    assert "2 decoder layers compiled (torch.compile)" in log
    assert_same(outcome(compiled_two), outcome(one))

    # the two-process run, as if killed after step 3: its step-2 checkpoint is the newest one left
    cut = tmp_path / "cut"
    shutil.copytree(two, cut)
    for gone in ("checkpoints/step-00000004", "model", "result.json"):
        path = cut / "runs/sharded" / gone
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed(cut, caplog, 2)  # one process reads the two processes' shards
    assert_same(outcome(cut), outcome(two))


def test_fsdp_with_an_adapter_is_a_located_error(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.replace("    lr: 0.01\n", "    peft: {kind: lora, r: 4}\n    lr: 0.01\n"))
    with pytest.raises(TunecError) as err:
        load_recipe(path)
    (problem,) = err.value.problems
    assert "stages[0]" in str(problem) and "`parallelism: fsdp` trains full models only for now" in str(problem)
    assert problem.line == 12


def test_the_gathered_model_is_the_trained_one_tied_embeddings_included():
    from tunec.compiler.recipe import ConfigModel
    from tunec.runtime import fsdp
    from tunec.runtime.dist import Dist
    from tunec.runtime.memory import Precision
    from tunec.runtime.model import PackedLM, build_from_config

    config = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": True}
    model, attn = build_from_config(ConfigModel(kind="config", config=config), 0, "sdpa")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    packed = PackedLM(model, attn)
    assert len(fsdp.decoder_layers(model)) == 2  # each its own FSDP unit
    try:
        fsdp.shard(packed, model, Precision(), torch.device("cpu"))
        assert fsdp.is_sharded(packed)
        copy = fsdp.gathered(packed, model, Dist())
    finally:
        fsdp.release()
    assert copy.get_output_embeddings().weight is copy.get_input_embeddings().weight
    after = copy.state_dict()
    assert set(after) == set(before)
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, msg=name)
    ids = torch.randint(0, 256, (1, 12))
    torch.testing.assert_close(copy(input_ids=ids).logits, build_from_config(
        ConfigModel(kind="config", config=config), 0, "sdpa")[0](input_ids=ids).logits)


def test_a_checkpoint_whose_steps_took_other_rows_is_refused(compiled, tmp_path):
    out = shutil.copytree(compiled["fsdp"], tmp_path / "build")
    with pytest.raises(Interrupt):
        run(out, RunOptions(on_step=interrupt_after(2), **QUIET))
    state = out / "runs/sharded/checkpoints/step-00000002/state.json"
    saved = json.loads(state.read_text())
    assert saved["rows_per_step"] == 6
    state.write_text(json.dumps(dict(saved, rows_per_step=4, world_size=2)))  # as 2 processes would round 5 rows
    with pytest.raises(TunecError, match=r"saved by 2 process\(es\) taking 4 rows per step; with 1 a step takes 6"):
        run(out, RunOptions(resume=True, **QUIET))
