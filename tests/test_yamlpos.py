"""yamlpos: every value of a YAML file keeps the line and column it was written at."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from tunec.compiler.errors import Problem, TunecError
from tunec.compiler.yamlpos import load_yaml_text, locate


def load(text: str):
    return load_yaml_text(textwrap.dedent(text).lstrip("\n"), "r.yaml")


def problems_of(text: str) -> list[str]:
    with pytest.raises(TunecError) as info:
        load(text)
    return [str(p) for p in info.value.problems]


def test_positions_of_keys_and_items():
    data, where = load(
        """
        tasks:
          sums:
            templates: [arithmetic/qa, arithmetic/equation]
        stages:
          - name: sft
            tasks:
              - sums
        """
    )
    assert data == {
        "tasks": {"sums": {"templates": ["arithmetic/qa", "arithmetic/equation"]}},
        "stages": [{"name": "sft", "tasks": ["sums"]}],
    }
    # Mapping entries are located at their key, sequence items at the item.
    assert where[()] == (1, 1)
    assert where[("tasks",)] == (1, 1)
    assert where[("tasks", "sums")] == (2, 3)
    assert where[("tasks", "sums", "templates")] == (3, 5)
    assert where[("tasks", "sums", "templates", 0)] == (3, 17)
    assert where[("tasks", "sums", "templates", 1)] == (3, 32)
    assert where[("stages",)] == (4, 1)
    assert where[("stages", 0)] == (5, 5)
    assert where[("stages", 0, "name")] == (5, 5)
    assert where[("stages", 0, "tasks")] == (6, 5)
    assert where[("stages", 0, "tasks", 0)] == (7, 9)


def test_every_value_has_a_position():
    data, where = load(
        """
        a: {b: [1, {c: 2}], d: x}
        e:
          - [3, 4]
        """
    )

    def paths(value, path=()):
        yield path
        if isinstance(value, dict):
            for k, v in value.items():
                yield from paths(v, path + (k,))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                yield from paths(v, path + (i,))

    assert set(paths(data)) == set(where)


def test_empty_document_is_none():
    assert load_yaml_text("", "r.yaml") == (None, {})
    assert load_yaml_text("# only a comment\n", "r.yaml") == (None, {})


def test_duplicate_key_reports_both_lines():
    assert problems_of(
        """
        seq_len: 64
        seed: 1
        seq_len: 128
        """
    ) == [
        "r.yaml:3:1: duplicate key `seq_len` (first given on line 1); YAML keeps only the last one, "
        "so remove one of them"
    ]


def test_all_duplicates_reported_at_once_including_nested():
    problems = problems_of(
        """
        tasks:
          a:
            truncation: drop
            truncation: error
        seed: 1
        seed: 2
        """
    )
    assert [p.split(": duplicate key")[0] for p in problems] == ["r.yaml:4:5", "r.yaml:6:1"]
    assert "(first given on line 3)" in problems[0]
    assert "(first given on line 5)" in problems[1]


def test_merge_key_copies_entries_with_their_positions():
    data, where = load(
        """
        defaults: &defaults
          lr: 0.001
          epochs: 2
        stage:
          <<: *defaults
          name: sft
        """
    )
    assert data["stage"] == {"lr": 0.001, "epochs": 2, "name": "sft"}
    # A merged value is located where it was written (under the anchor).
    assert where[("stage", "lr")] == (2, 3)
    assert where[("stage", "epochs")] == (3, 3)
    assert where[("stage", "name")] == (6, 3)


@pytest.mark.parametrize(
    "text",
    [
        # override after the merge
        "base: &b {lr: 1, epochs: 2}\ns:\n  <<: *b\n  lr: 3\n",
        # override before the merge: an explicit key still wins
        "s:\n  lr: 3\n  <<: {lr: 1, epochs: 2}\n",
        # a list of merges: the first listed wins
        "a: &a {x: 1, y: 1}\nb: &b {x: 2, z: 2}\nc:\n  <<: [*a, *b]\n",
        # an alias to a mapping that itself merged and overrode
        "base: &b {lr: 1}\ns: &s\n  <<: *b\n  lr: 3\nt: *s\n",
    ],
)
def test_merge_key_override_is_not_a_duplicate_and_matches_pyyaml(text):
    data, _ = load_yaml_text(text, "r.yaml")
    assert data == yaml.safe_load(text)


def test_merge_key_override_is_located_at_the_override():
    data, where = load(
        """
        base: &b
          lr: 1
          sub: {deep: 1}
        s:
          <<: *b
          lr: 3
          sub: 5
        """
    )
    assert data["s"] == {"lr": 3, "sub": 5}
    assert where[("s", "lr")] == (6, 3)
    assert where[("s", "sub")] == (7, 3)
    # the overridden merged value's children are gone from the map
    assert ("s", "sub", "deep") not in where


def test_explicit_duplicate_next_to_a_merge_is_still_reported():
    problems = problems_of(
        """
        base: &b {lr: 1}
        s:
          <<: *b
          lr: 2
          lr: 3
        """
    )
    assert len(problems) == 1
    assert problems[0].startswith("r.yaml:5:3: duplicate key `lr` (first given on line 4)")


@pytest.mark.parametrize(
    "text, place, words",
    [
        ("a: 1\nb: [1, 2\nc: 3\n", "r.yaml:3:2", "expected ',' or ']'"),
        ("a:\n  b: 1\n c: 2\n", "r.yaml:3:2", "expected <block end>"),
        ("a: 1\n\tb: 2\n", "r.yaml:2:1", "cannot start any token"),
        ("a: *nope\n", "r.yaml:1:4", "undefined alias 'nope'"),
    ],
)
def test_syntax_error_is_located(text, place, words):
    with pytest.raises(TunecError) as info:
        load_yaml_text(text, "r.yaml")
    (problem,) = info.value.problems
    assert str(problem).startswith(f"{place}: invalid YAML: ")
    assert words in problem.message


def test_non_scalar_key_is_reported():
    with pytest.raises(TunecError) as info:
        load_yaml_text("? [1, 2]\n: 3\nok: 1\n", "r.yaml")
    assert [str(p) for p in info.value.problems] == ["r.yaml:1:3: mapping keys must be plain scalars"]


# ----------------------------------------------------------------- locate


SOURCE_YAML = """
tasks:
  sums:
    source:
      kind: jsonl
      path: tiny/train.jsonl
    templates: [arithmetic/qa]
"""


def test_locate_skips_union_tag_segments():
    data, where = load(SOURCE_YAML)
    # pydantic's loc for a discriminated union includes the tag `jsonl`
    found, pos = locate(where, data, ("tasks", "sums", "source", "jsonl", "path"))
    assert found == ("tasks", "sums", "source", "path")
    assert pos == (5, 7)


def test_locate_skips_validator_names_and_falls_back_to_the_deepest_existing_node():
    data, where = load(SOURCE_YAML)
    # a field that is not in the data (e.g. missing) -> its parent
    found, pos = locate(where, data, ("tasks", "sums", "source", "jsonl", "columns"))
    assert found == ("tasks", "sums", "source")
    assert pos == (3, 5)
    # list index and a trailing validator-ish segment
    found, pos = locate(where, data, ("tasks", "sums", "templates", 0, "function-after[x]"))
    assert found == ("tasks", "sums", "templates", 0)
    assert pos == (6, 17)
    # an index past the end of a list stops at the list
    found, pos = locate(where, data, ("tasks", "sums", "templates", 3))
    assert found == ("tasks", "sums", "templates")
    assert pos == (6, 5)


def test_locate_of_the_empty_path_is_the_document():
    data, where = load(SOURCE_YAML)
    assert locate(where, data, ()) == ((), (1, 1))
    assert locate(where, data, ("nothing",)) == ((), (1, 1))


# ----------------------------------------------------------------- YAML 1.2 core schema


@pytest.mark.parametrize(
    "text, value",
    [
        ("1e-5", 1e-5), ("-2.5E+3", -2500.0), ("3.", 3.0), (".5", 0.5), ("+1", 1), ("010", 10), ("0o17", 15),
        ("0x1F", 31), (".inf", float("inf")), ("-.Inf", float("-inf")), ("true", True), ("FALSE", False),
        ("~", None), ("null", None), ("", None),
        # YAML 1.1 read these as booleans, sexagesimals, dates or numbers; YAML 1.2 as strings
        ("yes", "yes"), ("No", "No"), ("on", "on"), ("OFF", "OFF"), ("y", "y"), ("1:30", "1:30"),
        ("2024-01-01", "2024-01-01"), ("1_000", "1_000"), ("0b101", "0b101"), ("=", "="), ("1e", "1e"),
    ],
)
def test_scalars_follow_the_yaml_1_2_core_schema(text, value):
    data, _ = load_yaml_text(f"a: {text}\n", "r.yaml")
    assert data["a"] == value and type(data["a"]) is type(value)


def test_nan_is_a_float():
    data, _ = load_yaml_text("a: .nan\n", "r.yaml")
    assert data["a"] != data["a"]


def test_quoted_scalars_stay_strings():
    data, _ = load_yaml_text("a: ['1e-5', \"true\", '3']\n", "r.yaml")
    assert data["a"] == ["1e-5", "true", "3"]


def test_tunec_error_makes_bare_messages_problems_without_a_place():
    err = TunecError(["first", Problem("second", "r.yaml", 2, 1)])
    assert all(isinstance(p, Problem) for p in err.problems)
    assert [str(p) for p in err.problems] == ["first", "r.yaml:2:1: second"]
    assert str(err) == "first\nr.yaml:2:1: second"
