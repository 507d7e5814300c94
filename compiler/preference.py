"""Preference data: rows of (prompt, chosen, rejected) made into pairs of documents.

Each pair becomes two documents that share the prompt, chosen first::

    row    {"q": "2+2?", "good": " 4", "bad": " 5"}       format: {kind: preference, prompt: "Q: {{ q }}\\nA:",
                                                                    chosen: good, rejected: bad}
    doc 0  Q: 2+2?\\nA:« 4<eos>»      side 0 (chosen)
    doc 1  Q: 2+2?\\nA:« 5<eos>»      side 1 (rejected)

Loss is taken on each response and the EOS (``«…»``), located from character
spans like every other document. The shapes a row can have:

- templates: ``prompt`` plus ``chosen``/``rejected``, each a column or Jinja over
  the row (a value holding ``{{`` or ``{%`` is Jinja);
- chat: a ``messages`` column plus ``chosen``/``rejected`` replies, or
  ``chosen``/``rejected`` columns holding two whole conversations whose shared
  prefix is found and checked;
- raw-text dialogues (``dialogue:``): ``"\\n\\nHuman: …\\n\\nAssistant: …"``, the
  prompt being everything up to and including the last assistant marker.

``kind: unpaired`` (KTO) makes one document per row, its side being 0 for a
desirable completion and 1 for an undesirable one.

A pair lives or dies whole: ``truncation: drop`` drops both documents,
``truncate`` cuts the shared prompt from the left first and the responses only
then. The static checks of a recipe that uses these formats are here too.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import jinja2
import numpy as np

from .audit import audit
from .chat import ChatError, to_messages, with_system
from .errors import Problem, did_you_mean
from .pack import IGNORE, doc_labels
from .recipe import (
    PREFERENCE_OBJECTIVES,
    DialogueMarkers,
    PreferenceFormat,
    UnpairedFormat,
)
from .templates import make_env, string_problems

if TYPE_CHECKING:
    from .load import LoadedRecipe
    from .units import Chunk, UnitResult, _Unit

logger = logging.getLogger(__name__)

CHOSEN, REJECTED = 0, 1
DESIRABLE, UNDESIRABLE = 0, 1
CHECKS = ("identical", "whitespace_only", "empty")
_CHECK_WORDS = {"identical": "chosen and rejected are the same text",
                "whitespace_only": "chosen and rejected differ only in whitespace",
                "empty": "a response is empty"}
_CHECK_SHORT = {"identical": "identical", "whitespace_only": "differing only in whitespace",
                "empty": "with an empty response"}


def is_jinja(value: str) -> bool:
    """A format value holding ``{{`` or ``{%`` is Jinja over the row; any other names a column."""
    return "{{" in value or "{%" in value


def group_size(fmt: Any) -> int:
    """Documents per example: 2 for a pair, 1 for an unpaired (KTO) example."""
    return 2 if isinstance(fmt, PreferenceFormat) else 1


# ----------------------------------------------------------------- static checks


def format_problems(loaded: "LoadedRecipe", name: str, fmt: PreferenceFormat | UnpairedFormat,
                    cols: list[str] | None) -> list[Problem]:
    """Columns named by the format exist; its Jinja values compile and read known columns."""
    problems: list[Problem] = []
    keys = ["prompt", "chosen", "rejected", "messages"] if isinstance(fmt, PreferenceFormat) \
        else ["prompt", "completion", "label"]
    for key in keys:
        value = getattr(fmt, key)
        loc = ("tasks", name, "format", key)
        if value is None:
            continue
        if key not in ("messages", "label") and is_jinja(value):
            problems.extend(loaded.problem(loc, m) for m in string_problems(value, cols))
        elif cols is not None and value not in cols:
            problems.append(loaded.problem(loc, f"column `{value}` is not in the task{did_you_mean(value, cols)}; "
                                                f"columns: {', '.join(cols)}"))
    if fmt.system:
        loc = ("tasks", name, "format", "system")
        problems.extend(loaded.problem(loc, m) for m in string_problems(fmt.system, cols))
    if isinstance(fmt, PreferenceFormat) and fmt.dialogue is not None:
        d = fmt.dialogue
        if d.user == d.assistant or d.user.startswith(d.assistant) or d.assistant.startswith(d.user):
            problems.append(loaded.problem(("tasks", name, "format", "dialogue"),
                                           "the `user` and `assistant` markers must differ (and neither start the "
                                           "other)"))
    return problems


def stage_problems(loaded: "LoadedRecipe") -> list[Problem]:
    """A preference objective trains on preference tasks only, and the reverse; a `reference` stage is earlier."""
    recipe = loaded.recipe
    problems = []
    earlier: list[str] = []
    for i, stage in enumerate(recipe.stages):
        kind = stage.objective.kind
        wants = {"kto": "unpaired"}.get(kind, "preference") if kind in PREFERENCE_OBJECTIVES else None
        for j, t in enumerate([*stage.tasks, *stage.held_out]):
            task = recipe.tasks.get(t)
            if task is None:
                continue  # an unknown task: reported by the name checks
            where = ("stages", i, "tasks", j) if j < len(stage.tasks) else \
                ("stages", i, "held_out", j - len(stage.tasks))
            has = task.format.kind
            if wants is not None and has != wants:
                hint = ("give the task `format: {kind: unpaired, prompt, completion, label}`" if wants == "unpaired"
                        else "give the task `format: {kind: preference, prompt, chosen, rejected}`")
                problems.append(loaded.problem(where, f"objective `{kind}` trains on `format: {wants}` tasks, but "
                                                      f"task '{t}' has `format: {has}`; {hint}, or train it in an "
                                                      "`sft` stage"))
            elif wants is None and has in ("preference", "unpaired"):
                problems.append(loaded.problem(where, f"task '{t}' has `format: {has}`, which objective `{kind}` "
                                                      "cannot train on; use `objective: dpo` (or simpo, orpo; kto for "
                                                      "`unpaired`), or give the task another format"))
        ref = getattr(stage.objective, "reference", "initial")
        if ref != "initial" and ref not in earlier:
            why = "a stage" if ref == stage.name else "an earlier stage"
            problems.append(loaded.problem(("stages", i, "objective", "reference"),
                                           f"`reference` is `initial` or {why}'s name; '{ref}' is not"
                                           f"{did_you_mean(ref, earlier)}"))
        earlier.append(stage.name)
    return problems


def warn_checks(units: dict) -> None:
    """One warning per task part whose pairs `format.checks: warn` dropped (the counts are in the plan too)."""
    for (task, part), unit in sorted(units.items()):
        if unit.checks:
            found = ", ".join(f"{n} {_CHECK_SHORT[k]}" for k, n in sorted(unit.checks.items()))
            logger.warning(f"task '{task}', {part}: dropped {sum(unit.checks.values())} pair(s): {found} "
                           "(`format.checks: warn`)")


# ----------------------------------------------------------------- rendering rows


def _value(spec: str, row: dict, env: jinja2.Environment, what: str) -> Any:
    from .units import DataError, _render_string

    if not is_jinja(spec):
        if spec not in row:
            raise DataError(f"format.{what}: no column `{spec}` in the row")
        return row[spec]
    return _render_string(env.from_string(spec), row, f"format.{what}")


def _text(spec: str, row: dict, env: jinja2.Environment, what: str) -> str:
    from .units import DataError

    value = _value(spec, row, env, what)
    if value is None:
        raise DataError(f"format.{what}: the row has no value (null)")
    if not isinstance(value, str):
        raise DataError(f"format.{what}: expected text, got {type(value).__name__}")
    return value


def parse_dialogue(text: str, markers: DialogueMarkers) -> list[tuple[str, int, int]]:
    """A raw-text dialogue as ``(role, start, end)`` turns: the character range of each turn's text
    (after its marker). The text must open with a marker and end with an assistant turn.

    >>> parse_dialogue("\\n\\nHuman: hi\\n\\nAssistant: hello", DialogueMarkers())
    [('user', 8, 11), ('assistant', 23, 29)]
    """
    found = []
    for role, mark in (("user", markers.user), ("assistant", markers.assistant)):
        at = text.find(mark)
        while at >= 0:
            found.append((at, role, len(mark)))
            at = text.find(mark, at + len(mark))
    found.sort()
    if not found or found[0][0] != 0:
        start = text[:40]
        raise ChatError(f"the dialogue starts with {start!r}, not with a speaker marker ({markers.user!r} or "
                        f"{markers.assistant!r}); set `format.dialogue.user` / `assistant` to the data's markers")
    turns = []
    for k, (at, role, n) in enumerate(found):
        end = found[k + 1][0] if k + 1 < len(found) else len(text)
        turns.append((role, at + n, end))
    if turns[-1][0] != "assistant":
        raise ChatError("the dialogue does not end with an assistant turn: nothing to train on")
    return turns


def _dialogue_split(text: str, markers: DialogueMarkers) -> tuple[str, str, list[dict]]:
    """(prompt through the last assistant marker, the last reply, the turns as chat messages)."""
    turns = parse_dialogue(text, markers)
    _, start, _ = turns[-1]
    messages = [{"role": r, "content": text[s:e].strip()} for r, s, e in turns]
    return text[:start], text[start:], messages


def _shared(chosen: list[dict], rejected: list[dict]) -> list[dict]:
    """The conversation both replies answer: both must be it plus one final assistant reply."""
    for side, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not msgs or msgs[-1]["role"] != "assistant":
            raise ChatError(f"the {side} conversation does not end with an assistant reply")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise ChatError("chosen and rejected share no prefix (their first turns differ); they must be one "
                        "conversation with two final replies")
    if n < len(chosen) - 1 or n < len(rejected) - 1 or len(chosen) != len(rejected):
        raise ChatError(f"chosen and rejected differ at turn {n}, before the last assistant turn; they must "
                        "share every turn but the final reply")
    return chosen[:-1]


def _check_pair(chosen: str, rejected: str) -> str | None:
    if not chosen.strip() or not rejected.strip():
        return "empty"
    if chosen == rejected:
        return "identical"
    if "".join(chosen.split()) == "".join(rejected.split()):
        return "whitespace_only"
    return None


def row_docs(unit: "_Unit", row: dict, row_index: int, checks: dict[str, int]) -> list:
    """The documents of one row: ``[chosen, rejected]``, ``[completion]`` (unpaired), or ``[]`` when the
    pair fails a check and the format says `checks: warn` (counted in ``checks``)."""
    from .units import MESSAGES, DataError, _chat_spans, _Doc

    fmt = unit.spec.format
    env = make_env()
    system = _text(fmt.system, row, env, "system") if fmt.system else None

    def chat_doc(asked: list[dict], reply: str) -> "_Doc":
        messages = asked + [{"role": "assistant", "content": reply.strip()}]
        text, spans = _chat_spans(unit.info, messages, [False] * (len(messages) - 1) + [True])
        return _Doc(text, spans, MESSAGES, row_index, True, [])

    def text_doc(prompt: str, reply: str) -> "_Doc":
        return _Doc(prompt + reply, [(len(prompt), len(prompt + reply))], MESSAGES, row_index, False, [])

    if isinstance(fmt, UnpairedFormat):
        prompt = _text(fmt.prompt, row, env, "prompt")
        completion = _text(fmt.completion, row, env, "completion")
        label = row.get(fmt.label)
        if not isinstance(label, bool):
            raise DataError(f"format.label: column `{fmt.label}` holds {label!r}; expected true (desirable) or "
                            "false (undesirable)")
        if not completion.strip():
            raise DataError("format.completion: the completion is empty (nothing to train on)")
        if fmt.chat:
            return [chat_doc(with_system(system, [{"role": "user", "content": prompt.strip()}]), completion)]
        return [text_doc(prompt, completion)]

    assert isinstance(fmt, PreferenceFormat)
    if fmt.dialogue is not None:
        try:
            pc, chosen, mc = _dialogue_split(_text(fmt.chosen, row, env, "chosen"), fmt.dialogue)
        except ChatError as exc:
            raise ChatError(f"chosen: {exc}") from None
        try:
            pr, rejected, mr = _dialogue_split(_text(fmt.rejected, row, env, "rejected"), fmt.dialogue)
        except ChatError as exc:
            raise ChatError(f"rejected: {exc}") from None
        asked = _shared(mc, mr)
        if not fmt.chat and pc != pr:
            raise ChatError("chosen and rejected differ before the last assistant turn; they must share every "
                            "turn but the final reply")
        prompt = pc
    elif fmt.messages is not None:
        asked = to_messages(row.get(fmt.messages), fmt.roles, reply=False) if row.get(fmt.messages) else []
        if not asked:
            raise DataError(f"format.messages: column `{fmt.messages}` holds no conversation")
        chosen = _text(fmt.chosen, row, env, "chosen")
        rejected = _text(fmt.rejected, row, env, "rejected")
        prompt = ""
    elif fmt.prompt is not None:
        prompt = _text(fmt.prompt, row, env, "prompt")
        chosen = _text(fmt.chosen, row, env, "chosen")
        rejected = _text(fmt.rejected, row, env, "rejected")
        asked = [{"role": "user", "content": prompt.strip()}]
    else:  # two whole conversations
        for what in ("chosen", "rejected"):
            if not isinstance(_value(getattr(fmt, what), row, env, what), list):
                raise DataError(f"format.{what}: expected a conversation (a list of turns), since the format has "
                                "no `prompt`, `messages` or `dialogue`")
        mc = to_messages(_value(fmt.chosen, row, env, "chosen"), fmt.roles)
        mr = to_messages(_value(fmt.rejected, row, env, "rejected"), fmt.roles)
        asked = _shared(mc, mr)
        chosen, rejected, prompt = mc[-1]["content"], mr[-1]["content"], ""
    problem = _check_pair(chosen, rejected)
    if problem is not None:
        if fmt.checks == "error":
            raise DataError(f"{_CHECK_WORDS[problem]}; fix the row, or set `format.checks: warn` to drop such "
                            "pairs (counted in the plan)")
        checks[problem] = checks.get(problem, 0) + 1
        return []
    chat = fmt.chat or fmt.messages is not None or (fmt.prompt is None and fmt.dialogue is None)
    if chat:
        asked = with_system(system, asked)
        return [chat_doc(asked, chosen), chat_doc(asked, rejected)]
    return [text_doc(prompt, chosen), text_doc(prompt, rejected)]


def compile_rows(unit: "_Unit", chunk: "Chunk") -> "UnitResult":
    """A chunk of a preference (or unpaired) task: its documents, encoded, truncated pair by pair, audited."""
    from .units import DataError, RowError, _row

    spec = unit.spec
    docs: list = []
    checks: dict[str, int] = {}
    side: list[int] = []
    for i, row_index in enumerate(chunk.rows):
        row = _row(chunk.columns, i)
        try:
            made = row_docs(unit, row, row_index, checks)
        except ChatError as exc:
            raise RowError(spec.task, spec.part, row_index, f"{spec.format.kind}: {exc}") from None
        except DataError as exc:
            raise RowError(spec.task, spec.part, row_index, str(exc)) from None
        docs.extend(made)
        if isinstance(spec.format, UnpairedFormat) and made:
            side.append(DESIRABLE if row[spec.format.label] else UNDESIRABLE)
        else:
            side.extend([CHOSEN, REJECTED][: len(made)])
    return collect(unit, docs, unit.encode(docs), side, checks)


def _fit(ids: list[int], spans: list[tuple[int, int]], cut_prompt: int, keep_first: int,
         length: int) -> tuple[list[int], list[tuple[int, int]], bool]:
    """Drop ``cut_prompt`` prompt tokens after the first ``keep_first`` (a BOS), then cut to ``length``
    tokens; also say whether the response was cut."""
    if cut_prompt:
        ids = ids[:keep_first] + ids[keep_first + cut_prompt:]
        spans = [(s - cut_prompt, e - cut_prompt) for s, e in spans]
    if len(ids) <= length:
        return ids, spans, False
    return ids[:length], [(s, min(e, length)) for s, e in spans if s < length], True


def _cap(lengths: list[int], limit: int) -> int:
    """The largest per-document length ``c`` with ``sum(min(l, c)) <= limit``: the longest sides are cut first."""
    c = max(lengths)
    while c > 0 and sum(min(n, c) for n in lengths) > limit:
        c -= 1
    return c


def collect(unit: "_Unit", docs: list, encoded: list, side: list[int], checks: dict[str, int]) -> "UnitResult":
    """Like :meth:`tunec.compiler.units._Unit.collect`, with truncation decided per pair."""
    from .units import RowError, UnitResult, _clip, _intended, _per_doc

    spec, info = unit.spec, unit.info
    g = group_size(spec.format)
    limit = spec.seq_len
    flat: list[int] = []
    offsets = [0]
    spans: list[tuple[int, int, int]] = []
    keep_r, keep_side, keep_cut, intended = [], [], [], []
    truncated = dropped = straddles = 0
    eos_text = unit.eos_text
    for k in range(0, len(docs), g):
        group = list(zip(docs[k:k + g], encoded[k:k + g]))
        total = sum(len(enc.ids) for _, enc in group)  # a pair is packed into one row: both sides count
        if total > limit:
            what = f"pair is {total} tokens (both sides)" if g == 2 else f"example is {total} tokens"
            if spec.truncation == "error":
                raise RowError(spec.task, spec.part, group[0][0].row,
                               f"{what}, longer than seq_len {limit}; set `truncation: drop` or `truncate`, or raise "
                               "`seq_len`")
            if spec.truncation == "drop":
                dropped += g
                continue
            # the shared prompt goes first, from the left (after a BOS): the responses stay whole if they can
            bos = 1 if info.bos_id is not None and group[0][1].ids[:1] == [info.bos_id] else 0
            prompt = min(enc.spans[0][0] if enc.spans else len(enc.ids) for _, enc in group)
            cut = min(-(-(total - limit) // g), max(prompt - bos - 1, 0))
            cap = _cap([len(enc.ids) - cut for _, enc in group], limit)
            fitted = [_fit(enc.ids, enc.spans, cut, bos, cap) for _, enc in group]
            truncated += g
        else:
            fitted = [(enc.ids, enc.spans, False) for _, enc in group]
        for j, ((doc, enc), (ids, doc_spans, cut_response)) in enumerate(zip(group, fitted)):
            d = len(offsets) - 1
            spans.extend((d, s, e) for s, e in doc_spans)
            straddles += enc.straddles
            flat.extend(ids)
            offsets.append(len(flat))
            keep_r.append(doc.row)
            keep_side.append(side[k + j])
            keep_cut.append(len(ids) < len(enc.ids))
            intended.append(_intended(doc, doc_spans, enc.straddles > 0, cut_response, eos_text))
    ids_arr = np.asarray(flat, dtype=np.int32)
    offsets_arr = np.asarray(offsets, dtype=np.int64)
    spans_arr = np.asarray(spans, dtype=np.int32).reshape(-1, 3)
    sft_labels = doc_labels(ids_arr, offsets_arr, spans_arr, "sft")
    sft_trained = _per_doc(sft_labels != IGNORE, offsets_arr)
    wrong = audit(unit.backend, ids_arr, offsets_arr, sft_labels, intended)
    if wrong is not None:
        d, got, want = wrong
        raise RowError(spec.task, spec.part, keep_r[d], f"mask audit: the trained tokens decode to {_clip(got)}, "
                       f"not to the intended {_clip(want)}; please report this as a tunec bug")
    n = len(keep_r)
    return UnitResult(
        ids=ids_arr, offsets=offsets_arr, spans=spans_arr,
        template=np.full(n, -1, dtype=np.int16), row=np.asarray(keep_r, dtype=np.int32),
        skipped=np.zeros(1, np.int64), shots=np.zeros(n, np.int16), sft_labels=sft_labels, sft_trained=sft_trained,
        truncated=truncated, dropped=dropped, straddles=straddles, cut=np.asarray(keep_cut, dtype=bool),
        side=np.asarray(keep_side, dtype=np.int8), group=g, checks=checks,
    )
