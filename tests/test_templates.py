"""Templates: two Jinja blocks, rendered strictly, checked statically, with located errors."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
from jinja2 import meta

from tunec.compiler.templates import (
    LIBRARY_DIR,
    Renderer,
    RenderError,
    TemplateSource,
    analyse,
    find_library_template,
    library_names,
    make_env,
)

QA = """\
{# a question and its answer #}
{% block prompt -%}
Q: {{ q }}
A:
{%- endblock %}
{% block completion %} {{ a }}{% endblock %}
"""


def source(text: str, name: str = "t", filename: str = "t.j2") -> TemplateSource:
    return TemplateSource(name, text, filename)


# ----------------------------------------------------------------- rendering


def test_renders_the_two_blocks():
    assert Renderer([source(QA)]).render(0, {"q": "2+2?", "a": "4"}) == ("Q: 2+2?\nA:", " 4")


def test_text_outside_the_blocks_is_not_rendered():
    text = "HEADER {{ q }}\n{% block prompt %}P{% endblock %}FOOTER{% block completion %}C{% endblock %}"
    assert Renderer([source(text)]).render(0, {}) == ("P", "C")


def test_renderer_picks_the_template_by_index_and_ignores_extra_columns():
    inline = TemplateSource.inline("short", "{{ q }}=", "{{ a }}", "r.yaml", 4)
    r = Renderer([source(QA), inline])
    row = {"q": "1+1", "a": "2", "unused": "x"}
    assert r.render(0, row) == ("Q: 1+1\nA:", " 2")
    assert r.render(1, row) == ("1+1=", "2")


def test_undefined_variable_raises_with_the_template_line():
    text = "{% block prompt %}\nQ: {{ q }}\n{{ hint }}\n{% endblock %}{% block completion %}{{ a }}{% endblock %}"
    src = source(text, filename="hints.j2")
    with pytest.raises(RenderError) as info:
        Renderer([src]).render(0, {"q": "x", "a": "y"})
    err = info.value
    assert err.template is src
    assert err.line == 3
    assert err.message == "UndefinedError: 'hint' is undefined"
    assert src.place(err.line) == ("hints.j2", 3)


def test_error_in_the_completion_block_is_located_too():
    with pytest.raises(RenderError) as info:
        Renderer([source(QA)]).render(0, {"q": "x"})
    assert info.value.line == 6
    assert "'a' is undefined" in info.value.message


def test_inline_template_error_maps_onto_the_recipe_line():
    src = TemplateSource.inline("short", "Q: {{ q }}", " {{ a.value }}", "recipe.yaml", 7)
    assert src.first_line == 7
    with pytest.raises(RenderError) as info:
        Renderer([src]).render(0, {"q": "x", "a": "y"})
    assert src.place(info.value.line) == ("recipe.yaml", 7)
    assert "has no attribute 'value'" in info.value.message


def test_none_is_undefined_not_the_string_none():
    with pytest.raises(RenderError, match="'a' is undefined"):
        Renderer([source(QA)]).render(0, {"q": "x", "a": None})


def test_none_lets_is_defined_choose_the_branch():
    text = (
        "{% block prompt %}{{ q }}{% if ctx is defined %} [{{ ctx }}]{% endif %}{% endblock %}"
        "{% block completion %} {{ a }}{% endblock %}"
    )
    r = Renderer([source(text)])
    assert r.render(0, {"q": "Q", "a": "A", "ctx": None}) == ("Q", " A")
    assert r.render(0, {"q": "Q", "a": "A"}) == ("Q", " A")
    assert r.render(0, {"q": "Q", "a": "A", "ctx": "c"}) == ("Q [c]", " A")


def test_falsy_values_other_than_none_are_rendered():
    r = Renderer([source(QA)])
    assert r.render(0, {"q": 0, "a": ""}) == ("Q: 0\nA:", " ")
    assert r.render(0, {"q": False, "a": 0.5}) == ("Q: False\nA:", " 0.5")


def test_sandbox_blocks_attribute_escapes_and_mutation():
    escape = "{% block prompt %}{{ q.__class__.__mro__ }}{% endblock %}{% block completion %}{% endblock %}"
    with pytest.raises(RenderError):
        Renderer([source(escape)]).render(0, {"q": "x"})
    mutate = "{% block prompt %}{{ xs.append(1) }}{% endblock %}{% block completion %}{% endblock %}"
    row = {"xs": [0]}
    with pytest.raises(RenderError, match="SecurityError"):
        Renderer([source(mutate)]).render(0, row)
    assert row == {"xs": [0]}


def test_render_error_survives_pickling():
    # errors raised in worker processes are pickled back to the parent
    err = RenderError(source(QA), 6, "UndefinedError: 'a' is undefined")
    back = pickle.loads(pickle.dumps(err))
    assert (back.template, back.line, back.message) == (err.template, 6, err.message)
    assert str(back) == err.message


def test_sha256_follows_the_text():
    a, b = source(QA), source(QA, name="other", filename="o.j2")
    assert a.sha256 == b.sha256 and len(a.sha256) == 64
    assert source(QA + " ").sha256 != a.sha256


# ----------------------------------------------------------------- analyse


def test_analyse_clean_template_has_no_problems():
    assert analyse(source(QA), ["q", "a"]) == []


def test_analyse_syntax_error_with_its_line():
    text = "{# header #}\n{% block prompt %}\nQ: {{ q }\n{% endblock %}"
    (p,) = analyse(source(text, name="broken", filename="broken.j2"), ["q"])
    assert (p.file, p.line) == ("broken.j2", 3)
    assert p.message.startswith("template 'broken': syntax error: ")


def test_analyse_missing_blocks():
    text = "{% block prompt %}{{ q }}{% endblock %}"
    (p,) = analyse(source(text, name="half"), ["q"])
    assert p.message == (
        "template 'half' has no `{% block completion %}` (a template needs both a `prompt` and a "
        "`completion` block)"
    )
    assert (p.file, p.line) == ("t.j2", 1)
    problems = analyse(source("just text", name="none"), [])
    assert ["block prompt" in p.message for p in problems] == [True, False]
    assert ["block completion" in p.message for p in problems] == [False, True]


def test_analyse_unknown_variable_with_line_and_suggestion():
    text = "{% block prompt -%}\nQuestion:\n{{ qestion }}\n{%- endblock %}{% block completion %} {{ answer }}{% endblock %}"
    (p,) = analyse(source(text, name="typo", filename="typo.j2"), ["question", "answer"])
    assert (p.file, p.line) == ("typo.j2", 3)
    assert p.message == (
        "template 'typo' uses `qestion`, which the task does not provide (did you mean 'question'?); "
        "columns: question, answer"
    )


def test_analyse_lists_every_unknown_variable_and_no_columns():
    text = "{% block prompt %}{{ b }}{{ a }}{% endblock %}{% block completion %}{% endblock %}"
    problems = analyse(source(text), [])
    assert [p.message for p in problems] == [
        "template 't' uses `a`, which the task does not provide; columns: (none)",
        "template 't' uses `b`, which the task does not provide; columns: (none)",
    ]


def test_analyse_ignores_locals_and_globals():
    text = (
        "{% block prompt %}{% set n = 2 %}{% for i in range(n) %}{{ i }}{{ q }}{% endfor %}"
        "{% endblock %}{% block completion %}{{ a }}{% endblock %}"
    )
    assert analyse(source(text), ["q", "a"]) == []


def test_analyse_without_columns_checks_only_syntax_and_blocks():
    text = "{% block prompt %}{{ anything }}{% endblock %}{% block completion %}{% endblock %}"
    assert analyse(source(text), None) == []
    assert len(analyse(source("{% block prompt %}{% endblock %}"), None)) == 1


def test_analyse_inline_template_maps_lines_onto_the_recipe():
    # an inline template is one Jinja line: every problem is on the recipe line of `prompt:`
    unknown = TemplateSource.inline("spell", "Plural of {{ wrd }}?", " {{ plural }}", "recipe.yaml", 12)
    (p,) = analyse(unknown, ["word", "plural"])
    assert (p.file, p.line) == ("recipe.yaml", 12)
    assert "(did you mean 'word'?)" in p.message
    broken = TemplateSource.inline("spell", "Plural of {{ word }?", " {{ plural }}", "recipe.yaml", 12)
    (p,) = analyse(broken, ["word", "plural"])
    assert (p.file, p.line) == ("recipe.yaml", 12)
    assert "syntax error" in p.message


def test_place_offsets_by_first_line():
    src = TemplateSource("t", QA, "big.yaml", first_line=10)
    assert src.place(1) == ("big.yaml", 10)
    assert src.place(3) == ("big.yaml", 12)
    assert src.place(None) == ("big.yaml", None)


# ----------------------------------------------------------------- library lookup


def test_library_names_lists_every_j2_file_recursively(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "a" / "deep" / "x.j2").write_text(QA)
    (tmp_path / "top.j2").write_text(QA)
    (tmp_path / "notes.txt").write_text("not a template")
    assert library_names([tmp_path]) == ["a/deep/x", "top"]
    assert library_names([tmp_path / "missing"]) == []


def test_built_in_library_names_match_the_files():
    names = library_names([LIBRARY_DIR])
    files = sorted(str(p.relative_to(LIBRARY_DIR).with_suffix("")) for p in LIBRARY_DIR.rglob("*.j2"))
    assert names == files
    assert "sentiment/review_short" in names and "arithmetic/qa" in names


def test_find_library_template_first_folder_wins(tmp_path):
    mine = tmp_path / "mine"
    (mine / "sentiment").mkdir(parents=True)
    (mine / "sentiment" / "review_short.j2").write_text(QA)
    assert find_library_template("sentiment/review_short", [mine, LIBRARY_DIR]) == (
        mine / "sentiment" / "review_short.j2"
    ).resolve()
    assert find_library_template("sentiment/review_short", [LIBRARY_DIR, mine]) == (
        LIBRARY_DIR / "sentiment" / "review_short.j2"
    )
    assert find_library_template("arithmetic/qa", [mine, LIBRARY_DIR]) == LIBRARY_DIR / "arithmetic" / "qa.j2"
    assert find_library_template("sentiment/nope", [mine, LIBRARY_DIR]) is None
    assert find_library_template("sentiment", [mine, LIBRARY_DIR]) is None  # a folder, not a template


def test_find_library_template_cannot_escape_the_library(tmp_path):
    lib = tmp_path / "lib"
    (lib / "sub").mkdir(parents=True)
    (tmp_path / "secret.j2").write_text(QA)
    (lib / "sub" / "ok.j2").write_text(QA)
    assert find_library_template("../secret", [lib]) is None
    assert find_library_template("sub/../../secret", [lib]) is None
    assert find_library_template(str(tmp_path / "secret"), [lib]) is None  # absolute path
    # going up and back in is harmless: it stays inside
    assert find_library_template("sub/../sub/ok", [lib]) == (lib / "sub" / "ok.j2").resolve()


def test_find_library_template_rejects_a_symlink_out_of_the_library(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    (tmp_path / "outside.j2").write_text(QA)
    (lib / "link.j2").symlink_to(tmp_path / "outside.j2")
    assert find_library_template("link", [lib]) is None


# ----------------------------------------------------------------- every library template

LIBRARY_FILES = sorted(LIBRARY_DIR.rglob("*.j2"))


def _used_columns(text: str) -> list[str]:
    env = make_env()
    return sorted(meta.find_undeclared_variables(env.parse(text)) - set(env.globals))


def test_the_library_is_not_empty():
    assert len(LIBRARY_FILES) >= 10


@pytest.mark.parametrize("path", LIBRARY_FILES, ids=lambda p: str(p.relative_to(LIBRARY_DIR)))
def test_every_library_template_renders(path: Path):
    name = str(path.relative_to(LIBRARY_DIR).with_suffix(""))
    src = TemplateSource(name, path.read_text(encoding="utf-8"), str(path))
    columns = _used_columns(src.text)
    assert columns, "a template that uses no column renders the same text for every row"
    assert analyse(src, columns) == []
    # every value distinct and recognisable, so we can see each one made it into the text
    row = {c: f"<{c} value>" for c in columns}
    prompt, completion = Renderer([src]).render(0, row)
    assert completion.strip(), "empty completion: nothing to train on"
    assert prompt.strip()
    assert prompt == prompt.rstrip(), "the separator belongs at the start of the completion"
    text = prompt + completion
    for c in columns:
        assert f"<{c} value>" in text, f"column `{c}` is used but does not appear in the text"
    for c in columns:  # and every column is required or tested with `is defined`
        partial = {k: v for k, v in row.items() if k != c}
        try:
            Renderer([src]).render(0, partial)
        except RenderError as exc:
            assert f"'{c}' is undefined" in exc.message
            assert exc.line is not None


@pytest.mark.parametrize("path", LIBRARY_FILES, ids=lambda p: str(p.relative_to(LIBRARY_DIR)))
def test_every_library_template_documents_its_columns(path: Path):
    text = path.read_text(encoding="utf-8")
    header = re.match(r"\{#(.*?)#\}", text, re.S)
    assert header, "a library template starts with a {# comment #} saying what it is"
    documented = re.search(r"Columns:\s*(.*)", header.group(1))
    assert documented, "the header lists the template's columns"
    names = {part.strip().split()[0] for part in documented.group(1).split(",")}
    assert set(_used_columns(text)) == names


@pytest.mark.parametrize("name", ["qa/alpaca", "qa/plain"])
def test_optional_input_column(name):
    src = TemplateSource(name, (LIBRARY_DIR / f"{name}.j2").read_text(encoding="utf-8"), name)
    r = Renderer([src])
    base = {"instruction": " Name a colour. ", "output": "Blue."}
    without = [r.render(0, {**base, "input": v}) for v in (None, "", "   ")] + [r.render(0, base)]
    assert all(w == without[0] for w in without)
    prompt, completion = without[0]
    assert "Name a colour." in prompt and "Input" not in prompt and completion == "\nBlue."
    with_input, _ = r.render(0, {**base, "input": "  the sky  "})
    assert "\nthe sky" in with_input and with_input != prompt


def test_variables_guarded_by_is_defined_are_optional_columns():
    source = TemplateSource(
        "opt",
        "{% block prompt %}{% if passage is defined %}{{ passage }}\n{% endif %}{{ question }}{% endblock %}"
        "{% block completion %} {{ answer }}{% endblock %}",
        "opt.j2",
    )
    assert analyse(source, ["question", "answer"]) == []
    problems = analyse(source, ["question"])
    assert [p.message.split(",")[0] for p in problems] == ["template 'opt' uses `answer`"]
