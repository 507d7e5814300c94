"""Incremental compile: only changed units rebuild, unchanged stages keep their shards, and the output is
byte-identical to a clean build."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from tunec.compiler.build import Options, compile_recipe

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo"
VERDICT = "Did the reviewer like it?"


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".tunec")}


@pytest.fixture
def collection(tmp_path: Path) -> Path:
    """The demo collection (four tasks, few-shot, held-out, chat) plus a second stage training on `plurals`
    from the first one's model, in a copy we may edit."""
    shutil.copytree(DEMO / "data", tmp_path / "data")
    shutil.copytree(DEMO / "tokenizer", tmp_path / "tokenizer")
    text = (DEMO / "collection.yaml").read_text(encoding="utf-8")
    assert text.count(VERDICT) == 1
    text = text.replace("budget: {kind: tokens, count: 150000}", "budget: {kind: tokens, count: 40000}")
    text += "  - {name: plurals, objective: sft, tasks: [plurals], model: {kind: stage, stage: collection}}\n"
    (tmp_path / "collection.yaml").write_text(text, encoding="utf-8")
    return tmp_path / "collection.yaml"


def compile_(path: Path, out: Path, **kw) -> tuple[list, list]:
    said: list = []
    compile_recipe(path, out, Options(workers=1, on_units=lambda r, b: said.append((r, b)), **kw))
    return said[0]


@pytest.mark.slow  # five compiles of the demo collection
def test_one_template_edit_rebuilds_its_task_only_and_matches_a_clean_build(collection, tmp_path, caplog):
    out = tmp_path / "out"
    reused, rebuilt = compile_(collection, out)
    assert reused == [] and len(rebuilt) == 7
    manifest = json.loads((out / "manifest.json").read_text())
    first_stage_files = {rel: (out / rel).stat().st_ino for rel in manifest["files"]
                         if rel.startswith("stages/collection/")}

    # no change: every unit reused, every stage kept, the same bytes
    before = tree(out)
    with caplog.at_level(logging.INFO, logger="tunec.compiler.build"):
        reused, rebuilt = compile_(collection, out)
    assert len(reused) == 7 and rebuilt == []
    assert sum("shards kept" in r.getMessage() for r in caplog.records) == 2
    assert tree(out) == before

    # one template of `reviews_chat` (trained in the first stage only)
    collection.write_text(collection.read_text().replace(VERDICT, "Did the author like it?"), encoding="utf-8")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tunec.compiler.build"):
        reused, rebuilt = compile_(collection, out)
    assert rebuilt == [("reviews_chat", "train")] and len(reused) == 6
    kept = [r.getMessage() for r in caplog.records if "shards kept" in r.getMessage()]
    assert kept == ["stage plurals: unchanged, shards kept from the previous build"]  # it links `plurals` only
    clean = tmp_path / "clean"
    compile_(collection, clean, use_cache=False)
    assert tree(out) == tree(clean)
    # the first stage was relinked (new files), the shards differ from before
    assert any((out / rel).stat().st_ino != ino for rel, ino in first_stage_files.items() if (out / rel).exists())
    # ... but its eval sets, made from units that did not change, are the previous build's files
    evals = {rel: ino for rel, ino in first_stage_files.items() if rel.startswith("stages/collection/eval/")}
    assert evals and all((out / rel).stat().st_ino == ino for rel, ino in evals.items())
    assert all((out / rel).stat().st_ino != ino for rel, ino in first_stage_files.items()
               if rel.startswith("stages/collection/train/"))
