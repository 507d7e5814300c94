"""Memory-lean training: the chunked loss equals the full-logits loss, gradients included."""

from __future__ import annotations

import pytest
import torch

from tunec.compiler.recipe import ConfigModel, LoraPeft
from tunec.runtime.data import IGNORE
from tunec.runtime.loss import OutputHead, chunk_tokens, loss_sum, token_logprobs
from tunec.runtime.model import PackedLM, add_lora, build_from_config, packed_hidden
from tunec.runtime.model import loss_sum as full_loss_sum

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 128}
# gemma2 soft-caps its logits (cap * tanh(z / cap)); a small cap makes the cap matter
ARCHS = {"llama": {}, "qwen2": {}, "gemma2": {"head_dim": 8, "final_logit_softcapping": 3.0}}


def model_of(model_type: str, **extra):
    config = {"model_type": model_type, **TINY, **ARCHS.get(model_type, {}), **extra}
    model, attn = build_from_config(ConfigModel(kind="config", config=config), 0, "sdpa")
    return model, attn


def batch(rows: int = 3, seq: int = 40, seed: int = 0):
    """Packed rows: documents of random lengths, about half their tokens trained, some trailing padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 1024, (rows, seq), generator=gen)
    pos = torch.zeros(rows, seq, dtype=torch.long)
    for r in range(rows):
        t = 0
        while t < seq:
            n = int(torch.randint(1, 15, (1,), generator=gen))
            pos[r, t:t + n] = torch.arange(min(n, seq - t))
            t += n
    labels = ids.clone()
    labels[torch.rand(rows, seq, generator=gen) < 0.5] = IGNORE
    labels[:, -4:] = IGNORE
    return ids, pos, labels


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type", list(ARCHS))
@pytest.mark.parametrize("chunk", [7, None])  # many chunks; one chunk
def test_chunked_loss_and_gradients_equal_full_logits(model_type, chunk):
    model, attn = model_of(model_type)
    ids, pos, labels = batch()
    # the reference: the model's own forward (soft cap and all) and the full-logits cross-entropy
    full = full_loss_sum(model(input_ids=ids, position_ids=pos, use_cache=False).logits, labels)
    full.backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    head = OutputHead.of(model)
    if model_type == "gemma2":
        assert head.softcap == 3.0
    chunked = loss_sum(head, packed_hidden(model, ids, pos, attn), labels, chunk)
    chunked.backward()
    got = grads(model)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    assert set(got) == set(expected) and len(got) > 5
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)


def test_chunked_loss_trains_lora_including_a_wrapped_output_layer():
    model, attn = model_of("llama")
    model = add_lora(model, LoraPeft(kind="lora", r=4, dropout=0.0, target_modules=["q_proj", "lm_head"]), 0)
    for p in model.parameters():  # LoRA's B starts at zero; give it values so every gradient is non-trivial
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    ids, pos, labels = batch(seed=1)
    PackedLM(model, attn, chunked=False)(ids, pos, labels).backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    PackedLM(model, attn, chunked=True)(ids, pos, labels).backward()
    got = grads(model)
    assert any("lm_head.lora" in n for n in got) and set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)


def test_token_logprobs_are_the_labels_log_probabilities_with_gradients():
    model, attn = model_of("gemma2")
    ids, pos, labels = batch(rows=2, seed=2)
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    logp = torch.log_softmax(logits, dim=-1)
    expected = torch.zeros(labels.shape)
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] != IGNORE:
                expected[b, t] = logp[b, t - 1, labels[b, t]]
    (expected.sum() * 0.5).backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)
    got = token_logprobs(OutputHead.of(model), packed_hidden(model, ids, pos, attn), labels, chunk=5)
    assert got.shape == labels.shape
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5)
    (got.sum() * 0.5).backward()
    for name, g in grads(model).items():
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-5, msg=name)
    # the summed log-probs are minus the summed cross-entropy
    torch.testing.assert_close(-got.sum(), loss_sum(OutputHead.of(model), packed_hidden(model, ids, pos, attn),
                                                    labels), rtol=1e-5, atol=1e-5)


def test_no_trained_token_gives_a_zero_in_the_graph():
    model, attn = model_of("llama")
    ids, pos, labels = batch(rows=1)
    loss = loss_sum(OutputHead.of(model), packed_hidden(model, ids, pos, attn), torch.full_like(labels, IGNORE))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()  # a rank whose micro-batch trains nothing still takes part in the gradient reduction
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing  # DDP waits for a gradient of every parameter, the output layer's included
    logps = token_logprobs(OutputHead.of(model), packed_hidden(model, ids, pos, attn), torch.full_like(labels, IGNORE))
    assert logps.shape == labels.shape and not logps.detach().any() and logps.requires_grad


def test_chunk_size_bounds_the_logits_in_memory():
    assert chunk_tokens(151_936) * 151_936 <= 1 << 26
    assert chunk_tokens(10**9) == 64  # never fewer tokens than that per chunk


def test_dora_trains_magnitudes_and_the_chunked_loss_still_equals_full_logits():
    model, attn = model_of("llama")
    model = add_lora(model, LoraPeft(kind="lora", r=4, dropout=0.0, use_dora=True), 0)
    assert any("lora_magnitude_vector" in n and p.requires_grad for n, p in model.named_parameters())
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    ids, pos, labels = batch(seed=3)
    PackedLM(model, attn, chunked=False)(ids, pos, labels).backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    PackedLM(model, attn)(ids, pos, labels).backward()
    got = grads(model)
    assert any("magnitude" in n and g.abs().sum() > 0 for n, g in got.items())
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)


QLORA_RECIPE = """
tokenizer: {{kind: local, path: {demo}/tokenizer}}
seq_len: 64
tasks:
  arithmetic:
    source: {{kind: jsonl, path: {demo}/data/arithmetic/train.jsonl}}
    templates: [arithmetic/qa]
    train: {{stop: 10}}
stages:
  - name: q
    objective: sft
    tasks: [arithmetic]
    model: {model}
    peft: {{kind: qlora, r: 4}}
    max_steps: 1
"""


@pytest.mark.slow
def test_qlora_warns_at_validate_and_stops_at_run_without_cuda(tmp_path):
    from tiny import DEMO, QUIET

    from tunec.compiler.build import Options, compile_recipe
    from tunec.compiler.check import check
    from tunec.compiler.errors import TunecError
    from tunec.compiler.load import load_recipe
    from tunec.runtime.run import RunOptions, run

    model, _ = model_of("llama")
    model.save_pretrained(tmp_path / "base")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(QLORA_RECIPE.format(demo=DEMO, model="{kind: local, path: base}"))
    (warning,) = [w for w in check(load_recipe(recipe)).warnings if "qlora" in str(w)]
    assert warning.line == 14 and "stages[0].peft" in str(warning) and "needs a CUDA GPU" in str(warning)
    compile_recipe(recipe, tmp_path / "build", Options(workers=1))
    with pytest.raises(TunecError, match=r"stage `q`: `peft: qlora` needs a CUDA GPU .* this run is on cpu"):
        run(tmp_path / "build", RunOptions(**QUIET))
    assert not (tmp_path / "build" / "runs" / "q" / "result.json").exists()


def test_qlora_on_a_config_model_is_a_located_error(tmp_path):
    model, field, message = "{kind: config, config: {model_type: llama}}", "stages[0]", "quantizes a pretrained base"
    from tiny import DEMO

    from tunec.compiler.errors import TunecError
    from tunec.compiler.load import load_recipe

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(QLORA_RECIPE.format(demo=DEMO, model=model))
    with pytest.raises(TunecError) as err:
        load_recipe(recipe)
    (problem,) = err.value.problems
    assert f"{field}: " in str(problem) and message in str(problem) and problem.line == 10


@pytest.mark.parametrize("line,value,message", [
    ("activation_checkpointing", "yes", "activation_checkpointing"),
    ("chunked_loss", "1", "chunked_loss"),
    ("parallelism", "{kind: zero3}", "parallelism"),
])
def test_bad_memory_settings_are_located(tmp_path, line, value, message):
    from tiny import DEMO

    from tunec.compiler.errors import TunecError
    from tunec.compiler.load import load_recipe

    recipe = tmp_path / "recipe.yaml"
    text = QLORA_RECIPE.format(demo=DEMO, model="{kind: hub, id: org/model}").replace(
        "    peft: {kind: qlora, r: 4}\n", f"    {line}: {value}\n")
    recipe.write_text(text)
    with pytest.raises(TunecError) as err:
        load_recipe(recipe)
    shown = [str(p) for p in err.value.problems]
    assert any(":14:" in s and f"stages[0].{message}" in s for s in shown), shown


@pytest.mark.parametrize("name", ["tunec.runtime.loss", "tunec.runtime.memory"])
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
