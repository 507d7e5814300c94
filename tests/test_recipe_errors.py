"""Recipe loading: every mistake is reported as ``FILE:LINE:COL: field.path: message``, all at once.

Line and column numbers are read off the YAML written in each test (line 1
is the first line of the text).
"""

from __future__ import annotations

import pytest

from tunec.compiler.errors import Problem, TunecError
from tunec.compiler.load import display_path, load_recipe
from tunec.compiler.recipe import JsonlSource, LibraryTemplate, NoPeft, Recipe, SftObjective

VALID = """
tokenizer: {kind: local, path: tok}
seq_len: 64
tasks:
  sums:
    source: {kind: jsonl, path: tiny/train.jsonl}
    templates: [arithmetic/qa]
stages:
  - name: sft
    objective: sft
    tasks: [sums]
    model: {kind: hub, id: org/model}
"""


def errors(path) -> list[str]:
    """The lines a user would see, with the file shown as the CLI shows it."""
    with pytest.raises(TunecError) as info:
        load_recipe(path)
    shown = display_path(path.resolve())
    lines = [str(p) for p in info.value.problems]
    assert str(info.value) == "\n".join(lines)
    return [line.replace(shown, "R", 1) if line.startswith(shown) else line for line in lines]


def test_valid_recipe_loads_with_defaults(write_recipe):
    loaded = load_recipe(write_recipe(VALID))
    r = loaded.recipe
    assert isinstance(r, Recipe)
    task = r.tasks["sums"]
    assert isinstance(task.source, JsonlSource) and task.source.files() == {"train": "tiny/train.jsonl"}
    assert task.templates == [LibraryTemplate(kind="library", name="arithmetic/qa")]
    assert task.truncation == "drop" and task.eval is None
    assert (task.train.split, task.train.start, task.train.stop) == ("train", 0, None)
    stage = r.stages[0]
    assert stage.objective == SftObjective(kind="sft") and stage.peft == NoPeft(kind="none")
    assert r.seed == 0 and r.template_dirs == []
    assert loaded.position(("tasks", "sums", "templates", 0)) == (6, 17)


def test_demo_recipe_loads(demo_dir):
    loaded = load_recipe(demo_dir / "demo.yaml")
    assert list(loaded.recipe.tasks) == ["reviews", "arithmetic", "plurals"]


def test_several_mistakes_reported_together_sorted_by_line(write_recipe):
    path = write_recipe(
        """
        tokenizer: {kind: local, path: tok}
        seq_len: 8
        sed_len: 3
        tasks:
          sums:
            source: {kind: jsnl, path: tiny/train.jsonl}
            templates: [arithmetic/qa]
            truncaton: drop
            train: {start: 5, stop: 5}
        stages:
          - name: sft
            objective: sft
            tasks: [sums]
        """
    )
    assert errors(path) == [
        "R:2:1: seq_len: Input should be greater than 8 (got 8)",
        "R:3:1: sed_len: unknown field `sed_len` (did you mean 'seq_len'?)",
        "R:6:14: tasks.sums.source: unknown kind 'jsnl' (did you mean 'jsonl'?); "
        "expected one of: jsonl, json, csv, parquet, hub",
        "R:8:5: tasks.sums.truncaton: unknown field `truncaton` (did you mean 'truncation'?)",
        "R:9:5: tasks.sums.train: `stop` (5) must be greater than `start` (5)",
        "R:11:5: stages[0]: missing required field `model`",
    ]


def test_problems_carry_file_line_col_and_field(write_recipe):
    path = write_recipe(VALID.replace("seq_len: 64", "seq_len: 4"))
    with pytest.raises(TunecError) as info:
        load_recipe(path)
    assert info.value.problems == [
        Problem("Input should be greater than 8 (got 4)", display_path(path), 2, 1, "seq_len")
    ]


def test_unknown_field_without_close_name_lists_allowed_fields(write_recipe):
    path = write_recipe(VALID.replace("    objective: sft\n", "    objective: sft\n    zzz: 1\n"))
    assert errors(path) == [
        "R:10:5: stages[0].zzz: unknown field `zzz`; allowed: activation_checkpointing, batch_tokens, budget, "
        "checkpoint_every_steps, chunked_loss, compile, epochs, eval, eval_every_steps, held_out, log_every_steps, lr, "
        "max_grad_norm, max_steps, micro_batch_rows, mixture, model, name, objective, parallelism, peft, tasks, "
        "warmup_steps, weight_decay"
    ]


def test_unknown_field_inside_a_tagged_union_member(write_recipe):
    # the loc goes through the union tag (`jsonl`); the hint comes from that member
    path = write_recipe(VALID.replace("path: tiny/train.jsonl}", "pth: tiny/train.jsonl}"))
    assert errors(path) == [
        "R:5:5: tasks.sums.source: missing required field `path`",
        "R:5:27: tasks.sums.source.pth: unknown field `pth` (did you mean 'path'?)",
    ]


def test_misspelt_kinds_everywhere(write_recipe):
    path = write_recipe(
        """
        tokenizer: {kind: locl, path: tok}
        seq_len: 64
        tasks:
          sums:
            source: {kind: jsonl, path: tiny/train.jsonl}
            templates: [{kind: libary, name: arithmetic/qa}]
        stages:
          - name: sft
            objective: sfft
            tasks: [sums]
            model: {kind: hub, id: org/model}
            peft: {kind: lora_, r: 8}
        """
    )
    assert errors(path) == [
        "R:1:13: tokenizer: unknown kind 'locl' (did you mean 'local'?); expected one of: local, hub",
        "R:6:18: tasks.sums.templates[0]: unknown kind 'libary' (did you mean 'library'?); "
        "expected one of: library, file, inline, promptsource",
        # the `objective: sfft` shorthand has no `kind:` key: the error is at `objective`
        "R:9:5: stages[0].objective: unknown kind 'sfft' (did you mean 'sft'?); expected one of: sft, lm, dpo, simpo, orpo, kto",
        "R:12:12: stages[0].peft: unknown kind 'lora_' (did you mean 'lora'?); expected one of: none, lora, qlora",
    ]


def test_missing_kind_lists_the_kinds(write_recipe):
    path = write_recipe(VALID.replace("{kind: hub, id: org/model}", "{id: org/model}"))
    assert errors(path) == ["R:11:5: stages[0].model: missing `kind` (local, hub, config, stage)"]


def test_missing_required_top_level_fields_point_at_the_document(write_recipe):
    path = write_recipe("seq_len: 64\n")
    assert errors(path) == [
        "R:1:1: missing required field `tokenizer`",
        "R:1:1: missing required field `tasks`",
        "R:1:1: missing required field `stages`",
    ]


def test_missing_nested_fields(write_recipe):
    path = write_recipe(
        """
        tokenizer: {kind: local, path: tok}
        seq_len: 64
        tasks:
          sums:
            source: {kind: jsonl, path: tiny/train.jsonl}
            templates:
              - {kind: inline, prompt: "Q: {{ q }}"}
        stages:
          - objective: sft
            tasks: [sums]
            model: {kind: hub, id: org/model}
        """
    )
    assert errors(path) == [
        "R:7:9: tasks.sums.templates[0]: missing required field `completion`",
        "R:9:5: stages[0]: missing required field `name`",
    ]


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("seq_len: 64", "seq_len: 9", None),  # the smallest valid value
        ("seq_len: 64", "seq_len: 0", "R:2:1: seq_len: Input should be greater than 8 (got 0)"),
        ("seq_len: 64", "seq_len: sixty", "R:2:1: seq_len: Input should be a valid integer, unable to "
         "parse string as an integer (got 'sixty')"),
        ("[arithmetic/qa]", "[]", "R:4:3: tasks.sums: a task needs `templates` (or `format: {kind: chat, "
         "messages: COLUMN}`)"),
        ("templates: [arithmetic/qa]", "templates: [arithmetic/qa]\n    train: {start: 10, stop: 3}",
         "R:7:5: tasks.sums.train: `stop` (3) must be greater than `start` (10)"),
        ("templates: [arithmetic/qa]", "templates: [arithmetic/qa]\n    eval: {start: -1}",
         "R:7:12: tasks.sums.eval.start: Input should be greater than or equal to 0 (got -1)"),
        ("templates: [arithmetic/qa]", "templates: [arithmetic/qa]\n    truncation: cut",
         "R:7:5: tasks.sums.truncation: Input should be 'drop', 'truncate' or 'error' (got 'cut')"),
        ("- name: sft", "- name: my stage", "R:8:5: stages[0].name: String should match pattern "
         "'^[A-Za-z0-9][A-Za-z0-9_.-]*$' (got 'my stage')"),
        ("{kind: hub, id: org/model}", "{kind: config, config: {hidden_size: 8}}",
         "R:11:27: stages[0].model.config: `config` needs a `model_type` (for example `llama` or `qwen2`)"),
    ],
)
def test_value_errors(write_recipe, old, new, expected):
    assert old in VALID
    path = write_recipe(VALID.replace(old, new, 1))
    if expected is None:
        load_recipe(path)
    else:
        assert errors(path) == [expected]


@pytest.mark.parametrize(
    "text",
    ["- tokenizer: {kind: local, path: tok}\n- seq_len: 64\n", "just a sentence\n", "", "# nothing\n"],
    ids=["list", "scalar", "empty", "comment"],
)
def test_recipe_that_is_not_a_mapping(write_recipe, text):
    path = write_recipe(text)
    assert errors(path) == ["R:1:1: a recipe is a YAML mapping (tokenizer:, seq_len:, tasks:, stages:)"]


def test_missing_recipe_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(TunecError) as info:
        load_recipe(path)
    assert [str(p) for p in info.value.problems] == [f"recipe file not found: {display_path(path)}"]


def test_recipe_path_that_is_a_folder(tmp_path):
    with pytest.raises(TunecError, match="recipe file not found"):
        load_recipe(tmp_path)


def test_non_utf8_recipe_is_located(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("seq_len: 64\n# café\n".encode("latin-1"))  # é is byte 0xe9 at offset 17
    assert errors(path) == ["R:2:6: recipe is not UTF-8 text (invalid continuation byte at byte 17)"]


def test_non_utf8_byte_far_into_a_long_recipe_is_located(tmp_path):
    # past the first 8 KiB read buffer: the offset must still be the file's
    comments = "".join(f"# comment line {i:04d}\n" for i in range(600))  # 20 bytes a line
    path = tmp_path / "long.yaml"
    path.write_bytes(comments.encode() + b"seq_len: 64  # \xff\n")
    assert errors(path) == [f"R:601:16: recipe is not UTF-8 text (invalid start byte at byte {20 * 600 + 15})"]


def test_crlf_recipe_loads_like_lf(tmp_path):
    path = tmp_path / "crlf.yaml"
    path.write_bytes(VALID.lstrip("\n").replace("\n", "\r\n").encode())
    loaded = load_recipe(path)
    assert loaded.text == VALID.lstrip("\n")
    assert loaded.position(("stages", 0, "model")) == (11, 5)


def test_yaml_errors_come_before_validation(write_recipe):
    path = write_recipe(VALID + "seq_len: 128\n")
    assert errors(path) == [
        "R:12:1: duplicate key `seq_len` (first given on line 2); YAML keeps only the last one, "
        "so remove one of them"
    ]


def test_merge_keys_in_a_recipe(write_recipe):
    # stage settings shared through an anchor, one of them overridden
    path = write_recipe(
        """
        tokenizer: {kind: local, path: tok}
        seq_len: 64
        tasks:
          sums:
            source: {kind: jsonl, path: tiny/train.jsonl}
            templates: [arithmetic/qa]
        stages:
          - &first
            name: first
            objective: sft
            tasks: [sums]
            model: {kind: hub, id: org/model}
            lr: 1.0e-3
          - <<: *first
            name: second
            model: {kind: stage, stage: first}
            lr: 1.0e-4
        """
    )
    second = load_recipe(path).recipe.stages[1]
    assert (second.name, second.lr, second.tasks) == ("second", 1.0e-4, ["sums"])
    assert second.model.kind == "stage"


def test_error_in_merged_value_points_at_where_it_was_written(write_recipe):
    path = write_recipe(
        """
        tokenizer: {kind: local, path: tok}
        seq_len: 64
        tasks:
          sums:
            source: {kind: jsonl, path: tiny/train.jsonl}
            templates: [arithmetic/qa]
        defaults: &d
          lr: -1
        stages:
          - <<: *d
            name: sft
            objective: sft
            tasks: [sums]
            model: {kind: hub, id: org/model}
        """
    )
    assert errors(path) == [
        "R:7:1: defaults: unknown field `defaults`; allowed: audit, leakage, lint, seed, seq_len, stages, tasks, "
        "template_dirs, tokenizer, version",
        "R:8:3: stages[0].lr: Input should be greater than 0 (got -1)",
    ]


def test_misspelt_names_are_reported_with_schema_errors(write_recipe):
    # a wrong task or template name is not a schema error, but the user sees it in the same pass
    path = write_recipe(
        """
        tokenizer: {kind: local, path: tok}
        seq_len: 64
        tasks:
          sums:
            source: {kind: jsonl, path: tiny/train.jsonl}
            templates: [arithmetic/qaa]
        stages:
          - name: sft
            objective: sft
            tasks: [summs]
            model: {kind: hub, id: org/model}
            lrr: 0.1
        """
    )
    assert errors(path) == [
        "R:6:17: tasks.sums.templates[0]: unknown template 'arithmetic/qaa' (did you mean 'arithmetic/qa'?)",
        "R:10:13: stages[0].tasks[0]: unknown task 'summs' (did you mean 'sums'?)",
        "R:12:5: stages[0].lrr: unknown field `lrr` (did you mean 'lr'?)",
    ]


def test_yaml_booleans_where_strings_are_expected_get_a_hint(write_recipe):
    path = write_recipe(VALID.replace("templates: [arithmetic/qa]",
                                      "templates: [arithmetic/qa]\n    answer_choices: [true, no]"))
    messages = errors(path)
    assert any("YAML reads true/false as booleans: quote the value" in m for m in messages), messages


def test_yaml_1_2_scalars_yes_no_are_strings_and_exponents_are_floats(write_recipe):
    # YAML 1.1 (PyYAML's default) reads `no` as False and `1e-5` as a string.
    path = write_recipe(VALID.replace("templates: [arithmetic/qa]",
                                      "templates: [arithmetic/qa]\n    answer_choices: [yes, no, on, off]")
                        + "    lr: 1e-5\n")
    r = load_recipe(path).recipe
    assert r.tasks["sums"].answer_choices == ["yes", "no", "on", "off"]
    assert r.stages[0].lr == 1e-5 and isinstance(load_recipe(path).data["stages"][0]["lr"], float)


def test_non_finite_and_absurd_numbers_are_rejected_where_written(write_recipe):
    path = write_recipe(
        VALID.replace("seq_len: 64", "seq_len: 64\nseed: 1e29")
        + "    lr: .inf\n    epochs: .inf\n    batch_tokens: 1e24\n    warmup_steps: -3\n    max_steps: 1e10\n"
    )
    assert errors(path) == [
        "R:3:1: seed: Input is too large (got 1e+29)",
        "R:13:5: stages[0].lr: Input should be a finite number (got inf)",
        "R:14:5: stages[0].epochs: Input should be a finite number (got inf)",
        "R:15:5: stages[0].batch_tokens: Input is too large (got 1e+24)",
        "R:16:5: stages[0].warmup_steps: Input should be greater than or equal to 0 (got -3)",
        "R:17:5: stages[0].max_steps: Input should be less than or equal to 1000000000 (got 10000000000.0)",
    ]


def test_bounds_are_in_the_schema_too():
    schema = Recipe.model_json_schema()
    stage = schema["$defs"]["Stage"]["properties"]
    assert stage["lr"]["maximum"] == 1 and stage["batch_tokens"]["maximum"] == 1 << 40
    assert schema["properties"]["seed"]["maximum"] == 2**32 - 1


@pytest.mark.parametrize(
    "task_lines, expected",
    [
        ("    eval: {fractoin: 0.1}",
         ["R:7:12: tasks.sums.eval.fractoin: unknown field `fractoin` (did you mean 'fraction'?)"]),
        ("    answer_choices: {kind: column, colum: x}",
         ["R:7:5: tasks.sums.answer_choices: missing required field `column`",
          "R:7:36: tasks.sums.answer_choices.colum: unknown field `colum` (did you mean 'column'?)"]),
        ("    answer_choices: {kind: colum, column: x}",
         ["R:7:22: tasks.sums.answer_choices: unknown kind 'colum' (did you mean 'column'?); "
          "expected one of: column, jinja"]),
        ("    answer_choices: [a, [b]]", ["R:7:25: tasks.sums.answer_choices[1]: Input should be a valid string"]),
        ("    answer_choices: 5",
         ["R:7:5: tasks.sums.answer_choices: Input should be a valid list or a mapping (got 5)"]),
        ("    eval: 5", ["R:7:5: tasks.sums.eval: Input should be a mapping (got 5)"]),
        ("    truncation: truncat",
         ["R:7:5: tasks.sums.truncation: Input should be 'drop', 'truncate' or 'error' (got 'truncat') "
          "(did you mean 'truncate'?)"]),
    ],
)
def test_union_errors_collapse_to_the_member_meant(write_recipe, task_lines, expected):
    path = write_recipe(VALID.replace("templates: [arithmetic/qa]\n", f"templates: [arithmetic/qa]\n{task_lines}\n"))
    assert errors(path) == expected


def test_union_of_types_says_what_each_member_wanted(write_recipe):
    path = write_recipe(VALID.replace("path: tiny/train.jsonl", "path: 5")
                        + "    peft: {kind: lora, target_modules: all-linaer}\n")
    assert errors(path) == [
        "R:5:27: tasks.sums.source.path: Input should be a valid string or a mapping (got 5)",
        "R:12:24: stages[0].peft.target_modules: Input should be a valid list or 'all-linear' "
        "(got 'all-linaer') (did you mean 'all-linear'?)",
    ]
