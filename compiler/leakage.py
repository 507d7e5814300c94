"""Leakage between training mixtures and eval / held-out examples.

An example's *texts* are its string values of at least ``MIN_WORDS`` words,
normalised (lower case, runs of non-alphanumerics collapsed to one space).
Short values (labels, ids, single words) are left out: they repeat by nature.
An eval example leaks when one of its texts is also a text of an example in a
training mixture, under any task: the same passage reused by two datasets is
caught as well as a row copied from test to train.

>>> normalise("  The CAT -- sat!  ")
'the cat sat'
>>> sorted(texts({"q": "Is the sky blue today?", "label": "yes", "id": 7}))
['is the sky blue today']
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

MIN_WORDS = 4
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalise(text: str) -> str:
    return _NON_WORD.sub(" ", text.lower()).strip()


def texts(row: dict[str, Any]) -> set[str]:
    out = set()
    for value in row.values():
        for s in _strings(value):
            n = normalise(s)
            if n.count(" ") + 1 >= MIN_WORDS:
                out.add(n)
    return out


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)


@dataclass
class Leak:
    examples: int
    leaked: int = 0
    by_task: dict[str, int] = field(default_factory=dict)  # training task -> leaked examples found there


def find(train: dict[str, list[set[str]]], evals: dict[str, list[set[str]]]) -> dict[str, Leak]:
    """Per eval task: how many examples share a text with a training example, and with which tasks."""
    owner: dict[str, set[str]] = {}
    for task, rows in train.items():
        for keys in rows:
            for k in keys:
                owner.setdefault(k, set()).add(task)
    out = {}
    for task, rows in evals.items():
        leak = Leak(examples=len(rows))
        for keys in rows:
            hits = set().union(*(owner.get(k, set()) for k in keys)) if keys else set()
            if hits:
                leak.leaked += 1
                for t in hits:
                    leak.by_task[t] = leak.by_task.get(t, 0) + 1
        out[task] = leak
    return out
