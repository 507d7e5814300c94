"""Property: hostile data values never change which tokens are trained (needs `hypothesis`, a dev
dependency; skipped without it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunec.compiler.templates import TemplateSource

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")

TOKENIZER = Path(__file__).resolve().parents[1] / "recipes" / "demo" / "tokenizer"

HOSTILE = ["|||", " ||| ", "{{", "}}", "{%", "%}", "{#", "\n", "\r\n", "<|endoftext|>", "Q:", "A:", " ", "\t",
           "«", "»", "\u00e9", "\u2581", "\\", "'", '"', "\ue000", "\ue001", "\ue002", "\ue000\ue002"]
value = st.lists(st.one_of(st.sampled_from(HOSTILE), st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)),
                                                              max_size=6)), max_size=8).map("".join)


@pytest.fixture(scope="module")
def worker():
    from tunec.compiler.tokens import load_local_tokenizer, tokenizer_info
    from tunec.compiler.units import UnitSpec, Worker

    blocks = TemplateSource.inline("qa", "Q: {{ q }}\nA:", " {{ a }}", "r.yaml", 1)
    ps = TemplateSource(name="ps", text="{{ q }} ||| {{ a }}", filename="t.yaml", kind="promptsource")
    spec = UnitSpec(task="hostile", part="train", templates=(blocks, ps), truncation="drop", seq_len=4096, seed=0)
    return Worker(tokenizer_info(load_local_tokenizer(TOKENIZER)), [spec], {})


@hypothesis.settings(max_examples=200, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
# Prompts are never empty here: a document's first token is never a label (nothing predicts it).
@hypothesis.given(rows=st.lists(st.tuples(value.filter(lambda s: s.strip()), value.filter(lambda s: s.strip())),
                                min_size=1, max_size=4))
@hypothesis.example(rows=[("|||", "\ue000\ue001\ue002")])  # the private-use characters the renderer escapes with
def test_hostile_values_never_change_which_tokens_are_trained(worker, rows):
    """Whatever the data holds (separators, Jinja syntax, newlines, the EOS as text), the trained
    tokens decode to the completion the template means, and the EOS."""
    from tunec.compiler.pack import IGNORE
    from tunec.compiler.units import Chunk

    chunk = Chunk(0, list(range(len(rows))), {"q": [q for q, _ in rows], "a": [a for _, a in rows]},
                  [[(0, ()), (1, ())] for _ in rows])
    result = worker.compile(chunk)
    expected = []
    for _q, a in rows:
        expected.append(" " + a)  # the blocks template: its completion block, as written
        expected.append(" " + a.strip())  # promptsource: the stripped target after the first `|||`
    assert result.docs == len(expected)
    eos = worker.backend.decode([worker.info.eos_id], skip_special_tokens=False)
    for d, want in enumerate(expected):
        lo, hi = result.offsets[d], result.offsets[d + 1]
        trained = result.ids[lo:hi][result.sft_labels[lo:hi] != IGNORE].tolist()
        got = worker.backend.decode(trained, skip_special_tokens=False)
        assert got == (want if want.endswith(eos) else want + eos)

