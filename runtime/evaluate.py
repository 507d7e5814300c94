"""Evaluation: loss per task on the eval rows the compiler packed for the stage.

Each task's eval set is a packed set of its own (``plan.stages[i].eval[task]``),
so a task's loss is exactly that task's: summed token cross-entropy over its
trained tokens divided by their number, the same normalisation as training.
``all`` is the same over every task's tokens together. Ranks split the rows
(rank ``r`` takes rows ``r, r + W, ...``) and the sums are all-reduced.
"""

from __future__ import annotations

import numpy as np
import torch

from .data import ShardSet, micro_batches, trained_tokens
from .dist import Dist


@torch.no_grad()
def evaluate(module, sets: dict[str, ShardSet], micro_batch_rows: int, dist: Dist, device: torch.device,
             autocast) -> tuple[dict[str, float], dict[str, int]]:
    """``({task: loss, "all": loss}, {task: trained tokens})``; ``module`` is a :class:`PackedLM`."""
    was_training = module.training
    module.eval()
    losses, counts = {}, {}
    total_loss, total_count = 0.0, 0
    try:
        for task, data in sets.items():
            mine = np.arange(dist.rank, len(data), dist.world_size)
            loss, count = 0.0, 0
            for rows in micro_batches(mine, micro_batch_rows):
                arrays = data.gather(rows)
                count += trained_tokens(arrays["labels"])
                batch = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
                with autocast():
                    loss += float(module(batch["input_ids"], batch["position_ids"], batch["labels"]))
            loss, summed = dist.sum([loss, count], device)
            losses[task] = loss / max(summed, 1)
            counts[task] = int(summed)
            total_loss += loss
            total_count += int(summed)
    finally:
        module.train(was_training)
    if sets:
        losses["all"] = total_loss / max(total_count, 1)
    return losses, counts
