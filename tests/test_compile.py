"""End-to-end compile: masks, packing invariants, determinism, truncation, bad input."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from tunec.compiler import build as build_mod
from tunec.compiler import link as link_mod
from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.errors import TunecError
from tunec.compiler.pack import IGNORE
from tunec.compiler.plan import read_plan
from tunec.compiler.shards import open_shard

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo"
TOKENIZER = DEMO / "tokenizer"
EOS = "<|endoftext|>"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def qa_rows(n: int, long_every: int = 0) -> list[dict]:
    rows = []
    for i in range(n):
        q = f"How many legs do {i} spiders have?"
        if long_every and i % long_every == 0:
            q += " Think it over carefully." * 40
        rows.append({"id": i, "question": q, "answer": str(8 * i)})
    return rows


def qa_recipe(tmp_path: Path, *, seq_len=64, truncation="drop", rows=None, objective="sft",
              templates='["arithmetic/qa"]', extra_task="") -> Path:
    jsonl(tmp_path / "data" / "qa.jsonl", rows if rows is not None else qa_rows(60))
    return write(tmp_path / "recipe.yaml", f"""
        tokenizer: {{kind: local, path: {TOKENIZER}}}
        seq_len: {seq_len}
        tasks:
          qa:
            source: {{kind: jsonl, path: data/qa.jsonl}}
            templates: {templates}
            train: {{split: train, stop: 50}}
            eval: {{split: train, start: 50}}
            truncation: {truncation}
        {extra_task}
        stages:
          - name: one
            objective: {objective}
            tasks: [qa]
            model: {{kind: config, config: {{model_type: llama}}}}
        """)


def rows_of(out: Path, shards) -> dict[str, np.ndarray]:
    parts = [open_shard(out / s.path, s.bytes) for s in shards]
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in ("input_ids", "labels", "position_ids")}


def documents(row_ids, row_labels, row_pos, pad_id):
    """Split a packed row into (ids, labels) per document, padding excluded."""
    starts = list(np.flatnonzero(row_pos == 0)) + [len(row_ids)]
    for lo, hi in zip(starts[:-1], starts[1:]):
        ids, labels = row_ids[lo:hi], row_labels[lo:hi]
        if np.all(ids == pad_id) and np.all(labels == IGNORE):
            continue
        yield ids, labels


@pytest.fixture(scope="module")
def demo_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    plan = compile_recipe(DEMO / "demo.yaml", out, Options(workers=1))
    return plan, out


def expected_pairs():
    """Every (prompt, completion) the demo recipe renders, keyed by the full text."""
    from tunec.compiler.check import check
    from tunec.compiler.load import load_recipe
    from tunec.compiler.sources import load_part
    from tunec.compiler.templates import Renderer

    checked = check(load_recipe(DEMO / "demo.yaml"))
    pairs = {}
    for name, task in checked.recipe.tasks.items():
        renderer = Renderer(list(checked.templates[name]))
        for part in ("train", "eval"):
            rows = load_part(checked.loaded, name, task, part)
            for i in range(rows.count):
                row = {k: v[i] for k, v in rows.columns.items()}
                for t in range(len(checked.templates[name])):
                    p, c = renderer.render(t, row)
                    pairs[p + c] = (p, c)
    return pairs


def test_masks_decode_to_exactly_the_completion_plus_eos(demo_build):
    plan, out = demo_build
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    pairs = expected_pairs()
    stage = plan.stages[0]
    sets = [stage.train.shards] + [e.data.shards for e in stage.eval.values()]
    checked_docs = 0
    for shards in sets:
        arrays = rows_of(out, shards)
        for ids, labels, pos in zip(arrays["input_ids"], arrays["labels"], arrays["position_ids"]):
            for doc_ids, doc_labels in documents(ids, labels, pos, plan.tokenizer.pad_id):
                full = tok.decode(doc_ids.tolist())
                assert full.endswith(EOS)
                prompt, completion = pairs[full[: -len(EOS)]]  # whole document: never split
                trained = doc_labels != IGNORE
                first = int(np.argmax(trained))
                assert trained[first:].all(), "trained tokens form one suffix"
                assert (doc_labels[trained] == doc_ids[trained]).all()
                assert tok.decode(doc_ids[first:].tolist()) == completion + EOS
                assert tok.decode(doc_ids[:first].tolist()) == prompt
                checked_docs += 1
    total = stage.train.tokens and sum(c.examples for c in stage.tasks.values())
    total += sum(e.counts.examples for e in stage.eval.values())
    assert checked_docs == total


def test_packing_invariants_and_plan_counts(demo_build):
    plan, out = demo_build
    stage = plan.stages[0]
    arrays = rows_of(out, stage.train.shards)
    ids, labels, pos = arrays["input_ids"], arrays["labels"], arrays["position_ids"]
    seq_len = plan.seq_len
    assert ids.shape == labels.shape == pos.shape == (stage.train.rows, seq_len)
    eos, pad = plan.tokenizer.eos_id, plan.tokenizer.pad_id
    docs = 0
    real_tokens = 0
    for r in range(ids.shape[0]):
        assert pos[r, 0] == 0
        # positions count up by one inside a document and restart at 0 at the next
        steps = np.diff(pos[r])
        assert np.all((steps == 1) | (pos[r, 1:] == 0))
        starts = np.flatnonzero(pos[r] == 0)
        assert np.all(labels[r, starts] == IGNORE), "the first token of every document is never trained"
        for doc_ids, _ in documents(ids[r], labels[r], pos[r], pad):
            assert doc_ids[-1] == eos  # a complete document ends with EOS: nothing split
            docs += 1
            real_tokens += len(doc_ids)
    assert docs == sum(c.examples for c in stage.tasks.values())
    assert real_tokens == stage.train.tokens == sum(c.tokens for c in stage.tasks.values())
    assert int((labels != IGNORE).sum()) == stage.train.trained_tokens
    assert stage.train.trained_tokens == sum(c.trained_tokens for c in stage.tasks.values())
    assert stage.train.fill_rate == pytest.approx(real_tokens / (stage.train.rows * seq_len), abs=1e-6)
    # best-fit decreasing on short documents leaves little room
    assert stage.train.fill_rate > 0.9
    counts = stage.tasks["reviews"]
    assert counts.templates == {"sentiment/review_short": 400, "sentiment/one_word": 400}


def test_plan_records_hashes_versions_and_shard_checksums(demo_build):
    plan, out = demo_build
    import hashlib

    assert plan.versions.keys() >= {"tunec", "tokenizers", "transformers"}
    assert len(plan.recipe.hash) == 64
    for s in plan.stages[0].train.shards:
        data = (out / s.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s.sha256
        assert len(data) == s.bytes
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) >= {s.path for s in plan.stages[0].train.shards}
    assert any(f.startswith("tokenizer/") for f in manifest["files"])
    # the build folder carries its tokenizer: it loads without the recipe
    tok = AutoTokenizer.from_pretrained(str(out / plan.tokenizer.path))
    assert tok.eos_token_id == plan.tokenizer.eos_id


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            if p.name != ".tunec-build"}


def test_deterministic_across_runs_and_worker_counts(tmp_path, demo_build, monkeypatch):
    _, first = demo_build
    monkeypatch.setattr(build_mod, "DEFAULT_SHARD_ROWS", 64)
    again = tmp_path / "again"
    two = tmp_path / "two"
    compile_recipe(DEMO / "demo.yaml", again, Options(workers=1))
    compile_recipe(DEMO / "demo.yaml", two, Options(workers=2))
    a, b, c = tree_bytes(first), tree_bytes(again), tree_bytes(two)
    assert a.keys() == b.keys() == c.keys()
    assert a == b
    assert a == c


def test_shard_size_does_not_change_the_rows(tmp_path, demo_build):
    plan, first = demo_build
    small = tmp_path / "small"
    plan2 = compile_recipe(DEMO / "demo.yaml", small, Options(workers=1, shard_rows=50))
    assert len(plan2.stages[0].train.shards) == -(-plan.stages[0].train.rows // 50)
    a = rows_of(first, plan.stages[0].train.shards)
    b = rows_of(small, plan2.stages[0].train.shards)
    for k in a:
        assert np.array_equal(a[k], b[k])


def test_lm_objective_trains_every_token_but_each_documents_first(tmp_path):
    plan = compile_recipe(qa_recipe(tmp_path, objective="lm"), tmp_path / "out", Options())
    stage = plan.stages[0]
    arrays = rows_of(tmp_path / "out", stage.train.shards)
    for ids, labels, pos in zip(arrays["input_ids"], arrays["labels"], arrays["position_ids"]):
        for doc_ids, doc_labels in documents(ids, labels, pos, plan.tokenizer.pad_id):
            assert doc_labels[0] == IGNORE
            assert np.array_equal(doc_labels[1:], doc_ids[1:])
    assert stage.train.trained_tokens == stage.train.tokens - stage.tasks["qa"].examples


@pytest.mark.parametrize("policy", ["drop", "truncate"])
def test_truncation_policies_are_counted(tmp_path, policy):
    recipe = qa_recipe(tmp_path, seq_len=48, truncation=policy, rows=qa_rows(60, long_every=10))
    plan = compile_recipe(recipe, tmp_path / "out", Options())
    counts = plan.stages[0].tasks["qa"]
    long_rows = len([i for i in range(50) if i % 10 == 0])
    if policy == "drop":
        assert counts.dropped == long_rows and counts.truncated == 0
        assert counts.examples == 50 - long_rows
    else:
        # cut at the end: the long question fills the row, the answer is gone, nothing is left to train:
        # dropped, and not counted as truncated too
        assert counts.dropped == long_rows and counts.truncated == 0
        assert counts.examples + counts.dropped == 50
    arrays = rows_of(tmp_path / "out", plan.stages[0].train.shards)
    assert arrays["input_ids"].shape[1] == 48


def test_truncation_error_names_task_and_row(tmp_path):
    recipe = qa_recipe(tmp_path, seq_len=48, truncation="error", rows=qa_rows(60, long_every=10))
    with pytest.raises(TunecError) as err:
        compile_recipe(recipe, tmp_path / "out", Options())
    msg = str(err.value)
    assert "task 'qa', train row 0" in msg and "longer than seq_len 48" in msg
    assert not (tmp_path / "out" / "plan.json").exists()


def test_never_a_doubled_bos(tmp_path):
    """A tokenizer whose post-processor adds BOS, and a template that writes BOS itself."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    tok_dir = tmp_path / "bos_tok"
    tok_dir.mkdir()
    backend = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    backend.add_special_tokens(["<s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    backend.save(str(tok_dir / "tokenizer.json"))
    config = json.loads((TOKENIZER / "tokenizer_config.json").read_text())
    config.update(bos_token="<s>", add_bos_token=True)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))

    jsonl(tmp_path / "d.jsonl", qa_rows(20))
    recipe = write(tmp_path / "r.yaml", f"""
        tokenizer: {{kind: local, path: {tok_dir}}}
        seq_len: 64
        tasks:
          plain:
            source: {{kind: jsonl, path: d.jsonl}}
            templates: ["arithmetic/qa"]
          with_bos:
            source: {{kind: jsonl, path: d.jsonl}}
            templates:
              - {{kind: inline, prompt: "<s>Q: {{{{ question }}}}\\nA:", completion: " {{{{ answer }}}}"}}
        stages:
          - {{name: s, objective: sft, tasks: [plain, with_bos], model: {{kind: config, config: {{model_type: llama}}}}}}
        """)
    plan = compile_recipe(recipe, tmp_path / "out", Options())
    arrays = rows_of(tmp_path / "out", plan.stages[0].train.shards)
    n_docs = 0
    for ids, labels, pos in zip(arrays["input_ids"], arrays["labels"], arrays["position_ids"]):
        for doc_ids, _doc_labels in documents(ids, labels, pos, plan.tokenizer.pad_id):
            assert doc_ids[0] == bos and doc_ids[1] != bos
            assert doc_ids[-1] == plan.tokenizer.eos_id
            n_docs += 1
    assert n_docs == 40


# ----------------------------------------------------------------- bad input


def compile_error(recipe: Path, out: Path) -> str:
    had_plan = (out / "plan.json").exists()
    before = (out / "plan.json").read_bytes() if had_plan else None
    with pytest.raises(TunecError) as err:
        compile_recipe(recipe, out, Options())
    if had_plan:  # a refused build loses nothing of the one already there
        assert (out / "plan.json").read_bytes() == before
    else:
        assert not (out / "plan.json").exists()
    return str(err.value)


def test_malformed_jsonl_line_is_located(tmp_path):
    recipe = qa_recipe(tmp_path)
    data = tmp_path / "data" / "qa.jsonl"
    lines = data.read_text().splitlines()
    lines[6] = '{"id": 6, "question": "broken'
    data.write_text("\n".join(lines) + "\n")
    msg = compile_error(recipe, tmp_path / "out")
    assert f"{data}:7:" in msg and "malformed JSON" in msg


def test_missing_file_missing_column_and_empty_dataset(tmp_path):
    recipe = qa_recipe(tmp_path)
    (tmp_path / "data" / "qa.jsonl").unlink()
    assert "file not found" in compile_error(recipe, tmp_path / "o1")

    jsonl(tmp_path / "data" / "qa.jsonl", [{"id": i, "question": "q", "reply": "a"} for i in range(60)])
    msg = compile_error(recipe, tmp_path / "o2")
    assert "uses `answer`" in msg and "recipe.yaml:" in msg

    (tmp_path / "data" / "qa.jsonl").write_text("")
    assert "file is empty" in compile_error(recipe, tmp_path / "o3")

    jsonl(tmp_path / "data" / "qa.jsonl", qa_rows(10))  # train selection 0..50 -> 10 rows; eval 50.. -> none
    msg = compile_error(recipe, tmp_path / "o4")
    assert "eval selection is empty" in msg and "has 10 rows" in msg


def test_empty_completion_is_an_error_naming_the_row_and_keeps_the_previous_build(tmp_path):
    recipe = qa_recipe(tmp_path)
    out = tmp_path / "out"
    compile_recipe(recipe, out, Options())
    rows = qa_rows(60)
    rows[3]["answer"] = "  "
    jsonl(tmp_path / "data" / "qa.jsonl", rows)
    msg = compile_error(recipe, out)  # asserts the previous plan.json is untouched
    assert "task 'qa', train row 3" in msg and "empty completion" in msg
    assert read_plan(out).stages[0].tasks["qa"].examples == 50


def test_output_folder_of_another_build_is_refused_unless_forced(tmp_path):
    out = tmp_path / "out"
    a = qa_recipe(tmp_path / "a")
    b = qa_recipe(tmp_path / "b")
    compile_recipe(a, out, Options())
    compile_recipe(a, out, Options())  # the same recipe rebuilds in place
    msg = compile_error(b, out)
    assert "another recipe" in msg and "--force" in msg
    compile_recipe(b, out, Options(force=True))
    assert json.loads((out / "plan.json").read_text())["recipe"]["file"] == "recipe.yaml"

    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(TunecError, match="not a tunec build folder"):
        compile_recipe(a, other, Options(force=True))
    assert (other / "mine.txt").read_text() == "keep me"


def test_interrupted_compile_keeps_the_previous_build(tmp_path, monkeypatch):
    recipe = qa_recipe(tmp_path)
    out = tmp_path / "out"
    compile_recipe(recipe, out, Options())
    def files():  # the lock file stays in a folder that existed before the lock (compiler/lock.py)
        return {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".tunec.lock"}

    before = files()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(link_mod, "write_shard", crash)
    with pytest.raises(KeyboardInterrupt):  # no cache: the unchanged stage is relinked, not kept
        compile_recipe(recipe, out, Options(use_cache=False))
    assert files() == before  # the new build was staged aside
    assert read_plan(out).stages
    assert not list(tmp_path.glob(".out.tunec-new-*"))  # nor left its staging folder behind
