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

from .data import IGNORE, ShardSet, micro_batches, trained_tokens
from .dist import Dist


@torch.no_grad()
def evaluate(module, sets: dict[str, ShardSet], micro_batch_rows: int, dist: Dist, device: torch.device,
             autocast, lockstep: bool = False) -> tuple[dict[str, float], dict[str, int]]:
    """``({task: loss, "all": loss}, {task: trained tokens})``; ``module`` is a :class:`PackedLM`.

    ``lockstep`` (FSDP, whose every forward pass is collective): all ranks run as many micro-batches, a rank
    with fewer rows running its first row again with nothing trained (it adds 0).
    """
    was_training = module.training
    module.eval()
    losses, counts = {}, {}
    total_loss, total_count = 0.0, 0
    try:
        for task, data in sets.items():
            mine = np.arange(dist.rank, len(data), dist.world_size)
            loss, count = 0.0, 0
            parts = micro_batches(mine, micro_batch_rows)
            real = len(parts)
            if lockstep:
                most = -(-len(range(0, len(data), dist.world_size)) // micro_batch_rows)  # rank 0 has the most
                parts += [np.arange(1)] * (most - real)
            for i, rows in enumerate(parts):
                arrays = data.gather(rows)
                if i >= real:  # a stand-in that keeps this rank in step with the others' collectives
                    arrays["labels"] = np.full_like(arrays["labels"], IGNORE)
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
