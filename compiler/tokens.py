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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import TunecError
from .load import LoadedRecipe
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
