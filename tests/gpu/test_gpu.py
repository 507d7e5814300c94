"""The runtime's CUDA paths: bf16, packed attention under SDPA and flash-attention, the chunked loss's
memory, a frozen base in bf16, `micro_batch_rows: auto`, QLoRA, Liger, compiled layers, FSDP on one GPU."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch
from tiny import DEMO, tiny_llama

from tunec.compiler.recipe import ConfigModel, LoraPeft, QLoraPeft
from tunec.runtime import memory
from tunec.runtime.data import IGNORE
from tunec.runtime.loss import OutputHead, loss_sum
from tunec.runtime.model import PackedLM, add_lora, build_from_config, load_pretrained, packed_hidden, packed_logits

pytestmark = pytest.mark.gpu

# Qwen2.5-0.5B's architecture (random weights); `layers` shortens it where depth does not matter
QWEN = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
        "tie_word_embeddings": True}


def qwen(layers: int = 24, attn: str = "sdpa"):
    return build_from_config(ConfigModel(kind="config", config={**QWEN, "num_hidden_layers": layers}), 0, attn)


def rows(n: int, seq: int, vocab: int, longest: int = 512, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=gen)
    pos = torch.zeros(n, seq, dtype=torch.long)
    labels = torch.full((n, seq), IGNORE)
    for r in range(n):
        t = 0
        while t < seq:
            k = min(int(torch.randint(1, longest + 1, (1,), generator=gen)), seq - t)
            pos[r, t:t + k] = torch.arange(k)
            labels[r, t + k // 2:t + k] = ids[r, t + k // 2:t + k]
            t += k
    return ids.cuda(), pos.cuda(), labels.cuda()


@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_packed_rows_equal_each_document_alone(attn):
    if attn.startswith("flash") and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    model, got = qwen(layers=2, attn=attn)
    assert got == attn
    dtype = torch.bfloat16 if attn.startswith("flash") else torch.float32
    model = model.cuda().to(dtype).eval()
    ids, pos, _ = rows(2, 1024, QWEN["vocab_size"], longest=300)
    with torch.no_grad():
        packed = packed_logits(model, ids, pos, attn)
        for r in range(2):
            starts = (pos[r] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
            for lo, hi in zip(starts[:-1], starts[1:]):
                alone = model(input_ids=ids[r:r + 1, lo:hi], use_cache=False).logits[0].float()
                tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
                torch.testing.assert_close(packed[r, lo:hi], alone, rtol=tol, atol=tol)


def test_chunked_loss_needs_at_most_half_the_memory_of_full_logits():
    model, attn = qwen(layers=2)
    model = model.cuda().train()
    ids, pos, labels = rows(4, 2048, QWEN["vocab_size"])
    peaks, losses = {}, {}
    for chunked in (False, True):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = PackedLM(model, attn, chunked=chunked)(ids, pos, labels)
        loss.backward()
        peaks[chunked] = torch.cuda.max_memory_allocated() - before
        losses[chunked] = float(loss.detach())
        del loss
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
    assert peaks[True] <= 0.5 * peaks[False], peaks


def test_bf16_precision_frozen_base_and_float32_adapter():
    model, attn = qwen(layers=2)
    model = add_lora(model, LoraPeft(kind="lora", r=8), 0).cuda()
    precision, note = memory.prepare(model, "auto", True, torch.device("cuda"), 4 * 2048)
    assert precision.compute == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    assert "frozen base in" in note
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else precision.compute), name


def test_auto_micro_batch_rows_finds_the_largest_size_that_fits():
    class Rows:
        def __init__(self, n, seq):
            ids, pos, labels = rows(n, seq, QWEN["vocab_size"])
            self.arrays = {"input_ids": ids.cpu().numpy(), "position_ids": pos.cpu().numpy(),
                           "labels": labels.cpu().numpy()}

        def __len__(self):
            return len(self.arrays["labels"])

        def gather(self, idx):
            return {k: v[idx] for k, v in self.arrays.items()}

    model, attn = qwen()
    model = model.cuda().train()
    params = [p for p in model.parameters() if p.requires_grad]
    device = torch.device("cuda")
    most = 4096  # 8M tokens: never fits
    found, note = memory.auto_micro_batch_rows(PackedLM(model, attn), params, Rows(8, 2048), most, device,
                                               memory.precision_for(device))
    assert 1 <= found < most and "micro_batch_rows auto" in note
    assert found & (found - 1) == 0  # tried by halving from a power of two


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_qlora_loads_in_4bit_and_trains(tmp_path):
    from tunec.runtime.model import quantization

    model, _ = qwen(layers=2)
    model.save_pretrained(tmp_path / "base")
    peft = QLoraPeft(kind="qlora", r=8, dropout=0.0)
    model, attn = load_pretrained(str(tmp_path / "base"), "sdpa",
                                  quantized=quantization(peft, torch.device("cuda"), "test"))
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    model = add_lora(model, peft, 0).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids, pos, labels = rows(2, 512, QWEN["vocab_size"])
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = PackedLM(model, attn)(ids, pos, labels) / int((labels != IGNORE).sum())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
def test_liger_loss_equals_the_chunked_loss():
    from tunec.runtime import loss as lossmod

    model, attn = qwen(layers=2)
    model = model.cuda()
    ids, pos, labels = rows(2, 1024, QWEN["vocab_size"])
    hidden = packed_hidden(model, ids, pos, attn)
    head = OutputHead.of(model)
    assert lossmod.liger_usable(head, hidden)
    liger = loss_sum(head, hidden, labels)
    lossmod_usable = lossmod.liger_usable
    try:
        lossmod.liger_usable = lambda *a: False
        plain = loss_sum(head, hidden, labels)
    finally:
        lossmod.liger_usable = lossmod_usable
    assert float(liger) == pytest.approx(float(plain), rel=1e-4)


def loss_and_grads(model, attn, ids, pos, labels):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = PackedLM(model, attn)(ids, pos, labels)
    loss.backward()
    return float(loss.detach()), {n: p.grad.float().clone() for n, p in model.named_parameters()}


def same_step(a, b, rel: float) -> None:
    assert a[0] == pytest.approx(b[0], rel=rel)
    for name, grad in a[1].items():  # bf16 passes: each gradient within a few percent of its own scale
        scale = float(grad.abs().max()) + 1e-12
        assert float((grad - b[1][name]).abs().max()) <= 0.05 * scale, name


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
def test_liger_layers_compute_what_the_plain_layers_compute():
    from tunec.runtime import kernels

    model, attn = qwen(layers=2)
    model = model.cuda().train()
    ids, pos, labels = rows(2, 1024, QWEN["vocab_size"])
    plain = loss_and_grads(model, attn, ids, pos, labels)
    assert kernels.use_liger(model, torch.device("cuda")) == "Liger kernels for 5 RMSNorm and 2 SwiGLU modules"
    same_step(loss_and_grads(model, attn, ids, pos, labels), plain, rel=1e-3)


def test_compiled_layers_compute_what_the_eager_layers_compute():
    from tunec.runtime import kernels

    model, attn = qwen(layers=2)
    model = model.cuda().train()
    ids, pos, labels = rows(2, 1024, QWEN["vocab_size"])
    eager = loss_and_grads(model, attn, ids, pos, labels)
    assert kernels.compile_layers(model) == "2 decoder layers compiled (torch.compile)"
    same_step(loss_and_grads(model, attn, ids, pos, labels), eager, rel=1e-3)


def test_fsdp_on_one_gpu_trains_and_saves(tmp_path):
    from tunec.compiler.build import Options, compile_recipe
    from tunec.runtime.run import RunOptions, run

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
tokenizer: {{kind: local, path: {DEMO}/tokenizer}}
seq_len: 128
tasks:
  arithmetic:
    source: {{kind: jsonl, path: {DEMO}/data/arithmetic/train.jsonl}}
    templates: [arithmetic/qa]
    train: {{stop: 60}}
stages:
  - name: s
    objective: sft
    tasks: [arithmetic]
    model: {tiny_llama(layers=2)}
    parallelism: fsdp
    activation_checkpointing: true
    batch_tokens: 512
    max_steps: 3
""")
    compile_recipe(recipe, tmp_path / "build", Options(workers=1))
    (result,) = run(tmp_path / "build", RunOptions(progress=False, device="cuda"))
    assert result.steps == 3 and (tmp_path / "build" / "runs" / "s" / "model" / "model.safetensors").is_file()
    shutil.rmtree(tmp_path / "build")
