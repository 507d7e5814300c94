"""Start-up work run side by side: where cores are to spare, local files converted to Arrow in a child
process while the tokenizer loads (compiler/sources.py); worker processes forked at the compile's start
where it may fork, on any number of cores, and otherwise spawned before the tokenizer is loaded (cores
to spare) or once it is (fewer cores), handed their setup once it is loaded (compiler/executors.py);
on fewer cores, `datasets` imported while the model-config check is awaited. None of it may change a
byte of the build, and a child's answer that no longer holds is never used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunec.compiler import sources

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo"


def _rows(path: Path, n: int) -> Path:
    words = "the film was long and the plot was thin but the cast did what it could with it".split()
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            text = " ".join(words[(i + k) % len(words)] for k in range(40 + i % 30))
            fh.write(json.dumps({"question": f"{text} ({i})?", "answer": str(i % 97)}) + "\n")
    return path


def _recipe(tmp_path: Path, data: Path) -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"tokenizer: {{kind: local, path: {DEMO / 'tokenizer'}}}\nseq_len: 512\n"
        f"tasks:\n  arithmetic:\n    source: {{kind: jsonl, path: {data}}}\n"
        "    templates: [arithmetic/qa]\n    eval: {fraction: 0.1}\n"
        "stages:\n  - {name: sft, objective: sft, tasks: [arithmetic], model: {kind: config, config: "
        "{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, "
        "vocab_size: 1024}}}\n", encoding="utf-8")
    return recipe


_SCRIPT = """
import json, multiprocessing, os, sys
from pathlib import Path
import tunec.compiler.build as build
from tunec.compiler import executors

handed = []
events = []
original = executors.Workers.hand_over
original_ahead = executors.Workers.ahead.__func__
original_load = build.tokcache.load

def hand_over(self, *args):
    handed.append(self.workers)
    return original(self, *args)

def ahead(cls, workers, fork=False):
    started = original_ahead(cls, workers, fork)
    events.append("forked" if started.forked else "spawned")
    return started

def load(*args):
    events.append("tokenizer")
    return original_load(*args)

if __name__ == "__main__":
    executors.Workers.hand_over = hand_over
    executors.Workers.ahead = classmethod(ahead)
    build.tokcache.load = load
    recipe, out, cache = sys.argv[1:4]
    cpus = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    build.usable_cpus = lambda: cpus  # 8: as if cores were to spare
    if len(sys.argv) > 5 and sys.argv[5] == "spawn":  # as where this process may not fork
        build.can_fork = lambda: False
    options = build.Options(workers=2, use_cache=cache != "-", cache=None if cache == "-" else Path(cache))
    try:
        build.compile_recipe(recipe, out, options)
        failed = None
    except build.TunecError as exc:
        failed = str(exc)
    print(json.dumps(events))
    print(json.dumps({"handed": handed, "datasets": "datasets" in sys.modules,
                      "children": len(multiprocessing.active_children()), "failed": failed}))
"""


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_files_converted_beside_the_tokenizer_and_workers_started_ahead_build_the_same_bytes(tmp_path):
    from tunec.compiler.build import Options, compile_recipe

    data = _rows(tmp_path / "rows.jsonl", 8000)  # over a megabyte per worker: the workers start ahead
    assert data.stat().st_size > 2 << 20
    recipe = _recipe(tmp_path, data)
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT, encoding="utf-8")

    def side_by_side(out: str, cache: str, start: str = "fork") -> tuple[list[str], dict]:
        done = subprocess.run([sys.executable, str(script), str(recipe), str(tmp_path / out), cache, "8", start],
                              env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        events, got = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
        return events, got

    events, first = side_by_side("a", "-")
    assert events == ["forked", "tokenizer"]  # forked before the tokenizer's load, with no thread running yet
    # the rows came from the child's Arrow files: this process never imported datasets
    assert first == {"handed": [2], "datasets": False, "children": 0, "failed": None}
    assert list((tmp_path / "tmp").iterdir()) == []  # the workers' setup folder is gone
    events, cached = side_by_side("b", str(tmp_path / "cache"))  # the same with a cache, which remembers the files
    assert events == ["forked", "tokenizer"]
    assert cached == {"handed": [2], "datasets": False, "children": 0, "failed": None}
    events, spawned = side_by_side("s", "-", "spawn")  # where it may not fork: spawned, also before the load
    assert events == ["spawned", "tokenizer"]
    assert spawned == {"handed": [2], "datasets": False, "children": 0, "failed": None}

    # a recipe that fails its check after the workers were started: they end with the compile
    text = recipe.read_text(encoding="utf-8")
    recipe.write_text(text.replace("num_attention_heads: 2", "num_attention_heads: 3"), encoding="utf-8")
    _, broken = side_by_side("c", "-")
    assert broken["handed"] == [] and broken["children"] == 0 and "multiple of" in broken["failed"]
    assert list((tmp_path / "tmp").iterdir()) == [] and not (tmp_path / "c").exists()
    recipe.write_text(text, encoding="utf-8")
    assert list((tmp_path / "cache" / sources.ARROW_POINTERS).rglob("*.json"))

    compile_recipe(recipe, tmp_path / "here", Options(workers=1, use_cache=False))  # rows read through datasets
    here = _files(tmp_path / "here")
    assert _files(tmp_path / "a") == here and _files(tmp_path / "b") == here and _files(tmp_path / "s") == here


def test_the_childs_answer_is_what_datasets_loads(tmp_path):
    import datasets

    data = _rows(tmp_path / "rows.jsonl", 50)
    found = sources.arrow_of_file("jsonl", str(data))
    ds = datasets.load_dataset("json", data_files={"rows": str(data)}, split="rows")
    assert found["total"] == len(ds) == 50 and found["columns"] == ds.column_names
    assert [f["path"] for f in found["files"]] == [f["filename"] for f in ds.cache_files]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"question": "ok"}\n{"question": \xff}\n')
    assert "error" in sources.arrow_of_file("jsonl", str(bad))  # the compile reads it itself, and says why


def test_an_answer_for_a_file_changed_since_is_not_used(tmp_path, monkeypatch):
    data = _rows(tmp_path / "rows.jsonl", 20)
    key = ("jsonl", str(data))
    monkeypatch.setitem(sources._arrows, key, sources.arrow_of_file("jsonl", str(data)))
    split = sources._prefetched("jsonl", data)
    assert split is not None and split.total == 20
    with data.open("a", encoding="utf-8") as fh:  # one more row: another size
        fh.write(json.dumps({"question": "and one more?", "answer": "1"}) + "\n")
    assert sources._prefetched("jsonl", data) is None
    monkeypatch.setitem(sources._arrows, key, {"error": "no answer"})
    assert sources._prefetched("jsonl", data) is None


@pytest.mark.slow
def test_on_fewer_cores_workers_are_forked_first_or_spawned_once_the_tokenizer_is_loaded_and_build_the_same_bytes(
        tmp_path):
    from tunec.compiler.build import Options, compile_recipe

    data = _rows(tmp_path / "rows.jsonl", 8000)
    recipe = _recipe(tmp_path, data)
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT, encoding="utf-8")

    def two_cores(out: str, start: str) -> tuple[list[str], dict]:
        done = subprocess.run([sys.executable, str(script), str(recipe), str(tmp_path / out), "-", "2", start],
                              env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        events, got = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
        return events, got

    # forked: idle until handed their setup, they cost the tokenizer's load nothing, so they start first
    events, got = two_cores("a", "fork")
    assert events == ["forked", "tokenizer"]
    assert got == {"handed": [2], "datasets": True, "children": 0, "failed": None}  # no prefetch child here
    # spawned: after the tokenizer's load, not beside it
    events, got = two_cores("s", "spawn")
    assert events == ["tokenizer", "spawned"]
    assert got == {"handed": [2], "datasets": True, "children": 0, "failed": None}
    assert list((tmp_path / "tmp").iterdir()) == []
    compile_recipe(recipe, tmp_path / "here", Options(workers=1, use_cache=False))
    here = _files(tmp_path / "here")
    assert _files(tmp_path / "a") == here and _files(tmp_path / "s") == here


def test_datasets_is_imported_while_the_check_waits_only_when_the_build_will_read_through_it(tmp_path,
                                                                                           monkeypatch):
    from tunec.compiler import build

    data = _rows(tmp_path / "rows.jsonl", 40)
    recipe = _recipe(tmp_path, data)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    cache = tmp_path / "cache"
    build.compile_recipe(recipe, tmp_path / "first", build.Options(workers=1, cache=cache))  # remembers the file

    class Checked(Exception):
        pass

    def check(loaded, cache_dir):
        raise Checked

    imports: list[int] = []
    monkeypatch.setattr(build, "check", check)
    monkeypatch.setattr(build, "quiet_datasets", lambda: imports.append(1))

    def imported(waiting: bool, **options) -> bool:
        monkeypatch.setattr(build, "checks_running", lambda: waiting)
        imports.clear()
        with pytest.raises(Checked):
            build.compile_recipe(recipe, tmp_path / "out", build.Options(workers=1, **options))
        return bool(imports)

    assert imported(True, use_cache=False)  # the file is converted through datasets: imported while waiting
    assert not imported(False, use_cache=False)  # nothing to wait for: imported when the rows are loaded
    assert not imported(True, cache=cache)  # the cache knows the file's Arrow files: datasets is not needed
    data.write_text(data.read_text(encoding="utf-8") + json.dumps({"question": "q?", "answer": "a"}) + "\n",
                    encoding="utf-8")
    assert imported(True, cache=cache)  # changed since: converted again
