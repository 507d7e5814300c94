"""The libyaml-backed loader gives exactly the data and positions of the pure-Python one."""

from __future__ import annotations

import pytest

from tunec.compiler import yamlpos
from tunec.compiler.errors import TunecError

pytestmark = pytest.mark.skipif(yamlpos._FAST is None, reason="PyYAML built without libyaml")

DOCS = [
    "a: 1\n",
    "tokenizer: {kind: local, path: tok}\nseq_len: 256\nstages:\n  - name: sft\n    lr: 3.0e-3\n    tasks: [a, b]\n",
    "base: &b {lr: 1e-5, x: [1, 2, {y: no}]}\nother:\n  <<: *b\n  lr: 2\nlist:\n  - *b\n  - [on, off, ~, null, 0o17, 0x1f, 010]\n",
    "text: |\n  line one\n  line two\nfolded: >-\n  a\n  b\nq: 'it''s'\ndq: \"tab\\there\"\n",
    "# comment\nnom: \"caf\u00e9 \u2603 \U0001f600\"\n\u00e9t\u00e9: [\u00e0, {cl\u00e9: valeur}]  # trailing\n",
    "? complex\n: value\n",
    "",
    "just a scalar\n",
    "a:\n- 1\n-   - 2\n    - 3\n- k: v\n  k2: v2\n",
]


@pytest.mark.parametrize("text", DOCS)
def test_same_data_and_positions(text, monkeypatch):
    fast = yamlpos.load_yaml_text(text, "r.yaml")
    monkeypatch.setattr(yamlpos, "_FAST", None)
    slow = yamlpos.load_yaml_text(text, "r.yaml")
    assert fast == slow


@pytest.mark.parametrize("text", [
    "a: [1, 2\n",  # unclosed flow sequence
    "a: 1\n a: 2\n",  # bad indentation
    "a: \x01\n",  # a character PyYAML refuses
    "a: b: c\n",
    "a: !!python/object:os.system x\n",
    "a: 1\na: 2\n",
    "[" * 200 + "]" * 200 + "\n",  # nesting past the guard
    "a: &x [*x]\n",
    "a: 1\n---\nb: 2\n",  # two documents
])
def test_same_errors(text, monkeypatch):
    with pytest.raises(TunecError) as fast:
        yamlpos.load_yaml_text(text, "r.yaml")
    monkeypatch.setattr(yamlpos, "_FAST", None)
    with pytest.raises(TunecError) as slow:
        yamlpos.load_yaml_text(text, "r.yaml")
    assert str(fast.value) == str(slow.value)


def test_fast_path_taken(monkeypatch):
    """The C parser really composes valid text (otherwise the tests above compare the Python loader
    with itself)."""
    built = []
    monkeypatch.setattr(yamlpos, "_data", lambda node, loader, f: built.append(type(loader)) or (None, {}))
    yamlpos.load_yaml_text("a: 1\n", "r.yaml")
    assert built == [yamlpos._FAST]
