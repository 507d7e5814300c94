"""Local execution of compile chunks: in chunk order, the same results from one worker or a pool,
whose window of chunks in flight slides as results are taken; a row's error names the row."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from tunec.compiler import executors
from tunec.compiler.errors import TunecError
from tunec.compiler.templates import TemplateSource
from tunec.compiler.tokens import load_local_tokenizer, tokenizer_info
from tunec.compiler.units import Chunk, UnitSpec

TOKENIZER = Path(__file__).resolve().parents[1] / "recipes" / "demo" / "tokenizer"
ROWS = 4  # rows per chunk: many chunks from a few rows


@pytest.fixture(scope="module")
def info():
    return tokenizer_info(load_local_tokenizer(TOKENIZER))


def chunks(answers: list[str]) -> list[Chunk]:
    out = []
    for lo in range(0, len(answers), ROWS):
        rows = list(range(lo, min(lo + ROWS, len(answers))))
        out.append(Chunk(0, rows, {"q": [f"What is {i} plus one?" for i in rows], "a": [answers[i] for i in rows]},
                         [[(0, ())] for _ in rows]))
    return out


SPEC = UnitSpec(task="sums", part="train", templates=(TemplateSource.inline("qa", "Q: {{ q }}\nA:", " {{ a }}",
                                                                            "r.yaml", 1),),
                truncation="drop", seq_len=256, seed=0)


def test_chunks_come_back_in_order_and_the_same_from_a_pool(info, monkeypatch):
    monkeypatch.setattr(executors, "WINDOW_PER_WORKER", 2)  # 4 chunks in flight: the window slides 11 times
    work = chunks([str(i + 1) * (1 + i % 7) for i in range(60)])
    one = list(executors.run_local(iter(work), len(work), info, [SPEC], {}, 1))
    two = list(executors.run_local(iter(work), len(work), info, [SPEC], {}, 2))
    assert [c.rows for c, _ in two] == [c.rows for c, _ in one] == [c.rows for c in work]
    for (_, a), (_, b) in zip(one, two):
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.offsets, b.offsets)
        assert np.array_equal(a.sft_labels, b.sft_labels) and np.array_equal(a.row, b.row)


def test_a_row_that_fails_in_a_pool_names_its_task_and_row(info, monkeypatch):
    monkeypatch.setattr(executors, "WINDOW_PER_WORKER", 1)
    answers = [str(i) for i in range(30)]
    answers[21] = " "  # renders an empty completion: nothing to train on
    work = chunks(answers)
    with pytest.raises(TunecError, match=r"task 'sums', train row 21: .*empty completion"):
        for _ in executors.run_local(iter(work), len(work), info, [SPEC], {}, 2):
            pass


def test_workers_started_ahead_compile_the_same_and_are_closed_by_their_owner(info):
    from tunec.compiler.units import UnitSpec

    work = chunks([str(i) for i in range(24)])
    specs = [SPEC]
    here = list(executors.run_local(iter(work), len(work), info, specs, {}, 1))
    with executors.Workers(info, specs, {}, 2) as started:
        pool = started.pool
        ahead = list(executors.run_local(iter(work), len(work), info, specs, {}, 2, started))
        again = list(executors.run_local(iter(work), len(work), info, specs, {}, 2, started))  # still running
        with pytest.raises(AssertionError, match="other unit specs"):
            next(executors.run_local(iter(work), len(work), info, [UnitSpec(**{**vars(SPEC), "seed": 1})], {}, 2,
                                     started))
    assert started.pool is None and pool is not None
    for (_, a), (_, b), (_, c) in zip(here, ahead, again):
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.ids, c.ids)
        assert np.array_equal(a.sft_labels, b.sft_labels)
    with executors.Workers(info, specs, {}, 1) as one:  # one worker: none spawned, compiled here
        assert one.pool is None
        assert [r.ids.tolist() for _, r in executors.run_local(iter(work), len(work), info, specs, {}, 1, one)] == \
            [r.ids.tolist() for _, r in here]


def _pipe_bytes(conn) -> int:
    import fcntl

    return fcntl.fcntl(conn.fileno(), 1032)  # F_GETPIPE_SZ


@pytest.mark.skipif(not Path("/proc/sys/fs/pipe-max-size").is_file(), reason="pipe sizes are Linux's")
def test_the_pools_pipes_hold_a_whole_result_and_results_larger_than_a_pipe_come_back_whole(info):
    """A result (~1 MB of token arrays for a real chunk) is handed over at once instead of 64 KiB at a
    time: the pool's result and call pipes are widened to a megabyte where the system allows it."""
    cap = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    long = " ".join(f"w{i}" for i in range(4000))  # each result well over 64 KiB of ids and labels
    work = chunks([long + str(i) for i in range(8)])
    specs = [UnitSpec(**{**vars(SPEC), "seq_len": 100000})]
    here = list(executors.run_local(iter(work), len(work), info, specs, {}, 1))
    with executors.Workers(info, specs, {}, 2) as started:
        pool = started.ready()
        for queue in (pool._result_queue, pool._call_queue):
            assert _pipe_bytes(queue._reader) >= min(executors.PIPE_BYTES, cap)
        there = list(executors.run_local(iter(work), len(work), info, specs, {}, 2, started))
    assert here[0][1].ids.nbytes + here[0][1].sft_labels.nbytes > 1 << 16
    for (_, a), (_, b) in zip(here, there):
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.sft_labels, b.sft_labels)


@pytest.mark.slow
def test_a_worker_that_cannot_start_fails_the_compile_instead_of_hanging(tmp_path):
    """Spawned workers import the main script: one that compiles at import time, unguarded, makes every
    worker fail while starting. The compile stops with a message saying so, where a pool that replaced
    dead workers would have waited forever for their chunks. (Forked workers import nothing: the script
    forbids forking here, and makes its few rows worth workers.)"""
    import subprocess
    import sys

    from tiny import DEMO

    script = tmp_path / "unguarded.py"
    script.write_text("from tunec.compiler import build, incremental\n"
                      "build.can_fork = lambda: False\n"
                      "incremental.EARLY_SPAWN_BYTES = 1\n"
                      "from tunec.compiler.build import Options, compile_recipe\n"
                      f"compile_recipe({str(DEMO / 'demo.yaml')!r}, {str(tmp_path / 'out')!r}, "
                      "Options(workers=2, use_cache=False))\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode != 0
    assert "a compile worker process ended before its work was done" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out" / "plan.json").exists()


def test_workers_closed_before_their_launch_is_over_end_without_hanging(info):
    started = executors.Workers(info, [SPEC], {}, 2)
    setup = started._setup  # what each worker starts with, handed over in a file of this user's
    assert setup is not None and setup.is_file() and setup.stat().st_mode & 0o077 == 0
    started.close()  # waits for the launching thread, then ends the processes it launched
    assert started.pool is None and not setup.exists()


@pytest.mark.parametrize("held", [False, True])
def test_one_large_unit_spawns_its_workers_before_its_rows_load_and_builds_the_same(tmp_path, monkeypatch, held):
    """A single unit (fewer units than workers) whose source files are large gets its workers spawned while
    its rows load; a small one compiles here, and so do two small ones (``held``: a train and an eval part,
    as many units as workers, as when a small task's template is edited). The build is byte-identical to
    one worker's."""
    from tunec.compiler import incremental
    from tunec.compiler.build import Options, compile_recipe

    demo = Path(__file__).resolve().parents[1] / "recipes" / "demo"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"tokenizer: {{kind: local, path: {demo / 'tokenizer'}}}\nseq_len: 256\n"
        f"tasks:\n  arithmetic:\n    source: {{kind: jsonl, path: {demo / 'data/arithmetic/train.jsonl'}}}\n"
        "    templates: [arithmetic/qa]\n" + ("    eval: {fraction: 0.2}\n" if held else "") +
        "stages:\n  - {name: sft, objective: sft, tasks: [arithmetic], model: {kind: config, config: "
        "{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, "
        "vocab_size: 1024}}}\n", encoding="utf-8")
    asked: list[int] = []

    class Spy(executors.Workers):
        def __init__(self, info, specs, pools, workers):
            asked.append(workers)
            super().__init__(info, specs, pools, workers)

    monkeypatch.setattr(incremental, "Workers", Spy)
    launched: list[int] = []  # every pool of worker processes, wherever started
    launch = executors._launch

    def spy_launch(setup, workers, *args):
        launched.append(workers)
        return launch(setup, workers, *args)

    monkeypatch.setattr(executors, "_launch", spy_launch)

    def build(out: str, workers: int) -> dict[str, bytes]:
        compile_recipe(recipe, tmp_path / out, Options(workers=workers, use_cache=False))
        return {p.relative_to(tmp_path / out).as_posix(): p.read_bytes()
                for p in sorted((tmp_path / out).rglob("*")) if p.is_file()}

    one = build("one", 1)
    small = build("small", 2)  # a few kilobytes of source: compiled here, its chunks one after the other
    assert launched == []
    monkeypatch.setattr(incremental, "EARLY_SPAWN_BYTES", 1)
    large = build("large", 2)  # "large": spawned ahead
    assert asked == [1, 1, 2] and launched == [2]
    assert one == small == large


@pytest.mark.parametrize("recipe", ["demo/collection.yaml", "preference.yaml"])
def test_shards_built_by_the_workers_are_the_shards_built_here(tmp_path, monkeypatch, recipe):
    """With worker processes spawned for the units, they also build and write the shards (pairs excepted:
    their ids number the stage's pairs, so those are built here); every file equals a one-worker build's."""
    from tunec.compiler import incremental, link
    from tunec.compiler.build import Options, compile_recipe

    path = Path(__file__).resolve().parents[1] / "recipes" / recipe
    if "shared/data" in path.read_text(encoding="utf-8") and not (path.parents[2] / "shared" / "data").is_dir():
        pytest.skip(f"{recipe} needs ../shared/data, which is absent (a fresh clone has no ../shared)")
    used: list[tuple[bool, bool]] = []  # per shard set: (in the pool, of pairs)
    real = link.Linker._shards_in_pool

    def spy(self, docs, *args, **kwargs):
        got = real(self, docs, *args, **kwargs)
        used.append((got is not None, docs.side is not None))
        return got

    monkeypatch.setattr(link.Linker, "_shards_in_pool", spy)
    monkeypatch.setattr(incremental, "EARLY_SPAWN_BYTES", 1)  # spawned ahead, so kept for the shards

    def build(out: str, workers: int) -> dict[str, bytes]:
        compile_recipe(path, tmp_path / out, Options(workers=workers, use_cache=False, shard_rows=8))
        return {p.relative_to(tmp_path / out).as_posix(): p.read_bytes()
                for p in sorted((tmp_path / out).rglob("*")) if p.is_file()}

    one = build("one", 1)
    assert not any(pooled for pooled, _ in used)
    used.clear()
    two = build("two", 2)
    assert one == two
    assert used and all(pooled != pairs for pooled, pairs in used)
    assert any(pairs for _, pairs in used) == (recipe == "preference.yaml")
    assert sum(p.endswith(".safetensors") for p in two) > 2


def test_a_worker_that_dies_while_writing_a_shard_fails_the_compile_in_one_line(info, tmp_path):
    from tunec.compiler.link import Linker, Selected
    from tunec.compiler.unitstore import UnitWriter, open_unit

    work = chunks([str(i) for i in range(12)])
    writer = UnitWriter(tmp_path / "u", 1)
    for _, result in executors.run_local(iter(work), len(work), info, [SPEC], {}, 1):
        writer.add(result)
    writer.finish()
    unit = open_unit(tmp_path / "u")
    assert unit is not None
    with executors.Workers(info, [SPEC], {}, 2) as started:
        pool = started.ready()
        for process in list(pool._processes.values()):  # killed, as the system kills for memory
            process.kill()
            process.join()
        linker = Linker(out=tmp_path / "out", seq_len=64, pad_id=0, shard_rows=2, seed=0,
                        template_names={"sums": ["qa"]}, pool=pool)
        with pytest.raises(TunecError, match="ended while it wrote a shard"):
            linker._pack(Selected.of([(unit, np.arange(unit.docs))], "sft"), Path("s"), "s")


_FORK_SCRIPT = """
import json, os, signal, sys, threading
import numpy as np
sys.path.insert(0, sys.argv[1])
from test_executors import SPEC, TOKENIZER, chunks
from tunec.compiler import executors
from tunec.compiler.tokens import load_local_tokenizer, tokenizer_info

tok = load_local_tokenizer(TOKENIZER)
info = tokenizer_info(tok)
# the tokenizer's own thread pool at work in this process before it forks
tok.backend_tokenizer.encode_batch([f"warm {i} " * 50 for i in range(2000)])
work = chunks([str(i) * (1 + i % 5) for i in range(40)])


def compiled(started):
    specs = [SPEC]
    with started:
        started.hand_over(info, specs, {})
        return [r for _, r in executors.run_local(iter(work), len(work), info, specs, {}, 2, started)]


if __name__ == "__main__":  # the spawned workers import this script
    forked = executors.Workers.ahead(2, fork=True)
    pids = [p.pid for p in (forked.pool._processes or {}).values()]
    a = compiled(forked)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()  # another thread runs: a fork could copy a lock it holds, so the workers are spawned
    assert not executors.can_fork()
    spawned = executors.Workers.ahead(2, fork=True)
    b = compiled(spawned)
    stop.set()
    other.join()
    here = [r for _, r in executors.run_local(iter(work), len(work), info, [SPEC], {}, 1)]
    # this program's own SIGTERM handler: a forked worker must not run it, but end as a spawned one does
    marker = sys.argv[2]
    signal.signal(signal.SIGTERM, lambda *_: open(marker, "a").write(f"{os.getpid()}\\n"))
    held = executors.Workers.ahead(2, fork=True)
    held.hand_over(info, [SPEC], {})
    pid = held.ready().submit(os.getpid).result()  # a worker whose start is over
    process = next(p for p in held.pool._processes.values() if p.pid == pid)
    os.kill(pid, signal.SIGTERM)
    process.join(30)
    ended = process.exitcode
    held.close()
    quick = executors.Workers.ahead(2, fork=True)  # and one ended at once, before its start is over
    quick.close()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    same = all(np.array_equal(x.ids, y.ids) and np.array_equal(x.sft_labels, y.sft_labels) and np.array_equal(x.ids, z.ids)
               and np.array_equal(x.sft_labels, z.sft_labels) for x, y, z in zip(here, a, b))
    print(json.dumps({"forked": forked.forked, "spawned": not spawned.forked, "workers": len(pids), "same": same,
                      "chunks": len(a), "ended": ended, "handled": os.path.exists(marker)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are forked on Linux only")
def test_workers_forked_ahead_compile_what_spawned_ones_and_this_process_do(tmp_path):
    """Forked from a process whose tokenizer already ran its thread pool, the workers compile the same
    chunks to the same arrays as spawned ones and as the process itself; with another thread running
    the process does not fork. A forked worker ends on SIGTERM without running the handler the forking
    program had set."""
    import json
    import subprocess

    script = tmp_path / "fork.py"
    script.write_text(_FORK_SCRIPT, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    done = subprocess.run([sys.executable, str(script), str(Path(__file__).parent), str(tmp_path / "handled")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "forked": True, "spawned": True, "workers": 2, "same": True, "chunks": 10,
        "ended": -15, "handled": False}  # SIGTERM ended the worker; the program's handler never ran there
