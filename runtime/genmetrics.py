"""Exact match and token F1 between a generated answer and the reference, SQuAD-style.

Both texts are normalised first: lower case, punctuation removed, the articles
``a``, ``an`` and ``the`` removed, whitespace collapsed::

    >>> normalise("  The Eiffel-Tower!  ")
    'eiffeltower'
    >>> exact_match("The cat.", "cat")
    1.0
    >>> round(f1("a black cat sat", "the cat"), 3)
    0.5

F1 is over the normalised words as multisets: precision is the share of the
prediction's words found in the reference, recall the share of the
reference's found in the prediction. When either side has no word left, F1 is
1 if both are empty and 0 otherwise.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise(prediction) == normalise(reference))


def f1(prediction: str, reference: str) -> float:
    ours, theirs = normalise(prediction).split(), normalise(reference).split()
    if not ours or not theirs:
        return float(ours == theirs)
    common = sum((Counter(ours) & Counter(theirs)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(ours), common / len(theirs)
    return 2 * precision * recall / (precision + recall)
