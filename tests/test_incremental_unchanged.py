"""A rebuild whose units, stages, eval sets and leakage settings are all unchanged reads no unit: it keeps
the build, repeats its warnings, and writes the same bytes; any change to what the build key covers
takes the full path again."""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import pytest

from tunec.compiler import unitstore
from tunec.compiler.build import Options, compile_recipe

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "recipes" / "demo" / "tokenizer"
STORY = "Once upon a time a small brown fox lived by the old river."


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".tunec")}


def jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    """A task whose eval rows share a long text with its training rows (leakage warnings) and whose first
    template ends its prompt in a space (a unit-level warning)."""
    rows = [{"story": STORY, "q": f"Who {i}?", "a": f"fox {i}"} for i in range(8)]
    a = jsonl(tmp_path / "train.jsonl", rows)
    b = jsonl(tmp_path / "test.jsonl", [dict(r, q=f"Which {i}?") for i, r in enumerate(rows[:4])])
    path = tmp_path / "recipe.yaml"
    path.write_text(f"tokenizer: {{kind: local, path: {TOKENIZER}}}\nseq_len: 256\nleakage: warn\n" + textwrap.dedent(f"""
        tasks:
          t:
            source: {{kind: jsonl, path: {{train: {a}, test: {b}}}}}
            templates:
              - {{kind: inline, name: spaced, prompt: "{{{{ story }}}} Q: {{{{ q }}}} A: ", completion: " {{{{ a }}}}"}}
            eval: {{split: test}}
        stages:
          - {{name: s, objective: sft, tasks: [t], model: {{kind: config, config: {{model_type: llama}}}}}}
        """), encoding="utf-8")
    return path


def compile_(path: Path, out: Path, caplog, **kw) -> tuple[list[str], list]:
    said: list = []
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tunec"):
        compile_recipe(path, out, Options(workers=1, on_units=lambda r, b: said.append((r, b)), **kw))
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING], said[0]


def test_an_unchanged_rebuild_reads_no_unit_repeats_the_warnings_and_writes_the_same_bytes(
        recipe, tmp_path, caplog, monkeypatch):
    out = tmp_path / "out"
    warned, (reused, rebuilt) = compile_(recipe, out, caplog)
    assert reused == [] and rebuilt == [("t", "train"), ("t", "eval")]
    assert any("prompt ending in a space" in w for w in warned)
    assert any("also appear in the training mixture" in w for w in warned)
    before = tree(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["warnings"]["units"] and manifest["warnings"]["leakage"]

    def no_read(*a, **k):
        raise AssertionError("a unit was read")

    monkeypatch.setattr(unitstore, "open_unit", no_read)
    monkeypatch.setattr("tunec.compiler.cache.open_unit", no_read)
    again, (reused, rebuilt) = compile_(recipe, out, caplog)
    assert reused == [("t", "train"), ("t", "eval")] and rebuilt == []
    assert again == warned
    assert tree(out) == before


@pytest.mark.parametrize("edit", [
    ("objective: sft,", "objective: sft, lr: 2.0e-3,"),  # a stage setting: the stage is linked again
    ("eval: {split: test}", "eval: {split: test}\n    leakage: {context: [story]}"),  # in no unit's key
])
def test_a_change_the_build_key_covers_reads_the_units(recipe, tmp_path, caplog, monkeypatch, edit):
    out = tmp_path / "out"
    compile_(recipe, out, caplog)
    recipe.write_text(recipe.read_text().replace(*edit), encoding="utf-8")
    opened = []
    real = unitstore.open_unit

    def counted(*a, **k):
        opened.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr("tunec.compiler.cache.open_unit", counted)
    warned, _ = compile_(recipe, out, caplog)
    assert opened  # the full path: units read from the cache
    clean = tmp_path / "clean"
    compile_(recipe, clean, caplog, use_cache=False)
    assert tree(out) == tree(clean)
    if "context" in edit[1]:  # the shared story is context now: no leak left to warn about
        assert not any("also appear in the training mixture" in w for w in warned)


def test_units_missing_from_the_cache_are_compiled_again(recipe, tmp_path, caplog, unit_cache):
    import shutil

    out = tmp_path / "out"
    compile_(recipe, out, caplog)
    shutil.rmtree(unit_cache / "units")
    _, (reused, rebuilt) = compile_(recipe, out, caplog)
    assert reused == [] and len(rebuilt) == 2
    assert list((unit_cache / "units").rglob("*"))  # stored again


def test_warnings_are_kept_for_the_rebuild_even_when_this_compile_hides_them(recipe, tmp_path, caplog):
    out = tmp_path / "out"
    quiet = logging.getLogger("tunec")
    saved = quiet.level
    quiet.setLevel(logging.ERROR)  # a library user who silences tunec's warnings
    caplog.clear()
    try:
        compile_recipe(recipe, out, Options(workers=1))
    finally:
        quiet.setLevel(saved)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # none shown
    again, (reused, rebuilt) = compile_(recipe, out, caplog)
    assert rebuilt == []
    assert any("prompt ending in a space" in w for w in again)
    assert any("also appear in the training mixture" in w for w in again)
