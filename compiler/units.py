"""Compile units: one task part (train or eval) rendered, tokenized, masked and truncated.

The main process decides, per source row, which documents to make (which
templates, which few-shot exemplars) with a generator seeded by the recipe,
then cuts the rows into fixed-size chunks, independent of the number of worker
processes, and joins the results in chunk order: the output is the same
whatever ``--workers`` says. Workers are separate processes, each tokenizing
on one thread, so ``--workers N`` means N cores.
"""

from __future__ import annotations

import gc
import itertools
import os
import signal
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import jinja2
import numpy as np

from . import promptsource
from .audit import Intended, audit_all
from .chat import ChatError, assistant_spans, end_tokens, exchange, prompt_before_reply, to_messages, with_system
from .pack import IGNORE, doc_labels
from .recipe import PAIRED_FORMATS, AnswerChoices, ChatFormat, ColumnChoices, CompletionFormat, FewShot, JinjaChoices
from .sandbox import OutOfTime, RenderLimit, watchdog
from .templates import Renderer, RenderError, TemplateSource, make_env, render_string
from .tokens import Encoded, Tiling, TokenizerInfo, encode_texts

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
    format: Any = field(default_factory=lambda: CompletionFormat(kind="completion"))  # a recipe `Format`
    few_shot: FewShot | None = None
    answer_choices: AnswerChoices | None = None
    record_choices: bool = False
    audit: str = "error"  # the recipe's `audit:`: a mask audit failure stops the compile, or is counted (`warn`)

    @property
    def from_messages(self) -> bool:
        """One document set per row read through `format` (chat `messages`, preference pairs), not templates."""
        return isinstance(self.format, ChatFormat) and self.format.messages is not None or \
            isinstance(self.format, PAIRED_FORMATS)


@dataclass(frozen=True)
class Chunk:
    unit: int  # index into the list of UnitSpecs
    rows: list[int]  # each row's index in its split, for messages
    columns: dict[str, list[Any]]
    docs: list[list[DocPlan]]  # per row: the documents to make from it


class DataError(ValueError):
    """A row's value that a task cannot use (answer choices that are not a list), or a one-string
    template of the task (system prompt, answer choices) that fails."""


class RowError(Exception):
    """A row could not be compiled; carries the task, part and row (None: no one row's fault) for the message."""

    def __init__(self, task: str, part: str, row: int | None, message: str, file: str | None = None,
                 line: int | None = None):
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
    cut: np.ndarray | None = None  # bool per doc: truncated to seq_len (None: none was)
    choices: list[dict | None] | None = None  # per doc; None for a doc whose row has no answer choices
    # template -> docs whose prompt ends, and completion starts, with a space
    spaced: dict[int, int] = field(default_factory=dict)
    # preference tasks (compiler/preference.py): per doc 0 chosen / 1 rejected (unpaired: desirable /
    # undesirable); `group` docs in a row make one example; pairs dropped by a check, per check
    side: np.ndarray | None = None
    group: int = 1
    checks: dict[str, int] = field(default_factory=dict)
    # the mask audit under `audit: warn`: per doc, whether it failed (None: none did); the first failure
    audit_failed: np.ndarray | None = None
    audit_example: str | None = None

    @property
    def docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


# ----------------------------------------------------------------- main side


def plan_docs(spec: UnitSpec, count: int, pool_size: int) -> Iterator[list[DocPlan]]:
    """Per row, in order, the documents to make: templates by policy, exemplars for few-shot.

    A pure function of the recipe's seed, the task and the part. Exemplars
    come from the train pool only and never include the row itself.
    """
    rng = np.random.default_rng([spec.seed, zlib.crc32(spec.task.encode("utf-8")), spec.part == "eval"])
    n_templates = len(spec.templates)
    fs = spec.few_shot
    self_in_pool = spec.part == "train"
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
        yield docs


# ----------------------------------------------------------------- worker side


class Worker:
    """What a worker process holds: the tokenizer, the unit specs, the few-shot pools, and each
    unit's templates, compiled on first use."""

    def __init__(self, info: TokenizerInfo, specs: list[UnitSpec], pools: dict[str, dict[str, list]]):
        from tokenizers import Tokenizer

        self.info = info
        self.backend = Tokenizer.from_str(info.json)
        self.specs = specs
        self.pools = pools
        self._units: dict[int, _Unit] = {}
        # The tokenizer's fast path (its byte tables and its self-check, ~0.1 s) built now, not on the
        # first chunk: a worker process starts before the main process has loaded the rows.
        try:
            Tiling.of(self.backend)
        except Exception:  # noqa: BLE001 - built again on the first chunk, whose error reporting says why
            pass

    def unit(self, index: int) -> "_Unit":
        if index not in self._units:
            spec = self.specs[index]
            self._units[index] = _Unit(
                spec=spec, renderer=Renderer(list(spec.templates)), system=_system_template(spec),
                choices_template=choices_template(spec.answer_choices), info=self.info, backend=self.backend,
                pool=self.pools.get(spec.task),
            )
        return self._units[index]

    def compile(self, chunk: Chunk) -> UnitResult:
        spec = self.specs[chunk.unit]
        try:
            unit = self.unit(chunk.unit)
        except RenderError as exc:  # a template that does not compile: not any one row's fault
            file, line = exc.template.place(exc.line)
            raise RowError(spec.task, spec.part, None, f"template '{exc.template.name}': {exc.message}",
                           file, line) from None
        except DataError as exc:
            raise RowError(spec.task, spec.part, None, str(exc)) from None
        return unit.compile(chunk)


# The pool's initializer and task function must be module-level names (a spawned
# process imports them), so each process keeps its one Worker here.
_worker: Worker | None = None


def init_worker(info: TokenizerInfo, specs: list[UnitSpec], pools: dict[str, dict[str, list]],
                single_thread: bool) -> None:
    """Per-process setup: the tokenizer, the templates and the few-shot pools, built once."""
    global _worker
    if single_thread:
        # One tokenizer thread per worker: --workers N uses N cores, no more.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker = Worker(info, specs, pools)


WORKER_SIGNALS = {signal.SIGTERM, signal.SIGINT}  # a forked worker's, set back to a new interpreter's


def init_worker_from(setup: str, single_thread: bool, parent: int | None = None, forked: bool = False) -> None:
    """:func:`init_worker` with the arguments pickled in the file ``setup`` (written by the process that
    spawns the workers): handing a megabyte of tokenizer to each new process through its start-up pipe
    would hold up the start of the next one until this one has read it. ``parent``: the file is not
    written yet (workers started ahead of the tokenizer's load): wait for it to appear, as long as the
    process ``parent`` that will write it is this one's parent. ``forked``: this process is a fork of
    the compile's, whose signal handlers it inherited: they are set back to a new interpreter's, so
    that ending a worker (SIGTERM) or Ctrl-C runs nothing the program that compiles had set up."""
    import pickle
    import time

    if forked:  # the forking process held these back (executors._launch) until this is done
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
    while parent is not None and not os.path.exists(setup):
        if os.getppid() != parent:  # the compile is gone: nothing will come
            raise SystemExit(1)
        time.sleep(0.002)
    with open(setup, "rb") as fh:
        info, specs, pools = pickle.load(fh)
    init_worker(info, specs, pools, single_thread)


def compile_chunk(chunk: Chunk) -> UnitResult:
    assert _worker is not None, "init_worker runs first in every process"
    # A chunk allocates ~100 Python objects per row (Jinja contexts, token lists) and frees them at
    # its end, none of them in a cycle that outlives the chunk; the cyclic collector would scan them
    # many times over (~5% of a chunk's time). It resumes after the chunk.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _worker.compile(chunk)
    finally:
        if enabled:
            gc.enable()


def _row(columns: dict[str, list], i: int) -> dict:
    return {k: v[i] for k, v in columns.items()}


def _seed(seed: int, row: int, template: int) -> int:
    return (seed * 1_000_003 + row) * 1_009 + template + 1


def _system_template(spec: UnitSpec) -> jinja2.Template | None:
    if not (isinstance(spec.format, ChatFormat) and spec.format.system):
        return None
    try:
        return make_env().from_string(spec.format.system)
    except jinja2.TemplateSyntaxError as exc:
        raise DataError(f"format.system: {type(exc).__name__}: {exc.message}") from None


def choices_template(choices: AnswerChoices | None) -> jinja2.Template | None:
    """The compiled Jinja of ``kind: jinja`` answer choices (None for the other kinds)."""
    if not isinstance(choices, JinjaChoices):
        return None
    try:
        return make_env().from_string(choices.template)
    except jinja2.TemplateSyntaxError as exc:
        raise DataError(f"answer_choices: {type(exc).__name__}: {exc.message}") from None


def _render_string(template: jinja2.Template, row: dict, what: str) -> str:
    try:
        return render_string(template, row)
    except (RenderLimit, OutOfTime) as exc:
        raise DataError(f"{what}: rendering stopped: {exc}") from None
    except Exception as exc:  # a Jinja runtime error: the row's values or the template's fault
        raise DataError(f"{what}: {type(exc).__name__}: {exc}") from None


def answer_choices(spec_choices: AnswerChoices | None, compiled: jinja2.Template | None,
                   renderer: Renderer, index: int, row: dict, seed: int) -> list[str] | None:
    """The answer choices of ``row`` under template ``index``: the template's own (promptsource),
    else the task's (a list, a column, or a Jinja string over the row, ``compiled`` by
    :func:`choices_template`)."""
    if index >= 0 and renderer.has_own_choices(index):
        return renderer.choices(index, row, seed)
    if spec_choices is None:
        return None
    if isinstance(spec_choices, list):
        return list(spec_choices)
    if isinstance(spec_choices, ColumnChoices):
        value = row.get(spec_choices.column)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataError(f"answer choices column `{spec_choices.column}` is not a list of strings")
        return list(value)
    template = compiled if compiled is not None else choices_template(spec_choices)
    assert template is not None  # the one kind left: `kind: jinja`
    text = _render_string(template, promptsource.protect(row), "answer_choices")
    return promptsource.split(text)


def template_context(spec_choices: AnswerChoices | None, compiled: jinja2.Template | None,
                     renderer: Renderer, index: int, row: dict, seed: int) -> tuple[dict, list[str] | None]:
    """What template ``index`` renders ``row`` with, and the row's answer choices.

    The row's columns, plus ``answer_choices`` when the task or template has
    them (a column of that name wins). ``tunec generate`` renders its prompts
    through this too, so inference sees what training saw.
    """
    choices = answer_choices(spec_choices, compiled, renderer, index, row, seed)
    ctx = row if choices is None or "answer_choices" in row else {**row, "answer_choices": choices}
    return ctx, choices


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
    replies: tuple[str, ...] = ()  # chat: the trained assistant turns' texts (what the mask audit holds spans to)

    @property
    def shots(self) -> int:
        return self.chat_shots if self.chat else len(self.prefix_cuts)


@dataclass(frozen=True)
class _Rendered:
    """One row under one template: the pieces a document is made of."""

    row: dict
    row_index: int
    template: int
    prompt: str
    completion: str
    shots: list[tuple[str, str]]  # few-shot exemplars, rendered by the same template
    choices: list[str] | None


@dataclass
class _Unit:
    """One unit's spec with what compiling its rows needs, built once per worker."""

    spec: UnitSpec
    renderer: Renderer
    system: jinja2.Template | None
    choices_template: jinja2.Template | None
    info: TokenizerInfo
    backend: Any  # tokenizers.Tokenizer
    pool: dict[str, list] | None

    @property
    def eos_text(self) -> str:
        """The EOS as text (what the mask audit expects after a completion)."""
        return self.backend.decode([self.info.eos_id], skip_special_tokens=False)

    def compile(self, chunk: Chunk) -> UnitResult:
        spec = self.spec
        if isinstance(spec.format, PAIRED_FORMATS):
            from . import preference

            with watchdog():
                return preference.compile_rows(self, chunk)
        skipped = np.zeros(max(len(spec.templates), 1), dtype=np.int64)
        docs: list[_Doc] = []
        with watchdog():  # one timer for the chunk's renderings, not one per rendering
            for i, row_index in enumerate(chunk.rows):
                row = _row(chunk.columns, i)
                try:
                    docs.extend(self.row_docs(row, row_index, chunk.docs[i], skipped))
                except RenderError as exc:
                    file, line = exc.template.place(exc.line)
                    raise RowError(spec.task, spec.part, row_index, f"template '{exc.template.name}': {exc.message}",
                                   file, line) from None
                except ChatError as exc:
                    raise RowError(spec.task, spec.part, row_index, f"chat: {exc}") from None
                except DataError as exc:
                    raise RowError(spec.task, spec.part, row_index, str(exc)) from None
        return self.collect(docs, self.encode(docs), skipped)

    def context(self, row: dict, t: int, seed: int) -> tuple[dict, list[str] | None]:
        return template_context(self.spec.answer_choices, self.choices_template, self.renderer, t, row, seed)

    def system_prompt(self, row: dict) -> str:
        assert self.system is not None  # called for tasks that have one
        return _render_string(self.system, row, "format.system")

    def row_docs(self, row: dict, row_index: int, plans: list[DocPlan], skipped: np.ndarray) -> list[_Doc]:
        spec = self.spec
        out = []
        for t, exemplars in plans:
            seed = _seed(spec.seed, row_index, t)
            if t == MESSAGES:
                out.append(self.messages_doc(row, row_index))
                continue
            ctx, choices = self.context(row, t, seed)
            pair = self.renderer.render(t, ctx, seed)
            if pair is None or (spec.templates[t].kind == "promptsource" and not pair[1].strip()):
                skipped[t] += 1
                continue
            prompt, completion = pair
            if not completion.strip():
                raise RenderError(spec.templates[t], None, "rendered an empty completion (nothing to train on); "
                                  "check the row's values or the template")
            shots = []
            for j in exemplars:
                assert self.pool is not None  # exemplars are planned from the pool
                ex_seed = _seed(spec.seed, -1 - j, t)
                ex_ctx, _ = self.context(_row(self.pool, j), t, ex_seed)
                ex = self.renderer.render(t, ex_ctx, ex_seed)
                if ex is not None and ex[1].strip():
                    shots.append(ex)
            out.append(self.make_doc(_Rendered(row, row_index, t, prompt, completion, shots, choices)))
        return out

    def messages_doc(self, row: dict, row_index: int) -> _Doc:
        """A conversation read from the task's `messages` column."""
        fmt = self.spec.format
        assert isinstance(fmt, ChatFormat) and fmt.messages is not None  # MESSAGES is planned for those only
        messages = with_system(self.system_prompt(row) if self.system is not None else None,
                               to_messages(row.get(fmt.messages), fmt.roles))
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        trained = [m["role"] == "assistant" and (fmt.train_on == "all" or i == last) for i, m in enumerate(messages)]
        text, spans = _chat_spans(self.info, messages, trained)
        record = None
        if self.spec.record_choices and self.spec.answer_choices is not None:
            choices = answer_choices(self.spec.answer_choices, self.choices_template, self.renderer, MESSAGES, row,
                                     _seed(self.spec.seed, row_index, MESSAGES))
            if choices is not None:
                record = _chat_choice(self.info, messages[:last], messages[last]["content"], choices, row_index,
                                      "messages")
        return _Doc(text, spans, MESSAGES, row_index, True, [], record,
                    replies=tuple(m["content"] for m, t in zip(messages, trained) if t))

    def make_doc(self, r: _Rendered) -> _Doc:
        spec = self.spec
        if isinstance(spec.format, ChatFormat):
            # the one function `tunec generate` builds its conversation with
            asked = exchange(self.system_prompt(r.row) if self.system is not None else None, r.shots, r.prompt)
            messages = asked + [{"role": "assistant", "content": r.completion.strip()}]
            trained = [False] * (len(messages) - 1) + [True]
            text, spans = _chat_spans(self.info, messages, trained)
            record = None
            if spec.record_choices and r.choices is not None:
                record = _chat_choice(self.info, asked, r.completion, r.choices, r.row_index,
                                      spec.templates[r.template].name)
            return _Doc(text, spans, r.template, r.row_index, True, [], record, messages=messages,
                        chat_shots=len(r.shots), replies=(messages[-1]["content"],))
        sep = spec.few_shot.separator if spec.few_shot else ""
        prefix, cuts = "", []
        for p, c in r.shots:
            prefix += p + c + sep
            cuts.append(len(prefix))
        text = prefix + r.prompt + r.completion
        record = None
        if spec.record_choices and r.choices is not None:
            target = r.completion.strip()
            record = {
                "row": r.row_index, "template": spec.templates[r.template].name, "prompt": prefix + r.prompt,
                "target": r.completion, "choices": r.choices,
                "answer": r.choices.index(target) if target in r.choices else -1,
                "choice_prefix": r.completion[: len(r.completion) - len(r.completion.lstrip())],
            }
        return _Doc(text, [(len(prefix) + len(r.prompt), len(text))], r.template, r.row_index, False, cuts, record)

    def encode(self, docs: list[_Doc]) -> list[Encoded]:
        out: list[Encoded | None] = [None] * len(docs)
        for chat in (False, True):
            idx = [i for i, d in enumerate(docs) if d.chat == chat]
            if not idx:
                continue
            encs = encode_texts(self.backend, self.info, [docs[i].text for i in idx], [docs[i].spans for i in idx],
                                add_special=not chat, append_eos=not chat)
            for i, enc in zip(idx, encs):
                out[i] = enc
        return out  # type: ignore[return-value]

    def fit_fewshot(self, doc: _Doc, enc: Encoded) -> tuple[_Doc, Encoded]:
        """Drop exemplars (the first ones first) until the document fits; never cut the example itself."""
        info, limit = self.info, self.spec.seq_len
        while len(enc.ids) > limit and doc.shots:
            if doc.chat:
                assert doc.messages is not None  # a chat document with exemplars keeps its conversation
                first = 1 if doc.messages[0]["role"] == "system" else 0
                messages = doc.messages[:first] + doc.messages[first + 2 :]  # one user/assistant exchange less
                trained = [False] * (len(messages) - 1) + [True]
                text, spans = _chat_spans(info, messages, trained)
                choice = doc.choice
                if choice is not None:  # its prompt loses the exchange too
                    choice = _chat_choice(info, messages[:-1], messages[-1]["content"], choice["choices"],
                                          choice["row"], choice["template"])
                doc = _Doc(text, spans, doc.template, doc.row, True, [], choice, messages=messages,
                           chat_shots=doc.chat_shots - 1, replies=doc.replies)
                (enc,) = encode_texts(self.backend, info, [text], [spans], add_special=False, append_eos=False)
                continue
            cut = doc.prefix_cuts[0]
            text = doc.text[cut:]
            spans = [(s - cut, e - cut) for s, e in doc.spans]
            choice = dict(doc.choice, prompt=doc.choice["prompt"][cut:]) if doc.choice else None
            doc = _Doc(text, spans, doc.template, doc.row, False, [c - cut for c in doc.prefix_cuts[1:]], choice)
            (enc,) = encode_texts(self.backend, info, [doc.text], [doc.spans], add_special=True, append_eos=True)
        return doc, enc

    def collect(self, docs: list[_Doc], encoded: list[Encoded], skipped: np.ndarray) -> UnitResult:
        spec = self.spec
        kept_ids: list[list[int]] = []  # each kept doc's ids, flattened once at the end
        offsets = [0]
        spans: list[tuple[int, int, int]] = []
        keep_t, keep_r, choices = [], [], []
        keep_s, keep_cut = [], []
        intended: list[Intended] = []  # what each kept doc's trained tokens must decode to (the mask audit)
        eos_text = self.eos_text
        spaced: dict[int, int] = {}
        truncated = dropped = straddles = 0
        limit = spec.seq_len
        for doc, enc in zip(docs, encoded):
            if len(enc.ids) > limit and doc.shots:
                doc, enc = self.fit_fewshot(doc, enc)
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
            keep_cut.append(len(enc.ids) > limit)
            d = len(offsets) - 1
            spans.extend((d, s, e) for s, e in doc_spans)
            straddles += enc.straddles
            keep_s.append(doc.shots)
            kept_ids.append(ids)
            offsets.append(offsets[-1] + len(ids))
            keep_t.append(doc.template)
            keep_r.append(doc.row)
            intended.append(_intended(doc, doc_spans, enc.straddles > 0, len(enc.ids) > limit, eos_text,
                                      end_tokens(self.info.json, self.info.special_tokens) if doc.chat else ()))
            if not doc.chat and doc.spans and doc.text[doc.spans[0][0] - 1 : doc.spans[0][0] + 1] == "  ":
                spaced[doc.template] = spaced.get(doc.template, 0) + 1
            if spec.record_choices:
                choices.append(doc.choice)
        ids_arr = np.fromiter(itertools.chain.from_iterable(kept_ids), dtype=np.int32, count=offsets[-1])
        offsets_arr = np.asarray(offsets, dtype=np.int64)
        spans_arr = np.asarray(spans, dtype=np.int32).reshape(-1, 3)
        sft_labels = doc_labels(ids_arr, offsets_arr, spans_arr, "sft")
        sft_trained = _per_doc(sft_labels != IGNORE, offsets_arr)
        wrong = audit_all(self.backend, ids_arr, offsets_arr, sft_labels, intended)
        failed, example = None, None
        if wrong:
            d, got, want = wrong[0]
            name = spec.templates[keep_t[d]].name if keep_t[d] >= 0 else "messages"
            why = ("a chat template that marks more than the assistant turn and its end-of-turn token, or nothing"
                   if intended[d].replies else "please report this as a tunec bug")
            example = (f"template '{name}': mask audit: the trained tokens decode to {_clip(got)}, not to the intended "
                       f"{_clip(want)}; {why}")
            if spec.audit == "error":
                raise RowError(spec.task, spec.part, keep_r[d], example + " (`audit: warn` compiles anyway)")
            example = f"row {keep_r[d]}, {example}"
            failed = np.zeros(len(intended), dtype=bool)
            failed[[w[0] for w in wrong]] = True
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
            cut=np.asarray(keep_cut, dtype=bool),
            choices=choices if spec.record_choices else None,
            spaced=spaced,
            audit_failed=failed,
            audit_example=example,
        )


def _intended(doc: _Doc, token_spans: list[tuple[int, int]], merged: bool, cut: bool, eos_text: str,
              ends: tuple[str, ...] = ()) -> Intended:
    """The mask audit's intended text of a doc: each trained span's characters; a template doc's
    last span also ends with the EOS the tokenizer step appends."""
    spans = [(s, e) for s, e in doc.spans if e > s]
    pieces = [doc.text[s:e] for s, e in spans]
    if not doc.chat and pieces and not pieces[-1].endswith(eos_text):
        pieces[-1] += eos_text
    before = [doc.text[max(0, s - 64):s] for s, _ in spans]
    return Intended(pieces, before, merged, cut, bool(token_spans) and token_spans[0][0] == 0,
                    replies=doc.replies if doc.chat else (), ends=ends)


def _clip(text: str, n: int = 120) -> str:
    return repr(text if len(text) <= n else text[: n // 2] + "…" + text[-n // 2 :])


def _chat_template(info: TokenizerInfo) -> str:
    if not info.chat_template:
        raise ChatError("the tokenizer has no chat template; set `tokenizer.chat_template` to a Jinja file")
    return info.chat_template


def _chat_spans(info: TokenizerInfo, messages: list[dict], trained: list[bool]) -> tuple[str, list[tuple[int, int]]]:
    return assistant_spans(_chat_template(info), messages, dict(info.special_tokens), trained,
                           end_tokens(info.json, info.special_tokens))


def _chat_choice(info: TokenizerInfo, asked: list[dict], reply: str, choices: list[str], row: int,
                 template: str) -> dict:
    """A chat eval document's answer choices: the conversation up to the reply, rendered as training
    rendered it, and the reply as the target (the same record as a completion task's)."""
    prompt, space = prompt_before_reply(_chat_template(info), asked, dict(info.special_tokens))
    target = reply.strip()
    return {"row": row, "template": template, "prompt": prompt, "target": target, "choices": choices,
            "answer": choices.index(target) if target in choices else -1, "choice_prefix": space}


def _per_doc(mask: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Count of true values in each document of a flat per-token mask."""
    if len(offsets) < 2:
        return np.zeros(0, np.int64)
    counts = np.add.reduceat(mask, offsets[:-1], dtype=np.int64) if len(mask) else np.zeros(len(offsets) - 1, np.int64)
    counts[np.diff(offsets) == 0] = 0  # reduceat reads one element for an empty range
    return counts
