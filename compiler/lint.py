"""Prompt lint: what makes instruction data bad, found in the rendered prompts before any training.

Each rule has an id, says what it found in one line, and points at the recipe
(``FILE:LINE:COL`` of the task's template entry, or the task). A recipe turns
rules off or changes their thresholds with its top-level ``lint:`` block::

    lint: {disable: [short-instruction], label_ratio: 20}

The rules read a task's rows through its templates exactly as the compiler
renders them (answer choices included, few-shot exemplars left out), on the
first :data:`SAMPLE_ROWS` rows of the part the task trains on (its eval part
for a task that is only evaluated); duplicates are counted over every row.

======================  ===================================================================
id                      fires when
======================  ===================================================================
label-in-prompt         the completion appears verbatim in the prompt (outside a longer
                        input text that contains it, and not as one of a list naming every
                        label) in at least ``leak_share`` of the rows
constant-prompt         a template renders the same prompt for every row: it ignores its inputs
choices-not-in-prompt   a task with answer choices has a template whose prompt does not name
                        every choice (in at least half of the rows)
separator               the prompt ends in whitespace and the completion starts with it
                        (two separators), or neither has one (``Answer:positive``)
whitespace-variant      two templates of a task differ only in whitespace
short-instruction       the prompt's instructing words (the template's own, an ``instruction``
                        or ``question`` column's, short framing values such as a language name;
                        not its inputs) number fewer than ``min_instruction_words``
label-imbalance         a classification task's most frequent completion outnumbers its least
                        frequent by more than ``label_ratio``
duplicate-examples      rows of a task repeat another row exactly (more than ``duplicate_share``)
======================  ===================================================================
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .check import Checked
from .errors import Problem
from .load import display_path
from .plan import LintFinding
from .recipe import LintConfig, PromptsourceTemplates, Task
from .sandbox import OutOfTime, watchdog
from .sources import Rows, load_part
from .templates import Renderer, TemplateSource

# Bump when a rule, or what it reads, changes: findings cached by an older version are then never used.
RULES_VERSION = 1
SAMPLE_ROWS = 2000  # rows rendered per task: enough for shares and counts, cheap beside a compile
_MAX_LABELS = 20  # a task with at most this many distinct completions is read as a classification task
_WORD = re.compile(r"\w+")
# Columns whose text is the instruction (alpaca-style data): their words count as the instruction's.
INSTRUCTION_COLUMNS = frozenset({"instruction", "question", "prompt", "query", "request", "task"})

RULES = ("label-in-prompt", "constant-prompt", "choices-not-in-prompt", "separator", "whitespace-variant",
         "short-instruction", "label-imbalance", "duplicate-examples")


@dataclass(frozen=True)
class Finding:
    """One lint finding: the plan stores it as ``{id, message, location, task, template}``."""

    id: str
    message: str
    location: str | None  # "FILE:LINE:COL" (or FILE:LINE, FILE), None when the place is unknown
    task: str
    template: str | None = None

    def __str__(self) -> str:
        return f"{self.location + ': ' if self.location else ''}[{self.id}] {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "message": self.message, "location": self.location, "task": self.task,
                "template": self.template}


@dataclass(frozen=True)
class _Pair:
    row: dict
    prompt: str
    completion: str
    choices: list[str] | None


def location(problem: Problem) -> str | None:
    """``FILE:LINE:COL`` (as far as known) of a located problem."""
    if not problem.file:
        return None
    out = problem.file
    if problem.line is not None:
        out += f":{problem.line}"
        if problem.col is not None:
            out += f":{problem.col}"
    return out


def lint(checked: Checked, rows: dict[str, Rows]) -> list[Finding]:
    """Every enabled rule over every task in ``rows`` (task -> the rows it trains on), in recipe order."""
    config: LintConfig = checked.recipe.lint
    out: list[Finding] = []
    for name, part in rows.items():
        task = checked.recipe.tasks[name]
        out.extend(_task_findings(checked, name, task, part, config))
    return [f for f in out if f.id not in config.disable]


def _task_findings(checked: Checked, name: str, task: Task, rows: Rows, config: LintConfig,
                   tap: "DigestTap | None" = None) -> list[Finding]:
    loaded = checked.loaded
    sources = checked.templates[name]
    places = _template_places(checked, name, task, sources)

    def at(loc: tuple) -> str | None:
        return location(loaded.problem(loc, ""))

    out = _template_rules(checked, name, task, rows, config, sources, places, at)
    # last: with a tap, it waits for the compile to have converted every row (the finding is listed first)
    dup = _duplicates(rows, tap.wait() if tap is not None else None)
    if dup is not None and dup[0] / rows.count > config.duplicate_share:
        count, first, again = dup
        out.insert(0, Finding("duplicate-examples", f"task '{name}': {count} of {rows.count} rows repeat an earlier "
                              f"row exactly (row {again} repeats row {first}); deduplicate the data",
                              at(("tasks", name, "source")), name))
    return out


def _template_rules(checked: Checked, name: str, task: Task, rows: Rows, config: LintConfig,
                    sources: tuple[TemplateSource, ...], places: list[str | None],
                    at: Callable[[tuple], str | None]) -> list[Finding]:
    """The rules over the task's templates and the rows they render (all but the duplicate rule)."""
    out: list[Finding] = []
    if not sources:
        return out
    for a in range(len(sources)):
        for b in range(a + 1, len(sources)):
            if sources[a].text != sources[b].text and _squeezed(sources[a]) == _squeezed(sources[b]):
                out.append(Finding("whitespace-variant", f"task '{name}': templates '{sources[a].name}' and "
                                   f"'{sources[b].name}' differ only in whitespace: one wording counted twice",
                                   places[b], name, sources[b].name))
    pairs = _render(task, sources, rows)
    chat = task.format.kind == "chat"
    for t, source in enumerate(sources):
        got = pairs[t]
        if not got:
            continue
        where, tname = places[t], source.name
        out.extend(_template_findings(name, tname, where, got, config, chat))
    # label imbalance: the task's labels as its first template renders them
    sample = next((p for p in pairs if p), None)
    if sample is not None:
        labels = Counter(p.completion.strip() for p in sample)
        classes = task.answer_choices is not None or (len(labels) <= _MAX_LABELS and len(sample) >= 2 * len(labels))
        if classes and len(labels) >= 2:
            (top, most), (low, least) = labels.most_common(1)[0], labels.most_common()[-1]
            if most / least > config.label_ratio:
                out.append(Finding("label-imbalance", f"task '{name}': label '{top}' occurs {most} times, '{low}' "
                                   f"{least} times (ratio {most / least:.1f} > {config.label_ratio:g}, first "
                                   f"{len(sample)} rows); rebalance, or raise `lint.label_ratio`",
                                   at(("tasks", name, "source")), name))
    return out


def _template_findings(task: str, tname: str, where: str | None, pairs: list[_Pair], config: LintConfig,
                       chat: bool) -> list[Finding]:
    out = []
    n = len(pairs)
    who = f"task '{task}', template '{tname}'"
    leaks = _leaks(pairs)
    if leaks and len(leaks) / n >= config.leak_share:
        out.append(Finding("label-in-prompt", f"{who}: the completion appears verbatim in the prompt in {len(leaks)} "
                           f"of {n} rows (first: row {leaks[0]}); the template gives the answer away", where, task,
                           tname))
    distinct_rows = len({json.dumps(p.row, sort_keys=True, default=str) for p in pairs})
    if distinct_rows >= 2 and len({p.prompt for p in pairs}) == 1:
        out.append(Finding("constant-prompt", f"{who}: renders the same prompt for all {n} rows; it ignores its "
                           "inputs", where, task, tname))
    with_choices = [p for p in pairs if p.choices]
    missing = [p for p in with_choices if not all(_mentions(p.prompt, c) for c in p.choices or [])]
    if with_choices and len(missing) * 2 >= len(with_choices):
        absent = [c for c in missing[0].choices or [] if not _mentions(missing[0].prompt, c)]
        out.append(Finding("choices-not-in-prompt", f"{who}: the prompt does not name the answer choice(s) "
                           f"{', '.join(repr(c) for c in absent)} in {len(missing)} of {len(with_choices)} rows; "
                           "a classification prompt should list what it may answer", where, task, tname))
    if not chat:
        double = sum(1 for p in pairs if p.prompt[-1:].isspace() and p.completion[:1].isspace())
        none = sum(1 for p in pairs if p.prompt and p.completion and not p.prompt[-1].isspace()
                   and not p.completion[0].isspace())
        if double:
            out.append(Finding("separator", f"{who}: {double} of {n} prompts end in whitespace and their completion "
                               "starts with it too (two separators, the second one trained); end the prompt "
                               "without it", where, task, tname))
        if none:
            out.append(Finding("separator", f"{who}: {none} of {n} prompts run straight into their completion "
                               "(no whitespace on either side, as in `Answer:positive`); start the completion with "
                               "a space", where, task, tname))
    words = min(_instruction_words(p) for p in pairs)
    if words < config.min_instruction_words:
        out.append(Finding("short-instruction", f"{who}: the instruction has {words} word(s) of its own (fewer than "
                           f"{config.min_instruction_words}); say what the model should do", where, task, tname))
    return out


def _render(task: Task, sources: tuple[TemplateSource, ...], rows: Rows) -> list[list[_Pair]]:
    """Per template, the first rows rendered as the compiler renders them; rows that fail are left out
    (compile reports them, located)."""
    from .units import DataError, choices_template, template_context

    renderer = Renderer(list(sources))
    try:
        compiled = choices_template(task.answer_choices)
    except DataError:
        return [[] for _ in sources]
    out: list[list[_Pair]] = [[] for _ in sources]
    count = min(rows.count, SAMPLE_ROWS)
    columns = rows.slice(0, count)  # only the sampled rows leave Arrow
    with watchdog():  # one timer for the task's renderings, as a compile chunk has
        for i in range(count):
            row = {k: v[i] for k, v in columns.items()}
            for t in range(len(sources)):
                try:
                    ctx, choices = template_context(task.answer_choices, compiled, renderer, t, row, 0)
                    pair = renderer.render(t, ctx, 0)
                except (Exception, OutOfTime):  # noqa: BLE001 - a row the compiler reports, located
                    continue
                if pair is not None and pair[1].strip():
                    out[t].append(_Pair(row, pair[0], pair[1], choices))
    return out


def _leaks(pairs: list[_Pair]) -> list[int]:
    """Rows whose completion the prompt gives away.

    Not a leak: the completion inside a longer input value that holds it (an
    extractive answer in its passage), and a prompt that names every label of
    a classification task (``positive or negative?``).
    """
    labels = {p.completion.strip() for p in pairs}
    classes = len(labels) <= _MAX_LABELS and len(pairs) >= 2 * len(labels)
    out = []
    for i, p in enumerate(pairs):
        answer = p.completion.strip()
        if not answer:
            continue
        prompt = p.prompt
        for value in p.row.values():
            if isinstance(value, str) and len(value.strip()) > len(answer) and answer in value:
                prompt = prompt.replace(value.strip(), "\0")
        if not _mentions(prompt, answer):
            continue
        others = set(p.choices or ()) | (labels if classes else set())
        if len(others) >= 2 and all(_mentions(prompt, o) for o in others):
            continue  # the prompt lists every label: the answer is one of them, not given away
        out.append(i)
    return out


def _mentions(text: str, word: str) -> bool:
    """``word`` in ``text`` as a whole word (case-insensitive), where it starts and ends with word characters."""
    word = word.strip()
    if not word:
        return False
    if word.isascii() and "\0" not in word:
        # The same answer without a regex (a long answer compiled as a pattern costs milliseconds and
        # overflows re's cache, once per row): over ASCII, IGNORECASE compares what lower() does and
        # \w is [A-Za-z0-9_]; the text's other characters are mapped, one for one, to what they are
        # to an ASCII word (see _AsciiView).
        return _mentions_ascii(text.lower() if text.isascii() else text.translate(_ASCII_VIEW), word.lower())
    pattern = re.escape(word)
    if _WORD.match(word[0]):
        pattern = r"(?<!\w)" + pattern
    if _WORD.match(word[-1]):
        pattern += r"(?!\w)"
    return re.search(pattern, text, flags=re.IGNORECASE) is not None


class _AsciiView(dict):
    """``str.translate`` table: a character as an ASCII word sees it under IGNORECASE, one for one.

    ASCII letters are lowered; a character the regex would match with an ASCII letter (the Kelvin
    sign, the long s, the dotted capital I...) becomes that letter; any other word character
    becomes ``A`` (a word character no lowered word holds), anything else NUL (the callers
    leave a word with NUL to the regex). Filled on first sight of each character.
    """

    def __missing__(self, code: int) -> str:
        c = chr(code)
        if c.isascii() and not c.isalpha():
            out = c  # digits and `_` are word characters to both; the rest to neither
        else:
            same = [a for a in "abcdefghijklmnopqrstuvwxyz" if re.fullmatch(a, c, flags=re.IGNORECASE)]
            out = same[0] if same else ("A" if re.fullmatch(r"\w", c) else "\0")
        self[code] = out
        return out


_ASCII_VIEW = _AsciiView()


def _ascii_word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


def _mentions_ascii(text: str, word: str) -> bool:
    """:func:`_mentions` of lower-cased ASCII strings."""
    start_bounded, end_bounded = _ascii_word_char(word[0]), _ascii_word_char(word[-1])
    i = text.find(word)
    while i >= 0:
        j = i + len(word)
        if not (start_bounded and i > 0 and _ascii_word_char(text[i - 1])) and \
                not (end_bounded and j < len(text) and _ascii_word_char(text[j])):
            return True
        i = text.find(word, i + 1)
    return False


def _instruction_words(p: _Pair) -> int:
    """Words of the prompt that instruct: the template's own, those of a column that holds the
    instruction itself (``instruction``, ``question``... as alpaca-style data has), and short values
    that frame it (a language name); the inputs (values of three words or more) taken out."""
    prompt = p.prompt
    inputs = [str(v).strip() for k, v in p.row.items() if isinstance(v, (str, int, float))
              and k not in INSTRUCTION_COLUMNS and len(_WORD.findall(str(v))) >= 3]
    for v in sorted(inputs, key=len, reverse=True):
        prompt = prompt.replace(v, " ")
    return len(_WORD.findall(prompt))


def _squeezed(source: TemplateSource) -> str:
    return "".join(source.text.split()) + "\0" + "".join((source.answer_choices or "").split())


def _duplicates(rows: Rows, digests: np.ndarray | None = None) -> tuple[int, int, int] | None:
    """``(repeated rows, first row, its first repeat)`` over all rows, or None when none repeats.
    ``digests``: every row's :func:`_row_digest`, in order (a :class:`DigestTap`'s), instead of
    converting the rows out of Arrow here."""
    if digests is not None:
        return _duplicates_of(digests, rows.index)
    seen: dict[int, int] = {}  # a row's digest -> its first position
    count, first = 0, None
    for lo, columns in rows.slices():  # a slice of rows out of Arrow at a time
        names = sorted(columns)
        for j, values in enumerate(zip(*(columns[c] for c in names))):
            key = _row_digest(values)
            i = lo + j
            if key in seen:
                count += 1
                if first is None:
                    first = (int(rows.index[seen[key]]), int(rows.index[i]))
            else:
                seen[key] = i
    return None if first is None else (count, *first)


def _duplicates_of(digests: np.ndarray, index: np.ndarray) -> tuple[int, int, int] | None:
    """:func:`_duplicates` over the rows' digests: the rows whose digest an earlier row has, and the
    first of them with the first row that has its digest."""
    order = np.argsort(digests, kind="stable")  # equal digests stay in row order: a group's first is its first row
    ranked = digests[order]
    same = ranked[1:] == ranked[:-1]
    count = int(same.sum())
    if count == 0:
        return None
    repeats = order[1:][same]
    again = int(repeats.min())
    starts = np.flatnonzero(np.concatenate([[True], ~same]))  # where each group of equal digests starts
    rank = int(np.flatnonzero(order == again)[0])
    first = int(order[starts[np.searchsorted(starts, rank, side="right") - 1]])
    return count, int(index[first]), int(index[again])


class DigestTap:
    """Every row's :func:`_row_digest` for one part, taken from the columns the compile converts out of
    Arrow for its chunks anyway, so that the duplicate rule need not convert every row a second time.

    The compile feeds it each slice in order (:meth:`feed`) and closes it (:meth:`close`: whole or not,
    for a part it did not stream or a failed compile); the rule waits for it (:meth:`wait`), and reads
    the rows itself when the tap did not get them all."""

    def __init__(self, count: int):
        self.digests = np.empty(count, np.int64)
        self.filled = 0
        self.whole = False
        self._usable = True
        self._closed = threading.Event()

    def feed(self, lo: int, columns: dict[str, list[Any]]) -> None:
        names = sorted(columns)
        if lo != self.filled or not names:  # out of order, or no column to tell rows apart by: read them again
            self._usable = False
            return
        values = list(zip(*(columns[c] for c in names)))
        if lo + len(values) > len(self.digests):
            self._usable = False
            return
        self.digests[lo:lo + len(values)] = [_row_digest(v) for v in values]
        self.filled += len(values)

    def close(self, whole: bool) -> None:
        """Done feeding: ``whole`` when every row was fed. Only the first close counts."""
        if not self._closed.is_set():
            self.whole = whole and self._usable and self.filled == len(self.digests)
            self._closed.set()

    def wait(self) -> np.ndarray | None:
        self._closed.wait()
        return self.digests if self.whole else None


_JSON = json.JSONEncoder(default=str, ensure_ascii=False).encode  # what a row's values print as, JSON


def _row_digest(values: tuple) -> int:
    """64-bit digest of a row's values (columns in name order): two rows get the same one when each of
    their values prints as the same JSON. Python's own hash of the values, a string as itself, any
    other value as its JSON text (kept apart from strings), unless that is a JSON string (a value
    printed through ``str``): then as the string it holds, as equal JSON requires. Two different rows
    share a digest once in 2**64 pairs (a duplicate warning, never a change to the data)."""
    if all(type(v) is str for v in values):
        return hash(values)
    return hash(tuple(v if type(v) is str else _json_value(v) for v in values))


_JSON_SCALARS = {int: int.__repr__, bool: lambda v: "true" if v else "false", type(None): lambda v: "null"}


def _json_value(value: Any) -> Any:
    scalar = _JSON_SCALARS.get(type(value))
    if scalar is not None:  # what the encoder prints for them, without its call (an id column: every row)
        return ("json", scalar(value))
    text = _JSON(value)
    return json.loads(text) if text.startswith('"') else ("json", text)


def _template_places(checked: Checked, name: str, task: Task, sources: tuple[TemplateSource, ...]) -> list[str | None]:
    """Each template's location: the recipe's entry naming it, or for a promptsource template its own
    line in its file."""
    loaded = checked.loaded
    places: list[str | None] = []
    k = 0
    for i, ref in enumerate(task.templates):
        here = location(loaded.problem(("tasks", name, "templates", i), ""))
        if isinstance(ref, PromptsourceTemplates):  # one entry, many templates: each at its own line of its file
            shown = display_path(loaded.resolve(ref.path))
            while k < len(sources) and sources[k].kind == "promptsource" and sources[k].filename == shown:
                places.append(f"{shown}:{sources[k].first_line}")
                k += 1
        elif k < len(sources):
            places.append(here)
            k += 1
    places.extend([None] * (len(sources) - len(places)))
    return places


def lint_part(checked: Checked, name: str) -> str:
    """The part of task ``name`` the rules read: the one it trains on, its eval part when it is only evaluated."""
    task = checked.recipe.tasks[name]
    trained = any(name in s.tasks for s in checked.recipe.stages)
    return "train" if trained or task.eval is None else "eval"


def task_key(checked: Checked, name: str, part: str) -> str:
    """sha256 of everything one task's findings depend on, computed without reading its rows.

    The rules read the task's rows (the options that select and map them and the content of
    the files they come from, as a compile unit's key has them), its templates (texts, kinds,
    answer choices, separators) and where each is located in messages, the place of the
    task's ``source`` entry, the recipe's ``lint`` settings, and the code of the rules.
    """
    from . import __version__
    from .cache import code_versions, plain
    from .fileio import compact_json, sha256_text
    from .sources import part_inputs

    loaded = checked.loaded
    task = checked.recipe.tasks[name]
    sources = checked.templates[name]
    options, content = part_inputs(loaded, name, task, part)
    return sha256_text(compact_json({  # compact: the C encoder (a key, never read back)
        "code": code_versions(), "tunec": __version__, "rules": RULES_VERSION,
        "config": checked.recipe.lint.model_dump(mode="json"),
        "task": name, "part": part, "options": options, "content": content,
        "templates": plain(list(sources)), "places": _template_places(checked, name, task, sources),
        "source_at": location(loaded.problem(("tasks", name, "source"), "")),
    }))


def lint_recipe(checked: Checked, cache: Path | None = None,
                rows: Mapping[tuple[str, str], Rows] | None = None,
                taps: Mapping[tuple[str, str], DigestTap] | None = None) -> list[Finding]:
    """Lint each used task's rows (train part, else eval part), in recipe order.

    With a cache folder, each task's findings are kept there under :func:`task_key`, so a
    recompile lints again only the tasks whose rows, templates or settings changed (a
    template edited in one task lints that task alone) and reads no data for the others.
    ``rows``: parts already loaded (the compile's, keyed ``(task, part)``), read instead of
    loading them again; a part not in it is loaded here. ``taps``: the row digests of some of
    those parts, as the compile converts their rows (see :class:`DigestTap`).
    """
    config: LintConfig = checked.recipe.lint
    out: list[Finding] = []
    for name in checked.used_tasks():
        task = checked.recipe.tasks[name]
        part = lint_part(checked, name)
        path = None
        if cache is not None:
            path = _findings_path(cache, checked, name, part)
            stored = _read_findings(path)
            if stored is not None:
                out.extend(stored)
                continue
        given = rows.get((name, part)) if rows is not None else None
        part_rows = given if given is not None else load_part(checked.loaded, name, task, part, cache)
        tap = taps.get((name, part)) if taps is not None and given is not None else None
        found = [f for f in _task_findings(checked, name, task, part_rows, config, tap) if f.id not in config.disable]
        if path is not None:
            _write_findings(path, found)
        out.extend(found)
    return out


def _findings_path(cache: Path, checked: Checked, name: str, part: str) -> Path:
    """Where a task's findings are kept in the cache (:func:`task_key`)."""
    key = task_key(checked, name, part)
    return cache / "lint" / key[:2] / f"{key}.json"


class Background:
    """:func:`lint_recipe` in a thread, started once the compile has loaded the rows (:meth:`start`,
    the ``on_rows`` of :func:`.incremental.compile_units`): most of it runs while the workers compile
    the units and the main process only waits for them. :meth:`found` waits for it; None when it was
    never started. Its result does not depend on when it runs."""

    def __init__(self, checked: Checked, cache: Path | None):
        self.checked, self.cache = checked, cache
        self.thread: threading.Thread | None = None
        self.result: list[Finding] | None = None
        self.error: BaseException | None = None

    def start(self, rows: Mapping[tuple[str, str], Rows]) -> dict[tuple[str, str], DigestTap]:
        """Start the thread; returned: a tap for each part whose rows it will read and has no stored
        findings for, for the compile to feed and close (:class:`DigestTap`)."""
        taps = {}
        for name in self.checked.used_tasks():
            part = lint_part(self.checked, name)
            if (name, part) in rows and not self._stored(name, part):
                taps[(name, part)] = DigestTap(rows[(name, part)].count)

        def run() -> None:
            try:
                self.result = lint_recipe(self.checked, self.cache, rows, taps)
            except BaseException as exc:  # noqa: BLE001 - raised again in the compile's thread by found()
                self.error = exc

        self.thread = threading.Thread(target=run, name="tunec-lint", daemon=True)
        self.thread.start()
        return taps

    def _stored(self, name: str, part: str) -> bool:
        return self.cache is not None and _findings_path(self.cache, self.checked, name, part).is_file()

    def found(self) -> list[Finding] | None:
        if self.thread is None:
            return None
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result


_FINDING_KEYS = {"id", "message", "location", "task", "template"}


def _read_findings(path: Path) -> list[Finding] | None:
    """A task's stored findings; None when there are none stored, or the entry is not whole and valid
    (it is then linted again and rewritten)."""
    import logging

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        data = None
    ok = isinstance(data, list) and all(isinstance(f, dict) and set(f) == _FINDING_KEYS for f in data)
    if not ok:
        logging.getLogger(__name__).warning(f"cache: lint entry {path} is damaged; linting the task again")
        return None
    from .cache import touch

    touch(path)  # last use, for `tunec cache prune --older-than`
    return [Finding(**f) for f in data]


def _write_findings(path: Path, found: list[Finding]) -> None:
    from .fileio import atomic_write_text, canonical_json

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, canonical_json([f.as_dict() for f in found]))
    except OSError:
        pass  # a cache that cannot be written only costs time


def for_compile(checked: Checked, cache: Path | None = None,
                rows: Mapping[tuple[str, str], Rows] | None = None,
                found: list[Finding] | None = None) -> list[LintFinding]:
    """``tunec compile``'s lint: each finding logged as a warning, all of them returned for the plan.

    With a compile cache folder, findings are cached per task (:func:`lint_recipe`); ``rows``:
    the parts the compile has loaded, so that the lint does not read them again; ``found``: what
    :func:`lint_recipe` returned already (run while the units compiled, see :class:`Background`).
    """
    import logging

    if found is None:
        found = lint_recipe(checked, cache, rows)
    findings = [LintFinding.model_validate(f.as_dict()) for f in found]
    for f in findings:
        where = f"{f.location}: " if f.location else ""
        logging.getLogger(__name__).warning(f"lint: {where}[{f.id}] {f.message}")
    return findings
