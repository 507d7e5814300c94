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

The check itself runs on 64-bit hashes of the normalised keys (:class:`Hashed`),
vectorised with numpy: a million examples cost a few arrays of integers, not
sets of Python strings, and the hashes of a part are cached with its unit.

>>> normalise("  The CAT -- sat!  ")
'the cat sat'
>>> k = keys({"q": "Is the sky blue today?", "label": "yes", "id": 7})
>>> sorted(k.texts), k.example
(['is the sky blue today'], ('7', 'is the sky blue today', 'yes'))
>>> keys({"story": "Once upon a time there was a cat.", "q": "Who?", "a": "a cat"}, context=["story"]).example
('a cat', 'who')
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

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


def h64(text: str) -> int:
    """A 64-bit hash of a normalised text (never 0: 0 marks "nothing to compare")."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") or 1


_SEP = "\x1f"  # between an example's values: normalised text never holds it


@dataclass(frozen=True)
class Hashed:
    """The keys of many examples as 64-bit hashes: what the check compares (compact, vectorised).

    ``example[i]`` hashes example ``i``'s sorted key values (0: nothing to
    compare); its long texts are ``texts[text_offsets[i]:text_offsets[i + 1]]``.
    """

    example: np.ndarray  # uint64 per example
    text_offsets: np.ndarray  # int64, examples + 1
    texts: np.ndarray  # uint64

    @property
    def count(self) -> int:
        return len(self.example)

    def take(self, positions: np.ndarray) -> "Hashed":
        """The examples at ``positions``, in that order."""
        lens = np.diff(self.text_offsets)[positions]
        starts = self.text_offsets[:-1][positions]
        take = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(int(lens.sum()))
        return Hashed(self.example[positions], np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
                      self.texts[take.astype(np.int64)])

    @staticmethod
    def concat(parts: "Sequence[Hashed]") -> "Hashed":
        if not parts:
            return hashed([])
        offsets, base = [np.zeros(1, np.int64)], 0
        for p in parts:
            offsets.append(p.text_offsets[1:] + base)
            base += int(p.text_offsets[-1])
        return Hashed(np.concatenate([p.example for p in parts]), np.concatenate(offsets),
                      np.concatenate([p.texts for p in parts]))


def hashed(rows: Iterable[Keys]) -> Hashed:
    """Hash the keys of examples (see :func:`keys`).

    >>> h = hashed([keys({"q": "Is the sky blue today?", "a": "yes"}), keys({"q": ""})])
    >>> h.count, bool(h.example[0]), int(h.example[1]), h.text_offsets.tolist()
    (2, True, 0, [0, 1, 1])
    """
    example, texts, offsets = [], [], [0]
    for k in rows:
        example.append(0 if k.example is None else h64(_SEP.join(k.example)))
        texts.extend(sorted(h64(t) for t in k.texts))
        offsets.append(len(texts))
    return Hashed(np.asarray(example, np.uint64), np.asarray(offsets, np.int64), np.asarray(texts, np.uint64))


def hash_columns(columns: dict[str, list], key: Sequence[str] | None = None, context: Sequence[str] = ()) -> Hashed:
    """The hashed keys of every row of a part, given column-major."""
    names = list(columns)
    n = len(columns[names[0]]) if names else 0
    return hashed(keys({c: columns[c][i] for c in names}, key, context) for i in range(n))


@dataclass
class Leak:
    examples: int
    leaked: int = 0
    by_task: dict[str, int] = field(default_factory=dict)  # training task -> leaked examples found there
    by_kind: dict[str, int] = field(default_factory=dict)  # "example" | "text" -> leaked examples


def find(train: dict[str, Hashed], evals: dict[str, Hashed]) -> dict[str, Leak]:
    """Per eval task: how many examples are a training example or share a text with one, with which tasks.

    An example found whole (in any task) counts as ``example`` with the tasks it
    was found in; otherwise one of its long texts found counts as ``text``.

    >>> train = {"t": hashed([keys({"q": "2 + 2?", "a": "4"})])}
    >>> leak = find(train, {"e": hashed([keys({"q": "2+2 ?", "a": "4"}), keys({"q": "2 + 2?", "a": "5"})])})["e"]
    >>> leak.examples, leak.leaked, leak.by_kind, leak.by_task
    (2, 1, {'example': 1}, {'t': 1})
    """
    names = list(train)
    whole = {t: np.unique(k.example[k.example != 0]) for t, k in train.items()}
    text = {t: np.unique(k.texts) for t, k in train.items()}
    out = {}
    for task, k in evals.items():
        n = k.count
        owner = np.repeat(np.arange(n), np.diff(k.text_offsets))
        by_example = np.zeros((len(names), n), bool)
        by_text = np.zeros((len(names), n), bool)
        for j, t in enumerate(names):
            by_example[j] = (k.example != 0) & np.isin(k.example, whole[t])
            by_text[j, owner[np.isin(k.texts, text[t])]] = True
        whole_hit = np.any(by_example, axis=0, keepdims=False).astype(bool, copy=False)
        hits = np.where(whole_hit[None, :], by_example, by_text)
        leaked = hits.any(axis=0)
        leak = Leak(examples=n, leaked=int(leaked.sum()))
        for kind, count in (("example", int(whole_hit.sum())), ("text", int((leaked & ~whole_hit).sum()))):
            if count:
                leak.by_kind[kind] = count
        for j, t in enumerate(names):
            if hits[j].any():
                leak.by_task[t] = int(hits[j].sum())
        out[task] = leak
    return out
