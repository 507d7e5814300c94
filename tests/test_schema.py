"""`tunec schema` describes exactly the recipe language: what the loader accepts, the schema accepts.

Checked with the `jsonschema` package against every recipe under `recipes/`
(recursively), every recipe the test-suite writes, and crafted invalid ones.
"""

from __future__ import annotations

import ast
import json
import textwrap
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from tunec.cli import main
from tunec.compiler.errors import TunecError
from tunec.compiler.load import load_recipe
from tunec.compiler.recipe import Recipe
from tunec.compiler.yamlpos import load_yaml_text

ROOT = Path(__file__).resolve().parents[1]
RECIPE_FILES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "stages:" in p.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def validator():
    result = CliRunner().invoke(main, ["schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.output)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_errors(validator, data) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(data)]


def test_recipe_files_are_found_recursively():
    assert ROOT / "recipes" / "demo" / "demo.yaml" in RECIPE_FILES and len(RECIPE_FILES) >= 4


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_file_matches_the_schema(validator, path):
    loaded = load_recipe(path)
    assert schema_errors(validator, loaded.data) == []


def _string_value(node: ast.AST, names: dict[str, str]) -> str | None:
    """The value of a string expression built from literals, module constants, `+` and `.replace`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _string_value(node.left, names), _string_value(node.right, names)
        return left + right if left is not None and right is not None else None
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "replace":
        base = _string_value(node.func.value, names)
        args = [_string_value(a, names) for a in node.args]
        if base is not None and len(args) == 2 and None not in args and not node.keywords:
            return base.replace(*args)
    return None


def _recipes_written_by_tests() -> list[tuple[str, str]]:
    """Recipes spelt out in tests/*.py: string expressions over literals and module constants."""
    found = []
    for test_file in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(test_file.read_text(encoding="utf-8"))
        names: dict[str, str] = {}
        for stmt in tree.body:
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                value = _string_value(stmt.value, names)
                if value is not None:
                    names[stmt.targets[0].id] = value
        seen = set()
        for node in ast.walk(tree):
            value = _string_value(node, names) if isinstance(node, ast.expr) else None
            if value is None or "stages:" not in value or "tokenizer:" not in value:
                continue
            text = textwrap.dedent(value).lstrip("\n")
            try:
                data, _ = load_yaml_text(text, "t.yaml")
            except TunecError:
                continue
            if isinstance(data, dict) and "stages" in data and text not in seen:
                seen.add(text)
                found.append((f"{test_file.name}:{node.lineno}", text))
    return found


def _accepted(text: str) -> bool:
    try:
        Recipe.model_validate(load_yaml_text(text, "t.yaml")[0])
    except ValidationError:  # written invalid on purpose, for an error test
        return False
    return True


TEST_RECIPES = [(where, text) for where, text in _recipes_written_by_tests() if _accepted(text)]


def test_the_suite_writes_recipes_to_check():
    assert len(TEST_RECIPES) >= 15


@pytest.mark.parametrize("text", [t for _, t in TEST_RECIPES], ids=[i for i, _ in TEST_RECIPES])
def test_every_recipe_the_loader_accepts_matches_the_schema(validator, text):
    data, _ = load_yaml_text(text, "t.yaml")
    assert schema_errors(validator, data) == []


SHORTHANDS = """
tokenizer: {kind: local, path: tok}
seq_len: 64
version: 1
tasks:
  sums:
    source: {kind: jsonl, path: tiny/train.jsonl}
    templates: [arithmetic/qa, {kind: inline, prompt: "Q", completion: "A"}]
    format: chat
    answer_choices: [yes, no]
  more:
    source: {kind: hub, id: org/data, columns: [a]}
    templates: [{kind: library, name: arithmetic/qa}]
    format: completion
    eval: {fraction: 0.1}
stages:
  - name: a
    objective: sft
    tasks: [sums]
    model: {kind: hub, id: org/model}
    peft: none
    mixture: proportional
    lr: 1e-5
  - name: b
    objective: lm
    tasks: [more]
    model: {kind: stage, stage: a}
    peft: lora
    mixture: {kind: temperature, temperature: 2}
"""


def test_shorthand_forms_match_the_schema(validator):
    data, _ = load_yaml_text(SHORTHANDS, "t.yaml")
    Recipe.model_validate(data)
    assert schema_errors(validator, data) == []


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(sed=1),
        lambda d: d["stages"][0].update(objective="ppo"),  # not an objective (dpo is, since preference tuning)
        lambda d: d["stages"][0].update(mixture="weights"),  # `weights` has a required field: no shorthand
        lambda d: d["stages"][0].update(peft={"kind": "lora", "rr": 8}),
        lambda d: d["stages"][0].update(peft={"kind": "lora", "save_merged": "yes"}),  # YAML 1.2: a string
        lambda d: d["stages"][0].update(lr=-1),
        lambda d: d["stages"][0].update(lr=5),
        lambda d: d["stages"][0].update(batch_tokens=10**24),
        lambda d: d.update(seed=10**29),
        lambda d: d.update(version=2),
        lambda d: d["tasks"]["sums"].update(format="sharegpt"),
        lambda d: d["tasks"]["sums"].update(templates=[5]),
        lambda d: d["tasks"]["more"]["source"].update(kind="hubb"),
        lambda d: d["tasks"]["more"].update(eval={"fractoin": 0.1}),
        lambda d: d["tasks"]["more"].update(truncation="chop"),
    ],
)
def test_invalid_recipes_fail_the_schema(validator, change):
    data, _ = load_yaml_text(SHORTHANDS, "t.yaml")
    change(data)
    with pytest.raises(ValidationError):
        Recipe.model_validate(data)
    assert schema_errors(validator, data) != []
