"""The `tunec` program ends a finished compile without the interpreter's teardown, and nothing is lost
by it: the output is complete, exit handlers run, a running thread is waited for, and errors still exit 1."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from click.testing import CliRunner

from tunec import cli

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo" / "demo.yaml"


def run_program(tmp_path: Path, body: str, *args: str) -> subprocess.CompletedProcess:
    """``body`` (setup code), then the `tunec` program's own entry point with ``args``, in a new process."""
    code = textwrap.dedent(body) + "\nfrom tunec.cli import console\nconsole(sys.argv[1:])\n"
    return subprocess.run([sys.executable, "-c", "import sys\n" + code, *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)


def test_a_finished_compile_exits_0_with_its_output_whole_and_its_exit_handlers_run(tmp_path):
    out = tmp_path / "out"
    done = run_program(tmp_path, """
        import atexit, tempfile
        kept = tempfile.TemporaryDirectory(prefix="left-")  # removed by an exit handler
        with open("folder-was", "w") as fh:
            fh.write(kept.name)
        atexit.register(lambda: print("exit handlers ran", flush=True))
    """, "compile", str(DEMO), "-o", str(out), "-j", "1")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-2] == f"plan: {out / 'plan.json'}" and lines[-1] == "exit handlers ran"
    assert json.loads((out / "plan.json").read_text())["stages"]
    assert not Path((tmp_path / "folder-was").read_text()).exists()  # TemporaryDirectory's finalizer ran


def test_a_thread_still_running_is_waited_for_as_a_normal_exit_would(tmp_path):
    done = run_program(tmp_path, """
        import threading
        def late():
            threading.main_thread().join()  # until the program has returned from its last line
            print("thread finished", flush=True)
        threading.Thread(target=late).start()
    """, "compile", str(DEMO), "-o", str(tmp_path / "out"), "-j", "1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "thread finished"


def test_a_compile_run_under_a_profiler_lets_it_write_its_output(tmp_path):
    # `python -m cProfile` writes its file after the program returns: the program returns
    done = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(tmp_path / "prof"), "-m", "tunec.cli",
                           "compile", str(DEMO), "-o", str(tmp_path / "out"), "-j", "1"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "prof").stat().st_size > 0


def test_a_failed_compile_still_exits_1_with_its_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO.read_text(encoding="utf-8").replace("seq_len:", "seq_lenn:"), encoding="utf-8")
    done = run_program(tmp_path, "", "compile", str(bad), "-o", str(tmp_path / "out"), "-j", "1")
    assert done.returncode == 1
    assert "seq_lenn" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_compile_run_in_process_does_not_end_the_caller(tmp_path):
    # CliRunner calls `main`: the caller goes on, and a later `console` starts with the flag cleared.
    result = CliRunner().invoke(cli.main, ["compile", str(DEMO), "-o", str(tmp_path / "out"), "-j", "1"])
    assert result.exit_code == 0, result.output
    assert cli._finished_early[0]
    try:
        cli.console(["validate", str(DEMO)])
    except SystemExit as exc:
        assert exc.code == 0
    else:
        raise AssertionError("console() exits")
    assert not cli._finished_early[0]
