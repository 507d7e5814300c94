"""Runtime pieces on their own: row order and rank slices, batching, schedule, packed attention, loss."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tunec.compiler.recipe import ConfigModel
from tunec.runtime.data import (
    Batching,
    RowStream,
    epoch_order,
    micro_batches,
    plan_batching,
    step_rows,
    trained_tokens,
)
from tunec.runtime.loop import lr_factor, real_tokens
from tunec.runtime.model import build_from_config, loss_sum, packed_causal_mask, packed_logits

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 128}


# ----------------------------------------------------------------- data order


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    a = epoch_order(3, 0, 50)
    assert np.array_equal(a, epoch_order(3, 0, 50))
    assert sorted(a.tolist()) == list(range(50))
    assert not np.array_equal(a, epoch_order(3, 1, 50))
    assert not np.array_equal(a, epoch_order(4, 0, 50))


def test_steps_cover_each_epoch_once_and_ranks_are_disjoint():
    rows, world = 12, 2
    b = Batching(rows=rows, rows_per_step=4, micro_batch_rows=2, world_size=world, total_steps=6)
    stream = RowStream(seed=1, rows=rows)
    seen = []
    for step in range(6):
        parts = [step_rows(stream, b, step, r) for r in range(world)]
        assert not set(parts[0]) & set(parts[1])
        assert all(len(p) == 2 for p in parts)
        seen.extend(np.stack(parts, axis=1).reshape(-1))  # back in stream order
    assert sorted(seen[:12]) == list(range(12)) and sorted(seen[12:]) == list(range(12))
    assert seen[:12] == epoch_order(1, 0, 12).tolist()
    # one rank sees the same rows, in the same order, as the union of two ranks
    single = Batching(rows=rows, rows_per_step=4, micro_batch_rows=4, world_size=1, total_steps=6)
    assert step_rows(RowStream(1, rows), single, 4, 0).tolist() == seen[16:20]


def test_a_step_may_cross_an_epoch_boundary():
    stream = RowStream(seed=0, rows=5)
    pos = stream.positions(3, 8)
    assert pos[:2].tolist() == epoch_order(0, 0, 5)[3:].tolist()
    assert pos[2:].tolist() == epoch_order(0, 1, 5)[:3].tolist()


def test_batching_from_tokens():
    b = plan_batching(rows=100, seq_len=256, batch_tokens=4096, micro_batch_rows=4, epochs=2,
                      max_steps=None, world_size=1)
    assert (b.rows_per_step, b.micro_steps, b.total_steps) == (16, 4, math.ceil(200 / 16))
    b = plan_batching(rows=100, seq_len=256, batch_tokens=4096, micro_batch_rows=3, epochs=1,
                      max_steps=7, world_size=3)  # 16 rows / 3 ranks -> 5 rows per rank
    assert (b.rows_per_step, b.rows_per_rank, b.micro_steps, b.total_steps) == (15, 5, 2, 7)
    b = plan_batching(rows=10, seq_len=256, batch_tokens=10, micro_batch_rows=8, epochs=1,
                      max_steps=None, world_size=2)  # less than a row: one row per rank
    assert (b.rows_per_step, b.micro_batch_rows) == (2, 1)
    assert [len(m) for m in micro_batches(np.arange(7), 3)] == [3, 3, 1]


def test_token_counts():
    labels = np.array([[-100, 5, 6, -100, -100, 7, -100, -100]])
    ids = np.array([[4, 5, 6, 9, 9, 7, 1, 1]])
    assert trained_tokens(labels) == 3
    assert real_tokens(ids, labels, pad_id=1) == 6  # the two trailing pads
    assert real_tokens(np.ones((1, 4), int), np.full((1, 4), -100), pad_id=1) == 0


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine():
    f = [lr_factor(s, warmup=4, total=20) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and all(a >= b for a, b in zip(f[4:], f[5:]))
    assert f[12] == pytest.approx(0.5)
    assert 0 < f[-1] < 0.02


# ----------------------------------------------------------------- packed attention


def test_mask_is_block_diagonal_and_causal():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = packed_causal_mask(pos)[0, 0].int()
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ])
    assert torch.equal(mask, expected)


# gemma3 alternates sliding-window and global layers; phi3 fuses q/k/v (its default pad id is out of TINY's vocab)
ARCH_EXTRA = {"gemma3_text": {"head_dim": 8, "sliding_window": 6}, "phi3": {"pad_token_id": 0}}


@pytest.mark.parametrize("model_type,attn", [("llama", "sdpa"), ("qwen2", "sdpa"), ("llama", "eager"),
                                             ("gemma3_text", "sdpa"), ("phi3", "sdpa"), ("qwen2", "eager")])
def test_packed_row_logits_equal_each_document_alone(model_type, attn):
    """No token attends across documents: a packed row gives each document's own logits, and transformers'
    packed-sequence detection from ``position_ids`` alone gives what the hand-built block-diagonal mask gives."""
    config = {"model_type": model_type, **TINY, **ARCH_EXTRA.get(model_type, {})}
    model, attn = build_from_config(ConfigModel(kind="config", config=config), 0, attn)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    lengths, seq_len = [7, 1, 12, 5], 32
    docs = [torch.randint(4, 1024, (n,), generator=gen) for n in lengths]
    orders = [docs, docs[::-1]]  # a batch of two rows, the same documents packed differently

    def pack(row):
        pad = seq_len - sum(len(d) for d in row)
        return (torch.cat(row + [torch.ones(pad, dtype=torch.long)]),
                torch.cat([torch.arange(len(d)) for d in row] + [torch.arange(pad)]))

    ids, pos = (torch.stack(t) for t in zip(*(pack(row) for row in orders)))
    with torch.no_grad():
        packed = packed_logits(model, ids, pos, attn)
        for r, row in enumerate(orders):
            start = 0
            for doc in row:
                alone = model(input_ids=doc[None]).logits[0]
                torch.testing.assert_close(packed[r, start:start + len(doc)], alone, rtol=1e-5, atol=1e-5)
                start += len(doc)
        # A hand-built 4D mask replaces the sliding window of gemma3's local layers (a document longer than
        # the window then sees too far back), which is why training no longer passes one; elsewhere it agrees.
        if model_type != "gemma3_text":
            mask = packed_causal_mask(pos)
            if attn == "eager":  # eager attention adds the mask to the scores
                mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
            by_hand = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
            torch.testing.assert_close(packed, by_hand, rtol=1e-5, atol=1e-5)
        # without the mask, the one-token document (position 7) would see the document before it
        plain = model(input_ids=ids[:1], attention_mask=torch.ones(1, seq_len, dtype=torch.long)).logits[0]
        assert not torch.allclose(plain[7], packed[0, 7], atol=1e-3)


def test_loss_sum_shifts_unshifted_labels():
    logits = torch.zeros(1, 4, 10)
    logits[0, 0, 3] = 5.0  # position 0 predicts token 3 at position 1
    labels = torch.tensor([[-100, 3, -100, -100]])
    expected = torch.nn.functional.cross_entropy(logits[0, :1], torch.tensor([3]), reduction="sum")
    torch.testing.assert_close(loss_sum(logits, labels), expected)


def test_generate_renders_chat_tasks_with_their_system_prompt_and_stops_at_end_of_turn(tmp_path):
    from transformers import AutoTokenizer

    from tunec.compiler.build import Options, compile_recipe
    from tunec.runtime.generate import build_prompt, end_of_turn_ids

    root = Path(__file__).resolve().parents[1]
    plan = compile_recipe(root / "recipes" / "demo" / "collection.yaml", tmp_path / "out", Options())
    asked = build_prompt(plan, plan.stages[0].name, None, "reviews_chat", None,
                         {"text": "A fine lamp.", "label": "positive"})
    system, user = asked.messages
    assert user["role"] == "user" and "A fine lamp." in user["content"] and user["content"] == user["content"].strip()
    assert system == {"role": "system", "content": plan.tasks["reviews_chat"].system}  # a plain string renders to itself
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out" / "tokenizer"))
    assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
