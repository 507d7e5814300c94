"""Static checks: tasks, templates, columns, files and stages, all reported together with places."""

from __future__ import annotations

import pytest

from tunec.compiler.check import check
from tunec.compiler.errors import TunecError
from tunec.compiler.load import display_path, load_recipe
from tunec.compiler.templates import LIBRARY_DIR

HEAD = """
tokenizer: {kind: local, path: tok}
seq_len: 64
"""

# Lines 1-2 are HEAD; `tasks:` is line 3.
SUMS = HEAD + """\
tasks:
  sums:
    source: {kind: jsonl, path: {train: tiny/train.jsonl, test: tiny/test.jsonl}}
    fields: {question: q, answer: a}
    templates: [arithmetic/qa, arithmetic/equation]
    eval: {split: test}
"""

ONE_STAGE = """\
stages:
  - name: sft
    objective: sft
    tasks: [sums]
    model: {kind: hub, id: org/model}
"""


@pytest.fixture
def recipe(write_recipe, tiny_task_dir, tmp_path):
    """``recipe(text)`` writes the recipe next to ``tiny/`` and a ``tok/`` folder, and loads it."""
    (tmp_path / "tok").mkdir()

    def make(text: str):
        return load_recipe(write_recipe(text))

    return make


def problems(loaded) -> list[str]:
    with pytest.raises(TunecError) as info:
        check(loaded)
    shown = loaded.display
    return [str(p).replace(shown, "R", 1) for p in info.value.problems]


def test_valid_recipe_passes_with_resolved_templates_and_columns(recipe):
    checked = check(recipe(SUMS + ONE_STAGE))
    assert checked.columns == {"sums": ["question", "answer"]}
    names = [t.name for t in checked.templates["sums"]]
    assert names == ["arithmetic/qa", "arithmetic/equation"]
    assert checked.templates["sums"][0].text == (LIBRARY_DIR / "arithmetic" / "qa.j2").read_text()
    assert checked.used_tasks() == ["sums"]


def test_columns_without_field_map_are_the_source_columns(recipe):
    text = SUMS.replace("    fields: {question: q, answer: a}\n", "").replace(
        "[arithmetic/qa, arithmetic/equation]",
        '[{kind: inline, prompt: "{{ q }} =", completion: " {{ a }}"}]',
    )
    checked = check(recipe(text + ONE_STAGE))
    assert checked.columns == {"sums": ["q", "a"]}
    (inline,) = checked.templates["sums"]
    assert inline.first_line == 6  # the line of `prompt`


def test_demo_recipe_passes(demo_dir):
    checked = check(load_recipe(demo_dir / "demo.yaml"))
    assert checked.used_tasks() == ["reviews", "arithmetic", "plurals"]
    assert checked.columns["reviews"] == ["text", "label"]


def test_unknown_task_in_a_stage(recipe):
    loaded = recipe(SUMS + ONE_STAGE.replace("tasks: [sums]", "tasks: [sums, summs]"))
    assert problems(loaded) == ["R:12:19: stages[0].tasks[1]: unknown task 'summs' (did you mean 'sums'?)"]


def test_task_listed_twice(recipe):
    loaded = recipe(SUMS + ONE_STAGE.replace("tasks: [sums]", "tasks: [sums, sums]"))
    assert problems(loaded) == ["R:12:19: stages[0].tasks[1]: task 'sums' is listed twice"]


def test_unknown_library_template(recipe):
    loaded = recipe(SUMS.replace("arithmetic/equation", "arithmetic/equaton") + ONE_STAGE)
    assert problems(loaded) == [
        "R:7:32: tasks.sums.templates[1]: unknown template 'arithmetic/equaton' "
        "(did you mean 'arithmetic/equation'?)"
    ]


def test_unknown_library_template_sentiment(recipe):
    text = SUMS.replace(
        "fields: {question: q, answer: a}", "fields: {text: q, label: a}"
    ).replace("[arithmetic/qa, arithmetic/equation]", "[sentiment/review_shrt]")
    assert problems(recipe(text + ONE_STAGE)) == [
        "R:7:17: tasks.sums.templates[0]: unknown template 'sentiment/review_shrt' "
        "(did you mean 'sentiment/review_short'?)"
    ]


def test_template_name_cannot_escape_the_library(recipe, tmp_path):
    (tmp_path / "secret.j2").write_text("{% block prompt %}{% endblock %}{% block completion %}{% endblock %}")
    loaded = recipe(SUMS.replace("arithmetic/equation", f"../../../../../../..{tmp_path}/secret") + ONE_STAGE)
    (p,) = problems(loaded)
    assert p.startswith("R:7:32: tasks.sums.templates[1]: unknown template '../")


def test_template_variable_not_a_column_names_recipe_and_template_lines(recipe, monkeypatch, repo_root):
    # `review_short` uses `text` (line 3 of the file) and `label`; the field map gives neither
    monkeypatch.chdir(repo_root)  # library files are shown relative to the working folder
    loaded = recipe(SUMS.replace("arithmetic/equation", "sentiment/review_short") + ONE_STAGE)
    with pytest.raises(TunecError) as info:
        check(loaded)
    label, text = info.value.problems
    assert (text.file, text.line, text.col, text.field) == (loaded.display, 7, 32, "tasks.sums.templates[1]")
    assert text.message == (
        "template 'sentiment/review_short' uses `text`, which the task does not provide; "
        "columns: question, answer [templates/sentiment/review_short.j2:3]"
    )
    assert label.line == 7 and label.message.endswith("[templates/sentiment/review_short.j2:7]")
    assert "`label`" in label.message


def test_template_variable_suggests_the_close_column(recipe):
    text = SUMS.replace("fields: {question: q, answer: a}", "fields: {question: q, answr: a}")
    p, q = problems(recipe(text + ONE_STAGE))  # both templates use `answer`
    assert q.startswith("R:7:32: tasks.sums.templates[1]: template 'arithmetic/equation' uses `answer`")
    assert p.startswith(
        "R:7:17: tasks.sums.templates[0]: template 'arithmetic/qa' uses `answer`, which the task does "
        "not provide (did you mean 'answr'?); columns: question, answr ["
    )
    assert p.endswith("templates/arithmetic/qa.j2:6]")


def test_inline_template_problem_points_at_its_own_recipe_line(recipe):
    text = SUMS.replace(
        "[arithmetic/qa, arithmetic/equation]",
        '\n      - arithmetic/qa\n      - {kind: inline, prompt: "{{ questoin }} =", completion: " {{ answer }}"}',
    )
    # the inline template sits on line 9; its problem names no template file
    assert problems(recipe(text + ONE_STAGE)) == [
        "R:9: tasks.sums.templates[1]: template 'inline' uses `questoin`, which the task does not provide "
        "(did you mean 'question'?); columns: question, answer"
    ]


def test_field_map_pointing_at_a_missing_source_column(recipe):
    text = SUMS.replace("fields: {question: q, answer: a}", "fields: {question: qq, answer: ans}")
    assert problems(recipe(text + ONE_STAGE)) == [
        "R:6:14: tasks.sums.fields.question: column `qq` is not in the source (did you mean 'q'?); columns: q, a",
        "R:6:28: tasks.sums.fields.answer: column `ans` is not in the source; columns: q, a",
    ]


def test_missing_data_file(recipe):
    text = SUMS.replace("tiny/test.jsonl", "tiny/tset.jsonl")
    (p,) = problems(recipe(text + ONE_STAGE))
    assert p.startswith("R:5:59: tasks.sums.source.path.test: file not found: ")
    assert p.endswith("tiny/tset.jsonl")


def test_missing_single_data_file_and_its_columns_unknown(recipe):
    text = SUMS.replace(
        "{train: tiny/train.jsonl, test: tiny/test.jsonl}", "tiny/nope.jsonl"
    ).replace("    eval: {split: test}\n", "")
    # only the file is reported: with no file, the columns are unknown and templates unchecked
    (p,) = problems(recipe(text + ONE_STAGE))
    assert p.startswith("R:5:27: tasks.sums.source.path: file not found: ")


def test_empty_data_file_and_unknown_split(recipe, tiny_task_dir):
    (tiny_task_dir / "test.jsonl").write_text("")
    text = SUMS.replace("eval: {split: test}", "eval: {split: test}\n    train: {split: trian}")
    assert [p.split(": ", 2)[:2] for p in problems(recipe(text + ONE_STAGE))] == [
        ["R:5:59", "tasks.sums.source.path.test"],
        ["R:9:13", "tasks.sums.train.split"],
    ]


def test_missing_tokenizer_folder_and_template_dir(recipe):
    text = SUMS.replace("path: tok}", "path: tokenizer}").replace("seq_len: 64", "seq_len: 64\ntemplate_dirs: [mine]")
    got = problems(recipe(text + ONE_STAGE))
    assert [p.split(": ", 2)[:2] for p in got] == [["R:1:26", "tokenizer.path"], ["R:3:17", "template_dirs[0]"]]
    assert "tokenizer folder not found" in got[0] and "template folder not found" in got[1]


STAGES_LATER = """\
stages:
  - name: first
    objective: sft
    tasks: [sums]
    model: {kind: stage, stage: later}
  - name: later
    objective: sft
    tasks: [sums]
    model: {kind: hub, id: org/model}
"""


def test_stage_model_from_a_later_stage(recipe):
    assert problems(recipe(SUMS + STAGES_LATER)) == [
        "R:13:26: stages[0].model.stage: a stage can only start from an earlier stage: 'later'"
    ]


def test_stage_model_from_an_unknown_stage_suggests_earlier_ones(recipe):
    text = SUMS + STAGES_LATER.replace("stage: later}", "stage: x}").replace(
        "{kind: hub, id: org/model}", "{kind: stage, stage: frist}"
    ).replace("{kind: stage, stage: x}", "{kind: hub, id: org/model}")
    assert problems(recipe(text)) == [
        "R:17:26: stages[1].model.stage: no such stage: 'frist' (did you mean 'first'?)"
    ]


def test_stage_model_from_itself(recipe):
    text = SUMS + ONE_STAGE.replace("{kind: hub, id: org/model}", "{kind: stage, stage: sft}")
    assert problems(recipe(text)) == [
        "R:13:26: stages[0].model.stage: a stage can only start from an earlier stage: 'sft'"
    ]


def test_stage_chain_passes(recipe):
    text = SUMS + STAGES_LATER.replace("stage: later}", "stage: x}").replace(
        "{kind: hub, id: org/model}", "{kind: stage, stage: first}"
    ).replace("{kind: stage, stage: x}", "{kind: hub, id: org/model}")
    assert [s.name for s in check(recipe(text)).recipe.stages] == ["first", "later"]


def test_duplicate_stage_names(recipe):
    text = SUMS + ONE_STAGE + ONE_STAGE.replace("stages:\n", "")
    assert problems(recipe(text)) == ["R:14:5: stages[1].name: stage name 'sft' is used twice"]


def test_missing_local_model_folder(recipe):
    text = SUMS + ONE_STAGE.replace("{kind: hub, id: org/model}", "{kind: local, path: base}")
    (p,) = problems(recipe(text))
    assert p.startswith("R:13:26: stages[0].model.path: model folder not found: ")


def test_unused_task_is_checked_but_not_used(recipe, tiny_task_dir):
    text = SUMS + "  spare:\n    source: {kind: jsonl, path: tiny/train.jsonl}\n    templates: [arithmetic/qa]\n"
    with pytest.raises(TunecError) as info:  # spare has no `question`/`answer` columns
        check(recipe(text + ONE_STAGE))
    assert {p.field for p in info.value.problems} == {"tasks.spare.templates[0]"}
    ok = text.replace("path: tiny/train.jsonl}\n    templates",
                      "path: tiny/train.jsonl}\n    fields: {question: q, answer: a}\n    templates")
    assert check(recipe(ok + ONE_STAGE)).used_tasks() == ["sums"]


def test_all_problems_at_once_sorted_by_line(recipe):
    text = SUMS.replace("arithmetic/equation", "arithmetic/equaton").replace(
        "answer: a}", "answer: ans}"
    ) + ONE_STAGE.replace("tasks: [sums]", "tasks: [sums, summs]") + ONE_STAGE.replace("stages:\n", "")
    got = problems(recipe(text))
    assert [p.split(": ", 2)[:2] for p in got] == [
        ["R:6:27", "tasks.sums.fields.answer"],
        ["R:7:32", "tasks.sums.templates[1]"],
        ["R:12:19", "stages[0].tasks[1]"],
        ["R:14:5", "stages[1].name"],
    ]


# ----------------------------------------------------------------- template_dirs


OWN_QA = """\
{# my own arithmetic/qa: uses `question` and `answer` #}
{% block prompt -%}
Mine: {{ question }}
{%- endblock %}
{% block completion %} {{ answer }}{% endblock %}
"""


def test_template_dirs_are_searched_before_the_built_in_library(recipe, tmp_path):
    (tmp_path / "mine" / "arithmetic").mkdir(parents=True)
    (tmp_path / "mine" / "arithmetic" / "qa.j2").write_text(OWN_QA)
    text = SUMS.replace("seq_len: 64", "seq_len: 64\ntemplate_dirs: [mine]")
    qa, equation = check(recipe(text + ONE_STAGE)).templates["sums"]
    assert qa.text == OWN_QA
    assert qa.filename == display_path(tmp_path / "mine" / "arithmetic" / "qa.j2")
    assert equation.text == (LIBRARY_DIR / "arithmetic" / "equation.j2").read_text()


def test_template_dirs_add_new_names_and_suggestions(recipe, tmp_path):
    (tmp_path / "mine" / "house").mkdir(parents=True)
    (tmp_path / "mine" / "house" / "style.j2").write_text(OWN_QA)
    text = SUMS.replace("seq_len: 64", "seq_len: 64\ntemplate_dirs: [mine]")
    checked = check(recipe(text.replace("arithmetic/qa,", "house/style,") + ONE_STAGE))
    assert [t.name for t in checked.templates["sums"]] == [
        "house/style",
        "arithmetic/equation",
    ]
    got = problems(recipe(text.replace("arithmetic/qa,", "house/styel,") + ONE_STAGE))
    assert got == ["R:8:17: tasks.sums.templates[0]: unknown template 'house/styel' (did you mean 'house/style'?)"]


def test_file_template(recipe, tmp_path):
    (tmp_path / "own.j2").write_text(OWN_QA.replace("{{ question }}", "{{ questin }}"))
    text = SUMS.replace("arithmetic/equation", "{kind: file, path: own.j2}")
    got = problems(recipe(text + ONE_STAGE))
    assert len(got) == 1
    assert got[0].startswith("R:7:32: tasks.sums.templates[1]: template 'own.j2' uses `questin`")
    assert got[0].endswith(f"[{display_path(tmp_path / 'own.j2')}:3]")
    missing = problems(recipe(SUMS.replace("arithmetic/equation", "{kind: file, path: gone.j2}") + ONE_STAGE))
    assert len(missing) == 1 and missing[0].startswith("R:7:45: tasks.sums.templates[1].path: template file not found")


def test_inline_block_scalar_template_lines_point_at_the_text(write_recipe, tiny_task_dir, demo_tokenizer):
    path = write_recipe(f"""
        tokenizer: {{kind: local, path: {demo_tokenizer}}}
        seq_len: 64
        tasks:
          sums:
            source: {{kind: jsonl, path: tiny/train.jsonl}}
            templates:
              - kind: inline
                prompt: |-
                  Question: {{{{ q }}}}
                  Hint: {{{{ hint }}}}
                completion: " {{{{ a }}}}"
        stages:
          - {{name: s, objective: sft, tasks: [sums], model: {{kind: config, config: {{model_type: llama}}}}}}
        """)
    with pytest.raises(TunecError) as err:
        check(load_recipe(path))
    (problem,) = err.value.problems
    assert "uses `hint`" in problem.message and problem.line == 10  # the line that says Hint:


# ----------------------------------------------------------------- `kind: config` models


CONFIG_STAGE = """\
stages:
  - name: sft
    objective: sft
    tasks: [sums]
    model:
      kind: config
      config: {CONFIG}
"""


def config_stage(config: str) -> str:
    return CONFIG_STAGE.replace("{CONFIG}", config)


@pytest.mark.parametrize(
    "config, expected",
    [
        ("{model_type: lama}",
         "R:15:16: stages[0].model.config.model_type: unknown model_type 'lama' (did you mean 'llama'?)"),
        ("{model_type: llama, hidden_size: big}",
         "R:15:35: stages[0].model.config.hidden_size: Field 'hidden_size' expected int, got str (value: 'big')"),
        ("{model_type: llama, hiden_size: 64}",
         "R:15:35: stages[0].model.config.hiden_size: `hiden_size` is not a setting of LlamaConfig "
         "(did you mean 'hidden_size'?)"),
        ("{model_type: llama, vocab_size: -1}",
         "R:15:35: stages[0].model.config.vocab_size: `vocab_size` must be positive (got -1)"),
        ("{model_type: llama, hidden_size: 64, num_attention_heads: 5}",
         "R:15:7: stages[0].model.config: The hidden size (64) is not a multiple of the number of attention "
         "heads (5)."),
        ("{model_type: llama, rope_theta: .nan}",
         "R:15:35: stages[0].model.config.rope_theta: not a finite number (NaN and infinity cannot be stored in a "
         "plan)"),
        ("{model_type: llama, rope_theta: -.inf}",
         "R:15:35: stages[0].model.config.rope_theta: not a finite number (NaN and infinity cannot be stored "
         "in a plan)"),
        ("{model_type: qwen2, hidden_size: 64, num_attention_heads: 4, num_key_value_heads: 3}",
         "R:15:76: stages[0].model.config.num_key_value_heads: `num_key_value_heads` (3) must divide "
         "`num_attention_heads` (4): each key/value head serves a whole group of query heads"),
    ],
)
def test_config_models_are_built_at_validate(recipe, config, expected):
    assert problems(recipe(SUMS + config_stage(config))) == [expected]


def test_unknown_model_type_is_one_short_line(recipe):
    (line,) = problems(recipe(SUMS + config_stage("{model_type: not-a-model-at-all}")))
    assert line.endswith("unknown model_type 'not-a-model-at-all'") and len(line) < 200


def test_config_check_keeps_torch_out_of_validate(tmp_path, demo_dir):
    import subprocess
    import sys

    code = ("import sys; from tunec.compiler.check import check; from tunec.compiler.load import load_recipe; "
            f"check(load_recipe({str(demo_dir / 'demo.yaml')!r})); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_transformers_warnings_about_a_config_are_warnings(recipe):
    checked = check(recipe(SUMS + config_stage("{model_type: llama, vocab_size: 2, foo: 1}")))
    assert sorted(str(w).replace(checked.loaded.display, "R", 1) for w in checked.warnings) == [
        "R:15:50: stages[0].model.config.foo: `foo` is not a setting of LlamaConfig; transformers keeps it as a "
        "plain attribute",
        "R:15:7: stages[0].model.config: Model config: eos_token_id must be `None` or an integer within the "
        "vocabulary (between 0 and 1), got 2. This may result in unexpected behavior.",
    ]


# ----------------------------------------------------------------- hub sources without columns


HUB = HEAD + """\
tasks:
  sums:
    source: {kind: hub, id: org/arith}
    templates: [arithmetic/qa]
""" + ONE_STAGE


def test_hub_source_without_columns_warns_offline(recipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("validate went to the network while offline")

    monkeypatch.setattr("huggingface_hub.HfApi.dataset_info", no_network)
    checked = check(recipe(HUB))
    (warning,) = checked.warnings
    assert (warning.line, warning.field) == (5, "tasks.sums.source")
    assert "columns of hub dataset 'org/arith' could not be read" in warning.message
    assert "templates of task `sums`" in warning.message


def test_hub_source_columns_come_from_the_card_when_online(recipe, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("tunec.compiler.hubmeta.offline", lambda: False)
    calls = []

    def dataset_info(self, repo_id, revision=None, timeout=None, **kw):
        calls.append((repo_id, timeout))
        return SimpleNamespace(card_data={"dataset_info": {"features": [{"name": "question"}, {"name": "text"}]}})

    monkeypatch.setattr("huggingface_hub.HfApi.dataset_info", dataset_info)
    (message,) = problems(recipe(HUB))  # the card's columns lack the template's `answer`
    assert message.startswith("R:6:17: tasks.sums.templates[0]: template 'arithmetic/qa' uses `answer`, which the "
                              "task does not provide; columns: question, text")
    assert calls == [("org/arith", 5.0)]


def test_cli_prints_validate_warnings(tmp_path, monkeypatch, write_recipe, tiny_task_dir):
    from click.testing import CliRunner

    from tunec.cli import main

    (tmp_path / "tok").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_recipe(HUB)
    result = CliRunner().invoke(main, ["validate", "recipe.yaml"])
    assert result.exit_code == 0, result.output
    assert "warning: recipe.yaml:5:5: tasks.sums.source: the columns of hub dataset 'org/arith'" in result.output
