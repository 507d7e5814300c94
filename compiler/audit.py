"""The mask audit: the trained tokens of every compiled document, decoded, are the intended text.

Masks come from character spans (``tokens.py``); this module checks the
result from the other end, after the labels are made: per document, each run
of label-carrying tokens is decoded and compared with the text it must be.
A wrong trained token nobody notices is the worst thing a compiler of
training data can produce, so a mismatch stops the compile.

For a template document the intended text is its completion and the EOS;
for a chat document, each trained assistant turn's text (content and
end-of-turn), one piece per run::

    text     "Q: 2+2?\\nA:" + " 4"            + EOS
    labels    -   -  -  -  -  ␣4  <eos>
    decoded                  " 4<|endoftext|>"   == completion + EOS text

A chat document's trained spans are also checked against the conversation
itself (``Intended.replies``): each must be the assistant turn's text, with
only whitespace around it and one end-of-turn token after it, so a chat
template whose ``{% generation %}`` block (or end-of-turn) swallows the next
user turn is caught, not trained. A document with nothing trained is a
failure too. The recipe's ``audit: warn`` turns failures into a warning and a
count per task in the plan (``audit_failures``).

Allowed, because they are counted and shown elsewhere: a first trained token
that also holds the end of the text before it (a boundary merge, when the
document has one), a document cut short by ``truncation: truncate`` (its
runs are a prefix of the intended text), and a document whose first token is
trained (a first token is never a label: nothing predicts it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .pack import IGNORE, ramps

_MAX_MERGE = 64  # characters of the text before a span a boundary-merged token may hold
_PROBE = "Q: caf\u00e9 12+3?\n  A:\tyes <x> \u00ab\u00bb end"
_faithful: dict[int, tuple[Any, bool]] = {}  # see per_backend


@dataclass(frozen=True)
class Intended:
    """What one document's trained tokens must decode to: one piece per trained span, in order."""

    pieces: Sequence[str]
    before: Sequence[str] = field(default_factory=tuple)  # the text before each piece (for boundary merges)
    merged: bool = False  # the tokenizer merged text before a span into its first token (counted)
    truncated: bool = False  # cut to `seq_len`: runs may stop early
    first_token: bool = False  # the first trained span starts at the document's first token
    replies: Sequence[str] = field(default_factory=tuple)  # chat: each trained assistant turn's text, in order
    ends: Sequence[str] = field(default_factory=tuple)  # chat: the end-of-turn token texts one may close a turn


def per_backend(known: dict[int, tuple[Any, Any]], backend: Any, build: Callable[[Any], Any]) -> Any:
    """``build(backend)``, made once per tokenizer object and kept in ``known`` (id -> (backend, value):
    the backend is held so that its id cannot be reused by another tokenizer while the value is kept;
    a few at most, a worker has one tokenizer)."""
    key = id(backend)
    if key not in known or known[key][0] is not backend:
        if len(known) >= 8:
            known.pop(next(iter(known)))
        known[key] = (backend, build(backend))
    return known[key][1]


def faithful(backend: Any) -> bool:
    """Whether the tokenizer decodes what it encodes (byte-level BPE does; normalising ones do not)."""
    def check(b: Any) -> bool:
        return b.decode(b.encode(_PROBE, add_special_tokens=False).ids, skip_special_tokens=False) == _PROBE

    return per_backend(_faithful, backend, check)


def audit(backend: Any, ids: Sequence[int] | np.ndarray, offsets: Sequence[int] | np.ndarray,
          labels: Sequence[int] | np.ndarray, intended: Sequence[Intended]) -> tuple[int, str, str] | None:
    """``None`` when every document's trained tokens decode to its intended text; else the first
    document that does not: ``(index, decoded, intended)`` (see :func:`audit_all`)."""
    found = audit_all(backend, ids, offsets, labels, intended)
    return found[0] if found else None


def chat_span_ok(piece: str, reply: str, ends: Sequence[str]) -> bool:
    """A chat span's text is the reply (as the template shows it: trimmed or not), whitespace around it,
    and one end-of-turn token: nothing of another turn."""
    tail = "(?:" + "|".join(re.escape(e) for e in ends) + ")" if ends else "(?!)"
    for shown in dict.fromkeys([reply, reply.strip(), reply.lstrip(), reply.rstrip()]):
        if shown and re.fullmatch(r"\s*" + re.escape(shown) + r"[ \t]*" + tail + r"\s*", piece, flags=re.DOTALL):
            return True
    return False


def audit_all(backend: Any, ids: Sequence[int] | np.ndarray, offsets: Sequence[int] | np.ndarray,
              labels: Sequence[int] | np.ndarray, intended: Sequence[Intended]) -> list[tuple[int, str, str]]:
    """Every document whose trained tokens are not its intended text, as ``(index, decoded, intended)``;
    a chat document whose intended spans hold more than its assistant turns (:func:`chat_span_ok`)
    and a document with no trained token at all are failures too.

    ``ids``/``labels`` are flat, document ``i`` is ``[offsets[i], offsets[i+1])``; ``labels`` is
    ``IGNORE`` or the token (as the shards hold them). A tokenizer that does not decode what it
    encodes (one with a normaliser) is compared without whitespace, against its own round trip.
    """
    ids = np.asarray(ids)
    offsets = np.asarray(offsets, dtype=np.int64)
    trained = np.asarray(labels) != IGNORE
    # Runs of trained tokens, found for all documents at once: a run starts at a trained token whose
    # predecessor is untrained or in another document, and ends likewise.
    n = len(trained)
    doc_start = np.zeros(n + 1, dtype=bool)
    doc_start[offsets[:-1][offsets[:-1] < n]] = True
    prev = np.concatenate(([False], trained[:-1])) & ~doc_start[:-1]
    nxt = np.concatenate((trained[1:], [False])) & ~doc_start[1:]
    starts = np.flatnonzero(trained & ~prev)
    ends = np.flatnonzero(trained & ~nxt) + 1
    texts = decode_runs(backend, ids, starts, ends)
    docs = np.searchsorted(offsets, starts, side="right") - 1
    got: dict[int, list[str]] = {}
    for d, text in zip(docs.tolist(), texts):
        got.setdefault(d, []).append(text)
    exact = faithful(backend)
    failures = []
    for d, want in enumerate(intended):
        pieces = got.get(d, [])
        turns_ok = len(want.replies) == len(want.pieces) and all(
            chat_span_ok(p, r, want.ends) for p, r in zip(want.pieces, want.replies)) if want.replies else True
        # nothing trained: a failure, unless truncation cut the completion off (the link step drops those)
        if (not pieces and not want.truncated) or not turns_ok or not _document_ok(pieces, want, exact, backend):
            shown = "".join(want.replies) if want.replies and not turns_ok else "".join(want.pieces)
            failures.append((d, "".join(pieces), shown))
    return failures


def decode_runs(backend: Any, ids: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> list[str]:
    """``backend.decode(ids[a:b], skip_special_tokens=False)`` for each run ``[a, b)``.

    A byte-level BPE tokenizer's decode is the UTF-8 reading (invalid bytes replaced) of its tokens'
    bytes, one after the other; :class:`ByteDecoder` does that with one table lookup per token, a
    few times faster than ``decode_batch``. Every other tokenizer goes through ``decode_batch``.
    """
    if not len(starts):
        return []
    fast = ByteDecoder.of(backend)
    if fast is not None:
        got = fast.runs(ids, starts, ends)
        if got is not None:
            return got
    flat = np.asarray(ids).tolist()
    return backend.decode_batch([flat[a:b] for a, b in zip(starts.tolist(), ends.tolist())],
                                skip_special_tokens=False)


def _byte_chars() -> dict[str, int]:
    """Byte-level BPE's alphabet: the character that stands for each byte in its vocabulary. Printable
    bytes stand for themselves; the others, in order, for the characters from U+0100 on."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in set(printable)]
    chars.update({chr(0x100 + k): b for k, b in enumerate(others)})
    return chars


class ByteDecoder:
    """The decode of a byte-level BPE tokenizer (decoder ``ByteLevel``), as a table from id to bytes.

    Each token's bytes are its characters read through :func:`_byte_chars` (a token with a character
    outside that alphabet, as an added token may have, is its own UTF-8, as the tokenizer's decoder
    reads it); a run's text is its tokens' bytes read as UTF-8 with invalid bytes replaced, as the
    tokenizer's ``decode`` does. Used only when that is the tokenizer's whole decode: a ``ByteLevel``
    decoder alone, added tokens in ASCII (the same bytes however the decoder treats them), and the
    table agreeing with ``decode`` on a probe of whole and split characters.
    """

    _known: dict[int, tuple[Any, "ByteDecoder | None"]] = {}  # id(backend) -> (backend, decoder), as _faithful

    def __init__(self, table: list[bytes | None]):
        self.known = np.array([t is not None for t in table], dtype=bool)
        # every token's bytes, one after the other: token i is flat[at[i] : at[i] + lengths[i]]
        self.lengths = np.array([len(t) if t is not None else 0 for t in table], dtype=np.int64)
        self.at = np.cumsum(self.lengths) - self.lengths
        self.flat = np.frombuffer(b"".join(t for t in table if t is not None), dtype=np.uint8)

    @classmethod
    def of(cls, backend: Any) -> "ByteDecoder | None":
        return per_backend(cls._known, backend, cls._build)

    @classmethod
    def _build(cls, backend: Any) -> "ByteDecoder | None":
        from tokenizers import decoders, models

        if not isinstance(getattr(backend, "decoder", None), decoders.ByteLevel) or \
                not isinstance(getattr(backend, "model", None), models.BPE):
            return None
        added = backend.get_added_tokens_decoder()
        if not all(t.content.isascii() for t in added.values()):
            return None
        # an id's token as `decode` looks it up: the added tokens first, then the model's vocabulary
        tokens: dict[int, str] = {i: t for t, i in backend.get_vocab(with_added_tokens=False).items()}
        tokens.update({i: t.content for i, t in added.items()})
        table: list[bytes | None] = [None] * (max(tokens, default=-1) + 1)
        # Every token's characters read through the alphabet at once: one array of code points, one lookup
        lookup = np.full(0x200, -1, dtype=np.int16)  # the alphabet's characters are all below U+0200
        for c, b in _byte_chars().items():
            lookup[ord(c)] = b
        texts = list(tokens.values())
        points = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
        mapped = np.where(points < 0x200, lookup[np.minimum(points, 0x1FF)], -1)
        size = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        ends = np.cumsum(size)
        misses = np.concatenate(([0], np.cumsum(mapped < 0)))  # characters outside the alphabet, so far
        outside = misses[ends] > misses[ends - size]
        data = mapped.astype(np.uint8).tobytes()
        for i, token, e, n, out in zip(tokens, texts, ends.tolist(), size.tolist(), outside.tolist()):
            table[i] = token.encode("utf-8") if out else data[e - n:e]
        found = cls(table)
        probe = np.asarray(backend.encode(_PROBE + " \u4e2d\u6587 \U0001f600 <x>", add_special_tokens=True).ids
                           + sorted(added))  # with the added tokens (the EOS...) after it
        cuts = np.arange(len(probe) + 1)
        starts, ends = np.meshgrid(cuts, cuts, indexing="ij")
        keep = starts < ends
        starts, ends = starts[keep], ends[keep]  # every run of the probe: split characters included
        want = backend.decode_batch([probe[a:b].tolist() for a, b in zip(starts, ends)], skip_special_tokens=False)
        return found if found.runs(probe, starts, ends) == want else None

    def runs(self, ids: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> list[str] | None:
        """Each run's text; None when a run holds an id outside the table. Only the runs' tokens are
        looked up, and their bytes gathered in one step (no Python object per token)."""
        runs = np.asarray(ends, np.int64) - np.asarray(starts, np.int64)
        tokens = np.asarray(ids)[np.repeat(starts, runs) + ramps(runs)]
        if not ((tokens >= 0) & (tokens < len(self.known))).all() or not self.known[tokens].all():
            return None
        lengths = self.lengths[tokens]
        data = self.flat[np.repeat(self.at[tokens], lengths) + ramps(lengths)].tobytes()
        cum = np.concatenate(([0], np.cumsum(lengths)))[np.concatenate(([0], np.cumsum(runs)))].tolist()
        return [data[a:b].decode("utf-8", "replace") for a, b in zip(cum[:-1], cum[1:])]



def _document_ok(got: list[str], want: Intended, exact: bool, backend: Any) -> bool:
    if len(got) > len(want.pieces) or (len(got) < len(want.pieces) and not want.truncated):
        return False
    for k, (g, w) in enumerate(zip(got, want.pieces)):
        before = want.before[k] if k < len(want.before) else ""
        if not exact:
            g, w, before = _loose(g), _loose(_round_trip(backend, w)), _loose(before)
        last = k == len(got) - 1
        if not _piece_ok(g, w, before, merged=want.merged and k == 0,
                         cut=want.truncated and last, first=want.first_token and k == 0):
            return False
    return True


def _piece_ok(got: str, want: str, before: str, *, merged: bool, cut: bool, first: bool) -> bool:
    def same(g: str) -> bool:
        return g == want or (cut and want.startswith(g)) or (first and want.endswith(g)) \
            or (first and cut and g in want)

    if same(got):
        return True
    if merged:  # the first trained token begins with the end of the text before the span
        for n in range(1, min(len(got), len(before), _MAX_MERGE) + 1):
            if before.endswith(got[:n]) and same(got[n:]):
                return True
    return False


def _loose(text: str) -> str:
    return "".join(text.replace("\u2581", " ").split())


def _round_trip(backend: Any, text: str) -> str:
    return backend.decode(backend.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)


def warn_failures(units: dict[tuple[str, str], Any]) -> None:
    """Under ``audit: warn``: one warning per task part whose documents failed the audit (counted in the plan)."""
    import logging

    for (task, part), unit in sorted(units.items()):
        failed = getattr(unit, "audit_failed", None)
        if failed is not None and failed.any():
            logging.getLogger(__name__).warning(
                f"task '{task}', {part}: {int(failed.sum())} document(s) fail the mask audit and are trained anyway "
                f"(`audit: warn`); first: {unit.audit_example}")
