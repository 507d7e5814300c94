"""Faster decoder layers (runtime/kernels.py): `compile: true`, and Liger's kernels on CUDA.

Both change how a step runs, never what it trains: a compiled stage trains the
same losses and weights as an eager one (to float rounding), and the modules
routed through Liger compute what the modules they replace compute (here with a
stand-in for Liger's functions that does their documented arithmetic; the
kernels themselves run in tests/gpu).
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import DEMO, QUIET, tiny_llama

from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.errors import TunecError
from tunec.compiler.load import load_recipe
from tunec.compiler.recipe import ConfigModel, LoraPeft
from tunec.runtime import kernels
from tunec.runtime.model import PackedLM, add_lora, build_from_config
from tunec.runtime.run import RunOptions, run

RECIPE = f"""
tokenizer: {{kind: local, path: {DEMO}/tokenizer}}
seq_len: 128
seed: 5
tasks:
  arithmetic:
    source: {{kind: jsonl, path: {DEMO}/data/arithmetic/train.jsonl}}
    templates: [arithmetic/qa]
    train: {{stop: 64}}
stages:
  - name: sft
    objective: sft
    tasks: [arithmetic]
    model: {tiny_llama(layers=2)}
    lr: 0.01
    batch_tokens: 1024
    micro_batch_rows: 4
    max_steps: 3
"""


def trained(build: Path, into: Path, *overrides: str, caplog=None):
    out = into / "build"
    shutil.copytree(build, out)
    with caplog.at_level("INFO"):
        run(out, RunOptions(overrides=overrides, **QUIET))
    start = next(r.getMessage() for r in caplog.records if "trainable parameters" in r.getMessage())
    caplog.clear()
    losses = [json.loads(line)["loss"] for line in (out / "runs/sft/metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    saved = out / "runs/sft/model/model.safetensors"
    if not saved.is_file():  # LoRA: the adapter's weights
        saved = out / "runs/sft/adapter/adapter_model.safetensors"
    return start, losses, load_file(str(saved))


@pytest.mark.slow
# no LoRA dropout: compiled code draws its random masks in another order than eager code
@pytest.mark.parametrize("peft", ["", "    peft: {kind: lora, r: 4, dropout: 0.0}\n"], ids=["full", "lora"])
def test_a_compiled_stage_trains_what_an_eager_one_trains(tmp_path, caplog, peft):
    (tmp_path / "recipe.yaml").write_text(RECIPE.replace("    lr: 0.01\n", f"{peft}    lr: 0.01\n"))
    compile_recipe(tmp_path / "recipe.yaml", tmp_path / "build", Options(workers=1))
    eager_line, eager, eager_w = trained(tmp_path / "build", tmp_path / "eager", caplog=caplog)
    line, compiled, compiled_w = trained(tmp_path / "build", tmp_path / "compiled", "stages.sft.compile=true",
                                         caplog=caplog)
    assert "compiled" not in eager_line
    assert "2 decoder layers compiled (torch.compile)" in line
    assert len(eager) == 3 and compiled == pytest.approx(eager, rel=1e-4, abs=1e-4)
    assert eager[-1] < eager[0]
    assert set(compiled_w) == set(eager_w)  # the saved weights have the plain layers' names
    for name in eager_w:
        torch.testing.assert_close(compiled_w[name], eager_w[name], rtol=1e-4, atol=1e-4, msg=name)


def test_compile_with_qlora_is_a_located_error(tmp_path):
    message = "`compile: true` is not combined with `peft: qlora`"
    recipe = RECIPE.replace("    lr: 0.01\n", "    compile: true\n    peft: {kind: qlora, r: 4}\n    lr: 0.01\n")
    recipe = recipe.replace(f"model: {tiny_llama(layers=2)}", "model: {kind: local, path: somewhere}")
    (tmp_path / "recipe.yaml").write_text(recipe)
    with pytest.raises(TunecError) as err:
        load_recipe(tmp_path / "recipe.yaml")
    problems = [str(p) for p in err.value.problems]
    assert any(message in p and "stages[0]" in p for p in problems), problems


def test_compile_must_be_a_boolean(tmp_path):
    (tmp_path / "recipe.yaml").write_text(RECIPE.replace("    lr: 0.01\n", "    compile: fast\n    lr: 0.01\n"))
    with pytest.raises(TunecError) as err:
        load_recipe(tmp_path / "recipe.yaml")
    (problem,) = err.value.problems
    assert problem.line == 15 and "stages[0].compile" in str(problem)


def model_of(model_type: str, act: str = "silu"):
    config = {"model_type": model_type, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "hidden_act": act,
              "max_position_embeddings": 64}
    if model_type == "qwen3":
        config["head_dim"] = 8
    model, attn = build_from_config(ConfigModel(kind="config", config=config), 0, "sdpa")
    return model, attn


@pytest.fixture
def stand_in(monkeypatch):
    """``liger_kernel.transformers.functional`` as its functions are documented, in plain torch; records calls."""
    calls = {"rms_norm": 0, "swiglu": 0}

    def liger_rms_norm(x, w, eps, offset=0.0, casting_mode="llama", in_place=True):
        assert offset == 0.0 and casting_mode == "llama"
        calls["rms_norm"] += 1
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return (w + offset) * h.to(x.dtype)

    def liger_swiglu(a, b):
        calls["swiglu"] += 1
        return torch.nn.functional.silu(a) * b

    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_rms_norm = liger_rms_norm  # type: ignore[attr-defined]
    functional.liger_swiglu = liger_swiglu  # type: ignore[attr-defined]
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", functional)
    monkeypatch.setattr(kernels, "liger_usable", lambda device: True)
    return calls


@pytest.mark.parametrize("model_type, norms", [("llama", 5), ("qwen2", 5), ("mistral", 5), ("qwen3", 9)])
def test_liger_modules_compute_what_they_replace(stand_in, model_type, norms):
    model, attn = model_of(model_type)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, -1)
    labels = ids.clone()
    before = PackedLM(model, attn)(ids, pos, labels)
    note = kernels.use_liger(model, torch.device("cuda"))
    assert note == f"Liger kernels for {norms} RMSNorm and 2 SwiGLU modules"  # qwen3 also has q/k norms per layer
    after = PackedLM(model, attn)(ids, pos, labels)
    assert stand_in["rms_norm"] == norms and stand_in["swiglu"] == 2  # the replacements ran, once per module
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-5)
    after.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    fresh, _ = model_of(model_type)
    assert "forward" not in vars(fresh.model.layers[0].mlp)  # other instances keep their own forward


def test_liger_leaves_other_activations_and_lora_layers_work(stand_in):
    gelu, _ = model_of("llama", act="gelu")
    assert kernels.use_liger(gelu, torch.device("cuda")) == "Liger kernels for 5 RMSNorm and 0 SwiGLU modules"
    model, attn = model_of("llama")
    model = add_lora(model, LoraPeft(kind="lora", r=4), 0)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(16).expand(1, -1)
    before = PackedLM(model, attn)(ids, pos, ids)
    assert kernels.use_liger(model, torch.device("cuda")).endswith("2 SwiGLU modules")
    torch.testing.assert_close(PackedLM(model, attn)(ids, pos, ids), before, rtol=1e-6, atol=1e-5)


def test_no_liger_on_the_cpu():
    model, _ = model_of("llama")
    assert kernels.use_liger(model, torch.device("cpu")) == ""
    assert all("forward" not in vars(m) for m in model.modules())


def test_compile_needs_a_layer_stack():
    class Flat(torch.nn.Module):
        base_model = property(lambda self: self)

        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(2, 2)

    with pytest.raises(TunecError, match="names no decoder layers"):
        kernels.compile_layers(Flat())
