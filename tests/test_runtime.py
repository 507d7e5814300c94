"""`tunec run` / `tunec generate` end to end on CPU with tiny models built from a config.

One small recipe (demo data, seq_len 128) is compiled once per module; each
test trains in its own copy of the build. Stages: `base` (full fine-tuning,
`lm`), `tune` (LoRA with dropout on `base`'s output, merged copy saved), `more`
(keeps training `tune`'s adapter) and `final` (full fine-tuning on `more`
merged in).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny import DEMO, QUIET, Interrupt, interrupt_after, tiny_llama

from tunec.cli import main
from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.errors import TunecError
from tunec.compiler.shards import open_shard
from tunec.runtime.run import RunOptions, run

MODEL = tiny_llama(layers=2)
RECIPE = f"""
tokenizer: {{kind: local, path: {DEMO}/tokenizer}}
seq_len: 128
seed: 7
tasks:
  arithmetic:
    source: {{kind: jsonl, path: {{train: {DEMO}/data/arithmetic/train.jsonl, test: {DEMO}/data/arithmetic/test.jsonl}}}}
    templates: [arithmetic/qa]
    train: {{stop: 120}}
    eval: {{split: test, stop: 20}}
  plurals:
    source: {{kind: jsonl, path: {{train: {DEMO}/data/plurals/train.jsonl, test: {DEMO}/data/plurals/test.jsonl}}}}
    templates: [plural/plain]
    train: {{stop: 120}}
    eval: {{split: test, stop: 20}}
stages:
  - name: base
    objective: lm
    tasks: [arithmetic, plurals]
    model: {MODEL}
    lr: 0.01
    batch_tokens: 1024
    micro_batch_rows: 3
    max_steps: 8
    warmup_steps: 2
    checkpoint_every_steps: 3
    eval_every_steps: 4
  - name: tune
    objective: sft
    tasks: [arithmetic]
    model: {{kind: stage, stage: base}}
    peft: {{kind: lora, r: 4, alpha: 8, dropout: 0.1, save_merged: true}}
    lr: 0.01
    batch_tokens: 512
    max_steps: 4
    checkpoint_every_steps: 2
  - name: more
    objective: sft
    tasks: [plurals]
    model: {{kind: stage, stage: tune, adapter: continue}}
    peft: {{kind: lora, r: 4}}
    lr: 0.01
    batch_tokens: 512
    max_steps: 2
  - name: final
    objective: sft
    tasks: [plurals]
    model: {{kind: stage, stage: more}}
    lr: 0.001
    batch_tokens: 512
    max_steps: 2
"""



@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("runtime")
    recipe = folder / "recipe.yaml"
    recipe.write_text(RECIPE)
    out = folder / "build"
    compile_recipe(recipe, out, Options(workers=1))
    return out


@pytest.fixture
def build(compiled, tmp_path) -> Path:
    """A private copy of the compiled build."""
    out = tmp_path / "build"
    shutil.copytree(compiled, out)
    return out


def metrics(out: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (out / "runs" / stage / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


# ----------------------------------------------------------------- training, outputs, chaining


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft asking transformers
@pytest.mark.slow
def test_all_stages_train_chain_save_and_reload(build):
    results = run(build, RunOptions(**QUIET))
    assert [r.stage for r in results] == ["base", "tune", "more", "final"]
    runs = build / "runs"

    # base: full fine-tuning, a save_pretrained folder with the tokenizer, metrics, eval per task
    base = results[0]
    assert base.kind == "full" and base.model == "runs/base/model" and base.steps == 8
    records = metrics(build, "base")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert {"lr", "tokens_per_s", "tokens", "trained_tokens", "grad_norm", "epoch"} <= set(train[0])
    assert train[-1]["loss"] < train[0]["loss"]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert set(evals[-1]["eval_loss"]) == {"arithmetic", "plurals", "all"}
    assert base.eval_loss == evals[-1]["eval_loss"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(runs / "base" / "model")
    tok = AutoTokenizer.from_pretrained(runs / "base" / "model")
    ids = tok("Question: What is 2 plus 3?\nAnswer:", return_tensors="pt")["input_ids"]
    # The saved model is the trained one: its loss on the eval rows, each document run alone
    # through plain transformers, is the eval loss the run recorded.
    plan = json.loads((build / "plan.json").read_text())
    eval_set = plan["stages"][0]["eval"]["arithmetic"]["data"]
    total, count = 0.0, 0
    with torch.no_grad():
        for entry in eval_set["shards"]:
            arrays = open_shard(build / entry["path"])
            for row_ids, row_labels, row_pos in zip(arrays["input_ids"], arrays["labels"], arrays["position_ids"]):
                starts = list(np.flatnonzero(row_pos == 0)) + [len(row_pos)]
                for lo, hi in zip(starts[:-1], starts[1:]):
                    labels = torch.tensor(row_labels[lo:hi], dtype=torch.long)
                    if (labels == -100).all():
                        continue
                    logits = model(torch.tensor(row_ids[lo:hi], dtype=torch.long)[None]).logits[0]
                    total += float(torch.nn.functional.cross_entropy(logits[:-1], labels[1:], reduction="sum",
                                                                     ignore_index=-100))
                    count += int((labels[1:] != -100).sum())
    assert count > 0 and abs(total / count - base.eval_loss["arithmetic"]) < 1e-4

    # tune: a LoRA adapter on base's output (its base is base's folder), and the merged model
    tune = results[1]
    assert tune.kind == "lora" and tune.base.path == "runs/base/model" and tune.merged == "runs/tune/merged"
    adapter_cfg = json.loads((runs / "tune" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "runs/base/model"  # relative to the build: portable
    from peft import AutoPeftModelForCausalLM

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(build)  # peft resolves the base's relative path against the current folder
        peft_model = AutoPeftModelForCausalLM.from_pretrained("runs/tune/adapter")
    merged = AutoModelForCausalLM.from_pretrained(runs / "tune" / "merged")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(merged(ids).logits, model(ids).logits, atol=1e-4)  # training moved it

    # more: the same adapter trained further (same base), started from tune's adapter weights
    more = results[2]
    assert more.kind == "lora" and more.base == tune.base and more.merged is None
    a = weights(runs / "tune" / "adapter", "adapter_model.safetensors")
    b = weights(runs / "more" / "adapter", "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)

    # final: full fine-tuning on more's adapter merged into its base (merged on the fly, not saved by more)
    assert results[3].kind == "full" and (runs / "final" / "model" / "config.json").is_file()

    # generate from a LoRA stage without a merged copy: base + adapter, merged for inference
    from tunec.runtime.generate import generate

    g = generate(build, stage="more", task="plurals", values={"word": "gul"}, max_new_tokens=3, device="cpu")
    assert g.prompt == "Word: gul\nPlural:"
    from peft import PeftModel

    more_base = AutoModelForCausalLM.from_pretrained(runs / "base" / "model")
    more_model = PeftModel.from_pretrained(more_base, runs / "more" / "adapter").merge_and_unload()
    prompt_ids = tok(g.prompt, return_tensors="pt")["input_ids"]
    greedy = more_model.generate(prompt_ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
    assert g.completion == tok.decode(greedy[0, prompt_ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_loss_falls_on_the_demo(tmp_path):
    """README command 1's recipe and model, cut to its first 20 steps (plan.json edited to say so)."""
    out = tmp_path / "demo"
    compile_recipe(DEMO / "demo.yaml", out, Options(workers=1))
    plan = json.loads((out / "plan.json").read_text())
    plan["stages"][0]["settings"].update(max_steps=20)
    (out / "plan.json").write_text(json.dumps(plan))
    (result,) = run(out, RunOptions(**QUIET))
    losses = [r["loss"] for r in metrics(out, "sft") if "loss" in r]
    assert len(losses) == 20
    assert losses[0] > 6.5 and max(losses[-5:]) < losses[0] - 2.5, losses
    assert set(result.eval_loss) == {"reviews", "arithmetic", "plurals", "all"}


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(build, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(build, other)
    run(build, RunOptions(stage="base", **QUIET))  # uninterrupted

    with pytest.raises(Interrupt):
        run(other, RunOptions(stage="base", on_step=interrupt_after(5), **QUIET))
    ckpts = sorted(p.name for p in (other / "runs" / "base" / "checkpoints").iterdir())
    assert ckpts == ["step-00000003"]  # step 6 never came; nothing half-written is left
    assert not (other / "runs" / "base" / "result.json").exists()

    with pytest.raises(TunecError, match="interrupted run.*--resume"):
        run(other, RunOptions(stage="base", **QUIET))  # refuses to start over silently
    run(other, RunOptions(stage="base", resume=True, **QUIET))

    w1 = weights(build / "runs" / "base" / "model")
    w2 = weights(other / "runs" / "base" / "model")
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k
    # the metrics read as one run: steps 1..8 once each
    steps = [r["step"] for r in metrics(other, "base") if "loss" in r]
    assert steps == list(range(1, 9))


def test_lora_resume_restores_dropout_rng(build, tmp_path):
    run(build, RunOptions(stage="base", **QUIET))
    other = tmp_path / "other"
    shutil.copytree(build, other)
    run(build, RunOptions(stage="tune", **QUIET))
    with pytest.raises(Interrupt):
        run(other, RunOptions(stage="tune", on_step=interrupt_after(3), **QUIET))
    run(other, RunOptions(stage="tune", resume=True, **QUIET))
    a = weights(build / "runs" / "tune" / "adapter", "adapter_model.safetensors")
    b = weights(other / "runs" / "tune" / "adapter", "adapter_model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_finished_stages_are_kept_unless_forced(build):
    run(build, RunOptions(stage="base", **QUIET))
    model = build / "runs" / "base" / "model" / "model.safetensors"
    before = model.stat().st_mtime_ns
    with pytest.raises(TunecError, match="already trained"):
        run(build, RunOptions(stage="base", **QUIET))
    run(build, RunOptions(stage="base", resume=True, **QUIET))  # skipped
    assert model.stat().st_mtime_ns == before
    run(build, RunOptions(stage="base", force=True, **QUIET))
    assert model.stat().st_mtime_ns != before


# ----------------------------------------------------------------- bad input


def test_a_later_stage_needs_its_upstream(build):
    with pytest.raises(TunecError, match="starts from stage `base`, which has not finished"):
        run(build, RunOptions(stage="tune", **QUIET))


def test_incompatible_or_unfinished_plan_is_refused(build):
    plan = build / "plan.json"
    data = json.loads(plan.read_text())
    data["format_version"] = 99
    plan.write_text(json.dumps(data))
    with pytest.raises(TunecError, match="format version 99"):
        run(build, RunOptions(**QUIET))
    data["format_version"] = 1
    data["stages"][0]["unknown_field"] = 1
    plan.write_text(json.dumps(data))
    with pytest.raises(TunecError, match="incompatible tunec"):
        run(build, RunOptions(**QUIET))
    plan.unlink()
    with pytest.raises(TunecError, match="did not finish"):
        run(build, RunOptions(**QUIET))


def test_missing_truncated_and_corrupted_shards(build):
    shard = next((build / "stages" / "base" / "train").glob("*.safetensors"))
    blob = shard.read_bytes()
    shard.unlink()
    with pytest.raises(TunecError, match="shard is missing"):
        run(build, RunOptions(**QUIET))
    shard.write_bytes(blob[:-10])
    with pytest.raises(TunecError, match="truncated"):
        run(build, RunOptions(**QUIET))
    flipped = bytearray(blob)
    flipped[-5] ^= 0xFF  # a position id: same size, same header, caught by the value checks of every run
    shard.write_bytes(bytes(flipped))
    with pytest.raises(TunecError, match="breaks the document layout"):
        run(build, RunOptions(**QUIET))
    # an untrained prompt token changed to another valid id: plausible values, only --verify sees it
    shard.write_bytes(blob)
    arrays = open_shard(shard)
    row, col = np.argwhere((arrays["labels"] == -100) & (arrays["input_ids"] > 1))[0]
    header_end = len(blob) - 3 * arrays["input_ids"].nbytes
    layout = json.loads(blob[8:header_end])["input_ids"]["data_offsets"]
    at = header_end + layout[0] + 4 * (row * arrays["input_ids"].shape[1] + col)
    flipped = bytearray(blob)
    flipped[at] ^= 0x01
    shard.write_bytes(bytes(flipped))
    with pytest.raises(TunecError, match="sha256"):
        run(build, RunOptions(verify=True, **QUIET))
    assert not (build / "runs").exists()  # nothing was trained or written


def test_missing_model_path_and_absent_cuda(build, tmp_path, monkeypatch):
    recipe = tmp_path / "local.yaml"
    recipe.write_text(RECIPE.split("stages:")[0] + f"""stages:
  - name: local
    objective: sft
    tasks: [arithmetic]
    model: {{kind: local, path: {tmp_path}/no-such-model}}
""")
    out = tmp_path / "local-build"
    (tmp_path / "no-such-model").mkdir()  # the compiler checks that the folder exists...
    compile_recipe(recipe, out, Options(workers=1))
    (tmp_path / "no-such-model").rmdir()  # ...and it went away before training
    with pytest.raises(TunecError, match="no-such-model: not found"):
        run(out, RunOptions(**QUIET))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TunecError, match="no CUDA device"):
        run(build, RunOptions(progress=False, device="cuda"))


def test_out_of_memory_names_the_knob(build, monkeypatch):
    from tunec.runtime import model as models

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(models.PackedLM, "forward", oom)
    with pytest.raises(TunecError, match="out of GPU memory at step 1 with micro batches of 3 rows x 128 tokens; "
                                         "lower `micro_batch_rows`"):
        run(build, RunOptions(stage="base", **QUIET))
    assert not (build / "runs" / "base" / "result.json").exists()


# ----------------------------------------------------------------- CLI


def test_cli_run_and_generate(build):
    runner = CliRunner()
    result = runner.invoke(main, ["run", str(build), "--stage", "base", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "stage base: done" in result.output
    result = runner.invoke(main, ["generate", str(build), "--stage", "base", "--task", "arithmetic",
                                  "--set", "question=What is 2 plus 3?", "--max-new-tokens", "4", "--no-color"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Question: What is 2 plus 3?\nAnswer:«")
    result = runner.invoke(main, ["generate", str(build), "--stage", "base", "--prompt", "What", "--raw",
                                  "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output

    for args, message in [
        (["run", str(build), "--stage", "base"], "already trained"),
        (["run", str(build), "--stage", "nope"], "no stage 'nope'"),
        (["generate", str(build), "--stage", "tune", "--prompt", "x"], "has no trained model"),
        (["generate", str(build), "--stage", "base", "--task", "arithmetic", "--set", "questoin=1"],
         "did you mean 'question'"),
        (["generate", str(build), "--stage", "base", "--task", "arithmetic", "--template", "nope", "--set", "a=1"],
         "no template 'nope'"),
        (["generate", str(build), "--stage", "base"], "nothing to generate from"),
    ]:
        result = runner.invoke(main, args)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, (args, result.output)


@pytest.mark.parametrize("command", ["run", "generate"])
def test_help(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output
