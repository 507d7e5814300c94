"""Packing: best-fit decreasing, labels, positions, padding (pure functions on small arrays)."""

from __future__ import annotations

import numpy as np
import pytest

from tunec.compiler.pack import IGNORE, Docs, best_fit_decreasing, build_rows, doc_labels


def flat(docs: list[list[int]]):
    ids = np.asarray([t for d in docs for t in d], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    return ids, offsets


def test_best_fit_decreasing_places_each_document_once_and_never_overfills():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=2000)
    bins = best_fit_decreasing(lengths, 128)
    placed = sorted(d for b in bins for d in b)
    assert placed == list(range(len(lengths)))
    assert all(sum(int(lengths[d]) for d in b) <= 128 for b in bins)
    # BFD is within 11/9 OPT + 1; the trivial lower bound gives a checkable ceiling
    lower = -(-int(lengths.sum()) // 128)
    assert len(bins) <= 11 / 9 * lower + 1


def test_best_fit_picks_the_tightest_row():
    # 6 opens row 0 (room 4), 5 opens row 1 (room 5); 4 fits both and must go to row 0 (tighter)
    assert best_fit_decreasing(np.array([6, 5, 4]), 10) == [[0, 2], [1]]


def test_best_fit_is_a_pure_function_of_the_lengths():
    lengths = np.array([3, 3, 3, 5, 5, 2, 7, 1])
    assert best_fit_decreasing(lengths, 8) == best_fit_decreasing(lengths.copy(), 8)
    # equal lengths keep their original order
    assert best_fit_decreasing(np.array([4, 4, 4]), 4) == [[0], [1], [2]]


def test_a_document_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        best_fit_decreasing(np.array([3, 9]), 8)


def test_doc_labels_sft_and_lm():
    ids, offsets = flat([[10, 11, 12, 13], [20, 21, 22]])
    spans = np.array([[0, 2, 4], [1, 0, 3]], dtype=np.int32)  # doc 1's span starts at its first token
    sft = doc_labels(ids, offsets, spans, "sft")
    assert sft.tolist() == [IGNORE, IGNORE, 12, 13, IGNORE, 21, 22]  # first token of a doc never trained
    lm = doc_labels(ids, offsets, spans, "lm")
    assert lm.tolist() == [IGNORE, 11, 12, 13, IGNORE, 21, 22]


def test_build_rows_matches_the_drawing_in_the_docstring():
    # A = a0 a1 a2 (trained a1 a2), B = b0..b3 (lm); seq_len 8 -> B | A | pad
    ids, offsets = flat([[1, 2, 3], [4, 5, 6, 7]])
    labels = np.array([IGNORE, 2, 3, IGNORE, 5, 6, 7], dtype=np.int32)
    docs = Docs(ids, offsets, labels)
    bins = best_fit_decreasing(docs.lengths, 8)
    rows = build_rows(docs, bins, 8, pad_id=0)
    assert rows["input_ids"].tolist() == [[4, 5, 6, 7, 1, 2, 3, 0]]
    assert rows["labels"].tolist() == [[IGNORE, 5, 6, 7, IGNORE, 2, 3, IGNORE]]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0]]
    assert all(a.dtype == np.int32 for a in rows.values())


def test_full_rows_have_no_padding_document():
    ids, offsets = flat([[1, 2], [3, 4]])
    docs = Docs(ids, offsets, ids.copy())
    rows = build_rows(docs, [[0, 1]], 4, pad_id=9)
    assert rows["input_ids"].tolist() == [[1, 2, 3, 4]]
    assert rows["position_ids"].tolist() == [[0, 1, 0, 1]]


def test_a_bin_holding_more_tokens_than_a_row_stops_the_packing():
    from tunec.compiler.pack import Docs, build_rows

    docs = Docs(np.arange(10, dtype=np.int32), np.array([0, 6, 10]), np.arange(10, dtype=np.int32))
    assert build_rows(docs, [[0, 1]], 10, 0)["input_ids"].tolist() == [list(range(10))]
    with pytest.raises(AssertionError, match="more tokens than seq_len"):
        build_rows(docs, [[0, 1]], 8, 0)
