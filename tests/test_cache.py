"""The unit cache: what a unit's key covers (and what it does not), damaged entries, `tunec cache`."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tunec.cli import main
from tunec.compiler import cache as cache_mod
from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.cache import Cache, parse_age, plain, unit_key
from tunec.compiler.errors import TunecError
from tunec.compiler.templates import TemplateSource
from tunec.compiler.tokens import TokenizerInfo
from tunec.compiler.units import UnitSpec

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "recipes" / "demo" / "tokenizer"
MODEL = "{kind: config, config: {model_type: llama}}"
CHAT = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"


def _rows(path: Path, start: int, n: int) -> None:
    path.write_text("".join(json.dumps({"q": f"What is {i} plus {i}?", "a": str(2 * i)}) + "\n"
                            for i in range(start, start + n)), encoding="utf-8")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """Two tasks (`add` with train and test splits, `more` train only), a recipe made by `recipe(**changes)`."""
    for task in ("add", "more"):
        (tmp_path / task).mkdir()
        _rows(tmp_path / task / "train.jsonl", 0 if task == "add" else 50, 12)
        _rows(tmp_path / task / "test.jsonl", 100, 4)
    (tmp_path / "chat.jinja").write_text(CHAT, encoding="utf-8")
    return tmp_path


def recipe(folder: Path, add_prompt: str = "Q: {{ q }}\\nA:", more_prompt: str = "{{ q }} =", seq_len: int = 64,
           seed: int = 1, lr: str = "1.0e-3", fields: str = "", choices: str = "", truncation: str = "drop",
           leakage: str = "", top: str = "") -> Path:
    text = top + "\n".join([
        f"tokenizer: {{kind: local, path: {TOKENIZER}, chat_template: chat.jinja}}",
        f"seq_len: {seq_len}",
        f"seed: {seed}",
        "leakage: warn",
        "tasks:",
        "  add:",
        "    source: {kind: jsonl, path: {train: add/train.jsonl, test: add/test.jsonl}}",
        f'    templates: [{{kind: inline, name: t, prompt: "{add_prompt}", completion: " {{{{ a }}}}"}}]',
        "    eval: {split: test}",
        f"    truncation: {truncation}{fields}{choices}{leakage}",
        "  more:",
        "    source: {kind: jsonl, path: more/train.jsonl}",
        f'    templates: [{{kind: inline, name: t, prompt: "{more_prompt}", completion: " {{{{ a }}}}"}}]',
        "stages:",
        f"  - {{name: s, objective: sft, tasks: [add, more], model: {MODEL}, lr: {lr}}}",
    ]) + "\n"
    path = folder / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def keys(folder: Path, path: Path, out: str = "out") -> dict[str, str]:
    compile_recipe(path, folder / out, Options(workers=1, force=True))
    return json.loads((folder / out / "manifest.json").read_text())["units"]


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    assert before.keys() == after.keys()
    return {u for u in before if before[u] != after[u]}


ALL = {"add/train", "add/eval", "more/train"}


@pytest.mark.slow  # thirteen compiles
def test_each_input_invalidates_the_units_it_reaches_and_nothing_else(project):
    base = keys(project, recipe(project))
    assert set(base) == ALL
    # irrelevant: a stage's learning rate, the leakage check's options, lines moved by a comment
    assert changed(base, keys(project, recipe(project, lr="5.0e-4"))) == set()
    assert changed(base, keys(project, recipe(project, leakage="\n    leakage: {key: [q]}"))) == set()
    assert changed(base, keys(project, recipe(project, top="# a comment\n\n"))) == set()
    # a template of one task: that task's units only
    assert changed(base, keys(project, recipe(project, add_prompt="Question: {{ q }}\\nA:"))) == {"add/train",
                                                                                                  "add/eval"}
    assert changed(base, keys(project, recipe(project, more_prompt="{{ q }} equals"))) == {"more/train"}
    # options of one task
    assert changed(base, keys(project, recipe(project, fields="\n    fields: {q: q, a: a}"))) == {"add/train",
                                                                                                 "add/eval"}
    assert changed(base, keys(project, recipe(project, choices="\n    answer_choices: ['0', '2']"))) == {
        "add/train", "add/eval"}
    assert changed(base, keys(project, recipe(project, truncation="truncate"))) == {"add/train", "add/eval"}
    # recipe-wide inputs: every unit
    assert changed(base, keys(project, recipe(project, seq_len=128))) == ALL
    assert changed(base, keys(project, recipe(project, seed=2))) == ALL
    (project / "chat.jinja").write_text(CHAT + "\n", encoding="utf-8")
    assert changed(base, keys(project, recipe(project))) == ALL
    (project / "chat.jinja").write_text(CHAT, encoding="utf-8")
    # a source file's bytes: the parts that read it
    _rows(project / "add" / "train.jsonl", 1, 12)
    assert changed(base, keys(project, recipe(project))) == {"add/train"}
    _rows(project / "add" / "train.jsonl", 0, 12)
    _rows(project / "add" / "test.jsonl", 101, 4)
    assert changed(base, keys(project, recipe(project))) == {"add/eval"}
    _rows(project / "add" / "test.jsonl", 100, 4)
    assert keys(project, recipe(project)) == base  # back to the same inputs: the same keys


def test_the_code_and_the_tokenizer_are_in_every_key(monkeypatch):
    spec = UnitSpec(task="t", part="train", templates=(TemplateSource("x", "{% block prompt %}{% endblock %}",
                                                                      "r.yaml"),),
                    truncation="drop", seq_len=8, seed=0)
    info = TokenizerInfo(json="{}", eos_id=0, bos_id=None, pad_id=1, vocab_size=4)
    key = unit_key(spec, {}, {"split:train": "abc"}, info)
    assert unit_key(spec, {}, {"split:train": "abd"}, info) != key
    assert unit_key(spec, {}, {"split:train": "abc"}, dataclasses.replace(info, json='{"a": 1}')) != key
    assert unit_key(spec, {}, {"split:train": "abc"}, dataclasses.replace(info, eos_id=2)) != key
    # where a template sits in its file only locates errors
    moved = dataclasses.replace(spec, templates=(dataclasses.replace(spec.templates[0], first_line=9, lines=(9,)),))
    assert unit_key(moved, {}, {"split:train": "abc"}, info) == key
    monkeypatch.setattr(cache_mod, "UNIT_FORMAT_VERSION", cache_mod.UNIT_FORMAT_VERSION + 1)
    assert unit_key(spec, {}, {"split:train": "abc"}, info) != key


def test_a_value_the_key_cannot_hold_is_an_error_not_left_out():
    with pytest.raises(TypeError, match="cannot put a object in a unit key"):
        plain({"a": object()})


def ours(root: Path) -> list[Path]:
    """The cache's unit and leakage-key entries (other steps, such as the lint, keep entries there too)."""
    return [p for p in Cache(root).entries() if p.relative_to(root).parts[0] in ("units", "leak")]


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".tunec")}


def test_a_rebuild_reuses_every_unit_and_writes_the_same_bytes(project, unit_cache):
    path = recipe(project)
    said: list[tuple[list, list]] = []
    opts = Options(workers=1, on_units=lambda reused, rebuilt: said.append((reused, rebuilt)))
    compile_recipe(path, project / "a", opts)
    compile_recipe(path, project / "b", opts)
    compile_recipe(path, project / "clean", Options(workers=1, use_cache=False))
    assert [(len(r), len(b)) for r, b in said] == [(0, 3), (3, 0)]
    assert tree(project / "a") == tree(project / "b") == tree(project / "clean")
    assert len(ours(unit_cache)) == 3 + 3  # three units, the leakage keys of three parts


@pytest.mark.parametrize("damage", ["flip", "cut", "empty", "garbage"])
def test_a_damaged_entry_is_rebuilt_never_used(project, unit_cache, damage, caplog):
    path = recipe(project)
    compile_recipe(path, project / "a", Options(workers=1))
    entries = ours(unit_cache)
    for entry in entries:
        data = bytearray(entry.read_bytes())
        if damage == "flip":
            data[len(data) // 2] ^= 0x01
        elif damage == "cut":
            data = data[: len(data) - 7]
        elif damage == "empty":
            data = bytearray()
        else:
            data = bytearray(b"tunec.unit/1\n" + b"0" * 64 + b"\n" + b"not a unit")
        entry.write_bytes(bytes(data))
    said: list = []
    with caplog.at_level(logging.WARNING, logger="tunec.compiler.cache"):
        compile_recipe(path, project / "b", Options(workers=1, on_units=lambda r, b: said.append((r, b))))
    assert len(said[0][0]) == 0 and len(said[0][1]) == 3
    assert sum("is damaged" in r.getMessage() for r in caplog.records) == len(entries)
    assert tree(project / "a") == tree(project / "b")
    # the rebuilt entries are whole again
    said.clear()
    compile_recipe(path, project / "c", Options(workers=1, on_units=lambda r, b: said.append((r, b))))
    assert len(said[0][0]) == 3


def test_no_cache_reads_and_writes_nothing(project, unit_cache):
    compile_recipe(recipe(project), project / "a", Options(workers=1, use_cache=False))
    assert ours(unit_cache) == []


def test_cli_compile_says_what_it_reused_and_cache_info_and_prune(project, unit_cache):
    runner = CliRunner()
    path = str(recipe(project))
    first = runner.invoke(main, ["compile", path, "-o", str(project / "a"), "-j", "1"])
    assert first.exit_code == 0, first.output
    assert "units: 0 reused, 3 rebuilt" in first.output
    recipe(project, more_prompt="{{ q }} equals")
    again = runner.invoke(main, ["compile", path, "-o", str(project / "a"), "-j", "1"])
    assert "units: 2 reused, 1 rebuilt (more/train)" in again.output, again.output
    info = runner.invoke(main, ["cache", "info"])
    assert len(ours(unit_cache)) == 7  # 3 + 3, then a new unit (its leakage keys are its rows': unchanged)
    assert info.exit_code == 0 and f"cache: {unit_cache}" in info.output
    assert f"entries: {len(Cache(unit_cache).entries())}\n" in info.output
    # entries unused for a day go; fresh ones stay
    old = time.time() - 2 * 86400
    stale = ours(unit_cache)[:3]
    for p in stale:
        os.utime(p, (old, old))
    pruned = runner.invoke(main, ["cache", "prune", "--older-than", "1d"])
    assert pruned.exit_code == 0 and "removed 3 entries" in pruned.output
    assert len(ours(unit_cache)) == 4
    bad = runner.invoke(main, ["cache", "prune", "--older-than", "soon"])
    assert bad.exit_code == 1 and "error: --older-than: 'soon' is not a duration" in bad.output
    other = project / "elsewhere"
    runner.invoke(main, ["compile", path, "-o", str(project / "b"), "-j", "1", "--cache", str(other)])
    assert len(ours(other)) == 6
    count = len(Cache(other).entries())
    assert runner.invoke(main, ["cache", "prune", "--cache", str(other)]).output.startswith(f"removed {count} entries")
    assert Cache(other).entries() == []
    usage = runner.invoke(main, ["compile", path, "-o", str(project / "b"), "--no-cache", "--cache", str(other)])
    assert usage.exit_code == 2


def test_parse_age():
    assert parse_age("1.5h") == 5400 and parse_age("2w") == 14 * 86400
    with pytest.raises(TunecError):
        parse_age("7 days")


def test_executor_ray_without_ray_is_one_error_line(project, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as where it is not installed
    result = CliRunner().invoke(main, ["compile", str(recipe(project)), "-o", str(project / "a"), "-j", "1",
                                       "--executor", "ray"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == ("error: --executor ray needs Ray: pip install 'tunec[ray]' "
                                                      "(or `pip install ray`)")


def test_the_module_examples_hold():
    import doctest

    assert doctest.testmod(cache_mod).failed == 0


def test_which_files_each_part_reads(tmp_path):
    """A part's key reads the files its rows come from: its split, an eval file, the train split when
    its few-shot exemplars or its eval fraction come from there; never the other files."""
    from tunec.compiler.check import check
    from tunec.compiler.load import load_recipe
    from tunec.compiler.sources import part_inputs

    for name in ("train", "test", "extra"):
        _rows(tmp_path / f"{name}.jsonl", 0, 6)
    t = '{kind: inline, name: t, prompt: "{{ q }}", completion: " {{ a }}"}'
    (tmp_path / "r.yaml").write_text("\n".join([
        f"tokenizer: {{kind: local, path: {TOKENIZER}}}",
        "seq_len: 64",
        "tasks:",
        f"  split: {{source: {{kind: jsonl, path: {{train: train.jsonl, test: test.jsonl}}}}, templates: [{t}],"
        " eval: {split: test}}",
        f"  shots: {{source: {{kind: jsonl, path: {{train: train.jsonl, test: test.jsonl}}}}, templates: [{t}],"
        " eval: {split: test}, few_shot: {shots: 1}}",
        f"  frac: {{source: {{kind: jsonl, path: train.jsonl}}, templates: [{t}], eval: {{fraction: 0.5}}}}",
        f"  file: {{source: {{kind: jsonl, path: train.jsonl}}, templates: [{t}], eval: {{file: extra.jsonl}}}}",
        "stages:",
        f"  - {{name: s, objective: sft, tasks: [split, shots, frac, file], model: {MODEL}}}",
    ]) + "\n", encoding="utf-8")
    loaded = check(load_recipe(tmp_path / "r.yaml")).loaded

    def files(task: str, part: str) -> set[str]:
        options, content = part_inputs(loaded, task, loaded.recipe.tasks[task], part)
        assert "path" not in options["source"] and "leakage" not in options
        return set(content)

    assert files("split", "train") == {"split:train"} and files("split", "eval") == {"split:test"}
    assert files("shots", "eval") == {"split:test", "split:train"}
    assert files("frac", "train") == files("frac", "eval") == {"split:train"}
    assert files("file", "train") == {"split:train"} and files("file", "eval") == {"eval_file"}
    # a train part's key leaves out the eval selection, unless its rows depend on it
    assert "eval" not in part_inputs(loaded, "split", loaded.recipe.tasks["split"], "train")[0]
    assert "eval" in part_inputs(loaded, "frac", loaded.recipe.tasks["frac"], "train")[0]


def test_a_rebuild_loads_no_tokenizer_and_builds_no_model_config_unless_their_content_changed(project, unit_cache,
                                                                                             monkeypatch):
    """The tokenizer (compiler/tokcache.py) and the findings of building a `kind: config` model's config
    (compiler/check.py) come from the cache when their content is unchanged; the build's bytes are a
    clean build's."""
    import shutil

    from tunec.compiler import check as check_mod
    from tunec.compiler import tokcache

    shutil.copytree(TOKENIZER, project / "tok")
    path = recipe(project)
    path.write_text(path.read_text().replace(str(TOKENIZER), str(project / "tok")))
    compile_recipe(path, project / "a", Options(workers=1))
    compile_recipe(path, project / "clean", Options(workers=1, use_cache=False))
    assert tree(project / "a") == tree(project / "clean")

    calls: list[str] = []
    real_load, real_findings = tokcache.load_tokenizer, check_mod.config_findings
    monkeypatch.setattr(tokcache, "load_tokenizer", lambda loaded: calls.append("tokenizer") or real_load(loaded))
    monkeypatch.setattr(check_mod, "config_findings", lambda c: calls.append("config") or real_findings(c))
    compile_recipe(path, project / "b", Options(workers=1))
    assert calls == [] and tree(project / "b") == tree(project / "clean")

    (project / "chat.jinja").write_text(CHAT.replace("<{{ m.role }}>", "[{{ m.role }}] "), encoding="utf-8")
    compile_recipe(path, project / "c", Options(workers=1))
    assert calls == ["tokenizer"]
    saved = "".join(p.read_text() for p in (project / "c" / "tokenizer").iterdir())
    assert "[{{ m.role }}]" in saved and "[{{ m.role }}]" not in "".join(
        p.read_text() for p in (project / "b" / "tokenizer").iterdir())
    calls.clear()
    config = project / "tok" / "tokenizer_config.json"
    settings = json.loads(config.read_text())
    settings["model_max_length"] = 4321
    config.write_text(json.dumps(settings))  # a tokenizer file changed: loaded again
    compile_recipe(path, project / "d", Options(workers=1))
    assert calls == ["tokenizer"]
    calls.clear()
    for entry in (unit_cache / tokcache.KIND).rglob("*"):
        if entry.is_file():
            entry.write_bytes(entry.read_bytes()[:-5])  # damaged: loaded again, never used
    compile_recipe(path, project / "e", Options(workers=1))
    assert calls == ["tokenizer"] and tree(project / "e") == tree(project / "d")

    calls.clear()
    path.write_text(path.read_text().replace("{model_type: llama}", "{model_type: llama, num_hidden_layers: 3}"))
    compile_recipe(path, project / "f", Options(workers=1))
    assert calls == ["config"]  # another config: checked again
    calls.clear()
    compile_recipe(path, project / "g", Options(workers=1, use_cache=False))
    # --no-cache: nothing read from the cache (the tokenizer loads while the config is checked)
    assert sorted(calls) == ["config", "tokenizer"]


def test_leakage_reports_are_compared_once_per_content(project, unit_cache, monkeypatch):
    from tunec.compiler import incremental

    _rows(project / "add" / "test.jsonl", 0, 4)  # the eval rows are training rows: they leak
    path = recipe(project)
    first = compile_recipe(path, project / "a", Options(workers=1)).stages[0].leakage
    assert first["add"].leaked == 4
    calls: list[int] = []
    real = incremental.leak_reports
    monkeypatch.setattr(incremental, "leak_reports", lambda train, evals: calls.append(1) or real(train, evals))
    assert compile_recipe(path, project / "b", Options(workers=1)).stages[0].leakage == first and calls == []
    for entry in (unit_cache / incremental.LEAK_REPORTS).rglob("*.json"):
        entry.write_text("[[")  # damaged: compared again
    assert compile_recipe(path, project / "c", Options(workers=1)).stages[0].leakage == first and calls == [1]
    _rows(project / "add" / "test.jsonl", 10, 4)  # two of them still leak (the train split holds 0..11)
    assert compile_recipe(path, project / "d", Options(workers=1)).stages[0].leakage["add"].leaked == 2
    assert calls == [1, 1]
    clean = compile_recipe(path, project / "e", Options(workers=1, use_cache=False)).stages[0].leakage
    assert clean["add"].leaked == 2 and calls == [1, 1, 1]


def test_the_tokenizer_hash_kept_with_a_cached_tokenizer_is_the_one_computed(project, unit_cache):
    """The unit keys take the tokenizer's hash from its cache entry instead of hashing its JSON again:
    the same value."""
    from tunec.compiler import cache as cache_mod
    from tunec.compiler import tokcache
    from tunec.compiler.load import load_recipe

    loaded = load_recipe(recipe(project))
    _, fresh = tokcache.load(loaded, unit_cache)  # loaded, stored
    cache_mod._TOKENIZER_HASHES.clear()
    _, again = tokcache.load(loaded, unit_cache)  # read back: its hash remembered
    assert again == fresh and again in cache_mod._TOKENIZER_HASHES
    remembered = cache_mod.tokenizer_hash(again)
    cache_mod._TOKENIZER_HASHES.clear()
    assert remembered == cache_mod.tokenizer_hash(again) == cache_mod.tokenizer_hash(fresh)
