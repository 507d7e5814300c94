"""Template errors point at the exact line of the template's text: files, inline strings, promptsource."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from tunec.cli import main
from tunec.compiler.yamltext import value_lines

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "recipes" / "demo" / "tokenizer"
BREAK = re.compile(r"\r\n|\r|\n")


def _dump(value: str, style: str | None, width: int, flow: bool) -> str:
    class Dumper(yaml.SafeDumper):
        pass

    def represent(dumper, data):
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style if data == value else None)

    Dumper.add_representer(str, represent)
    return yaml.dump({"tasks": [{"kind": "inline", "prompt": value}]}, Dumper=Dumper, width=width,
                     default_flow_style=flow)


def test_every_value_line_maps_onto_the_file_line_that_holds_it():
    """Random multi-line values in every scalar style, folded at several widths: each value line
    starts with a marker `M<i>M`, which must be on the file line the map gives."""
    rng = random.Random(7)
    checked = 0
    for _ in range(1500):
        words = ["w", "xx", "{{ q }}", "yy zz", "  lead", "", "\t"]
        parts = [f"M{i}M " + " ".join(rng.choice(words) for _ in range(rng.randint(0, 8)))
                 if rng.random() < 0.8 else "" for i in range(rng.randint(1, 6))]
        value = parts[0] + "".join(rng.choice(["\n", "\n\n", "\r\n"]) + p for p in parts[1:])
        value += "\n" if rng.random() < 0.3 else ""
        doc = _dump(value, rng.choice(['"', "'", "|", ">", None]), rng.choice([10, 30, 80]), rng.random() < 0.5)
        if yaml.safe_load(doc)["tasks"][0]["prompt"] != value:
            continue  # a style that cannot hold this value: the dumper changed it
        key = next(k for k, _ in yaml.compose(doc).value[0][1].value[0].value if k.value == "prompt")
        lines = value_lines(doc, key.start_mark.line + 1, key.start_mark.column + 1)
        file_lines = BREAK.split(doc)
        value_parts = BREAK.split(value)
        assert lines is not None and len(lines) == len(value_parts)
        for i, part in enumerate(value_parts):
            marker = re.match(r"M\d+M", part)
            if marker:
                assert marker.group(0) in file_lines[lines[i] - 1], (doc, value, lines, i)
                checked += 1
    assert checked > 3000


# ----------------------------------------------------------------- through the CLI


def recipe(tmp_path: Path, templates: str) -> Path:
    """A one-task recipe; ``templates`` (YAML lines, indented 6) start on line 7."""
    rows = [{"q": f"question {i}", "a": str(i)} for i in range(6)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "r.yaml"
    path.write_text(
        f"tokenizer: {{kind: local, path: {TOKENIZER}}}\n"  # 1
        "seq_len: 64\n"
        "tasks:\n"
        "  t:\n"
        "    source: {kind: jsonl, path: d.jsonl}\n"  # 5
        "    templates:\n"
        f"{templates}\n"  # 7
        "stages:\n"
        "  - {name: s, objective: sft, tasks: [t], model: {kind: config, config: {model_type: llama}}}\n"
    )
    return path


def run(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, list(args))
    assert "Traceback" not in result.output, result.output
    return result.exit_code, [l for l in result.output.splitlines() if l.startswith("error:")]


def validate_and_compile(path: Path, tmp_path: Path) -> list[list[str]]:
    out = []
    for args in (["validate", str(path)], ["compile", str(path), "-o", str(tmp_path / "out"), "-j", "1"]):
        code, errors = run(*args)
        assert code == 1 and len(errors) == 1, errors
        out.append(errors)
    return out


INLINE = [
    # (templates block, line of the fault)
    ("      - kind: inline\n        name: b\n        prompt: |\n          line one\n          {{ q }\n"
     "        completion: \" {{ a }}\"", 11),
    ("      - kind: inline\n        name: b\n        prompt: \"line one\\n{{ q }\"\n"
     "        completion: \" {{ a }}\"", 9),
    ("      - {kind: inline, name: b, prompt: \"line one\\n\\nthree {{ q }\", completion: \" {{ a }}\"}", 7),
    ("      - kind: inline\n        name: b\n        prompt: >-\n          line one\n\n          {{ q }\n"
     "        completion: \" {{ a }}\"", 12),
    ("      - kind: inline\n        name: b\n        prompt: 'line one\n\n\n          {{ q }'\n"
     "        completion: \" {{ a }}\"", 12),
    ("      - kind: inline\n        name: b\n        completion: |\n          {{ a }}\n\n          {{ a }\n"
     "        prompt: \"{{ q }}\"", 12),
    ("      - kind: inline\n        name: b\n        prompt: |\n          {{ q }}\n"
     "        completion: \" {{ a }\"", 11),
]


@pytest.mark.parametrize("templates,line", INLINE, ids=["literal", "quoted", "flow-quoted", "folded",
                                                        "single-quoted", "completion-literal", "completion-after"])
def test_inline_syntax_error_names_the_recipe_line_of_the_fault(tmp_path, templates, line):
    path = recipe(tmp_path, templates)
    for errors in validate_and_compile(path, tmp_path):
        assert errors[0].startswith(f"error: {path}:{line}: tasks.t.templates[0]: template 'b': syntax error: "), errors


def test_template_file_syntax_error_names_the_file_line(tmp_path):
    (tmp_path / "t.j2").write_text("{# header #}\n\n{% block prompt %}\nQ: {{ q }\n{% endblock %}"
                                   "{% block completion %} {{ a }}{% endblock %}\n")
    path = recipe(tmp_path, "      - {kind: file, path: t.j2}")
    for errors in validate_and_compile(path, tmp_path):
        assert errors[0].endswith(f"[{tmp_path / 't.j2'}:4]") and "syntax error: unexpected '}'" in errors[0], errors


def test_unknown_filter_is_a_located_error_in_validate_and_compile(tmp_path):
    (tmp_path / "t.j2").write_text("{# x #}\n{% block prompt %}\n{{ q | nosuchfilter }}\n{% endblock %}"
                                   "{% block completion %} {{ a | uper }}{% endblock %}\n")
    path = recipe(tmp_path, "      - {kind: file, path: t.j2}")
    for args in (["validate", str(path)], ["compile", str(path), "-o", str(tmp_path / "out"), "-j", "1"]):
        code, errors = run(*args)
        assert code == 1
        assert errors == [
            f"error: {path}:7:9: tasks.t.templates[0]: template 't.j2': no filter named `nosuchfilter` "
            f"[{tmp_path / 't.j2'}:3]",
            f"error: {path}:7:9: tasks.t.templates[0]: template 't.j2': no filter named `uper` "
            f"(did you mean 'upper'?) [{tmp_path / 't.j2'}:4]",
        ]


def test_unknown_filter_in_an_inline_template_names_its_recipe_line(tmp_path):
    path = recipe(tmp_path, "      - kind: inline\n        name: b\n        completion: ' {{ a }}'\n"
                            "        prompt: |\n          line one\n          {{ q | nosuch }}")
    code, errors = run("validate", str(path))
    assert (code, errors) == (1, [f"error: {path}:12: tasks.t.templates[0]: template 'b': no filter named `nosuch`"])


def test_a_template_that_slips_past_validation_is_still_a_one_line_error_at_compile(tmp_path, monkeypatch):
    from tunec.compiler import check

    monkeypatch.setattr(check, "analyse", lambda source, columns: [])  # as if validate had missed it
    (tmp_path / "t.j2").write_text("{% block prompt %}\n{{ q | nosuchfilter }}{% endblock %}"
                                   "{% block completion %} {{ a }}{% endblock %}\n")
    path = recipe(tmp_path, "      - {kind: file, path: t.j2}")
    code, errors = run("compile", str(path), "-o", str(tmp_path / "out"), "-j", "1")
    assert (code, errors) == (1, ["error: task 't', train: template 't.j2': TemplateAssertionError: "
                                  f"No filter named 'nosuchfilter'. [{tmp_path / 't.j2'}:2]"])


@pytest.mark.parametrize("workers", ["1", "2"])
def test_rendering_past_the_limits_names_task_row_and_template(tmp_path, workers):
    path = recipe(tmp_path, "      - kind: inline\n        name: big\n        prompt: \"{{ q }}\"\n"
                            "        completion: |\n          {{ a }}\n          {{ 'a' * 10**9 if a == '3' else '' }}")
    code, errors = run("validate", str(path))
    assert code == 0
    code, errors = run("compile", str(path), "-o", str(tmp_path / "out"), "-j", workers)
    assert (code, errors) == (1, [
        "error: task 't', train row 3: template 'big': rendering stopped: a value of 1,000,000,000 characters "
        f"or items is larger than a template may make (10,000,000) [{path}:12]"])


PROMPTSOURCE_LIST = """\
dataset: toy
templates:
  a1: !Template
    answer_choices:
    - 'no'
    - 'yes'
    id: a1
    jinja: "{{ question }}\\nYes or no? ||| {{ answer_choices[label] }}"
    metadata: !TemplateMetadata {original_task: true}
    name: yes_no
    reference: ''
  b2: !Template
    answer_choices: [no, yes]
    id: b2
    jinja: '{{ question }} True or false? ||| {{ answer_choices[label] }}'
    metadata: !TemplateMetadata {original_task: true}
    name: true_false
    reference: ''
"""


def test_promptsource_answer_choices_written_as_a_yaml_list(tmp_path):
    from tunec.compiler.promptsource import parse_templates
    from tunec.compiler.templates import Renderer, TemplateSource

    parsed = {t.name: t for t in parse_templates(PROMPTSOURCE_LIST, "templates.yaml")}
    assert parsed["yes_no"].answer_choices == "no ||| yes"
    assert parsed["true_false"].answer_choices == "no ||| yes"  # as written, not as YAML's booleans
    sources = [TemplateSource(t.name, t.jinja, "templates.yaml", t.line, kind="promptsource",
                              answer_choices=t.answer_choices) for t in parsed.values()]
    renderer = Renderer(sources)
    assert renderer.choices(0, {}) == ["no", "yes"]
    assert renderer.render(0, {"question": "Is ice cold?", "label": 1, "answer_choices": renderer.choices(0, {})}) \
        == ("Is ice cold?\nYes or no?", " yes")

    # and through a compile: every row's target is its label's choice
    (tmp_path / "templates.yaml").write_text(PROMPTSOURCE_LIST)
    rows = [{"question": f"Is {i} even?", "label": int(i % 2 == 0)} for i in range(6)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "r.yaml"
    path.write_text(
        f"tokenizer: {{kind: local, path: {TOKENIZER}}}\n"
        "seq_len: 64\n"
        "tasks:\n"
        "  t:\n"
        "    source: {kind: jsonl, path: d.jsonl}\n"
        "    templates: [{kind: promptsource, path: templates.yaml}]\n"
        "stages:\n"
        "  - {name: s, objective: sft, tasks: [t], model: {kind: config, config: {model_type: llama}}}\n"
    )
    code, errors = run("compile", str(path), "-o", str(tmp_path / "out"), "-j", "1")
    assert (code, errors) == (0, [])
    from transformers import AutoTokenizer

    from tunec.compiler.plan import read_plan
    from tunec.compiler.shards import open_shard

    plan = read_plan(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out" / plan.tokenizer.path))
    texts = []
    for shard in plan.stages[0].train.shards:
        for ids in open_shard(tmp_path / "out" / shard.path, shard.bytes)["input_ids"]:
            texts.append(tok.decode(ids.tolist()))
    joined = "".join(texts)
    for i in range(6):
        assert f"Is {i} even?\nYes or no? {'yes' if i % 2 == 0 else 'no'}" in joined
        assert f"Is {i} even? True or false? {'yes' if i % 2 == 0 else 'no'}" in joined


def test_promptsource_answer_choices_list_of_mappings_is_a_located_error():
    from tunec.compiler.errors import TunecError
    from tunec.compiler.promptsource import parse_templates

    text = PROMPTSOURCE_LIST.replace("    - 'no'\n", "    - {a: 1}\n")
    with pytest.raises(TunecError) as info:
        parse_templates(text, "templates.yaml")
    assert [str(p) for p in info.value.problems] == [
        "templates.yaml:3: template `a1`: `answer_choices` is a list of strings or a string of choices "
        "separated by `|||`"]


def test_promptsource_syntax_error_names_the_file_line_of_the_jinja(tmp_path):
    text = PROMPTSOURCE_LIST.replace('jinja: "{{ question }}\\nYes or no?', 'jinja: "{{ question }}\\n{{ Yes or no?')
    (tmp_path / "templates.yaml").write_text(text)
    (tmp_path / "d.jsonl").write_text(json.dumps({"question": "q", "label": 0}) + "\n")
    path = recipe(tmp_path, "      - {kind: promptsource, path: templates.yaml, names: [yes_no]}")
    code, errors = run("validate", str(path))
    assert code == 1 and len(errors) == 1
    assert errors[0].endswith(f"[{tmp_path / 'templates.yaml'}:8]"), errors  # the `jinja:` line, not the entry's


def test_system_prompt_and_jinja_answer_choices_are_checked_at_validate(tmp_path):
    path = recipe(tmp_path, "      - {kind: inline, name: x, prompt: '{{ q }}', completion: ' {{ a }}'}\n"
                            "    answer_choices: {kind: jinja, template: '{{ a | nosuch }} ||| {{ qq }}'}\n"
                            "    format: {kind: chat, system: 'You answer {{ q }'}")
    code, errors = run("validate", str(path))
    assert (code, errors) == (1, [
        f"error: {path}:8:35: tasks.t.answer_choices.template: no filter named `nosuch`",
        f"error: {path}:9:26: tasks.t.format.system: syntax error: unexpected '}}'",
    ])


def test_jinja_answer_choices_that_fail_on_a_row_name_task_and_row(tmp_path):
    path = recipe(tmp_path, "      - {kind: inline, name: x, prompt: '{{ q }}', completion: ' {{ a }}'}\n"
                            "    answer_choices: {kind: jinja, template: "
                            "\"{{ 'a' * (10**9 if a == '4' else 1) }} ||| b\"}")
    assert run("validate", str(path)) == (0, [])
    code, errors = run("compile", str(path), "-o", str(tmp_path / "out"), "-j", "1")
    assert (code, errors) == (1, ["error: task 't', train row 4: answer_choices: rendering stopped: a value of "
                                  "1,000,000,000 characters or items is larger than a template may make (10,000,000)"])


@pytest.mark.parametrize("kind", ["file", "promptsource"])
def test_a_template_file_that_is_not_utf8_is_located(tmp_path, kind):
    if kind == "file":
        data = "{% block prompt %}\nQ: {{ q }} caf\xe9\n{% endblock %}{% block completion %} {{ a }}{% endblock %}\n"
        ref = "{kind: file, path: t.j2}"
    else:
        data = PROMPTSOURCE_LIST.replace("Yes or no?", "Oui ou non, caf\xe9 ?")
        ref = "{kind: promptsource, path: t.j2}"
    (tmp_path / "t.j2").write_bytes(data.encode("latin-1"))
    path = recipe(tmp_path, f"      - {ref}")
    line, col = (2, 15) if kind == "file" else (8, 44)
    for args in (["validate", str(path)], ["compile", str(path), "-o", str(tmp_path / "out"), "-j", "1"]):
        code, errors = run(*args)
        assert (code, errors) == (1, [f"error: {tmp_path / 't.j2'}:{line}:{col}: not valid UTF-8: byte 0xe9 "
                                      "(invalid continuation byte); save the file as UTF-8"])


def test_a_row_that_renders_too_long_stops_the_compile_naming_it(tmp_path, monkeypatch):
    from tunec.compiler import sandbox

    monkeypatch.setattr(sandbox, "MAX_RENDER_SECONDS", 0.3)  # in this process: `-j 1` renders here
    path = recipe(tmp_path, "      - kind: inline\n        name: slow\n        prompt: |\n          {{ q }}\n"
                            "          {% if a == '2' %}{% for i in range(99999) %}{% for j in range(99999) %}"
                            "{% endfor %}{% endfor %}{% endif %}\n        completion: ' {{ a }}'")
    code, errors = run("compile", str(path), "-o", str(tmp_path / "out"), "-j", "1")
    assert (code, errors) == (1, ["error: task 't', train row 2: template 'slow': rendering stopped: rendering took "
                                  f"longer than 0.3 s [{path}:11]"])


def test_an_injection_payload_is_refused_by_validate_and_blocked_by_compile(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    payload = "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}".replace("MARKER", str(marker))
    (tmp_path / "t.j2").write_text("{% block prompt %}{{ q }}\n" + payload +
                                   "{% endblock %}{% block completion %} {{ a }}{% endblock %}\n")
    path = recipe(tmp_path, "      - {kind: file, path: t.j2}")
    code, errors = run("validate", str(path))
    assert code == 1 and len(errors) == 2, errors  # `__globals__` and `__init__`
    assert all("names starting with `_` are not available in the template sandbox" in e for e in errors)
    assert all(e.endswith(f"[{tmp_path / 't.j2'}:2]") for e in errors)

    from tunec.compiler import check

    monkeypatch.setattr(check, "analyse", lambda source, columns: [])  # as if validate had missed it
    code, errors = run("compile", str(path), "-o", str(tmp_path / "out"), "-j", "1")
    assert (code, errors) == (1, ["error: task 't', train row 0: template 't.j2': SecurityError: access to "
                                  f"attribute '__init__' of 'type' object is unsafe. [{tmp_path / 't.j2'}:2]"])
    assert not marker.exists()


@pytest.mark.parametrize("text, expected", [
    ("{% for m in messages %}{{ m['content'] }}{% endfor", "chat.jinja:1: chat template: unexpected end of template"),
    ("{% for m in messages %}\n{{ m['content'] | shout }}{% endfor %}",
     "chat.jinja:2: chat template: No filter named 'shout'"),
    ("{% for m in messages %}\n\n{{ m['content'].__class__ }}{% endfor %}",
     "chat.jinja:3: template 'chat.jinja' reads `__class__`: names starting with `_` are not available"),
    ("{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}", None),
], ids=["syntax", "filter", "private", "generation-tag"])
def test_a_chat_template_file_is_checked_at_validate(tmp_path, text, expected):
    path = recipe(tmp_path, "      - {kind: inline, name: b, prompt: '{{ q }}', completion: ' {{ a }}'}")
    path.write_text(path.read_text().replace("path: " + str(TOKENIZER) + "}",
                                             "path: " + str(TOKENIZER) + ", chat_template: chat.jinja}"))
    (tmp_path / "chat.jinja").write_text(text)
    code, errors = run("validate", str(path))
    if expected is None:  # transformers' own `{% generation %}` tag is part of the language
        assert code == 0 and errors == []
    else:
        assert code == 1 and len(errors) == 1 and f"{tmp_path}/{expected}" in errors[0], errors
