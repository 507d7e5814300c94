"""A compile builds each `kind: config` model's transformers config in one child process: the config
check's child also returns the config the cost estimates read, the same one their own child builds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CODE = """
import json, subprocess, sys
from tunec.compiler import estimate, modelconfig
from tunec.compiler.build import Options, compile_recipe
children = []
real = subprocess.run
def counted(cmd, *a, **k):
    children.append(cmd[1:2])
    return real(cmd, *a, **k)
modelconfig.subprocess.run = estimate.subprocess.run = counted
plan = compile_recipe(sys.argv[1], sys.argv[2], Options(workers=1, use_cache=False))
during = list(children)
request = modelconfig.config_request(plan.stages[0].settings.model.config)
shared = modelconfig.built_config(request)
modelconfig._built.clear()
estimate._config.cache_clear()
own = estimate._config(request)  # the estimates' own child
print(json.dumps({"children": during, "torch": "torch" in sys.modules, "shared": shared, "own": own,
                  "flops": plan.stages[0].estimate.flops if plan.stages[0].estimate else None}))
"""


@pytest.mark.slow  # a compile in a child process, and two grandchildren importing transformers
def test_one_config_child_per_compile_and_the_config_the_estimates_build_themselves(tmp_path):
    done = subprocess.run([sys.executable, "-c", CODE, str(ROOT / "recipes" / "demo" / "demo.yaml"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert not got["torch"]
    assert got["children"] == [["-c"]]  # the config check's child; the estimates started none
    assert got["shared"]["config"] == got["own"][0] and got["own"][1] is None
    assert got["flops"] > 0


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".tunec")}


def test_the_tokenizer_loaded_while_the_configs_are_checked_is_the_one_compiled_with(tmp_path, monkeypatch):
    from tunec.compiler import build, tokcache

    demo = ROOT / "recipes" / "demo" / "demo.yaml"
    build.compile_recipe(demo, tmp_path / "plain", build.Options(workers=1, use_cache=False))
    loads = []
    real = tokcache.load
    monkeypatch.setattr(tokcache, "load", lambda *a: loads.append(1) or real(*a))
    monkeypatch.setattr(build, "start_model_checks", lambda *a: True)  # as when a config child starts
    build.compile_recipe(demo, tmp_path / "early", build.Options(workers=1, use_cache=False))
    assert loads == [1]  # loaded early, not again by the build
    assert _tree(tmp_path / "early") == _tree(tmp_path / "plain")


def test_a_tokenizer_that_fails_to_load_early_fails_the_compile_as_it_does_without(tmp_path, monkeypatch):
    """An empty tokenizer folder: the early load's failure is not the compile's message; the build loads it
    again and fails as a compile that never loaded it early does."""
    from tunec.compiler import build, tokcache
    from tunec.compiler.errors import TunecError

    text = (ROOT / "recipes" / "demo" / "demo.yaml").read_text(encoding="utf-8")
    assert text.count("  path: tokenizer\n") == 1
    (tmp_path / "r.yaml").write_text(text.replace("  path: tokenizer\n", "  path: empty_tokenizer\n"),
                                     encoding="utf-8")
    (tmp_path / "empty_tokenizer").mkdir()
    (tmp_path / "data").symlink_to(ROOT / "recipes" / "demo" / "data")
    loads = []
    real = tokcache.load
    monkeypatch.setattr(tokcache, "load", lambda *a: loads.append(1) or real(*a))
    messages = []
    for early in (True, False):
        monkeypatch.setattr(build, "start_model_checks", lambda *a, early=early: early)
        with pytest.raises(TunecError) as err:
            build.compile_recipe(tmp_path / "r.yaml", tmp_path / "out", build.Options(workers=1, use_cache=False))
        messages.append(str(err.value))
    assert len(loads) == 3  # early and again in the build, then once without the early load
    assert messages[0] == messages[1]
    assert not (tmp_path / "out" / "plan.json").exists()


@pytest.mark.parametrize("which", ["modelconfig", "estimate"])
def test_a_config_child_that_ends_without_teardown_still_answers_whole_through_a_buffered_pipe(which):
    # The children end with os._exit (no teardown of transformers' modules): what they printed must still
    # arrive whole when stdout is a buffered pipe, as it is outside this test environment's settings.
    from tunec.compiler import estimate, modelconfig

    config = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}
    code, request = ((modelconfig._CHILD, config) if which == "modelconfig"
                     else (estimate._CHILD, {"kind": "config", "config": config}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(request), capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    built = answer["built"] if which == "modelconfig" else answer
    assert built["config"]["hidden_size"] == 64 and built["config"]["model_type"] == "llama"
