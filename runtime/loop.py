"""The training loop: AdamW, warmup + cosine, gradient accumulation, clipping, bf16 autocast.

One optimizer step consumes ``rows_per_step`` packed rows (all ranks), as
micro-batches of at most ``micro_batch_rows`` rows. The loss of a step is::

    sum over every trained token of the step (all micro-batches, all ranks) of  -log p(token)
    ---------------------------------------------------------------------------------------
                    number of trained tokens in the step (all micro-batches, all ranks)

The token count is known before the forward passes (it is in the labels), so
it is all-reduced first and every micro-batch's summed loss is divided by it.
A document then weighs by its trained tokens wherever it was packed, however
the step was split into micro-batches and ranks: the same step gives the same
gradient on 1 rank or on N (``runtime/README.md`` says why we chose this).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from tunec.compiler.recipe import Stage

from . import fsdp
from .data import (
    IGNORE,
    Batching,
    RowStream,
    ShardSet,
    micro_batches,
    step_rows,
    trained_tokens,
)
from .dist import Dist
from .memory import Precision, to_device


def make_optimizer(model, stage: Stage, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases or other vectors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": stage.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=stage.lr, betas=(0.9, 0.999),
                             eps=1e-8, fused=device.type == "cuda")


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based): linear warmup, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))


def real_tokens(input_ids: np.ndarray, labels: np.ndarray, pad_id: int) -> int:
    """Tokens that are not the trailing padding of a row (pad ids without a label at the end)."""
    is_pad = (input_ids == pad_id) & (labels == IGNORE)
    # length of the run of padding at the end of each row
    tail = np.argmin(is_pad[:, ::-1], axis=1)
    tail[is_pad.all(axis=1)] = input_ids.shape[1]
    return int(input_ids.size - tail.sum())


@dataclass
class Progress:
    """Counters carried from step to step and saved in checkpoints."""

    step: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    window: dict = field(default_factory=lambda: {"loss": 0.0, "trained": 0, "tokens": 0, "t0": time.perf_counter()})


@dataclass
class Loop:
    """Everything one stage's loop needs; ``run_stage`` builds it."""

    module: torch.nn.Module  # PackedLM, wrapped in DDP when distributed
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: ShardSet
    stream: RowStream
    batching: Batching
    stage: Stage
    dist: Dist
    device: torch.device
    pad_id: int
    trace: Path | None = None  # debugging aid: a file per rank listing the rows of every step
    precision: Precision = field(default_factory=Precision)  # autocast dtype (runtime/memory.py)
    scaler: torch.amp.GradScaler | None = None  # fp16 only: losses scaled so small gradients survive
    _ahead: tuple | None = field(default=None, repr=False)  # (step, rows, arrays, device tensors) read early
    preference: Any = None  # a preference stage's objective (runtime/preference.py: PreferenceRun) does its steps

    def autocast(self):
        return self.precision.autocast(self.device)  # also the saved model's dtype

    def _read(self, step: int) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, torch.Tensor]]:
        """This rank's rows of ``step``, their arrays, and the arrays on the device (prefetched when it can)."""
        if self._ahead is not None and self._ahead[0] == step:
            _, rows, batch, on_device = self._ahead
            self._ahead = None
            return rows, batch, on_device
        rows = step_rows(self.stream, self.batching, step, self.dist.rank)
        batch = self.data.gather(rows)
        return rows, batch, to_device(batch, self.device)

    def step(self, progress: Progress) -> None:
        """One optimizer step over this rank's rows of step ``progress.step``."""
        if self.preference is not None:
            return self.preference.step(self, progress)
        rows, batch, on_device = self._read(progress.step)
        if self.trace is not None:
            with (self.trace / f"rank-{self.dist.rank}.txt").open("a") as fh:
                fh.write(f"{progress.step} " + " ".join(map(str, rows.tolist())) + "\n")
        local = [trained_tokens(batch["labels"]), real_tokens(batch["input_ids"], batch["labels"], self.pad_id)]
        n_trained, n_tokens = self.dist.sum(local, self.device)
        # DDP averages gradients over ranks; multiplying by world_size turns that into a sum.
        scale = self.dist.world_size / max(n_trained, 1.0)

        parts = micro_batches(np.arange(len(rows)), self.batching.micro_batch_rows)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, part in enumerate(parts):
            tensors = {k: v[part[0]:part[-1] + 1] for k, v in on_device.items()}  # parts are runs of rows
            last = i == len(parts) - 1
            # distributed: the module is a DistributedDataParallel
            if fsdp.is_sharded(self.module):
                sync = fsdp.gradient_sync(self.module, last)
            else:
                sync = nullcontext() if last or not self.dist.active else cast(DDP, self.module).no_sync()
            with sync:
                with self.autocast():
                    summed = self.module(tensors["input_ids"], tensors["position_ids"], tensors["labels"])
                loss = summed * scale
                (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            total += summed.detach()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.stage.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when a gradient overflowed; the scale then shrinks
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda" and progress.step + 1 < self.batching.total_steps:
            # the GPU is still busy with this step: read and send the next one meanwhile
            self._ahead = (progress.step + 1, *self._read(progress.step + 1))

        (loss_sum,) = self.dist.sum([total.item()], self.device)  # the one host synchronisation of a step
        progress.step += 1
        progress.tokens += int(n_tokens)
        progress.trained_tokens += int(n_trained)
        w = progress.window
        w["loss"] += loss_sum
        w["trained"] += int(n_trained)
        w["tokens"] += int(n_tokens)
        w["grad_norm"] = float(getattr(grad_norm, "full_tensor", lambda: grad_norm)())  # FSDP: a DTensor

    def record(self, progress: Progress, started: float) -> dict:
        """A metrics record for the steps since the previous one (token-weighted loss)."""
        w = progress.window
        now = time.perf_counter()
        rec = {
            "step": progress.step,
            "loss": w["loss"] / max(w["trained"], 1),
            "lr": self.stage.lr * lr_factor(progress.step - 1, self.stage.warmup_steps, self.batching.total_steps),
            "grad_norm": w.get("grad_norm", 0.0),
            "tokens_per_s": w["tokens"] / max(now - w["t0"], 1e-9),
            "tokens": progress.tokens,
            "trained_tokens": progress.trained_tokens,
            "epoch": progress.step * self.batching.rows_per_step / self.batching.rows,
            "elapsed_s": now - started,
        }
        if self.preference is not None:  # rewards/accuracies, ... as TRL names them
            rec.update(self.preference.record(w))
        progress.window = {"loss": 0.0, "trained": 0, "tokens": 0, "t0": now}
        return rec


def train(loop: Loop, progress: Progress, log, every: Callable[[Progress], None]) -> None:
    """Run optimizer steps from ``progress.step`` to the end; ``every`` does eval/checkpoints between steps."""
    total = loop.batching.total_steps
    started = time.perf_counter()
    progress.window["t0"] = started
    while progress.step < total:
        loop.step(progress)
        log.advance()
        if progress.step % loop.stage.log_every_steps == 0 or progress.step == total:
            log.write(loop.record(progress, started))
        every(progress)
