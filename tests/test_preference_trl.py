"""Cross-check with TRL (skipped when `trl` is not installed; tunec does not depend on it): on the same
tokens, tunec's DPO loss and rewards at step 0 equal TRL's `DPOTrainer` computation to 1e-4.

TRL tokenizes the pairs and pads them (``[chosen..., rejected...]``, a completion mask); the same
token ids are then packed tunec's way, several pairs to a row, and run through tunec's path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import DEMO

from tunec.compiler.recipe import DpoObjective
from tunec.runtime.preference import PreferenceLM, PreferenceRun

trl = pytest.importorskip("trl")


def tiny_model(seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                                  max_position_embeddings=128)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")


def packed(batch: dict[str, torch.Tensor], per_row: int) -> dict[str, torch.Tensor]:
    """TRL's padded batch as tunec's packed rows: each pair's chosen then rejected, ``per_row`` pairs a row."""
    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    n = len(ids) // 2
    rows = []
    for lo in range(0, n, per_row):
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [], "pair_ids": [], "sides": []}
        for p in range(lo, min(lo + per_row, n)):
            for side, i in ((0, p), (1, p + n)):
                keep = mask[i] == 1
                doc = ids[i][keep].tolist()
                row["input_ids"] += doc
                row["labels"] += torch.where(completion[i][keep] == 1, ids[i][keep], -100).tolist()
                row["position_ids"] += list(range(len(doc)))
                row["pair_ids"] += [p] * len(doc)
                row["sides"] += [side] * len(doc)
        rows.append(row)
    width = max(len(r["input_ids"]) for r in rows)
    fill = {"input_ids": 1, "labels": -100, "pair_ids": -1, "sides": -1}
    out = {}
    for key in rows[0]:
        if key == "position_ids":
            out[key] = torch.tensor([r[key] + list(range(width - len(r[key]))) for r in rows])
        else:
            out[key] = torch.tensor([r[key] + [fill[key]] * (width - len(r[key])) for r in rows])
    return out


@pytest.mark.parametrize("loss", ["sigmoid", "hinge", "ipo"])
def test_dpo_loss_and_rewards_match_trl_at_step_0(tmp_path, loss, one_thread):
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(DEMO / "tokenizer"))
    rows = [{"prompt": f"Q: what is {a} plus {a + 3}?\nA:", "chosen": f" {2 * a + 3}", "rejected": f" {a} or so"}
            for a in range(1, 9)]
    policy, reference = tiny_model(1), tiny_model(2)
    config = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=len(rows),
                           beta=0.2, loss_type=[loss], use_cpu=True, bf16=False, max_length=None)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, batch))
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    rows_ = packed(batch, per_row=3)
    objective = DpoObjective(kind="dpo", beta=0.2, loss=loss)
    run = PreferenceRun(objective, PreferenceLM(policy.eval(), "sdpa"))
    t = rows_
    with torch.no_grad():
        rp, rs, ref_lp, _ = PreferenceLM(reference.eval(), "sdpa")(t["input_ids"], t["position_ids"], t["labels"],
                                                                     t["pair_ids"], t["sides"])
        ref = np.zeros(2 * len(rows))
        ref[(2 * rp + rs).numpy()] = ref_lp.double().numpy()
        run.reference = {"train": ref}
        pair, side, lp, n = run.module(t["input_ids"], t["position_ids"], t["labels"], t["pair_ids"], t["sides"])
        losses, metrics = run.losses("train", pair, side, lp, n)
    assert float(losses.mean()) == pytest.approx(trl_loss, abs=1e-4)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert float(metrics[name][0].mean()) == pytest.approx(trl_metrics[name], abs=1e-4), name
    for name in ("logps/chosen", "logps/rejected"):
        assert float(metrics[name][0].mean()) == pytest.approx(trl_metrics[name], abs=1e-4), name
