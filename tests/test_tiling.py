"""Offsets from token bytes (compiler/tokens.py `Tiling`): every token span and id equals what the
tokenizer's own offsets give, for random texts and spans; tokenizers it cannot read that way are not read
that way."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from tunec.compiler.tokens import Tiling, TokenizerInfo, encode_texts

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo" / "tokenizer" / "tokenizer.json"
SHARED_GPT2 = ROOT.parent / "shared" / "data" / "tokenizers" / "gpt2"

PIECES = ["a", "b", "cat", "dogs", " ", "  ", "\n", "\n\n", "\t", "é", "ü", "«", "»", "中", "文", "😀", "👍🏽",
          "12", "+", "?", ":", "Answer", " positive", "’", "—", "<x>", "<|endoftext|>", "ß", "\u00a0"]


def texts_and_spans(seed: int, n: int) -> tuple[list[str], list[list[tuple[int, int]]]]:
    rng = random.Random(seed)
    texts, spans = [], []
    for _ in range(n):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 30)))
        cuts = sorted(rng.randint(0, len(text)) for _ in range(2 * rng.randint(1, 3)))
        texts.append(text)
        spans.append([(cuts[i], cuts[i + 1]) for i in range(0, len(cuts), 2)])
    return texts, spans


def with_post_processor(post: dict) -> Tokenizer:
    data = json.loads(DEMO.read_text(encoding="utf-8"))
    data["post_processor"] = post
    return Tokenizer.from_str(json.dumps(data))


def info_of(backend: Tokenizer) -> TokenizerInfo:
    eos = backend.token_to_id("<|endoftext|>")
    return TokenizerInfo(json="", eos_id=eos, bos_id=None, pad_id=eos, vocab_size=backend.get_vocab_size())


BOS = {"type": "TemplateProcessing",
       "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
       "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
       "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}}


def backends() -> list[tuple[str, Tokenizer]]:
    out = [("demo", Tokenizer.from_file(str(DEMO)))]
    bos = json.loads(json.dumps(BOS))
    demo = Tokenizer.from_file(str(DEMO))
    bos["special_tokens"]["<|endoftext|>"]["ids"] = [demo.token_to_id("<|endoftext|>")]
    out.append(("demo+bos", with_post_processor(bos)))
    if SHARED_GPT2.is_dir():  # the GPT-2 tokenizer of ../shared, through transformers as a compile loads it
        from tunec.compiler.tokens import load_local_tokenizer

        out.append(("gpt2", Tokenizer.from_str(load_local_tokenizer(SHARED_GPT2).backend_tokenizer.to_str())))
    return out


@pytest.mark.parametrize("name,backend", backends(), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("special", [True, False])
def test_spans_and_ids_from_token_bytes_are_those_of_the_tokenizers_offsets(name, backend, special, monkeypatch):
    assert Tiling.of(backend) is not None, name
    info = info_of(backend)
    texts, spans = texts_and_spans(len(name) + special, 400)
    fast = encode_texts(backend, info, texts, spans, add_special=special, append_eos=special)
    monkeypatch.setattr(Tiling, "of", classmethod(lambda cls, b: None))
    slow = encode_texts(backend, info, texts, spans, add_special=special, append_eos=special)
    assert [(e.ids, e.spans, e.straddles) for e in fast] == [(e.ids, e.spans, e.straddles) for e in slow]
    assert any(e.straddles for e in slow) and any(len(e.spans) > 1 for e in slow)  # the cases that matter occur


def test_a_tokenizer_that_changes_the_text_is_read_through_its_offsets():
    data = json.loads(DEMO.read_text(encoding="utf-8"))
    data["normalizer"] = {"type": "Lowercase"}
    assert Tiling.of(Tokenizer.from_str(json.dumps(data))) is None
    data = json.loads(DEMO.read_text(encoding="utf-8"))
    data["pre_tokenizer"]["add_prefix_space"] = True  # a space the text does not hold
    assert Tiling.of(Tokenizer.from_str(json.dumps(data))) is None


def test_a_batch_whose_tokens_do_not_tile_its_texts_uses_the_tokenizers_offsets(monkeypatch):
    backend = Tokenizer.from_file(str(DEMO))
    tiling = Tiling.of(backend)
    assert tiling is not None
    monkeypatch.setitem(tiling.affixes, True, ([backend.token_to_id("<|endoftext|>")], []))  # a BOS none has
    assert tiling.encode(backend, ["Q: 2+2?\nA: 4"], True) is None
    info = info_of(backend)
    (enc,) = encode_texts(backend, info, ["Q: 2+2?\nA: 4"], [[(10, 12)]], add_special=True, append_eos=True)
    assert backend.decode(enc.ids[enc.spans[0][0]:], skip_special_tokens=False) == " 4<|endoftext|>"


def test_a_worker_builds_the_fast_path_when_it_starts_and_a_failure_there_waits_for_the_first_chunk(monkeypatch):
    """Built when the worker starts (before the main process has loaded the rows it will send), not on
    the first chunk; a build that fails at start is only tried again on the first chunk."""
    from tunec.compiler.units import Worker

    backend = Tokenizer.from_file(str(DEMO))
    info = info_of(backend)
    info = TokenizerInfo(**{**info.__dict__, "json": backend.to_str()})
    worker = Worker(info, [], {})
    assert Tiling._known[id(worker.backend)][0] is worker.backend and Tiling.of(worker.backend) is not None

    def broken(cls, b):
        raise RuntimeError("not now")

    monkeypatch.setattr(Tiling, "_build", classmethod(broken))
    Worker(info, [], {})  # starts all the same
