"""Compile units: one task part (train or eval) rendered, tokenized, masked and truncated.

The work is cut into fixed-size chunks of rows, independent of the number of
worker processes, and the results are joined in chunk order: the output is the
same whatever ``--workers`` says. Workers are separate processes, each
tokenizing on one thread, so ``--workers N`` means N cores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from .templates import RenderError, Renderer, TemplateSource
from .tokenize import TokenizerInfo, encode_pairs

CHUNK_ROWS = 512


@dataclass(frozen=True)
class UnitSpec:
    """Everything a worker needs to compile the rows of one task part."""

    task: str
    part: str  # "train" | "eval"
    templates: tuple[TemplateSource, ...]
    truncation: str  # drop | truncate | error
    seq_len: int


@dataclass(frozen=True)
class Chunk:
    unit: int  # index into the list of UnitSpecs
    first_row: int  # row index in the split, for messages
    columns: dict[str, list[Any]]


class RowError(Exception):
    """A row could not be compiled; carries the task, part and row for the message."""

    def __init__(self, task: str, part: str, row: int, message: str, file: str | None = None, line: int | None = None):
        self.task, self.part, self.row, self.message, self.file, self.line = task, part, row, message, file, line
        super().__init__(message)

    def __reduce__(self):
        return (RowError, (self.task, self.part, self.row, self.message, self.file, self.line))


@dataclass
class UnitResult:
    """Documents of a unit, flat: doc ``i`` is ``ids[offsets[i]:offsets[i+1]]``.

    ``spans`` rows are ``(doc, start, end)``: token ranges of the doc that carry
    loss under the ``sft`` objective. ``template`` and ``row`` say which
    template and which source row produced each doc.
    """

    ids: np.ndarray  # int32
    offsets: np.ndarray  # int64, len = docs + 1
    spans: np.ndarray  # int32, (n, 3)
    template: np.ndarray  # int16
    row: np.ndarray  # int32
    truncated: int = 0
    dropped: int = 0
    straddles: int = 0

    @property
    def docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def chunks_of(unit: int, columns: dict[str, list[Any]], count: int, first_row: int) -> Iterator[Chunk]:
    for lo in range(0, count, CHUNK_ROWS):
        hi = min(lo + CHUNK_ROWS, count)
        yield Chunk(unit, first_row + lo, {k: v[lo:hi] for k, v in columns.items()})


# ----------------------------------------------------------------- worker side

_STATE: dict[str, Any] = {}


def init_worker(info: TokenizerInfo, specs: list[UnitSpec], single_thread: bool) -> None:
    """Per-process setup: the tokenizer and the templates, built once."""
    if single_thread:
        # One tokenizer thread per worker: --workers N uses N cores, no more.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _STATE["backend"] = Tokenizer.from_str(info.json)
    _STATE["info"] = info
    _STATE["specs"] = specs
    _STATE["renderers"] = {}


def compile_chunk(chunk: Chunk) -> UnitResult:
    spec: UnitSpec = _STATE["specs"][chunk.unit]
    renderers = _STATE["renderers"]
    if chunk.unit not in renderers:
        renderers[chunk.unit] = Renderer(list(spec.templates))
    renderer: Renderer = renderers[chunk.unit]
    n = len(next(iter(chunk.columns.values()))) if chunk.columns else 0
    names = list(chunk.columns)

    prompts, completions, tmpl_idx, rows = [], [], [], []
    for i in range(n):
        row = {k: chunk.columns[k][i] for k in names}
        for t in range(len(spec.templates)):
            try:
                prompt, completion = renderer.render(t, row)
            except RenderError as exc:
                file, line = exc.template.place(exc.line)
                raise RowError(spec.task, spec.part, chunk.first_row + i,
                               f"template '{exc.template.name}': {exc.message}", file, line) from None
            if not completion.strip():
                file, _ = spec.templates[t].place(None)
                raise RowError(spec.task, spec.part, chunk.first_row + i,
                               f"template '{spec.templates[t].name}' rendered an empty completion "
                               "(nothing to train on); check the row's values or the template", file)
            prompts.append(prompt)
            completions.append(completion)
            tmpl_idx.append(t)
            rows.append(chunk.first_row + i)

    encoded = encode_pairs(_STATE["backend"], _STATE["info"], prompts, completions)

    flat: list[int] = []
    offsets = [0]
    spans: list[tuple[int, int, int]] = []
    keep_t, keep_r = [], []
    truncated = dropped = straddles = 0
    limit = spec.seq_len
    for enc, t, r in zip(encoded, tmpl_idx, rows):
        ids, doc_spans = enc.ids, enc.spans
        if len(ids) > limit:
            if spec.truncation == "error":
                raise RowError(spec.task, spec.part, r,
                               f"example is {len(ids)} tokens, longer than seq_len {limit} "
                               f"(template '{spec.templates[t].name}'); set `truncation: drop` or "
                               "`truncate`, or raise `seq_len`")
            if spec.truncation == "drop":
                dropped += 1
                continue
            ids = ids[:limit]
            doc_spans = [(s, min(e, limit)) for s, e in doc_spans if s < limit]
            truncated += 1
        doc = len(offsets) - 1
        spans.extend((doc, s, e) for s, e in doc_spans)
        straddles += enc.straddles
        flat.extend(ids)
        offsets.append(len(flat))
        keep_t.append(t)
        keep_r.append(r)
    return UnitResult(
        ids=np.asarray(flat, dtype=np.int32),
        offsets=np.asarray(offsets, dtype=np.int64),
        spans=np.asarray(spans, dtype=np.int32).reshape(-1, 3),
        template=np.asarray(keep_t, dtype=np.int16),
        row=np.asarray(keep_r, dtype=np.int32),
        truncated=truncated,
        dropped=dropped,
        straddles=straddles,
    )


def join(results: list[UnitResult]) -> UnitResult:
    """Concatenate chunk results of one unit, in order."""
    if not results:
        empty = np.zeros(0, dtype=np.int32)
        return UnitResult(empty, np.zeros(1, dtype=np.int64), np.zeros((0, 3), np.int32),
                          np.zeros(0, np.int16), empty.copy())
    ids = np.concatenate([r.ids for r in results])
    offsets, spans, base_tok, base_doc = [np.zeros(1, np.int64)], [], 0, 0
    for r in results:
        offsets.append(r.offsets[1:] + base_tok)
        s = r.spans.copy()
        s[:, 0] += base_doc
        spans.append(s)
        base_tok += int(r.offsets[-1])
        base_doc += r.docs
    return UnitResult(
        ids=ids,
        offsets=np.concatenate(offsets),
        spans=np.concatenate(spans).astype(np.int32),
        template=np.concatenate([r.template for r in results]),
        row=np.concatenate([r.row for r in results]),
        truncated=sum(r.truncated for r in results),
        dropped=sum(r.dropped for r in results),
        straddles=sum(r.straddles for r in results),
    )
