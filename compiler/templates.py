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
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import jinja2
from jinja2 import meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from . import promptsource
from .errors import Problem, did_you_mean

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

    @classmethod
    def inline(cls, name: str, prompt: str, completion: str, filename: str, line: int) -> "TemplateSource":
        # Same mechanism as a file: two blocks. Kept on one line so that Jinja's
        # line numbers map onto the recipe's lines.
        text = (
            "{% block prompt %}" + prompt + "{% endblock %}"
            "{% block completion %}" + completion + "{% endblock %}"
        )
        return cls(name, text, filename, line)

    @property
    def sha256(self) -> str:
        key = self.text if self.kind == "blocks" else "\0".join([self.text, self.answer_choices or "", self.separator])
        return hashlib.sha256(key.encode("utf-8")).hexdigest()

    def place(self, jinja_line: int | None) -> tuple[str, int | None]:
        return self.filename, None if jinja_line is None else self.first_line + jinja_line - 1


class _FixedRng:
    rng = random.Random(0)


def make_env(rng_holder=_FixedRng) -> ImmutableSandboxedEnvironment:
    """The sandbox every template renders in, with promptsource's filters and globals."""
    env = ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    promptsource.install(env, rng_holder)
    return env


def library_names(dirs: list[Path]) -> list[str]:
    names = set()
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
    if columns is None:
        return problems
    used = meta.find_undeclared_variables(ast) - set(env.globals) - {"answer_choices", "zip"}
    if source.answer_choices:
        try:
            used |= meta.find_undeclared_variables(env.parse(source.answer_choices)) - set(env.globals) - {"zip"}
        except jinja2.TemplateSyntaxError as exc:
            file, line = source.place(None)
            problems.append(Problem(f"template '{source.name}': answer_choices: syntax error: {exc.message}", file, line))
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
        env.loader = jinja2.FunctionLoader(lambda n: (texts[n], n, lambda: True))
        self._templates = [env.get_template(f"t{i}") for i in range(len(sources))]
        self._choices = {i: env.get_template(f"c{i}") for i, s in enumerate(sources) if s.answer_choices}

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
        text = self._call(index, self._choices[index], lambda t, ctx: t.render(ctx), row)
        return [c.strip() for c in text.split("|||")]

    def render(self, index: int, row: dict, seed: int = 0) -> tuple[str, str] | None:
        """``(prompt, completion)`` of ``row`` under template ``index``.

        None when a promptsource template does not apply to the row (its target
        renders empty): the caller counts and skips it.
        """
        source = self.sources[index]
        tmpl = self._templates[index]
        self._reseed(seed)
        if source.kind == "promptsource":
            text = self._call(index, tmpl, lambda t, ctx: t.render(ctx), row)
            parts = [p.strip() for p in text.split("|||")]
            if len(parts) < 2 or not parts[1]:
                return None
            return parts[0], source.separator + parts[1]

        def blocks(t, ctx):
            context = t.new_context(ctx)
            return "".join(t.blocks["prompt"](context)), "".join(t.blocks["completion"](context))

        return self._call(index, tmpl, blocks, row)

    def _call(self, index: int, tmpl, fn, row: dict | None = None):
        values = {k: v for k, v in (row or {}).items() if v is not None}
        try:
            return fn(tmpl, values)
        except Exception as exc:  # any Jinja runtime error is the template's or the row's fault
            line = _template_line(exc, tmpl)
            raise RenderError(self.sources[index], line, f"{type(exc).__name__}: {exc}") from None


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

