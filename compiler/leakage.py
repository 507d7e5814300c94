"""Leakage between training mixtures and eval / held-out examples.

Two checks, on every eval example against every example a stage trains on
(under any task):

- **example**: the whole example is the same: its key fields (a task's
  ``leakage.key``; default: every field not in ``leakage.context``), each
  normalised (lower case, runs of non-alphanumerics collapsed to one space),
  compared together as a set of values, at any length, so a duplicated
  two-word question with its answer is caught;
- **text**: one key field's text of at least ``MIN_WORDS`` words is a key
  field's text of a training example: the same passage reused by two datasets
  is caught even when the rest of the example differs. Shorter values (labels,
  ids, single words) repeat by nature and are compared only as part of a whole
  example.

Context fields (a story several questions ask about) are never compared.

>>> normalise("  The CAT -- sat!  ")
'the cat sat'
>>> k = keys({"q": "Is the sky blue today?", "label": "yes", "id": 7})
>>> sorted(k.texts), k.example
(['is the sky blue today'], ('7', 'is the sky blue today', 'yes'))
>>> keys({"story": "Once upon a time there was a cat.", "q": "Who?", "a": "a cat"}, context=["story"]).example
('a cat', 'who')
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

MIN_WORDS = 4
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)
# which check found a leaked example (the first that matched), as messages say it
KIND_WORDS = {"example": "as whole examples", "text": "by a shared long text"}


def normalise(text: str) -> str:
    return _NON_WORD.sub(" ", text.lower()).strip()


@dataclass(frozen=True)
class Keys:
    """What one example is compared by."""

    example: tuple[str, ...] | None  # the key fields' normalised values, sorted (None: nothing to compare)
    texts: frozenset[str]  # the key fields' normalised texts of at least MIN_WORDS words


def keys(row: dict[str, Any], key: Sequence[str] | None = None, context: Sequence[str] = ()) -> Keys:
    names = [k for k in (key if key is not None else row) if k not in context]
    values: list[str] = []
    texts: set[str] = set()
    for name in names:
        parts = [normalise(s) for s in _strings(row.get(name))]
        values.append(" ".join(p for p in parts if p))
        texts.update(p for p in parts if p.count(" ") + 1 >= MIN_WORDS)
    example = tuple(sorted(values)) if any(values) else None
    return Keys(example, frozenset(texts))


def _strings(value: Any) -> Iterable[str]:
    if value is None:
        return
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    else:  # numbers and booleans belong to the whole example (a label 0 is not a label 1)
        yield str(value)


@dataclass
class Leak:
    examples: int
    leaked: int = 0
    by_task: dict[str, int] = field(default_factory=dict)  # training task -> leaked examples found there
    by_kind: dict[str, int] = field(default_factory=dict)  # "example" | "text" -> leaked examples


def find(train: dict[str, list[Keys]], evals: dict[str, list[Keys]]) -> dict[str, Leak]:
    """Per eval task: how many examples are a training example or share a text with one, with which tasks."""
    whole: dict[tuple[str, ...], set[str]] = {}
    text: dict[str, set[str]] = {}
    for task, rows in train.items():
        for k in rows:
            if k.example is not None:
                whole.setdefault(k.example, set()).add(task)
            for t in k.texts:
                text.setdefault(t, set()).add(task)
    out = {}
    for task, rows in evals.items():
        leak = Leak(examples=len(rows))
        for k in rows:
            hits = whole.get(k.example, set()) if k.example is not None else set()
            kind = "example"
            if not hits:
                hits, kind = set().union(*(text.get(t, set()) for t in k.texts)), "text"
            if hits:
                leak.leaked += 1
                leak.by_kind[kind] = leak.by_kind.get(kind, 0) + 1
                for t in hits:
                    leak.by_task[t] = leak.by_task.get(t, 0) + 1
        out[task] = leak
    return out
