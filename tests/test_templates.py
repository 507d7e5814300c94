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
    assert r.render(0, {"q": False, "a": 0.5}) == ("Q: false\nA:", " 0.5")  # JSON, never Python's repr


def test_objects_lists_and_booleans_render_as_json():
    r = Renderer([source(QA)])
    row = {"q": {"a": 1, "b": [True, None, "é"]}, "a": [1, 2.5, False]}
    assert r.render(0, row) == ('Q: {"a": 1, "b": [true, null, "é"]}\nA:', " [1, 2.5, false]")
    loop = "{% block prompt %}{% for x in xs %}{{ x }};{% endfor %}{{ d.k }}{% endblock %}{% block completion %}{% endblock %}"
    assert Renderer([source(loop)]).render(0, {"xs": [True, {"n": 1}], "d": {"k": [1]}}) == ('true;{"n": 1};[1]', "")


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


# ----------------------------------------------------------------- unknown filters and tests


def test_analyse_reports_unknown_filters_and_tests_with_their_lines():
    text = ("{% block prompt %}\n{{ q | uper }}\n{% if q is nosuchtest %}x{% endif %}{% endblock %}"
            "{% block completion %} {{ a }}{% endblock %}")
    problems = analyse(source(text, name="f", filename="f.j2"), ["q", "a"])
    assert [(p.file, p.line, p.message) for p in problems] == [
        ("f.j2", 2, "template 'f': no filter named `uper` (did you mean 'upper'?)"),
        ("f.j2", 3, "template 'f': no test named `nosuchtest`"),
    ]
    # without the columns too: it is a property of the template alone
    assert len(analyse(source(text), None)) == 2


def test_unknown_filter_in_a_filter_block_and_in_answer_choices():
    block = "{% block prompt %}{% filter nosuch %}x{% endfilter %}{% endblock %}{% block completion %} y{% endblock %}"
    (p,) = analyse(source(block), [])
    assert "no filter named `nosuch`" in p.message
    ps = TemplateSource("ps", "{{ q }} ||| {{ a }}", "ps.yaml", 4, kind="promptsource",
                        answer_choices="{{ a | nosuch }} ||| b")
    (p,) = analyse(ps, ["q", "a"])
    assert p.message == "answer_choices: template 'ps': no filter named `nosuch`" and p.line == 4


def test_renderer_reports_a_template_jinja_cannot_compile_as_a_render_error():
    # `tunec compile` validates first; this is the net under it
    text = "{% block prompt %}\n\n{{ q | nosuchfilter }}{% endblock %}{% block completion %} {{ a }}{% endblock %}"
    src = source(text, name="bad", filename="bad.j2")
    with pytest.raises(RenderError) as info:
        Renderer([src])
    assert info.value.template is src and info.value.line == 3
    assert "No filter named 'nosuchfilter'" in info.value.message


# ----------------------------------------------------------------- bounded rendering and the sandbox


def _prompt_only(body: str, name: str = "p") -> TemplateSource:
    return source("{% block prompt %}" + body + "{% endblock %}{% block completion %} c{% endblock %}", name=name)


@pytest.mark.parametrize("body", [
    "{{ 'a' * 10**9 }}",
    "{{ [0] * 10**9 }}",
    "{{ 'x'.ljust(10**9) }}",
    "{{ ('\t' * 1000).expandtabs(100000) }}",
    "{{ 'x' | center(10**9) }}",
    "{{ '%0999999999d' % 1 }}",
    "{{ '%*d' | format(999999999, 1) }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ '{:>{w}}'.format(1, w=999999999) }}",
    "{{ '{0:>{1}}'.format(1, 999999999) }}",
    "{{ '%*d' % (999999999, 1) }}",
    "{{ 2 ** 999999999 }}",
    "{{ lipsum(10**6) }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% macro d(s) %}{{ d(s ~ s) }}{% endmacro %}{{ d('ab') }}",
    "{{ 'abcdefghij'" + " | replace('a', 'aaaaaaaaaa')" * 7 + " }}",  # ten times longer at each step
    "{% for i in range(99999) %}{{ 'x' * 99999 }}{% endfor %}",
])
def test_a_template_cannot_make_values_larger_than_the_limit(body):
    with pytest.raises(RenderError) as info:
        Renderer([_prompt_only(body)]).render(0, {})
    message = info.value.message
    assert message.startswith("rendering stopped: "), message
    assert "larger than a template may make (10,000,000)" in message or "passed 10,000,000 characters" in message \
        or message.endswith("is too large a number")


def test_range_is_bounded_in_the_sandbox():
    with pytest.raises(RenderError, match="MAX_RANGE"):
        Renderer([_prompt_only("{% for i in range(10**9) %}x{% endfor %}")]).render(0, {})


@pytest.mark.parametrize("body", [
    "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",  # no output, no calls
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",  # 2**60 calls
])
def test_a_template_that_runs_too_long_is_stopped(body, monkeypatch):
    import time

    from tunec.compiler import sandbox

    monkeypatch.setattr(sandbox, "MAX_RENDER_SECONDS", 0.3)
    started = time.monotonic()
    with pytest.raises(RenderError) as info:
        Renderer([_prompt_only(body, name="slow")]).render(0, {})
    assert time.monotonic() - started < 5
    assert info.value.message == "rendering stopped: rendering took longer than 0.3 s"
    assert info.value.template.name == "slow"


def test_runaway_recursion_is_a_clean_error():
    with pytest.raises(RenderError, match="RecursionError"):
        Renderer([_prompt_only("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}")]).render(0, {})


def test_the_time_limit_leaves_no_timer_behind(monkeypatch):
    import signal

    from tunec.compiler import sandbox

    monkeypatch.setattr(sandbox, "MAX_RENDER_SECONDS", 0.2)
    before = signal.getsignal(signal.SIGALRM)
    assert Renderer([source(QA)]).render(0, {"q": "x", "a": "y"}) == ("Q: x\nA:", " y")
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is before


SSTI = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ joiner.__init__.__globals__.os.popen('touch {marker}').read() }}",
    "{{ namespace.__init__.__globals__['os'].system('touch {marker}') }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ self.__init__.__globals__.__builtins__ }}",
    "{{ lipsum.__globals__['os'].system('touch {marker}') }}",
    "{{ range.__globals__ }}",
    "{{ q | attr('__class__') }}",
    "{{ q | attr('\\x5f\\x5fclass\\x5f\\x5f') }}",
    "{{ ().__class__.__bases__[0].__subclasses__() }}",
    "{{ q['__class__'] }}",
]


@pytest.mark.parametrize("payload", SSTI)
def test_template_injection_payloads_are_refused_at_validate_and_blocked_at_compile(payload, tmp_path):
    marker = tmp_path / "pwned"
    src = _prompt_only(payload.replace("{marker}", str(marker)), name="evil")
    problems = analyse(src, ["q"])
    assert problems and all("names starting with `_` are not available" in p.message for p in problems), problems
    with pytest.raises(RenderError) as info:
        Renderer([src]).render(0, {"q": "x"})
    assert info.value.message.startswith(("SecurityError: ", "UndefinedError: ")), info.value.message
    assert not marker.exists()


@pytest.mark.parametrize("name", ["config", "request", "os", "__builtins__"])
def test_flask_style_globals_do_not_exist(name):
    src = _prompt_only("{{ %s }}" % name)
    (p,) = analyse(src, ["q"])
    assert f"uses `{name}`, which the task does not provide" in p.message
    with pytest.raises(RenderError, match=f"UndefinedError: '{name}' is undefined"):
        Renderer([src]).render(0, {"q": "x"})


@pytest.mark.parametrize("tag", ["{% include 't0' %}", "{% import 't0' as m %}", "{% from 't0' import x %}",
                                 "{% extends 't0' %}"])
def test_templates_cannot_include_or_import_other_templates(tag):
    src = source("{% block prompt %}\n" + tag + "{% endblock %}{% block completion %} c{% endblock %}", name="inc")
    problems = analyse(src, [])
    assert [(p.line, p.message.split(":")[0]) for p in problems][:1] == [(2, "template 'inc'")]
    assert "is not available: a template is one text" in problems[0].message
