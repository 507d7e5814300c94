"""Fault injection: bad inputs through the real CLI, and failures or kills at every point of a compile.

The first part feeds `tunec` damaged recipes, data, templates, output paths and builds, each
something the project already rejects: every one must exit 1 with `error:` lines and no
traceback. The second part makes a compile fail late (a shard, the manifest, the plan, the
swap) and kills real `tunec compile` processes with SIGKILL, polled from outside at several
moments and at exact moments from inside (a small wrapper passed to `python -c`, as in
tests/test_faults.py): the previous build must stay byte-identical (every file's sha256)
until the new one is complete, and the next compile cleans what the killed one left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import DEMO, tiny_llama

from tunec.compiler import build as build_mod
from tunec.compiler import link as link_mod
from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.errors import TunecError
from tunec.compiler.fileio import sha256_file
from tunec.compiler.lock import FILES as LOCK_FILES
from tunec.compiler.lock import HOLDER_FILE

RECIPE = f"""\
tokenizer: {{kind: local, path: {DEMO}/tokenizer}}
seq_len: 64
seed: 1
tasks:
  qa:
    source: {{kind: jsonl, path: {{train: data/train.jsonl, test: data/test.jsonl}}}}
    templates: [arithmetic/qa]
    eval: {{split: test}}
stages:
  - name: base
    objective: sft
    tasks: [qa]
    model: {tiny_llama(positions=64)}
    lr: 0.01
    batch_tokens: 256
    max_steps: 2
"""
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def make_project(root: Path, train_rows: int = 40) -> Path:
    """A recipe and its data under ``root``: questions of our own making, tests disjoint from training."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", range(train_rows)), ("test", range(10_000, 10_005))):
        lines = [json.dumps({"question": f"What is {i} plus {i % 7}?", "answer": str(i + i % 7)}) for i in rows]
        (data / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE)
    return recipe


def tunec(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunec", *map(str, args)], env=ENV, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def snapshot(out: Path) -> dict[str, str]:
    """sha256 of every file of a build folder (the lock files are not part of a build)."""
    return {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in LOCK_FILES}


def assert_complete(out: Path) -> None:
    """A finished build: every file the manifest and the plan name exists with its sha256."""
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    for rel, entry in manifest.items():
        assert sha256_file(out / rel) == entry["sha256"], rel
    plan = json.loads((out / "plan.json").read_text())
    for stage in plan["stages"]:
        sets = [stage["train"]] + [e["data"] for e in stage["eval"].values()]
        for shard in (s for packed in sets for s in packed["shards"]):
            assert shard["path"] in manifest and sha256_file(out / shard["path"]) == shard["sha256"]


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tunec-"))


# ----------------------------------------------------------------- bad inputs through the CLI


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))


def _other_recipe_build(root: Path, recipe: Path, out: Path) -> None:
    other = root / "other.yaml"
    other.write_text(recipe.read_text())
    compile_recipe(other, out, Options(workers=1))


def _damaged_shard(root: Path, recipe: Path, out: Path) -> None:
    compile_recipe(recipe, out, Options(workers=1))
    shard = next((out / "stages" / "base" / "train").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-40])


def _unfinished_build(root: Path, recipe: Path, out: Path) -> None:
    compile_recipe(recipe, out, Options(workers=1))
    (out / "plan.json").unlink()


# name -> (damage(root, recipe, out), the command's arguments, a piece of its error)
CASES = {
    "recipe file missing": (lambda r, rec, o: rec.unlink(), ["validate", "{recipe}"], "recipe.yaml"),
    "YAML syntax error": (lambda r, rec, o: rec.write_text("tasks: [a\nseq_len: 1\n"), ["validate", "{recipe}"],
                          "recipe.yaml:"),
    "unknown key": (lambda r, rec, o: _edit(rec, "seq_len: 64", "seq_len: 64\nseq_lenn: 3"),
                    ["validate", "{recipe}"], "seq_lenn"),
    "Python tag": (lambda r, rec, o: _edit(rec, "seed: 1", "seed: !!python/object:os.system x"),
                   ["validate", "{recipe}"], "tag"),
    "infinite lr": (lambda r, rec, o: _edit(rec, "lr: 0.01", "lr: .inf"), ["validate", "{recipe}"], "lr"),
    "zero seq_len": (lambda r, rec, o: _edit(rec, "seq_len: 64", "seq_len: 0"), ["validate", "{recipe}"], "seq_len"),
    "unknown stage task": (lambda r, rec, o: _edit(rec, "tasks: [qa]", "tasks: [qaa]"), ["validate", "{recipe}"],
                           "qaa"),
    "unknown template": (lambda r, rec, o: _edit(rec, "arithmetic/qa", "arithmetic/qaa"), ["validate", "{recipe}"],
                         "arithmetic/qaa"),
    "template variable not a column": (
        lambda r, rec, o: _edit(rec, "templates: [arithmetic/qa]",
                                "templates: [{kind: inline, prompt: '{{ questoin }}', completion: ' {{ answer }}'}]"),
        ["validate", "{recipe}"], "questoin"),
    "Jinja syntax error": (
        lambda r, rec, o: _edit(rec, "templates: [arithmetic/qa]",
                                "templates: [{kind: inline, prompt: '{{ question ', completion: ' {{ answer }}'}]"),
        ["validate", "{recipe}"], "recipe.yaml:"),
    "data file missing": (lambda r, rec, o: (r / "data" / "test.jsonl").unlink(), ["compile", "{recipe}", "-o", "{out}"],
                          "test.jsonl"),
    "malformed JSONL": (lambda r, rec, o: (r / "data" / "train.jsonl").write_text('{"question": "a", "answer": 1\n'),
                        ["compile", "{recipe}", "-o", "{out}"], "train.jsonl:1:"),
    "data not UTF-8": (lambda r, rec, o: (r / "data" / "train.jsonl").write_bytes(b'{"question": "\xff", "answer": "1"}\n'),
                       ["compile", "{recipe}", "-o", "{out}"], "train.jsonl:1:"),
    "example longer than seq_len": (
        lambda r, rec, o: (_edit(rec, "eval: {split: test}", "eval: {split: test}\n    truncation: error"),
                           (r / "data" / "train.jsonl").write_text(json.dumps({"question": "7 " * 200, "answer": "1"}) + "\n")),
        ["compile", "{recipe}", "-o", "{out}"], "longer than seq_len 64"),
    "unknown --set path": (lambda r, rec, o: None, ["compile", "{recipe}", "-o", "{out}", "--set", "stages.0.lrr=1"],
                           "lrr"),
    "template file missing": (lambda r, rec, o: _edit(rec, "templates: [arithmetic/qa]",
                                                      "templates: [{kind: file, path: nothere.j2}]"),
                              ["validate", "{recipe}"], "nothere.j2"),
    "output parent is a file": (lambda r, rec, o: o.write_text("x"), ["compile", "{recipe}", "-o", "{out}/build"],
                                "is a file, not a folder"),
    "output folder holds other files": (lambda r, rec, o: (o.mkdir(), (o / "notes.txt").write_text("x")),
                                        ["compile", "{recipe}", "-o", "{out}"], "not a tunec build folder"),
    "output holds another recipe's build": (_other_recipe_build, ["compile", "{recipe}", "-o", "{out}"],
                                            "pass --force"),
    "inspect an unfinished build": (_unfinished_build, ["inspect", "{out}"], "did not finish"),
    "inspect a truncated shard": (_damaged_shard, ["inspect", "{out}", "--show", "1"], "00000.safetensors"),
    "plan.json not JSON": (lambda r, rec, o: (compile_recipe(rec, o, Options(workers=1)),
                                              (o / "plan.json").write_text("{not json")),
                           ["inspect", "{out}"], "plan.json"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line_per_problem_and_no_traceback(tmp_path, case):
    damage, args, expected = CASES[case]
    recipe = make_project(tmp_path)
    out = tmp_path / "out"
    damage(tmp_path, recipe, out)
    result = tunec(*(a.format(recipe=recipe, out=out) for a in args), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and "Traceback" not in result.stderr + result.stdout, result.stderr
    assert expected in result.stderr, result.stderr


# ----------------------------------------------------------------- output paths, before any work


def _no_work(*args, **kwargs):
    raise AssertionError("the recipe was read before the output path was checked")


def test_an_output_under_a_file_is_refused_before_any_work(tmp_path, monkeypatch):
    recipe = make_project(tmp_path)
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(build_mod, "check", _no_work)
    with pytest.raises(TunecError) as err:
        compile_recipe(recipe, tmp_path / "file" / "a" / "b", Options(workers=1))
    assert str(err.value) == f"output {tmp_path}/file/a/b: {tmp_path}/file is a file, not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any permission bits, so a chmod'ed folder "
                    "cannot stand for an unwritable or read-only one")
@pytest.mark.parametrize("where", ["parent", "output"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch, where):
    recipe = make_project(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    out = locked / "build"
    if where == "output":
        compile_recipe(recipe, out, Options(workers=1))
        (out / ".tunec.lock").unlink(missing_ok=True)
    target = locked if where == "parent" else out
    target.chmod(0o555)
    monkeypatch.setattr(build_mod, "check", _no_work)
    try:
        with pytest.raises(TunecError, match=f"cannot write in {target} .*; permission denied$"):
            compile_recipe(recipe, out, Options(workers=1))
    finally:
        target.chmod(0o755)


# ----------------------------------------------------------------- failures late in a compile


def _fail_at(point: str, monkeypatch) -> type[BaseException]:
    """Make the next compile fail at ``point``; the exception it then raises."""
    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if point == "shard":
        monkeypatch.setattr(link_mod, "write_shard", boom)
        return OSError
    if point == "manifest":
        monkeypatch.setattr(build_mod, "_write_manifest", boom)
        return OSError
    if point == "plan serialisation":
        def unserialisable(data):
            if "stages" in data and "versions" in data:  # the plan, after everything else is written
                raise ValueError("Out of range float values are not JSON compliant")
            return original(data)

        original = build_mod.canonical_json
        monkeypatch.setattr(build_mod, "canonical_json", unserialisable)
        return ValueError
    if point == "swap":
        monkeypatch.setattr(build_mod, "_exchange", boom)
        return TunecError
    if point == "interrupt":
        def interrupt(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(build_mod, "_write_manifest", interrupt)
        return KeyboardInterrupt
    raise AssertionError(point)


@pytest.mark.parametrize("force", [False, True], ids=["same recipe", "forced onto another recipe"])
@pytest.mark.parametrize("point", ["shard", "manifest", "plan serialisation", "swap", "interrupt"])
def test_a_compile_failing_late_keeps_the_previous_build(tmp_path, monkeypatch, point, force):
    recipe = make_project(tmp_path)
    out = tmp_path / "out"
    compile_recipe(recipe, out, Options(workers=1))
    (out / "runs" / "base").mkdir(parents=True)
    (out / "runs" / "base" / "result.json").write_text('{"steps": 2}\n')  # trained results too
    before = snapshot(out)
    if force:  # a rebuild that would replace runs/ as well
        recipe = tmp_path / "other.yaml"
        recipe.write_text(RECIPE)
    raised = _fail_at(point, monkeypatch)
    with pytest.raises(raised) as err:
        compile_recipe(recipe, out, Options(workers=1, force=force), overrides=("seed=9",))
    if raised is TunecError:
        assert str(err.value).startswith(f"output {out}: cannot put the new build in place (")
        assert str(err.value).endswith("; the previous build is unchanged")
    assert snapshot(out) == before
    assert leftovers(out) == []
    monkeypatch.undo()
    compile_recipe(recipe, out, Options(workers=1, force=force), overrides=("seed=9",))
    assert_complete(out)
    assert (out / "runs" / "base" / "result.json").exists() != force  # kept for the same recipe only
    assert json.loads((out / "plan.json").read_text())["seed"] == 9


def test_runs_are_carried_by_hard_links_and_the_lock_holds_the_new_folder(tmp_path):
    recipe = make_project(tmp_path)
    out = tmp_path / "out"
    compile_recipe(recipe, out, Options(workers=1))
    result = out / "runs" / "base" / "result.json"
    result.parent.mkdir(parents=True)
    result.write_text("{}\n")
    inode = result.stat().st_ino
    (out / "runs" / "latest").symlink_to("base")
    (out / "notes.txt").write_text("mine\n")  # anything else the folder holds is kept too
    compile_recipe(recipe, out, Options(workers=1), overrides=("seed=4",))
    assert result.stat().st_ino == inode and result.read_text() == "{}\n"
    assert os.readlink(out / "runs" / "latest") == "base" and (out / "notes.txt").read_text() == "mine\n"
    assert_complete(out)
    assert leftovers(out) == []


def test_an_exact_rebuild_is_byte_identical_and_swapped_in(tmp_path):
    recipe = make_project(tmp_path)
    out = tmp_path / "out"
    compile_recipe(recipe, out, Options(workers=1))
    before = snapshot(out)
    inode = (out / "plan.json").stat().st_ino
    compile_recipe(recipe, out, Options(workers=1))
    assert snapshot(out) == before and (out / "plan.json").stat().st_ino != inode  # a new folder, same bytes


def test_a_symlinked_output_is_rebuilt_behind_its_link(tmp_path):
    recipe = make_project(tmp_path)
    real = tmp_path / "disk" / "build"
    real.parent.mkdir()
    compile_recipe(recipe, real, Options(workers=1))
    link = tmp_path / "out"
    link.symlink_to(real)
    compile_recipe(recipe, link, Options(workers=1), overrides=("seed=3",))
    assert link.is_symlink() and json.loads((real / "plan.json").read_text())["seed"] == 3
    assert leftovers(real) == [] and leftovers(link) == []


def test_a_staging_folder_left_by_a_killed_compile_is_removed_by_the_next(tmp_path):
    recipe = make_project(tmp_path)
    out = tmp_path / "out"
    stale = tmp_path / ".out.tunec-new-999999"
    (stale / "stages").mkdir(parents=True)
    foreign = tmp_path / ".out.tunec-new-mine"  # not a name tunec makes: left alone
    foreign.mkdir()
    compile_recipe(recipe, out, Options(workers=1))
    assert not stale.exists() and foreign.exists()
    assert_complete(out)


# ----------------------------------------------------------------- kill -9 of a real compile


KILL_AT = """
import os, signal, sys
from tunec.compiler import build
where = sys.argv.pop(1)
original = build._exchange

def exchange(a, b):
    if where == "after":
        original(a, b)
    os.kill(os.getpid(), signal.SIGKILL)

build._exchange = exchange
from tunec.cli import main
sys.argv[0] = "tunec"
main()
"""


def _big_project(root: Path) -> tuple[Path, Path, dict[str, str]]:
    """A build of a few thousand rows (one shard per packed row: the writes take a while), with runs/."""
    recipe = make_project(root, train_rows=3000)
    out = root / "out"
    compile_recipe(recipe, out, Options(workers=1, shard_rows=4))
    (out / "runs" / "base").mkdir(parents=True)
    (out / "runs" / "base" / "result.json").write_text('{"steps": 2}\n')
    return recipe, out, snapshot(out)


def _staged(out: Path) -> Path | None:
    found = list(out.parent.glob(f".{out.name}.tunec-new-*"))
    return found[0] if found else None


def _shards(folder: Path | None) -> int:
    try:
        return 0 if folder is None else len(list(folder.rglob("*.safetensors")))
    except FileNotFoundError:  # removed while we looked
        return 0


MOMENTS = {
    # what the poller waits for before it kills the compile
    "reading the data": lambda out: (out / HOLDER_FILE).exists(),  # it holds the lock: the recipe is checked
    "staging folder made": lambda out: _staged(out) is not None,
    "tokenizer staged": lambda out: (s := _staged(out)) is not None and (s / "tokenizer").is_dir(),
    "shards being written": lambda out: _shards(_staged(out)) >= 20,
}


@pytest.mark.slow
def test_kill_9_at_any_moment_of_a_compile_keeps_the_previous_build(tmp_path):
    recipe, out, before = _big_project(tmp_path)
    cmd = [sys.executable, "-m", "tunec", "compile", str(recipe), "-o", str(out), "--workers", "1",
           "--shard-rows", "4", "--set", "seed=8"]
    caught = []
    for moment, ready in MOMENTS.items():
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 90
            while not ready(out) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            proc.send_signal(signal.SIGKILL)
        finally:
            output = proc.communicate()[0]
        assert proc.returncode in (0, -signal.SIGKILL), output
        if snapshot(out) == before:
            caught.append(moment)
        else:  # a slow poller on a fast machine: the compile got past its swap, so the new build is whole
            assert_complete(out)
            assert json.loads((out / "plan.json").read_text())["seed"] == 8
            assert (out / "runs" / "base" / "result.json").exists()
            before = snapshot(out)
    assert "shards being written" in caught and len(caught) >= 3, caught

    done = tunec("compile", recipe, "-o", out, "--workers", "1", "--shard-rows", "4", "--set", "seed=8")
    assert done.returncode == 0, done.stderr
    assert leftovers(out) == []  # the killed compiles' staging folders are gone
    assert_complete(out)
    assert (out / "runs" / "base" / "result.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["before", "after"])
def test_kill_9_at_the_swap(tmp_path, where):
    recipe = make_project(tmp_path)
    out = tmp_path / "out"
    compile_recipe(recipe, out, Options(workers=1))
    (out / "runs").mkdir()
    (out / "runs" / "kept.txt").write_text("x")
    before = snapshot(out)
    proc = subprocess.run([sys.executable, "-c", KILL_AT, where, "compile", str(recipe), "-o", str(out),
                           "--workers", "1", "--set", "seed=6"], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if where == "before":
        assert snapshot(out) == before
    else:  # the new build is in place, whole, with runs/; the old one waits at the staging name
        assert_complete(out)
        assert json.loads((out / "plan.json").read_text())["seed"] == 6
        assert (out / "runs" / "kept.txt").read_text() == "x"
    assert len(leftovers(out)) == 1
    compile_recipe(recipe, out, Options(workers=1), overrides=("seed=6",))
    assert leftovers(out) == [] and (out / "runs" / "kept.txt").exists()
    assert_complete(out)


@pytest.mark.slow
def test_two_compiles_into_one_folder_never_leave_a_plan_naming_missing_shards(tmp_path):
    recipe, out, _ = _big_project(tmp_path)
    cmds = [[sys.executable, "-m", "tunec", "compile", str(recipe), "-o", str(out), "--workers", "1",
             "--shard-rows", str(rows), "--set", f"seed={seed}"] for rows, seed in ((4, 11), (8, 12))]
    procs = [subprocess.Popen(c, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    while any(p.poll() is None for p in procs):  # the plan, read while they run, always names shards that exist
        for attempt in range(3):  # an exchange between reading the plan and a shard: read again
            try:
                if (out / "plan.json").exists():
                    assert_complete(out)
                break
            except (AssertionError, FileNotFoundError):
                if attempt == 2:
                    raise
        time.sleep(0.05)
    results = [p.communicate() + (p.returncode,) for p in procs]
    assert sorted(r[2] for r in results) in ([0, 0], [0, 1]), results
    for _stdout, stderr, code in results:
        if code == 1:
            assert " is in use by `tunec compile " in stderr and "Traceback" not in stderr, stderr
    assert_complete(out)
    assert leftovers(out) == []


# ----------------------------------------------------------------- what the data holds, as trained text


def _trained_text(out: Path) -> str:
    from tokenizers import Tokenizer

    from tunec.compiler.shards import open_shard

    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    ids = open_shard(next((out / "stages" / "base" / "train").glob("*.safetensors")))["input_ids"]
    return "\n".join(tok.decode(row.tolist()) for row in ids)


def test_jsonl_objects_lists_and_booleans_are_trained_as_json(tmp_path):
    recipe = make_project(tmp_path)
    # one type per column, as Arrow (under every datasets version tunec supports) needs
    rows = [{"question": {"city": "Oslo", "tags": ["a", "b"], "open": True}, "answer": True},
            {"question": {"city": "Bergen", "tags": [], "open": False}, "answer": False}]
    (tmp_path / "data" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _edit(recipe, "    eval: {split: test}\n", "")
    out = tmp_path / "out"
    compile_recipe(recipe, out, Options(workers=1), overrides=("seq_len=128",))
    text = _trained_text(out)
    assert 'Question: {"city": "Oslo", "tags": ["a", "b"], "open": true}\nAnswer: true' in text, text
    assert 'Question: {"city": "Bergen", "tags": [], "open": false}\nAnswer: false' in text, text
    assert "True" not in text and "None" not in text and "'" not in text, text


@pytest.mark.parametrize("objective", ["sft", "lm"])
def test_a_prompt_that_alone_fills_seq_len_is_dropped_not_truncated(tmp_path, objective):
    recipe = make_project(tmp_path, train_rows=6)
    rows = [{"question": "7 " * 100, "answer": "1"}] + [{"question": f"{i}?", "answer": str(i)} for i in range(5)]
    (tmp_path / "data" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _edit(recipe, "    eval: {split: test}\n", "    truncation: truncate\n")
    _edit(recipe, "objective: sft", f"objective: {objective}")
    counts = compile_recipe(recipe, tmp_path / "out", Options(workers=1)).stages[0].tasks["qa"]
    if objective == "sft":  # nothing of the answer is left to train on
        assert (counts.examples, counts.dropped, counts.truncated) == (5, 1, 0)
    else:  # every token is trained: cut, and kept
        assert (counts.examples, counts.dropped, counts.truncated) == (6, 0, 1)
