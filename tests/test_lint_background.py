"""The compile's prompt lint runs in a thread while the units compile: the same findings as the lint run
alone, and its errors are the compile's."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from tunec.compiler import lint
from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.check import check
from tunec.compiler.errors import TunecError
from tunec.compiler.load import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "recipes" / "demo" / "tokenizer"


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    """Two tasks: one whose template ends its prompt in a space (a `separator` finding), one with
    repeated rows (a `duplicates` finding)."""
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"q": f"What is {i}?", "a": str(i)}) + "\n" for i in range(12)), encoding="utf-8")
    rep = tmp_path / "rep.jsonl"
    rep.write_text("".join(json.dumps({"q": f"Say {i % 3}", "a": str(i % 3)}) + "\n" for i in range(12)),
                   encoding="utf-8")
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""tokenizer: {{kind: local, path: {TOKENIZER}}}
seq_len: 128
tasks:
  qa:
    source: {{kind: jsonl, path: {qa}}}
    templates: [{{kind: inline, name: spaced, prompt: "Q: {{{{ q }}}} A: ", completion: " {{{{ a }}}}"}}]
  rep:
    source: {{kind: jsonl, path: {rep}}}
    templates: [{{kind: inline, name: plain, prompt: "{{{{ q }}}}:", completion: " {{{{ a }}}}"}}]
stages:
  - {{name: s, objective: sft, tasks: [qa, rep], model: {{kind: config, config: {{model_type: llama}}}}}}
""", encoding="utf-8")
    return path


def test_the_lint_beside_the_units_finds_what_the_lint_alone_finds(recipe, tmp_path, monkeypatch):
    ran_in = []
    real = lint.lint_recipe

    def recorded(*a, **k):
        ran_in.append(threading.current_thread().name)
        return real(*a, **k)

    monkeypatch.setattr(lint, "lint_recipe", recorded)
    plan = compile_recipe(recipe, tmp_path / "out", Options(workers=1, use_cache=False))
    assert ran_in == ["tunec-lint"]
    alone = [lint.LintFinding.model_validate(f.as_dict()) for f in real(check(load_recipe(recipe)))]
    assert plan.lint == alone
    assert {f.id for f in plan.lint} >= {"separator", "duplicate-examples"}


def test_an_error_in_the_lint_thread_is_the_compiles(recipe, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise TunecError("the lint could not read a row")

    monkeypatch.setattr(lint, "_task_findings", broken)
    out = tmp_path / "out"
    with pytest.raises(TunecError, match="the lint could not read a row"):
        compile_recipe(recipe, out, Options(workers=1, use_cache=False))
    assert not (out / "plan.json").exists()
