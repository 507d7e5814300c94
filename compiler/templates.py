"""Instruction templates: Jinja files with a ``prompt`` and a ``completion`` block.

A template is rendered in Jinja's immutable sandbox with ``StrictUndefined``,
so a misspelt column is an error, never an empty string. The text the model
sees is ``prompt + completion``; only the completion carries loss under the
``sft`` objective. See ``templates/README.md``.

>>> t = TemplateSource.inline("demo", "Q: {{ q }}\\nA:", " {{ a }}", "r.yaml", 3)
>>> Renderer([t]).render(0, {"q": "2+2?", "a": "4"})
('Q: 2+2?\\nA:', ' 4')
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import jinja2
from jinja2 import meta, nodes

from . import promptsource
from .errors import Problem, did_you_mean
from .sandbox import BoundedSandbox, OutOfTime, RenderLimit, bounded_join, render_bounds
from .yamltext import jinja_line_count

BLOCKS = ("prompt", "completion")
# The library ships inside the package (``tunec.templates``), so an installed wheel has it too.
LIBRARY_DIR = Path(str(resources.files("tunec.templates")))



@dataclass(frozen=True)
class TemplateSource:
    """The text of one template and where it came from (for messages)."""

    name: str  # what the recipe calls it: 'sentiment/review_short', a file path, or an inline name
    text: str  # Jinja source: two blocks, or (promptsource) one string with `|||` before the target
    filename: str  # file shown in messages
    first_line: int = 1  # line of `filename` where the Jinja text starts
    kind: str = "blocks"  # "blocks" | "promptsource"
    answer_choices: str | None = None  # promptsource: Jinja listing the choices, separated by `|||`
    separator: str = " "  # promptsource: between the rendered input and target
    lines: tuple[int, ...] = ()  # line of `filename` of each Jinja line, where they are not consecutive

    @classmethod
    def inline(cls, name: str, prompt: str, completion: str, filename: str, line: int,
               prompt_lines: Sequence[int] | None = None,
               completion_lines: Sequence[int] | None = None) -> "TemplateSource":
        """Two Jinja strings of a recipe as a two-block template.

        ``prompt_lines`` / ``completion_lines`` give the recipe line of each
        line of the strings (see :func:`.yamltext.value_lines`); without them the
        prompt's lines count on from ``line`` and the completion's from the
        prompt's last line.
        """
        # A line break between the blocks (outside them, so never rendered)
        # keeps the prompt's and the completion's Jinja lines apart: each maps
        # onto its own place in the recipe.
        text = (
            "{% block prompt %}" + prompt + "{% endblock %}\n"
            "{% block completion %}" + completion + "{% endblock %}"
        )
        p_lines = _fill(prompt_lines, jinja_line_count(prompt), line)
        c_lines = _fill(completion_lines, jinja_line_count(completion), p_lines[-1])
        return cls(name, text, filename, p_lines[0], lines=tuple(p_lines + c_lines))

    @property
    def sha256(self) -> str:
        key = self.text if self.kind == "blocks" else "\0".join([self.text, self.answer_choices or "", self.separator])
        return hashlib.sha256(key.encode("utf-8")).hexdigest()

    def place(self, jinja_line: int | None) -> tuple[str, int | None]:
        if jinja_line is None:
            return self.filename, None
        if 1 <= jinja_line <= len(self.lines):
            return self.filename, self.lines[jinja_line - 1]
        return self.filename, self.first_line + jinja_line - 1


def _fill(given: Sequence[int] | None, count: int, start: int) -> list[int]:
    out = list(given or [start])[:count]
    while len(out) < count:
        out.append(out[-1] + 1)
    return out


def as_text(value: Any) -> Any:
    """What ``{{ value }}`` prints: JSON for booleans, objects and lists, never Python's repr.

    Rows hold what the source held (a JSONL object, a parquet list): ``{"a": 1}``
    and ``true`` are what a model should learn, not ``{'a': 1}`` and ``True``.
    Templates still index and loop over such values; only printing changes.
    Strings and numbers print as they are; None too (a missing column is undefined).

    >>> make_env().from_string("{{ a }} {{ b }} {{ c }} {{ a.k }} {{ b[0] }}").render(a={"k": 1}, b=[True, "é"], c=2.5)
    '{"k": 1} [true, "é"] 2.5 1 true'
    """
    if isinstance(value, (bool, dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return value


class _FixedRng:
    rng = random.Random(0)


def make_env(rng_holder=_FixedRng) -> BoundedSandbox:
    """The sandbox every template renders in (bounded: see :mod:`.sandbox`), with promptsource's
    filters and globals."""
    env = BoundedSandbox(
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
        finalize=as_text,
    )
    promptsource.install(env, rng_holder)
    env.bound_filters()  # promptsource's too
    return env


def library_names(dirs: list[Path]) -> list[str]:
    names: set[str] = set()
    for d in dirs:
        if d.is_dir():
            names.update(str(p.relative_to(d).with_suffix("")) for p in d.rglob("*.j2"))
    return sorted(names)


def find_library_template(name: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        candidate = (d / f"{name}.j2").resolve()
        if candidate.is_file() and d.resolve() in candidate.parents:
            return candidate
    return None


# ----------------------------------------------------------------- static checks


def analyse(source: TemplateSource, columns: list[str] | None) -> list[Problem]:
    """Check syntax, the two blocks, and that every variable used is a column.

    ``columns=None`` means the columns are unknown (a hub source without a
    declared column list): only syntax and blocks are checked.
    """
    env = make_env()
    try:
        ast = env.parse(source.text)
    except jinja2.TemplateSyntaxError as exc:
        file, line = source.place(exc.lineno)
        return [Problem(f"template '{source.name}': syntax error: {exc.message}", file, line)]
    problems = []
    blocks = {b.name: b for b in ast.find_all(nodes.Block)}
    for block in BLOCKS if source.kind == "blocks" else ():
        if block not in blocks:
            file, _ = source.place(None)
            problems.append(
                Problem(
                    f"template '{source.name}' has no `{{% block {block} %}}` (a template needs "
                    "both a `prompt` and a `completion` block)",
                    file,
                    source.first_line,
                )
            )
    unknown = unknown_names(env, ast, source)
    if unknown:  # Jinja cannot compile the template, so it cannot list its variables either
        return problems + unknown
    try:
        used = meta.find_undeclared_variables(ast) - set(env.globals) - {"answer_choices", "zip"}
    except jinja2.TemplateSyntaxError as exc:  # what only compiling finds (a block defined twice...)
        file, line = source.place(exc.lineno)
        return problems + [Problem(f"template '{source.name}': {exc.message}", file, line)]
    if source.answer_choices:
        file, _ = source.place(None)
        try:
            choices_ast = env.parse(source.answer_choices)
            bad = unknown_names(env, choices_ast, source)
            if bad:
                problems.extend(Problem(f"answer_choices: {p.message}", file, source.first_line) for p in bad)
            else:
                used |= meta.find_undeclared_variables(choices_ast) - set(env.globals) - {"zip"}
        except jinja2.TemplateSyntaxError as exc:
            problems.append(Problem(f"template '{source.name}': answer_choices: syntax error: {exc.message}",
                                    file, source.first_line))
    if columns is None:
        return problems
    for var in sorted(used - set(columns) - optional_variables(ast)):
        line = next((n.lineno for n in ast.find_all(nodes.Name) if n.name == var), None)
        file, line = source.place(line)
        problems.append(
            Problem(
                f"template '{source.name}' uses `{var}`, which the task does not provide"
                f"{did_you_mean(var, columns)}; columns: {', '.join(columns) or '(none)'}",
                file,
                line,
            )
        )
    return problems


def string_problems(text: str, columns: list[str] | None) -> list[str]:
    """What is wrong with a one-string Jinja template of a recipe (a system prompt, answer choices):
    syntax, unknown filters and tests, private attributes, variables that are not columns."""
    env = make_env()
    try:
        ast = env.parse(text)
    except jinja2.TemplateSyntaxError as exc:
        return [f"syntax error: {exc.message}"]
    unknown = unknown_names(env, ast, TemplateSource("", text, ""), named=False)
    if unknown:
        return [p.message for p in unknown]
    if columns is None:
        return []
    used = meta.find_undeclared_variables(ast) - set(env.globals) - optional_variables(ast)
    return [f"uses `{v}`, which the task does not provide{did_you_mean(v, columns)}; columns: "
            f"{', '.join(columns) or '(none)'}" for v in sorted(used - set(columns))]


def unknown_names(env: jinja2.Environment, ast: nodes.Template, source: TemplateSource,
                  named: bool = True) -> list[Problem]:
    """Filters and tests the sandbox does not have (Jinja would only say so when compiling), and
    private attributes it refuses (it would only say so on the first row)."""
    who = f"template '{source.name}'"
    problems = []
    for node_type, kind, known in ((nodes.Filter, "filter", env.filters), (nodes.Test, "test", env.tests)):
        for found in ast.find_all(node_type):
            if found.name not in known:
                file, line = source.place(found.lineno)
                problems.append(Problem(f"{who}: " * named + f"no {kind} named `{found.name}`"
                                        f"{did_you_mean(found.name, known)}", file, line))
    tags: dict[type, str] = {nodes.Include: "include", nodes.Import: "import", nodes.FromImport: "from ... import",
                             nodes.Extends: "extends"}
    for stmt in ast.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
        file, line = source.place(stmt.lineno)
        tag = tags[type(stmt)]
        problems.append(Problem(f"{who}: " * named + f"`{{% {tag} %}}` is not available: a template is one "
                                "text (copy what it needs into it)", file, line))
    for node in ast.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        if isinstance(node, nodes.Getattr):
            attr = node.attr
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            attr = node.arg.value
        elif isinstance(node, nodes.Filter) and node.name == "attr" and node.args \
                and isinstance(node.args[0], nodes.Const):
            attr = node.args[0].value
        else:
            continue
        if isinstance(attr, str) and attr.startswith("_"):
            file, line = source.place(node.lineno)
            problems.append(Problem(f"{who} " * named + f"reads `{attr}`: names starting with `_` are "
                                    "not available in the template sandbox", file, line))
    return problems


def optional_variables(ast: nodes.Template) -> set[str]:
    """Variables the template tests with ``is defined`` / ``is not defined``: it works without them."""
    return {
        test.node.name
        for test in ast.find_all(nodes.Test)
        if test.name in ("defined", "undefined") and isinstance(test.node, nodes.Name)
    }


# ----------------------------------------------------------------- rendering


class RenderError(Exception):
    """A template failed on a row; carries where, for a located user error."""

    def __init__(self, template: TemplateSource, line: int | None, message: str):
        self.template = template
        self.line = line
        self.message = message
        super().__init__(message)

    def __reduce__(self):  # cross process boundaries intact
        return (RenderError, (self.template, self.line, self.message))


class Renderer:
    """Renders rows through a task's templates (built once per worker).

    Missing values (None) are left undefined, so a template that uses one fails
    loudly instead of printing "None"; test optional columns with
    ``{% if x is defined %}``. ``answer_choices`` (a list), when the task has
    them, is one more variable.
    """

    def __init__(self, sources: list[TemplateSource]):
        self.sources = sources
        self._seed = 0
        self._rng: random.Random | None = None
        texts = {f"t{i}": s.text for i, s in enumerate(sources)}
        texts.update({f"c{i}": s.answer_choices for i, s in enumerate(sources) if s.answer_choices})
        env = make_env(self)
        # Only the templates' own names: `{% include %}` of anything is "not found" (validate says why)
        env.loader = jinja2.FunctionLoader(lambda n: (texts[n], n, lambda: True) if n in texts else None)
        self._templates = [_compile(env, f"t{i}", s) for i, s in enumerate(sources)]
        self._choices = {i: _compile(env, f"c{i}", s) for i, s in enumerate(sources) if s.answer_choices}

    @property
    def rng(self) -> random.Random:
        """The generator of the `choice` filter, seeded per row and template, made only when used."""
        if self._rng is None:
            self._rng = random.Random(self._seed)
        return self._rng

    def _reseed(self, seed: int) -> None:
        self._seed, self._rng = seed, None

    def has_own_choices(self, index: int) -> bool:
        return index in self._choices

    def choices(self, index: int, row: dict, seed: int = 0) -> list[str]:
        """A promptsource template's own answer choices for ``row``."""
        self._reseed(seed)
        text = self._call(index, self._choices[index], _whole, promptsource.protect(row))
        return promptsource.split(text)

    def render(self, index: int, row: dict, seed: int = 0) -> tuple[str, str] | None:
        """``(prompt, completion)`` of ``row`` under template ``index``.

        None when a promptsource template does not apply to the row (its target
        renders empty): the caller counts and skips it.
        """
        source = self.sources[index]
        tmpl = self._templates[index]
        self._reseed(seed)
        if source.kind == "promptsource":
            text = self._call(index, tmpl, _whole, promptsource.protect(row))
            parts = promptsource.split(text)
            if len(parts) < 2 or not parts[1]:
                return None
            return parts[0], source.separator + parts[1]

        def blocks(t, ctx):
            context = t.new_context(ctx)
            return bounded_join(t.blocks["prompt"](context)), bounded_join(t.blocks["completion"](context))

        return self._call(index, tmpl, blocks, row)

    def render_prompt(self, index: int, row: dict) -> str:
        """The ``prompt`` block alone (what a model is asked at inference: no completion needed)."""
        return self._call(index, self._templates[index],
                          lambda t, ctx: bounded_join(t.blocks["prompt"](t.new_context(ctx))), row)

    def _call(self, index: int, tmpl, fn, row: dict | None = None):
        values = {k: v for k, v in (row or {}).items() if v is not None}
        try:
            with render_bounds():
                return fn(tmpl, values)
        except (RenderLimit, OutOfTime) as exc:
            raise RenderError(self.sources[index], _template_line(exc, tmpl), f"rendering stopped: {exc}") from None
        except Exception as exc:  # any Jinja runtime error is the template's or the row's fault
            line = _template_line(exc, tmpl)
            raise RenderError(self.sources[index], line, f"{type(exc).__name__}: {exc}") from None


def _whole(tmpl: jinja2.Template, values: dict) -> str:
    return bounded_join(tmpl.root_render_func(tmpl.new_context(values)))


def _compile(env: jinja2.Environment, name: str, source: TemplateSource) -> jinja2.Template:
    """Compile a template, as a :class:`RenderError` when it cannot be (``tunec validate`` says so first)."""
    try:
        return env.get_template(name)
    except jinja2.TemplateSyntaxError as exc:
        line = exc.lineno if name.startswith("t") else None
        raise RenderError(source, line, f"{type(exc).__name__}: {exc.message}") from None


def render_string(template: jinja2.Template, values: dict) -> str:
    """A whole one-string template (a system prompt, answer choices) with the bounds of :class:`Renderer`.

    Raises :class:`RenderLimit` or :class:`OutOfTime` past the bounds, Jinja's own errors as they are.
    """
    with render_bounds():
        return _whole(template, {k: v for k, v in values.items() if v is not None})


def _template_line(exc: BaseException, tmpl: jinja2.Template) -> int | None:
    """The template line a Jinja runtime error came from.

    Blocks are called directly, so Jinja does not rewrite the traceback; map
    the generated code's line back through the template's debug info.
    """
    tb = exc.__traceback__
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == tmpl.filename:
            line = tmpl.get_corresponding_lineno(tb.tb_lineno)
        tb = tb.tb_next
    return line

