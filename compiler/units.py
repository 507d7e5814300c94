"""Compile units: one task part (train or eval) rendered, tokenized, masked and truncated.

The main process decides, per source row, which documents to make (which
templates, which few-shot exemplars) with a generator seeded by the recipe,
then cuts the rows into fixed-size chunks, independent of the number of worker
processes, and joins the results in chunk order: the output is the same
whatever ``--workers`` says. Workers are separate processes, each tokenizing
on one thread, so ``--workers N`` means N cores.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from .chat import ChatError, assistant_spans, to_messages
from .pack import IGNORE, doc_labels
from .recipe import AnswerChoices, ChatFormat, ColumnChoices, CompletionFormat, FewShot, JinjaChoices
from .templates import RenderError, Renderer, TemplateSource, make_env
from .tokens import Encoded, TokenizerInfo, encode_texts

CHUNK_ROWS = 512
MESSAGES = -1  # the "template" of a document read from a chat `messages` column

DocPlan = tuple[int, tuple[int, ...]]  # (template index, exemplar positions in the train pool)


@dataclass(frozen=True)
class UnitSpec:
    """Everything a worker needs to compile the rows of one task part."""

    task: str
    part: str  # "train" | "eval"
    templates: tuple[TemplateSource, ...]
    truncation: str  # drop | truncate | error
    seq_len: int
    seed: int
    policy: str = "all"  # all | sample | round_robin
    format: CompletionFormat | ChatFormat = field(default_factory=lambda: CompletionFormat(kind="completion"))
    few_shot: FewShot | None = None
    answer_choices: AnswerChoices | None = None
    record_choices: bool = False

    @property
    def from_messages(self) -> bool:
        return isinstance(self.format, ChatFormat) and self.format.messages is not None


@dataclass(frozen=True)
class Chunk:
    unit: int  # index into the list of UnitSpecs
    rows: list[int]  # each row's index in its split, for messages
    columns: dict[str, list[Any]]
    docs: list[list[DocPlan]]  # per row: the documents to make from it


class DataError(ValueError):
    """A row's value that a task cannot use (for example answer choices that are not a list)."""


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
    template and which source row produced each doc (template -1: a chat
    ``messages`` column). ``choices`` (eval parts with answer choices) holds,
    per doc, what a runtime needs to score the choices by log-likelihood.
    """

    ids: np.ndarray  # int32
    offsets: np.ndarray  # int64, len = docs + 1
    spans: np.ndarray  # int32, (n, 3)
    template: np.ndarray  # int16
    row: np.ndarray  # int32
    skipped: np.ndarray  # int64 per template: promptsource templates that did not apply to a row
    shots: np.ndarray  # int16: few-shot exemplars kept in each doc
    sft_labels: np.ndarray  # int32, like ids: the labels under the `sft` objective (made by the workers)
    sft_trained: np.ndarray  # int64 per doc: tokens labelled under `sft`
    truncated: int = 0
    dropped: int = 0
    straddles: int = 0
    choices: list[dict] | None = None

    @property
    def docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


# ----------------------------------------------------------------- main side


def plan_docs(spec: UnitSpec, count: int, pool_size: int) -> list[list[DocPlan]]:
    """Per row, the documents to make: templates by policy, exemplars for few-shot.

    A pure function of the recipe's seed, the task and the part. Exemplars
    come from the train pool only and never include the row itself.
    """
    rng = np.random.default_rng([spec.seed, zlib.crc32(spec.task.encode("utf-8")), spec.part == "eval"])
    n_templates = len(spec.templates)
    fs = spec.few_shot
    self_in_pool = spec.part == "train"
    out: list[list[DocPlan]] = []
    for i in range(count):
        if spec.from_messages:
            chosen = [MESSAGES]
        elif spec.policy == "all":
            chosen = list(range(n_templates))
        elif spec.policy == "round_robin":
            chosen = [i % n_templates]
        else:
            chosen = [int(rng.integers(n_templates))]
        docs = []
        for t in chosen:
            exemplars: tuple[int, ...] = ()
            if fs is not None and rng.random() < fs.share:
                k = fs.shots if fs.min_shots is None else int(rng.integers(fs.min_shots, fs.shots + 1))
                candidates = pool_size - (1 if self_in_pool else 0)
                k = min(k, candidates)
                if k > 0:
                    picks = rng.choice(candidates, size=k, replace=False)
                    if self_in_pool:
                        picks = picks + (picks >= i)  # skip the row itself
                    exemplars = tuple(int(p) for p in picks)
            docs.append((t, exemplars))
        out.append(docs)
    return out


def chunks_of(unit: int, columns: dict[str, list[Any]], rows: list[int], docs: list[list[DocPlan]]) -> Iterator[Chunk]:
    for lo in range(0, len(rows), CHUNK_ROWS):
        hi = min(lo + CHUNK_ROWS, len(rows))
        yield Chunk(unit, rows[lo:hi], {k: v[lo:hi] for k, v in columns.items()}, docs[lo:hi])


# ----------------------------------------------------------------- worker side

_STATE: dict[str, Any] = {}


def init_worker(info: TokenizerInfo, specs: list[UnitSpec], pools: dict[str, dict[str, list]], single_thread: bool) -> None:
    """Per-process setup: the tokenizer, the templates and the few-shot pools, built once."""
    if single_thread:
        # One tokenizer thread per worker: --workers N uses N cores, no more.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _STATE.update(backend=Tokenizer.from_str(info.json), info=info, specs=specs, pools=pools, renderers={})


def _row(columns: dict[str, list], i: int) -> dict:
    return {k: v[i] for k, v in columns.items()}


def _seed(seed: int, row: int, template: int) -> int:
    return (seed * 1_000_003 + row) * 1_009 + template + 1


@dataclass
class _Doc:
    text: str
    spans: list[tuple[int, int]]
    template: int
    row: int
    chat: bool
    prefix_cuts: list[int]  # completion format: where each exemplar ends in the prompt (to drop exemplars)
    choice: dict | None = None
    messages: list[dict] | None = None  # chat few-shot: the conversation, exemplar turns first (to drop them)
    chat_shots: int = 0  # chat few-shot: exemplar exchanges at the start of `messages` (after a system turn)

    @property
    def shots(self) -> int:
        return self.chat_shots if self.chat else len(self.prefix_cuts)


def compile_chunk(chunk: Chunk) -> UnitResult:
    spec: UnitSpec = _STATE["specs"][chunk.unit]
    renderers = _STATE["renderers"]
    if chunk.unit not in renderers:
        system = make_env().from_string(spec.format.system) if isinstance(spec.format, ChatFormat) and spec.format.system else None
        renderers[chunk.unit] = (Renderer(list(spec.templates)), system)
    renderer, system = renderers[chunk.unit]
    info: TokenizerInfo = _STATE["info"]
    pool = _STATE["pools"].get(spec.task)
    n_templates = max(len(spec.templates), 1)
    skipped = np.zeros(n_templates, dtype=np.int64)

    docs: list[_Doc] = []
    for i, row_index in enumerate(chunk.rows):
        row = _row(chunk.columns, i)
        try:
            docs.extend(_row_docs(spec, renderer, system, info, pool, row, row_index, chunk.docs[i], skipped))
        except RenderError as exc:
            file, line = exc.template.place(exc.line)
            raise RowError(spec.task, spec.part, row_index, f"template '{exc.template.name}': {exc.message}", file, line) from None
        except ChatError as exc:
            raise RowError(spec.task, spec.part, row_index, f"chat: {exc}") from None
        except DataError as exc:
            raise RowError(spec.task, spec.part, row_index, str(exc)) from None

    encoded = _encode(docs, info)
    return _collect(spec, docs, encoded, skipped, info)


def _choices_for(spec: UnitSpec, renderer: Renderer, row: dict, t: int, seed: int) -> list[str] | None:
    if t >= 0 and renderer.has_own_choices(t):
        return renderer.choices(t, row, seed)
    ac = spec.answer_choices
    if ac is None:
        return None
    if isinstance(ac, list):
        return list(ac)
    if isinstance(ac, ColumnChoices):
        value = row.get(ac.column)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataError(f"answer choices column `{ac.column}` is not a list of strings")
        return list(value)
    assert isinstance(ac, JinjaChoices)
    text = make_env().from_string(ac.template).render({k: v for k, v in row.items() if v is not None})
    return [c.strip() for c in text.split("|||")]


def _row_docs(spec, renderer, system, info, pool, row, row_index, plans, skipped) -> list[_Doc]:
    out = []
    for t, exemplars in plans:
        seed = _seed(spec.seed, row_index, t)
        if t == MESSAGES:
            fmt: ChatFormat = spec.format
            messages = to_messages(row.get(fmt.messages), fmt.roles)
            if system is not None:
                messages = [{"role": "system", "content": system.render(_defined(row))}] + messages
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            trained = [m["role"] == "assistant" and (fmt.train_on == "all" or i == last) for i, m in enumerate(messages)]
            text, spans = assistant_spans(_chat_template(info), messages, dict(info.special_tokens), trained)
            out.append(_Doc(text, spans, t, row_index, True, []))
            continue
        choices = _choices_for(spec, renderer, row, t, seed)
        ctx = row if choices is None or "answer_choices" in row else {**row, "answer_choices": choices}
        pair = renderer.render(t, ctx, seed)
        if pair is None or (spec.templates[t].kind == "promptsource" and not pair[1].strip()):
            skipped[t] += 1
            continue
        prompt, completion = pair
        if not completion.strip():
            raise RenderError(spec.templates[t], None, "rendered an empty completion (nothing to train on); "
                              "check the row's values or the template")
        shots = []
        for j in exemplars:
            ex_row = _row(pool, j)
            ex_choices = _choices_for(spec, renderer, ex_row, t, _seed(spec.seed, -1 - j, t))
            ex_ctx = ex_row if ex_choices is None or "answer_choices" in ex_row else {**ex_row, "answer_choices": ex_choices}
            ex = renderer.render(t, ex_ctx, _seed(spec.seed, -1 - j, t))
            if ex is not None and ex[1].strip():
                shots.append(ex)
        out.append(_make_doc(spec, info, system, row, row_index, t, prompt, completion, shots, choices))
    return out


def _defined(row: dict) -> dict:
    return {k: v for k, v in row.items() if v is not None}


def _chat_template(info: TokenizerInfo) -> str:
    if not info.chat_template:
        raise ChatError("the tokenizer has no chat template; set `tokenizer.chat_template` to a Jinja file")
    return info.chat_template


def _make_doc(spec, info, system, row, row_index, t, prompt, completion, shots, choices) -> _Doc:
    record = None
    if isinstance(spec.format, ChatFormat):
        messages = []
        if system is not None:
            messages.append({"role": "system", "content": system.render(_defined(row))})
        for p, c in shots:
            messages += [{"role": "user", "content": p.strip()}, {"role": "assistant", "content": c.strip()}]
        messages += [{"role": "user", "content": prompt.strip()}, {"role": "assistant", "content": completion.strip()}]
        trained = [False] * (len(messages) - 1) + [True]
        text, spans = assistant_spans(_chat_template(info), messages, dict(info.special_tokens), trained)
        return _Doc(text, spans, t, row_index, True, [], messages=messages, chat_shots=len(shots))
    sep = spec.few_shot.separator if spec.few_shot else ""
    prefix, cuts = "", []
    for p, c in shots:
        prefix += p + c + sep
        cuts.append(len(prefix))
    text = prefix + prompt + completion
    if spec.record_choices and choices is not None:
        target = completion.strip()
        record = {
            "row": row_index, "template": spec.templates[t].name, "prompt": prefix + prompt,
            "target": completion, "choices": choices,
            "answer": choices.index(target) if target in choices else -1,
            "choice_prefix": completion[: len(completion) - len(completion.lstrip())],
        }
    return _Doc(text, [(len(prefix) + len(prompt), len(text))], t, row_index, False, cuts, record)


def _encode(docs: list[_Doc], info: TokenizerInfo) -> list[Encoded]:
    backend = _STATE["backend"]
    out: list[Encoded | None] = [None] * len(docs)
    for chat in (False, True):
        idx = [i for i, d in enumerate(docs) if d.chat == chat]
        if not idx:
            continue
        encs = encode_texts(backend, info, [docs[i].text for i in idx], [docs[i].spans for i in idx],
                            add_special=not chat, append_eos=not chat)
        for i, enc in zip(idx, encs):
            out[i] = enc
    return out  # type: ignore[return-value]


def _fit_fewshot(doc: _Doc, enc: Encoded, info: TokenizerInfo, limit: int) -> tuple[_Doc, Encoded]:
    """Drop exemplars (the first ones first) until the document fits; never cut the example itself."""
    backend = _STATE["backend"]
    while len(enc.ids) > limit and doc.shots:
        if doc.chat:
            first = 1 if doc.messages[0]["role"] == "system" else 0
            messages = doc.messages[:first] + doc.messages[first + 2 :]  # one user/assistant exchange less
            trained = [False] * (len(messages) - 1) + [True]
            text, spans = assistant_spans(_chat_template(info), messages, dict(info.special_tokens), trained)
            doc = _Doc(text, spans, doc.template, doc.row, True, [], messages=messages, chat_shots=doc.chat_shots - 1)
            (enc,) = encode_texts(backend, info, [text], [spans], add_special=False, append_eos=False)
            continue
        cut = doc.prefix_cuts[0]
        text = doc.text[cut:]
        spans = [(s - cut, e - cut) for s, e in doc.spans]
        choice = dict(doc.choice, prompt=doc.choice["prompt"][cut:]) if doc.choice else None
        doc = _Doc(text, spans, doc.template, doc.row, False, [c - cut for c in doc.prefix_cuts[1:]], choice)
        (enc,) = encode_texts(backend, info, [doc.text], [doc.spans], add_special=True, append_eos=True)
    return doc, enc


def _collect(spec: UnitSpec, docs: list[_Doc], encoded: list[Encoded], skipped, info) -> UnitResult:
    flat: list[int] = []
    offsets = [0]
    spans: list[tuple[int, int, int]] = []
    keep_t, keep_r, choices = [], [], []
    keep_s = []
    truncated = dropped = straddles = 0
    limit = spec.seq_len
    for doc, enc in zip(docs, encoded):
        if len(enc.ids) > limit and doc.shots:
            doc, enc = _fit_fewshot(doc, enc, info, limit)
        ids, doc_spans = enc.ids, enc.spans
        if len(ids) > limit:
            if spec.truncation == "error":
                name = spec.templates[doc.template].name if doc.template >= 0 else "messages"
                raise RowError(spec.task, spec.part, doc.row,
                               f"example is {len(ids)} tokens, longer than seq_len {limit} "
                               f"(template '{name}'); set `truncation: drop` or `truncate`, or raise `seq_len`")
            if spec.truncation == "drop":
                dropped += 1
                continue
            ids = ids[:limit]
            doc_spans = [(s, min(e, limit)) for s, e in doc_spans if s < limit]
            truncated += 1
        d = len(offsets) - 1
        spans.extend((d, s, e) for s, e in doc_spans)
        straddles += enc.straddles
        keep_s.append(doc.shots)
        flat.extend(ids)
        offsets.append(len(flat))
        keep_t.append(doc.template)
        keep_r.append(doc.row)
        if spec.record_choices:
            choices.append(doc.choice)
    ids_arr = np.asarray(flat, dtype=np.int32)
    offsets_arr = np.asarray(offsets, dtype=np.int64)
    spans_arr = np.asarray(spans, dtype=np.int32).reshape(-1, 3)
    sft_labels = doc_labels(ids_arr, offsets_arr, spans_arr, "sft")
    sft_trained = _per_doc(sft_labels != IGNORE, offsets_arr)
    return UnitResult(
        ids=ids_arr,
        offsets=offsets_arr,
        spans=spans_arr,
        template=np.asarray(keep_t, dtype=np.int16),
        row=np.asarray(keep_r, dtype=np.int32),
        skipped=skipped,
        shots=np.asarray(keep_s, dtype=np.int16),
        sft_labels=sft_labels,
        sft_trained=sft_trained,
        truncated=truncated,
        dropped=dropped,
        straddles=straddles,
        choices=choices if spec.record_choices else None,
    )


def _per_doc(mask: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Count of true values in each document of a flat per-token mask."""
    if len(offsets) < 2:
        return np.zeros(0, np.int64)
    counts = np.add.reduceat(mask, offsets[:-1], dtype=np.int64) if len(mask) else np.zeros(len(offsets) - 1, np.int64)
    counts[np.diff(offsets) == 0] = 0  # reduceat reads one element for an empty range
    return counts


def lm_labels(unit: UnitResult) -> tuple[np.ndarray, np.ndarray]:
    """Labels and per-doc trained counts under the `lm` objective."""
    labels = doc_labels(unit.ids, unit.offsets, unit.spans, "lm")
    return labels, np.maximum(unit.lengths - 1, 0)


def join(results: list[UnitResult], n_templates: int) -> UnitResult:
    """Concatenate chunk results of one unit, in order."""
    if not results:
        empty = np.zeros(0, dtype=np.int32)
        return UnitResult(empty, np.zeros(1, dtype=np.int64), np.zeros((0, 3), np.int32),
                          np.zeros(0, np.int16), empty.copy(), np.zeros(max(n_templates, 1), np.int64),
                          np.zeros(0, np.int16), empty.copy(), np.zeros(0, np.int64))
    ids = np.concatenate([r.ids for r in results])
    offsets, spans, base_tok, base_doc = [np.zeros(1, np.int64)], [], 0, 0
    for r in results:
        offsets.append(r.offsets[1:] + base_tok)
        s = r.spans.copy()
        s[:, 0] += base_doc
        spans.append(s)
        base_tok += int(r.offsets[-1])
        base_doc += r.docs
    has_choices = results[0].choices is not None
    return UnitResult(
        ids=ids,
        offsets=np.concatenate(offsets),
        spans=np.concatenate(spans).astype(np.int32),
        template=np.concatenate([r.template for r in results]),
        row=np.concatenate([r.row for r in results]),
        skipped=np.sum([r.skipped for r in results], axis=0),
        shots=np.concatenate([r.shots for r in results]),
        sft_labels=np.concatenate([r.sft_labels for r in results]),
        sft_trained=np.concatenate([r.sft_trained for r in results]),
        truncated=sum(r.truncated for r in results),
        dropped=sum(r.dropped for r in results),
        straddles=sum(r.straddles for r in results),
        choices=[c for r in results for c in r.choices] if has_choices else None,
    )
