"""Tokenization and loss masks, from character spans of the exact text the model sees.

A document is ``prompt + completion`` tokenized in one piece (BPE merges across
the boundary are what the model will see at inference, so pieces are never
tokenized separately). The trained span starts at the token that holds the
first completion character and runs to the end, EOS included::

    text    "Review: great\\nAnswer: positive"         + EOS
    tokens   Review | : | great | \\n | Answer | : | ␣positive | <eos>
    trained                                        ^^^^^^^^^^^^^^^^^^^
    span     (6, 8)

The post-processor's BOS (if the tokenizer adds one) is kept once: a template
that writes the BOS string itself does not get a second one.

Which token holds a character comes from the tokenizer's offsets, or, for a
byte-level BPE tokenizer whose tokens are the text's bytes one after the other,
from the tokens' byte lengths (:class:`Tiling`: the same answer, a tenth faster).
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .audit import ByteDecoder, per_backend
from .errors import TunecError
from .load import LoadedRecipe
from .pack import ramps
from .recipe import HubTokenizer, LocalTokenizer


@dataclass(frozen=True)
class TokenizerInfo:
    """What workers need to tokenize: the fast tokenizer's JSON and its special ids."""

    json: str
    eos_id: int
    bos_id: int | None
    pad_id: int
    vocab_size: int
    chat_template: str | None = None
    special_tokens: tuple[tuple[str, str], ...] = ()  # (name, text), passed to the chat template


@dataclass
class Encoded:
    """One document: token ids and the half-open token spans that carry loss."""

    ids: list[int]
    spans: list[tuple[int, int]]
    straddles: int  # spans whose first token also holds prompt characters


def load_tokenizer(loaded: LoadedRecipe):
    """Load the recipe's tokenizer with transformers (a fast tokenizer is required)."""
    spec = loaded.recipe.tokenizer
    loc = ("tokenizer",)
    if isinstance(spec, LocalTokenizer):
        path = loaded.resolve(spec.path)
        if not path.is_dir():
            raise TunecError(loaded.problem(loc + ("path",), f"tokenizer folder not found: {path}"))
        target = str(path)
        try:
            tok = load_local_tokenizer(path)
        except Exception as exc:
            raise TunecError(loaded.problem(loc, f"cannot load tokenizer '{target}': {exc}")) from None
    else:
        assert isinstance(spec, HubTokenizer)
        from transformers import AutoTokenizer

        target = spec.id
        try:
            tok = AutoTokenizer.from_pretrained(target, revision=spec.revision)
        except Exception as exc:
            raise TunecError(loaded.problem(loc, f"cannot load tokenizer '{target}': {exc}")) from None
    if getattr(tok, "backend_tokenizer", None) is None:
        raise TunecError(loaded.problem(loc, f"tokenizer '{target}' has no fast (Rust) tokenizer; "
                                             "tunec needs one for character offsets"))
    if spec.chat_template:
        tpath = loaded.resolve(spec.chat_template)
        if not tpath.is_file():
            raise TunecError(loaded.problem(loc + ("chat_template",), f"chat template file not found: {tpath}"))
        tok.chat_template = tpath.read_text(encoding="utf-8")
    if tok.eos_token_id is None:
        raise TunecError(loaded.problem(loc, f"tokenizer '{target}' has no EOS token; "
                                             "tunec ends every completion with one"))
    return tok


def load_local_tokenizer(path: Path):
    """A tokenizer folder through the class its ``tokenizer_config.json`` names.

    ``transformers.AutoTokenizer`` imports torch (over a second, and the
    compiler never needs it); looking the class up directly does not.
    """
    import transformers

    config = path / "tokenizer_config.json"
    try:
        name = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class") if config.is_file() else None
    except (OSError, ValueError, AttributeError) as exc:
        raise TunecError(f"{config}: unreadable tokenizer config ({exc})") from None
    cls = None
    if isinstance(name, str):
        # The fast (Rust) class first: transformers 4.x maps the plain name to a slow Python class.
        base = name[: -len("Fast")] if name.endswith("Fast") else name
        cls = getattr(transformers, base + "Fast", None) or getattr(transformers, base, None)
    if cls is None:
        cls = transformers.AutoTokenizer  # unknown class name: let transformers resolve it
    try:
        return cls.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever a damaged folder raises, the user gets one line
        raise TunecError(f"{path}: cannot load the tokenizer ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None


def tokenizer_info(tok) -> TokenizerInfo:
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return TokenizerInfo(
        json=tok.backend_tokenizer.to_str(),
        eos_id=int(tok.eos_token_id),
        bos_id=None if tok.bos_token_id is None else int(tok.bos_token_id),
        pad_id=int(pad),
        vocab_size=len(tok),
        chat_template=tok.chat_template if isinstance(tok.chat_template, str) else None,
        special_tokens=tuple(sorted((k, v) for k, v in tok.special_tokens_map.items() if isinstance(v, str))),
    )




def encode_pairs(backend, info: TokenizerInfo, prompts: list[str], completions: list[str]) -> list[Encoded]:
    """Tokenize ``prompt + completion`` pairs in one batch; the completion and the EOS carry loss."""
    texts = [p + c for p, c in zip(prompts, completions)]
    spans = [[(len(p), len(t))] for p, t in zip(prompts, texts)]
    return encode_texts(backend, info, texts, spans, add_special=True, append_eos=True)


def encode_texts(backend, info: TokenizerInfo, texts: list[str], char_spans: list[list[tuple[int, int]]],
                 *, add_special: bool, append_eos: bool) -> list[Encoded]:
    """Tokenize texts in one batch and turn trained character spans into token spans.

    A token is trained when it holds any character of a span. ``append_eos``
    adds EOS (unless the text already ends with it) and trains it with a span
    that reaches the end of the text. Chat texts come with their own
    end-of-turn tokens and special tokens, so they use neither option.
    """
    tiling = Tiling.of(backend)
    encodings = tiling.encode(backend, texts, add_special) if tiling is not None else None
    if encodings is None:
        encodings = backend.encode_batch(texts, add_special_tokens=add_special)
    out = []
    for text, spans, enc in zip(texts, char_spans, encodings):
        ids = enc.ids
        tok_spans, straddles = [], 0
        for s, e in spans:
            first = _first_token_at_or_after(enc, s, e)
            if first is None:
                continue
            last = _last_token_before(enc, s, e, len(ids))
            if enc.token_to_chars(first)[0] < s:
                straddles += 1  # a token merged the characters before the span with its first ones
            tok_spans.append((first, last + 1))
        if info.bos_id is not None and len(ids) >= 2 and ids[0] == ids[1] == info.bos_id:
            ids = ids[1:]
            tok_spans = [(a - 1, b - 1) for a, b in tok_spans]
        if append_eos and (not ids or ids[-1] != info.eos_id):
            reaches_end = bool(tok_spans) and tok_spans[-1][1] == len(ids)
            ids.append(info.eos_id)  # `enc.ids` made this list for us: no copy
            if reaches_end:
                tok_spans[-1] = (tok_spans[-1][0], len(ids))
            elif spans and spans[-1][1] == len(text):
                tok_spans.append((len(ids) - 1, len(ids)))
        out.append(Encoded(ids, tok_spans, straddles))
    return out


class Tiling:
    """Character offsets of a byte-level BPE tokenizer's tokens, from the tokens' bytes.

    Between the special tokens its post-processor adds (a BOS...), the tokens of
    such a tokenizer, each read as its bytes, are the text's UTF-8 bytes one after
    the other: which characters a token holds follows from the lengths of the
    tokens before it. The tokenizer then need not track offsets
    (``encode_batch_fast``: a tenth less time, and less to free). Used for a
    tokenizer only when, on a probe of texts, every token span this module
    computes is the same as with the tokenizer's own offsets, and for a batch
    only when its tokens' bytes are its texts' bytes; otherwise the tokenizer's
    offsets are used (:func:`encode_texts`).
    """

    _known: dict[int, tuple[Any, "Tiling | None"]] = {}  # id(backend) -> (backend, tiling), as ByteDecoder's

    def __init__(self, decoder: ByteDecoder, affixes: dict[bool, tuple[list[int], list[int]]]):
        self.decoder = decoder
        self.affixes = affixes  # add_special_tokens -> (ids the post-processor puts before, after)

    @classmethod
    def of(cls, backend: Any) -> "Tiling | None":
        return per_backend(cls._known, backend, cls._build)

    @classmethod
    def _build(cls, backend: Any) -> "Tiling | None":
        decoder = ByteDecoder.of(backend)
        if decoder is None or not hasattr(backend, "encode_batch_fast") or backend.normalizer is not None:
            return None
        affixes = {}
        for special in (False, True):
            core = backend.encode("a", add_special_tokens=False).ids
            full = backend.encode("a", add_special_tokens=special).ids
            at = next((i for i in range(len(full) - len(core) + 1) if full[i:i + len(core)] == core), None)
            if not core or at is None:
                return None
            affixes[special] = (full[:at], full[at + len(core):])
        found = cls(decoder, affixes)
        for special in (False, True):  # the same token spans as the tokenizer's offsets give, on every probe
            tiled = found.encode(backend, list(_TILING_PROBES), special)
            if tiled is None:
                return None
            for text, mine, theirs in zip(_TILING_PROBES, tiled,
                                          backend.encode_batch(list(_TILING_PROBES), add_special_tokens=special)):
                if mine.ids != theirs.ids:
                    return None
                # A span's first token and its straddling depend on where it starts, its last token on
                # where it ends: every start and every end, each with a few partners, covers them all.
                n = len(text)
                spans = {(a, b) for k in range(n + 1) for a, b in ((k, n), (0, k), (k, k + 1), (k, k + 2),
                                                                      (k - 1, k), (k - 2, k)) if 0 <= a <= b <= n}
                if any(_token_span(mine, a, b) != _token_span(theirs, a, b) for a, b in spans):
                    return None
        return found

    def encode(self, backend: Any, texts: list[str], add_special: bool) -> "list[_Tiled] | None":
        """The texts' encodings with offsets from their tokens' bytes; None when a text's tokens do not
        tile it (a character the tokenizer changes, an added token it inserts)."""
        before, after = self.affixes[add_special]
        ids = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=add_special)]
        if any(x[:len(before)] != before or (after and x[len(x) - len(after):] != after) or
               len(x) < len(before) + len(after) for x in ids):
            return None
        try:
            raw = [t.encode("utf-8") for t in texts]
        except UnicodeEncodeError:
            return None
        counts = np.array([len(x) - len(before) - len(after) for x in ids], dtype=np.int64)
        core = np.fromiter((t for x in ids for t in x[len(before):len(x) - len(after)]), dtype=np.int64,
                           count=int(counts.sum()))
        dec = self.decoder
        if not ((core >= 0) & (core < len(dec.known))).all() or not dec.known[core].all():
            return None
        lengths = dec.lengths[core]
        if not (lengths > 0).all():
            return None
        data = dec.flat[np.repeat(dec.at[core], lengths) + ramps(lengths)].tobytes()
        if data != b"".join(raw):
            return None
        ends = np.cumsum(lengths)
        doc_ends = np.cumsum(counts)
        per_doc = np.concatenate(([0], ends))[doc_ends]  # bytes of each text's tokens, summed
        if (np.diff(np.concatenate(([0], per_doc))) != np.array([len(r) for r in raw], dtype=np.int64)).any():
            return None
        bounds = np.concatenate(([0], ends)).tolist()
        out = []
        lo = 0
        for text, x, n in zip(texts, ids, counts.tolist()):
            base = bounds[lo]
            out.append(_Tiled(x, [b - base for b in bounds[lo:lo + n + 1]], text, len(before)))
            lo += n
        return out


class _Tiled:
    """One text's encoding as :class:`Tiling` reads it: ``ids``, and the two offset lookups
    :func:`encode_texts` makes, answered as the tokenizer's ``Encoding`` answers them."""

    __slots__ = ("ids", "_bounds", "_text", "_before", "_starts")

    def __init__(self, ids: list[int], bounds: list[int], text: str, before: int):
        self.ids = ids
        self._bounds = bounds  # byte offset where each token of the text starts, then the text's length
        self._text = text
        self._before = before  # tokens the post-processor put before the text's
        self._starts: list[int] | None = None  # byte offset of each character (None: ASCII, the same)

    def _byte(self, char: int) -> int:
        return char if self._char_starts() is None else self._starts[char]  # type: ignore[index]

    def _char(self, byte: int) -> int:
        starts = self._char_starts()
        return byte if starts is None else bisect.bisect_right(starts, byte) - 1

    def _char_starts(self) -> list[int] | None:
        if self._starts is None and not self._text.isascii():
            points = np.frombuffer(self._text.encode("utf-32-le"), dtype=np.uint32)
            width = 1 + (points >= 0x80).astype(np.int64) + (points >= 0x800) + (points >= 0x10000)
            self._starts = np.concatenate(([0], np.cumsum(width))).tolist()
        return self._starts

    def char_to_token(self, char: int) -> int | None:
        if not 0 <= char < len(self._text):
            return None
        return bisect.bisect_right(self._bounds, self._byte(char)) - 1 + self._before

    def token_to_chars(self, token: int) -> tuple[int, int] | None:
        k = token - self._before
        if not 0 <= k < len(self._bounds) - 1:
            return None  # a token of the post-processor's: it holds no character
        return self._char(self._bounds[k]), self._char(self._bounds[k + 1] - 1) + 1


def _token_span(enc: Any, s: int, e: int) -> tuple[int, int, bool] | None:
    """``(first, last, straddles)`` of character span ``[s, e)`` as :func:`encode_texts` finds them."""
    first = _first_token_at_or_after(enc, s, e)
    if first is None:
        return None
    return first, _last_token_before(enc, s, e, len(enc.ids)), enc.token_to_chars(first)[0] < s


# Texts on which a Tiling must give the token spans the tokenizer's offsets give: spaces, tabs and newlines
# where words end, characters of two, three and four bytes (split across tokens or not), digits, markup.
_TILING_PROBES = (
    "Q: caf\u00e9 12+3?\n  A:\tyes <x> \u00ab\u00bb end",
    " leading space, trailing space ",
    "\n\nInstruction:\n\nWrite a haiku.\n\n### Response:\n Sure!",
    "\u4e2d\u6587 mixed \U0001f600\U0001f44d emoji  double  spaces\t\ttabs",
    "Answer: positive\u2019s \u201cquoted\u201d \u2014 dash",
    "x",
)


def _first_token_at_or_after(enc, char: int, end: int) -> int | None:
    """Index of the token holding character ``char`` (or the next character, before ``end``, that has one)."""
    for c in range(char, end):
        tok = enc.char_to_token(c)
        if tok is not None:
            return tok
    return None


def _last_token_before(enc, start: int, end: int, count: int) -> int:
    """Index of the last token holding a character of ``[start, end)``; ``count``: the tokens of ``enc``."""
    for c in range(end - 1, start - 1, -1):
        tok = enc.char_to_token(c)
        if tok is not None:
            # `char_to_token` names the first token of a character; a character split over several
            # tokens (bytes of `«` without a token of their own) must be trained up to its last one.
            # (One token's offsets at a time: `enc.offsets` would build the whole document's list.)
            while tok + 1 < count and (chars := enc.token_to_chars(tok + 1)) is not None and chars[0] <= c < chars[1]:
                tok += 1
            return tok
    raise AssertionError("unreachable: a first token was found in the same range")
