"""Incremental compile: only changed units rebuild, unchanged stages keep their shards, and the output is
byte-identical to a clean build."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
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


def test_a_rebuilt_unit_reads_its_rows_without_importing_datasets(collection, tmp_path, unit_cache):
    """The cache remembers where `datasets` keeps a file's rows (by the file's bytes): a template edit
    rebuilds its units from there, with neither `datasets` nor pandas imported, and the same bytes."""
    import subprocess
    import sys

    out = tmp_path / "out"
    compile_(collection, out)
    collection.write_text(collection.read_text().replace(VERDICT, "Did the author like it?"), encoding="utf-8")
    shutil.rmtree(unit_cache / "units")  # every unit rebuilt (held-out fractions: rows taken out of order)
    code = ("import sys; from tunec.compiler.build import Options, compile_recipe; "
            "compile_recipe(sys.argv[1], sys.argv[2], Options(workers=1)); "
            "print(sorted(m for m in ('datasets', 'pandas') if m in sys.modules))")
    env = {**__import__("os").environ, "TUNEC_CACHE": str(unit_cache)}
    done = subprocess.run([sys.executable, "-c", code, str(collection), str(out)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    clean = tmp_path / "clean"
    compile_(collection, clean, use_cache=False)
    assert tree(out) == tree(clean)


def test_rows_found_again_without_datasets_equal_rows_loaded_by_it(collection, unit_cache):
    from tunec.compiler.load import load_recipe
    from tunec.compiler.sources import load_part

    loaded = load_recipe(collection)
    for name, task in loaded.recipe.tasks.items():
        parts = ["train"] + (["eval"] if task.eval is not None else [])
        for part in parts:
            first = load_part(loaded, name, task, part)  # through datasets
            load_part(loaded, name, task, part, unit_cache)  # remembered (or found: two parts, one file)
            again = load_part(loaded, name, task, part, unit_cache)
            assert first.table is not None and again.table is None
            assert np.array_equal(first.index, again.index) and first.total == again.total
            assert again.columns == first.columns
            assert list(again.slices(5)) == list(first.slices(5))
            assert again.slice(0, 3) == first.slice(0, 3) and again.slice(2, 7) == first.slice(2, 7)
    # an Arrow file that is no longer as it was is not read: datasets loads the file again
    pointers = list((unit_cache / "arrow").rglob("*.json"))
    assert pointers
    for p in pointers:
        for f in json.loads(p.read_text())["files"]:
            __import__("os").utime(f["path"], ns=(1, 1))
    name, task = next(iter(loaded.recipe.tasks.items()))
    assert load_part(loaded, name, task, "train", unit_cache).table is not None
