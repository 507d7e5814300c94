"""Training data: memory-mapped shards, a seeded row order, and each rank's slice of it.

The rows of a stage are read straight from the compiled shards (no copy until
a micro-batch is gathered). Training consumes an endless *stream* of rows: the
concatenation of one seeded permutation per epoch, a pure function of
``(seed, epoch)``. Optimizer step ``s`` takes stream positions
``[s * R, (s + 1) * R)`` where ``R`` is the number of rows per step (all
ranks); rank ``r`` of ``W`` takes every ``W``-th of them, starting at ``r``.
So the data position of a run is just its step number, resuming needs nothing
else, and the ranks of a ``torchrun`` job never read the same row of a step::

    rows = 6, R = 4, W = 2          epoch 0: perm [3 0 5 1 4 2]   epoch 1: perm [1 4 0 2 5 3]
    stream                          3 0 5 1 | 4 2 1 4 | 0 2 5 3 | ...
    step 1, rank 0 / rank 1         4 . 1 .   /   . 2 . 4
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tunec.compiler.errors import TunecError
from tunec.compiler.fileio import sha256_file
from tunec.compiler.plan import PackedSet
from tunec.compiler.shards import ShardError, check_values, open_shard

IGNORE = -100


class ShardSet:
    """The rows of a packed set (a stage's train data or a task's eval data), memory-mapped."""

    def __init__(self, out: Path, packed: PackedSet, verify: bool = False, vocab_size: int | None = None):
        self.seq_len = packed.seq_len
        self._arrays: list[dict[str, np.ndarray]] = []
        problems = []
        for entry in packed.shards:
            path = Path(out) / entry.path
            try:
                arrays = open_shard(path, expect_bytes=entry.bytes)
                if vocab_size is not None:  # every run: one vectorised pass over the rows
                    check_values(path, arrays, vocab_size)
            except ShardError as exc:
                problems.append(f"{exc}; compile the recipe again")
                continue
            shape = tuple(arrays["input_ids"].shape)
            if shape != (entry.rows, packed.seq_len):
                problems.append(f"{path}: shape {shape}, the plan says ({entry.rows}, {packed.seq_len})")
                continue
            if verify and sha256_file(path) != entry.sha256:
                problems.append(f"{path}: sha256 differs from the plan (corrupted or replaced); "
                                "compile the recipe again")
                continue
            self._arrays.append(arrays)
        if problems:
            raise TunecError(problems)
        counts = [a["input_ids"].shape[0] for a in self._arrays]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.rows = int(self.starts[-1])
        # preference stages' shards (format version 2) also hold `pair_ids` and `sides`
        self.names = tuple(self._arrays[0]) if self._arrays else ("input_ids", "labels", "position_ids")
        if len({tuple(sorted(a)) for a in self._arrays}) > 1:
            raise TunecError(f"{out}: the shards of one set hold different tensors; compile the recipe again")

    @property
    def paired(self) -> bool:
        """Whether the rows carry preference pairs (``pair_ids`` and ``sides``)."""
        return "pair_ids" in self.names

    def pairs(self) -> int:
        """One more than the largest pair id: the size of per-pair arrays (reference log-probs)."""
        return max((int(a["pair_ids"].max()) + 1 for a in self._arrays if a["pair_ids"].size), default=0)

    def __len__(self) -> int:
        return self.rows

    def gather(self, indices) -> dict[str, np.ndarray]:
        """Rows ``indices`` (global row numbers) as int64 arrays ``[len(indices), seq_len]``."""
        indices = np.asarray(indices, dtype=np.int64)
        shard = np.searchsorted(self.starts, indices, side="right") - 1
        out = {}
        for name in self.names:
            rows = [self._arrays[s][name][i - self.starts[s]] for s, i in zip(shard, indices)]
            out[name] = np.stack(rows).astype(np.int64) if rows else np.zeros((0, self.seq_len), np.int64)
        return out


def epoch_order(seed: int, epoch: int, rows: int) -> np.ndarray:
    """The row order of one epoch: a permutation that depends on ``(seed, epoch)`` only."""
    return np.random.default_rng([seed, epoch]).permutation(rows)


@dataclass(frozen=True)
class Batching:
    """How a stage's rows become optimizer steps and micro-batches."""

    rows: int  # rows in the training set
    rows_per_step: int  # all ranks together; a multiple of world_size
    micro_batch_rows: int
    world_size: int
    total_steps: int

    @property
    def rows_per_rank(self) -> int:
        return self.rows_per_step // self.world_size

    @property
    def micro_steps(self) -> int:
        """Forward/backward passes per optimizer step, the same on every rank."""
        return math.ceil(self.rows_per_rank / self.micro_batch_rows)


def plan_batching(rows: int, seq_len: int, batch_tokens: int, micro_batch_rows: int,
                  epochs: float, max_steps: int | None, world_size: int) -> Batching:
    """Rows per step from ``batch_tokens`` (rounded to a whole number of rows per rank, at least one),
    and the number of steps: ``max_steps`` when given, else enough steps to cover ``epochs`` passes."""
    if rows == 0:
        raise TunecError("the stage has no training rows")
    per_rank = max(1, round(batch_tokens / seq_len / world_size))
    rows_per_step = per_rank * world_size
    steps = max_steps if max_steps is not None else max(1, math.ceil(epochs * rows / rows_per_step))
    return Batching(rows, rows_per_step, min(micro_batch_rows, per_rank), world_size, steps)


class RowStream:
    """Stream positions -> row numbers, with one cached permutation per epoch."""

    def __init__(self, seed: int, rows: int):
        self.seed, self.rows = seed, rows
        self._cache: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) >= 2:  # bounded: a step usually touches one or two epochs
                self._cache.pop(min(self._cache))
            self._cache[epoch] = epoch_order(self.seed, epoch, self.rows)
        return self._cache[epoch]

    def positions(self, lo: int, hi: int) -> np.ndarray:
        """Row numbers at stream positions ``[lo, hi)``."""
        epoch, index = np.divmod(np.arange(lo, hi, dtype=np.int64), self.rows)
        out = np.empty(hi - lo, dtype=np.int64)
        for e in np.unique(epoch):
            here = epoch == e
            out[here] = self.order(int(e))[index[here]]
        return out


def step_rows(stream: RowStream, batching: Batching, step: int, rank: int) -> np.ndarray:
    """The rows rank ``rank`` trains on at optimizer step ``step`` (0-based)."""
    lo = step * batching.rows_per_step
    rows = stream.positions(lo, lo + batching.rows_per_step)
    return rows[rank :: batching.world_size]


def micro_batches(rows: np.ndarray, micro_batch_rows: int) -> list[np.ndarray]:
    return [rows[i : i + micro_batch_rows] for i in range(0, len(rows), micro_batch_rows)]


def trained_tokens(labels: np.ndarray) -> int:
    """Tokens that carry loss: labels after the shift (position 0 of a row is never predicted)."""
    return int((labels[:, 1:] != IGNORE).sum())
