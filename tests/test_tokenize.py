"""Tokenization and masks on the demo tokenizer: spans from character offsets."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from tunec.compiler.tokens import TokenizerInfo, encode_pairs

TOKENIZER = Path(__file__).resolve().parents[1] / "recipes" / "demo" / "tokenizer"


@pytest.fixture(scope="module")
def backend():
    return Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))


@pytest.fixture(scope="module")
def info(backend):
    eos = backend.token_to_id("<|endoftext|>")
    return TokenizerInfo(json="", eos_id=eos, bos_id=eos, pad_id=backend.token_to_id("<|pad|>"),
                         vocab_size=backend.get_vocab_size())


def test_trained_span_decodes_to_the_completion_plus_eos(backend, info):
    prompts = ["Question: What is 2 plus 2?\nAnswer:", "Word: cat\nPlural:"]
    completions = [" 4", " cats"]
    for enc, p, c in zip(encode_pairs(backend, info, prompts, completions), prompts, completions):
        (start, end), = enc.spans
        assert end == len(enc.ids) and enc.ids[-1] == info.eos_id
        assert backend.decode(enc.ids[start:], skip_special_tokens=False) == c + "<|endoftext|>"
        assert backend.decode(enc.ids[:start]) == p
        assert enc.straddles == 0


def test_a_merge_across_the_boundary_is_counted_not_hidden(backend, info):
    # The prompt ends with a space that BPE glues to the completion's first word.
    (enc,) = encode_pairs(backend, info, ["Plural: "], ["cats"])
    assert enc.straddles == 1
    (start, _), = enc.spans
    # the straddling token is trained (the completion must be learned whole)
    assert backend.decode(enc.ids[start:], skip_special_tokens=False).endswith("cats<|endoftext|>")


def test_eos_is_not_doubled_when_the_completion_already_ends_with_it(backend, info):
    (enc,) = encode_pairs(backend, info, ["Q:"], [" yes<|endoftext|>"])
    assert enc.ids[-1] == info.eos_id and enc.ids[-2] != info.eos_id
