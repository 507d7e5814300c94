"""Packing documents into fixed-length rows, and the labels and positions of those rows.

Best-fit decreasing over the whole stage: documents are placed longest first,
each into the open row with the least room that still fits it, so no document
is ever split across rows. Every document's positions restart at 0 (attention
never crosses documents when the runtime uses them), and the first token of
every document carries no label (no document is predicted from the one before
it). Padding ends a row as a pseudo-document of pad tokens, positions from 0,
no labels. With ``seq_len = 8``, docs ``A = a0 a1 a2`` (trained: a1 a2) and
``B = b0 b1 b2 b3`` (trained: all, ``lm``)::

    input_ids     b0   b1  b2  b3 | a0    a1 a2 | pad
    labels      -100   b1  b2  b3 | -100  a1 a2 | -100
    position_ids   0    1   2   3 | 0     1  2  | 0

>>> best_fit_decreasing(np.array([3, 4, 5, 2]), capacity=8)
[[2, 0], [1, 3]]
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np

IGNORE = -100
BLOCK_ROWS = 256  # rows filled at a time by build_rows


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Assign document indices to bins (rows) of ``capacity`` tokens.

    Ties are broken by document index, so the result is a pure function of the
    lengths. Cost O(n log n + n * distinct_room): open rows are kept in buckets
    keyed by their free room, and a sorted list of the non-empty rooms finds the
    tightest fit by bisection.
    """
    if len(lengths) and int(np.max(lengths)) > capacity:
        raise ValueError(f"a document of {int(np.max(lengths))} tokens does not fit rows of {capacity}")
    order = np.lexsort((np.arange(len(lengths)), -np.asarray(lengths)))
    bins: list[list[int]] = []
    rooms: list[int] = []  # sorted distinct free-room values with at least one open bin
    by_room: dict[int, deque[int]] = {}  # room -> open bin ids (oldest first)
    for doc in order.tolist():
        need = int(lengths[doc])
        i = bisect.bisect_left(rooms, need)
        if i == len(rooms):
            b, room = len(bins), capacity
            bins.append([])
        else:
            room = rooms[i]
            b = by_room[room].popleft()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(i)
        bins[b].append(doc)
        left = room - need
        if left > 0:
            if left not in by_room:
                by_room[left] = deque()
                bisect.insort(rooms, left)
            by_room[left].append(b)
    return bins


@dataclass
class Docs:
    """Documents of a stage, flat (see :class:`tunec.compiler.units.UnitResult`), with labels decided."""

    ids: np.ndarray  # int32
    offsets: np.ndarray  # int64, docs + 1
    labels: np.ndarray  # int32, same length as ids
    side: np.ndarray | None = None  # preference stages: per doc, 0 chosen / 1 rejected (see compiler/preference.py)
    group: int = 1  # preference stages: docs ``[g*k, g*(k+1))`` are one pair (g = 2) or one unpaired example

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def gather(self, order: np.ndarray, lengths: np.ndarray, inner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ids and labels of documents ``order`` (``lengths`` their lengths, ``inner`` each token's
        position in its document), one after the other."""
        src = np.repeat(self.offsets[:-1][order], lengths) + inner
        return self.ids[src], self.labels[src]

    def release(self) -> None:
        """Nothing to hand back: these arrays are in memory (see ``link.Selected``)."""


class DocSource(Protocol):
    """What packing reads documents from: :class:`Docs`, or a stage's selection of mapped units."""

    side: np.ndarray | None
    group: int

    @property
    def lengths(self) -> np.ndarray: ...

    def gather(self, order: np.ndarray, lengths: np.ndarray, inner: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def release(self) -> None: ...


def doc_labels(ids: np.ndarray, offsets: np.ndarray, spans: np.ndarray, objective: str) -> np.ndarray:
    """Labels for flat docs: ``sft`` trains the spans, ``lm`` every token; never a doc's first token."""
    if objective == "lm":
        labels = ids.copy()
    else:
        # Mark the spans with +1/-1 at their ends and a running sum: no loop per document.
        edges = np.zeros(len(ids) + 1, dtype=np.int32)
        base = offsets[spans[:, 0]] if len(spans) else np.zeros(0, np.int64)
        np.add.at(edges, base + spans[:, 1], 1)
        np.add.at(edges, base + spans[:, 2], -1)
        labels = np.where(np.cumsum(edges[:-1]) > 0, ids, IGNORE).astype(ids.dtype)
    labels[offsets[:-1][np.diff(offsets) > 0]] = IGNORE
    return labels


def ramps(lengths: np.ndarray) -> np.ndarray:
    """``[0..l0), [0..l1), ...`` concatenated: the position of every token inside its run."""
    total = int(lengths.sum())
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(total, dtype=np.int64) - starts


def group_bins(docs: DocSource, capacity: int) -> list[list[int]]:
    """Best-fit decreasing over groups (the two documents of a pair) instead of documents: a pair
    always lands in one row, its chosen document right before its rejected one.

    >>> d = Docs(np.zeros(9, np.int32), np.array([0, 2, 4, 7, 9]), np.zeros(9, np.int32), group=2)
    >>> group_bins(d, 8)
    [[2, 3], [0, 1]]
    """
    g = docs.group
    bins = best_fit_decreasing(docs.lengths.reshape(-1, g).sum(axis=1), capacity)
    return [[k * g + j for k in b for j in range(g)] for b in bins]


def build_rows(docs: DocSource, bins: list[list[int]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Materialise packed rows: ``input_ids``, ``labels``, ``position_ids``, each ``[rows, seq_len]``.

    Documents with a ``side`` (preference stages) also give ``pair_ids`` (the group's index in
    ``docs``) and ``sides`` per token, ``-1`` on padding::

        input_ids   p0 p1 c0 c1 | p0 p1 r0 | pad
        labels      -  -  c0 c1 | -  -  r0 | -
        pair_ids    7  7  7  7  | 7  7  7  | -1
        sides       0  0  0  0  | 1  1  1  | -1
    """
    n = len(bins)
    input_ids = np.full((n, seq_len), pad_id, dtype=np.int32)
    labels = np.full((n, seq_len), IGNORE, dtype=np.int32)
    # positions: 0.. inside every document; the padding after the last one counts from 0 too
    positions = np.tile(np.arange(seq_len, dtype=np.int32), (n, 1))
    out = {"input_ids": input_ids, "labels": labels, "position_ids": positions}
    if docs.side is not None:
        out.update(pair_ids=np.full((n, seq_len), -1, dtype=np.int32), sides=np.full((n, seq_len), -1, dtype=np.int32))
    for lo in range(0, n, BLOCK_ROWS):  # a block of rows at a time: the per-token index arrays stay small
        _fill({k: v[lo:lo + BLOCK_ROWS] for k, v in out.items()}, docs, bins[lo:lo + BLOCK_ROWS], seq_len)
        docs.release()  # what the block read of memory-mapped units goes back to the page cache
    return out


def _fill(out: dict[str, np.ndarray], docs: DocSource, bins: list[list[int]], seq_len: int) -> None:
    """Write the documents of ``bins`` into rows ``out`` (as many rows as bins), positions included."""
    n = len(bins)
    order = np.fromiter((d for b in bins for d in b), dtype=np.int64)
    row_of = np.repeat(np.arange(n), [len(b) for b in bins])
    lengths = docs.lengths[order]
    # where each document starts inside its row: a running sum that restarts at every row
    ends = np.cumsum(lengths)
    row_start = np.zeros(n, dtype=np.int64)
    first = np.concatenate([[0], np.cumsum([len(b) for b in bins])[:-1]])
    row_start[:] = (ends - lengths)[first]
    at = (ends - lengths) - row_start[row_of]
    inner = ramps(lengths)
    used = np.bincount(row_of, weights=lengths, minlength=n).astype(np.int64)
    if bool((at + lengths > seq_len).any()):
        raise AssertionError("a packed row holds more tokens than seq_len")
    # A row's documents fill it from its start, one after the other: the cells they take, read row by
    # row, are the documents' tokens in `order`'s order (a mask, not an index per token)
    taken = (np.arange(seq_len) < used[:, None]).reshape(-1)
    ids, labs = docs.gather(order, lengths, inner)
    out["input_ids"].reshape(-1)[taken] = ids
    out["labels"].reshape(-1)[taken] = labs
    del ids, labs
    positions = out["position_ids"]
    positions.reshape(-1)[taken] = inner
    pad_rows = np.flatnonzero(used < seq_len)
    for r in pad_rows.tolist():  # one slice per row (not per document)
        positions[r, used[r]:] = np.arange(seq_len - used[r], dtype=np.int32)
    if docs.side is not None:
        out["pair_ids"].reshape(-1)[taken] = np.repeat(order // docs.group, lengths)
        out["sides"].reshape(-1)[taken] = np.repeat(docs.side[order].astype(np.int32), lengths)
