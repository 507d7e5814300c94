"""The mask audit catches planted mask errors on every compile: a label array shifted by one token, a
chat template whose assistant span takes in the next user turn, a document with nothing trained; and
`audit: warn` compiles anyway, counting the failures in the plan."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from test_chat_templates import ROWS, make_tokenizer
from tokenizers import Tokenizer

from tunec.compiler import units
from tunec.compiler.audit import Intended, audit_all, chat_span_ok
from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.errors import TunecError
from tunec.compiler.pack import IGNORE

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "recipes" / "demo" / "tokenizer"
MODEL = "{kind: config, config: {model_type: llama}}"

# The assistant's {% generation %} block runs on over the next user turn (which the template then
# leaves out of its own place): that user text would be trained.
SWALLOWS_NEXT_TURN = (
    "{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n{% generation %}{{ m.content }}"
    "<|im_end|>\n{% if not loop.last %}<|im_start|>{{ messages[loop.index0 + 1].role }}\n"
    "{{ messages[loop.index0 + 1].content }}<|im_end|>\n{% endif %}{% endgeneration %}"
    "{% elif loop.first or messages[loop.index0 - 1].role != 'assistant' %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "<|im_end|>\n{% endif %}{% endfor %}"
)


def qa_recipe(tmp_path: Path, extra: str = "") -> Path:
    rows = [{"q": f"What is {i} plus 2?", "a": str(i + 2)} for i in range(6)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"tokenizer: {{kind: local, path: {TOKENIZER}}}\nseq_len: 64\n{extra}\n"
                      "tasks:\n  qa:\n    source: {kind: jsonl, path: qa.jsonl}\n"
                      '    templates: [{kind: inline, name: ask, prompt: "Q: {{ q }}\\nA:", completion: " {{ a }}"}]\n'
                      f"stages:\n  - {{name: s, objective: sft, tasks: [qa], model: {MODEL}}}\n")
    return recipe


def shifted_labels(real):
    """Labels one token late: what an off-by-one in the label step would write."""
    def shifted(ids, offsets, spans, objective):
        labels = real(ids, offsets, spans, objective)
        trained = np.zeros(len(labels), dtype=bool)
        trained[1:] = labels[:-1] != IGNORE
        return np.where(trained, ids, IGNORE).astype(labels.dtype)
    return shifted


def test_a_label_array_shifted_by_one_token_stops_the_compile(tmp_path, monkeypatch):
    monkeypatch.setattr(units, "doc_labels", shifted_labels(units.doc_labels))
    with pytest.raises(TunecError) as err:
        compile_recipe(qa_recipe(tmp_path), tmp_path / "out", Options(workers=1))
    message = str(err.value)
    assert message.startswith("task 'qa', train row 0: template 'ask': mask audit: ")
    assert "not to the intended ' 2<|endoftext|>'" in message and "`audit: warn`" in message
    assert not (tmp_path / "out").exists()  # nothing written


def test_audit_warn_compiles_and_counts_the_failures_in_the_plan(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(units, "doc_labels", shifted_labels(units.doc_labels))
    with caplog.at_level(logging.WARNING):
        plan = compile_recipe(qa_recipe(tmp_path, "audit: warn"), tmp_path / "out", Options(workers=1))
    counts = plan.stages[0].tasks["qa"]
    assert counts.audit_failures == counts.examples == 6
    saved = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert saved["stages"][0]["tasks"]["qa"]["audit_failures"] == 6
    warned = [r.getMessage() for r in caplog.records if "fail the mask audit" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("task 'qa', train: 6 document(s) fail the mask audit")
    assert "row 0, template 'ask'" in warned[0]


def test_a_right_mask_passes_and_counts_no_failure(tmp_path):
    plan = compile_recipe(qa_recipe(tmp_path, "audit: warn"), tmp_path / "out", Options(workers=1))
    assert plan.stages[0].tasks["qa"].audit_failures == 0


def test_a_bad_audit_value_is_a_located_error(tmp_path):
    from tunec.compiler.load import load_recipe

    with pytest.raises(TunecError) as err:
        load_recipe(qa_recipe(tmp_path, "audit: lenient"))
    (problem,) = err.value.problems
    assert problem.field == "audit" and problem.line == 3 and "'error' or 'warn'" in problem.message


def chat_recipe(tmp_path: Path, template: str, extra: str = "") -> Path:
    tok = make_tokenizer(tmp_path / "tok", template, [], [])
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"tokenizer: {{kind: local, path: {tok}}}\nseq_len: 512\n{extra}\n"
                      "tasks:\n  chat:\n    source: {kind: jsonl, path: chat.jsonl}\n"
                      "    format: {kind: chat, messages: messages}\n"
                      f"stages:\n  - {{name: s, objective: sft, tasks: [chat], model: {MODEL}}}\n")
    return recipe


def test_a_chat_template_whose_assistant_span_includes_the_next_user_turn_is_caught(tmp_path):
    with pytest.raises(TunecError) as err:
        compile_recipe(chat_recipe(tmp_path, SWALLOWS_NEXT_TURN), tmp_path / "out", Options(workers=1))
    message = str(err.value)
    assert message.startswith("task 'chat', train row 0: template 'messages': mask audit: ")
    assert "Again: say hello" in message  # the user's text, trained
    assert "marks more than the assistant turn" in message


def test_the_same_conversations_under_warn_count_the_rows_with_a_later_user_turn(tmp_path):
    plan = compile_recipe(chat_recipe(tmp_path, SWALLOWS_NEXT_TURN, "audit: warn"), tmp_path / "out",
                          Options(workers=1))
    counts = plan.stages[0].tasks["chat"]
    assert counts.examples == 3 and counts.audit_failures == 2  # the third row has one exchange: nothing swallowed


def test_chat_spans_are_held_to_their_turn():
    ends = ("<|im_end|>", "<|endoftext|>")
    assert chat_span_ok("hello<|im_end|>", "hello", ends)
    assert chat_span_ok(" hello <|im_end|>\n", " hello ", ends)  # spaces around, a newline after: whitespace
    assert not chat_span_ok("hello", "hello", ends)  # no end of turn: the model never learns to stop
    assert not chat_span_ok("hello<|im_end|>\n<|im_start|>user\nbye<|im_end|>", "hello", ends)
    assert not chat_span_ok("<|im_start|>assistant\nhello<|im_end|>", "hello", ends)


def test_a_document_with_nothing_trained_fails():
    backend = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    text = "Q: hi\nA: yes<|endoftext|>"
    enc = backend.encode(text, add_special_tokens=False)
    start = enc.char_to_token(text.index(" yes"))
    labels = np.full(len(enc.ids), IGNORE)
    labels[start:] = enc.ids[start:]
    want = Intended([" yes<|endoftext|>"], [text[: text.index(" yes")]])
    assert audit_all(backend, enc.ids, [0, len(enc.ids)], labels, [want]) == []
    nothing = np.full(len(enc.ids), IGNORE)
    assert [d for d, _, _ in audit_all(backend, enc.ids, [0, len(enc.ids)], nothing, [want])] == [0]
    late = np.full(len(enc.ids), IGNORE)
    late[start + 1:] = enc.ids[start + 1:]  # one token late: the answer's first token untrained
    assert [d for d, _, _ in audit_all(backend, enc.ids, [0, len(enc.ids)], late, [want])] == [0]


def _runs(n: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n, count)
    return starts, np.minimum(n, starts + rng.integers(1, 40, count))


def test_the_table_decode_of_a_byte_level_tokenizer_is_its_decode_on_every_run():
    """The audit's fast decode gives, run for run, what the tokenizer's own decode gives: split
    multi-byte characters (replaced), added tokens and all."""
    from tunec.compiler.audit import ByteDecoder, decode_runs

    backend = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    assert ByteDecoder.of(backend) is not None
    text = "Résumé: naïve café — 中文 😀 «quotes» <|endoftext|> tabs\tand\nlines  " * 20
    ids = np.asarray(backend.encode(text, add_special_tokens=False).ids)
    starts, ends = _runs(len(ids), 3000, 0)
    flat = ids.tolist()
    want = backend.decode_batch([flat[a:b] for a, b in zip(starts, ends)], skip_special_tokens=False)
    assert decode_runs(backend, ids, starts, ends) == want
    assert any("\ufffd" in w for w in want)  # runs that cut a character in two were among them


def test_other_tokenizers_decode_through_the_tokenizer():
    """A tokenizer whose decode is not byte-level BPE's (here WordPiece), or whose added tokens are not
    ASCII, gets no table: the audit decodes through the tokenizer itself."""
    from tokenizers import decoders, models, pre_tokenizers

    from tunec.compiler.audit import ByteDecoder, decode_runs

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "##s": 3, "!": 4}
    wordpiece = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    wordpiece.decoder = decoders.WordPiece()
    assert ByteDecoder.of(wordpiece) is None
    ids = np.asarray(wordpiece.encode("hello worlds ! hellos").ids)
    starts, ends = _runs(len(ids), 50, 1)
    flat = ids.tolist()
    assert decode_runs(wordpiece, ids, starts, ends) == wordpiece.decode_batch(
        [flat[a:b] for a, b in zip(starts, ends)], skip_special_tokens=False)
    byte_level = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    byte_level.add_special_tokens(["<|fin\u00e9|>"])
    assert ByteDecoder.of(byte_level) is None
