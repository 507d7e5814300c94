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

import numpy as np

IGNORE = -100


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
    """Documents of a stage, flat (see :class:`compiler.units.UnitResult`), with labels decided."""

    ids: np.ndarray  # int32
    offsets: np.ndarray  # int64, docs + 1
    labels: np.ndarray  # int32, same length as ids

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def doc_labels(ids: np.ndarray, offsets: np.ndarray, spans: np.ndarray, objective: str) -> np.ndarray:
    """Labels for flat docs: ``sft`` trains the spans, ``lm`` every token; never a doc's first token."""
    if objective == "lm":
        labels = ids.copy()
    else:
        labels = np.full_like(ids, IGNORE)
        for doc, s, e in spans.tolist():
            base = int(offsets[doc])
            labels[base + s : base + e] = ids[base + s : base + e]
    labels[offsets[:-1][np.diff(offsets) > 0]] = IGNORE
    return labels


def build_rows(docs: Docs, bins: list[list[int]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Materialise packed rows: ``input_ids``, ``labels``, ``position_ids``, each ``[rows, seq_len]``."""
    n = len(bins)
    input_ids = np.full((n, seq_len), pad_id, dtype=np.int32)
    labels = np.full((n, seq_len), IGNORE, dtype=np.int32)
    positions = np.zeros((n, seq_len), dtype=np.int32)
    ramp = np.arange(seq_len, dtype=np.int32)
    for r, members in enumerate(bins):
        at = 0
        for doc in members:
            lo, hi = int(docs.offsets[doc]), int(docs.offsets[doc + 1])
            k = hi - lo
            input_ids[r, at : at + k] = docs.ids[lo:hi]
            labels[r, at : at + k] = docs.labels[lo:hi]
            positions[r, at : at + k] = ramp[:k]
            at += k
        positions[r, at:] = ramp[: seq_len - at]
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions}
