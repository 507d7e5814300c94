"""Load a recipe file into a typed :class:`~compiler.recipe.Recipe`, with located errors.

Every validation error becomes ``recipe.yaml:LINE:COL: field.path: message``;
misspelt keys and tags get a "did you mean" from the names the schema allows.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import Problem, TunecError, did_you_mean, field_path
from .recipe import Recipe
from .yamlpos import Position, load_yaml_text, locate


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe plus what is needed to point back into its file."""

    recipe: Recipe
    path: Path  # absolute path of the recipe file
    text: str
    data: Any  # the raw YAML data
    where: dict[tuple, Position]

    @property
    def root(self) -> Path:
        """Folder that relative paths in the recipe are resolved against."""
        return self.path.parent

    @property
    def display(self) -> str:
        return display_path(self.path)

    def resolve(self, rel: str) -> Path:
        return (self.root / rel).expanduser().resolve()

    def position(self, loc: tuple) -> tuple[int | None, int | None]:
        """Line and column of the recipe field ``loc`` (or of its nearest existing parent)."""
        _, pos = locate(self.where, self.data, loc)
        return pos if pos else (None, None)

    def problem(self, loc: tuple, message: str) -> Problem:
        line, col = self.position(loc)
        return Problem(message, self.display, line, col, field_path(loc))


def display_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def load_recipe(path: str | Path) -> LoadedRecipe:
    path = Path(path).expanduser().resolve()
    shown = display_path(path)
    if not path.is_file():
        raise TunecError(Problem(f"recipe file not found: {shown}"))
    raw = path.read_bytes()  # decoded whole, so that the error's byte offset is the file's
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1  # in bytes
        raise TunecError(
            Problem(f"recipe is not UTF-8 text ({exc.reason} at byte {exc.start})", shown, line, col)
        ) from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # as read_text's universal newlines did
    data, where = load_yaml_text(text, shown)
    if not isinstance(data, dict):
        raise TunecError(Problem("a recipe is a YAML mapping (tokenizer:, seq_len:, tasks:, stages:)", shown, 1, 1))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems = [_problem_from_error(err, data, where, shown) for err in exc.errors()]
        # Misspelt names are reported together with schema errors, in one pass.
        from .refs import reference_problems, template_dirs

        def problem_at(loc: tuple, message: str) -> Problem:
            _, pos = locate(where, data, loc)
            line, col = pos if pos else (None, None)
            return Problem(message, shown, line, col, field_path(loc))

        resolve = lambda rel: (path.parent / rel).expanduser().resolve()  # noqa: E731
        problems += reference_problems(data, problem_at, template_dirs(data, resolve))
        raise TunecError(_sorted_unique(problems)) from None
    return LoadedRecipe(recipe, path, text, data, where)


def _sorted_unique(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        if str(p) not in seen:
            seen.add(str(p))
            out.append(p)
    return sorted(out, key=lambda p: (p.line or 0, p.col or 0))


def _problem_from_error(err: dict, data: Any, where: dict, filename: str) -> Problem:
    loc = tuple(err["loc"])
    kind = err["type"]
    # A wrong tag is best shown at the `kind:` key itself.
    found, pos = locate(where, data, loc + ("kind",) if kind == "union_tag_invalid" else loc)
    if kind == "union_tag_invalid":
        found = found[:-1] if found and found[-1] == "kind" else found
    line, col = pos if pos else (None, None)
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        key = loc[-1]
        allowed = _allowed_fields(loc[:-1])
        hint = did_you_mean(key, allowed) if allowed else ""
        listing = f"; allowed: {', '.join(sorted(allowed))}" if allowed and not hint else ""
        message = f"unknown field `{key}`{hint}{listing}"
        return Problem(message, filename, line, col, field_path(found))
    if kind == "missing":
        name = loc[-1]
        return Problem(f"missing required field `{name}`", filename, line, col, field_path(found))
    if kind == "union_tag_invalid":
        tags = [t.strip().strip("'") for t in str(ctx.get("expected_tags", "")).split(",")]
        tag = ctx.get("tag")
        message = f"unknown kind '{tag}'{did_you_mean(tag, tags)}; expected one of: {', '.join(tags)}"
        return Problem(message, filename, line, col, field_path(found))
    if kind == "union_tag_not_found":
        tags = _union_tags(loc)
        listing = f" ({', '.join(tags)})" if tags else ""
        return Problem(f"missing `kind`{listing}", filename, line, col, field_path(found))
    message = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if kind not in ("value_error", "assertion_error") and "input" in err and not isinstance(err["input"], (dict, list)):
        message += f" (got {err['input']!r})"
    if kind == "string_type" and isinstance(err.get("input"), bool):
        message += "; YAML reads yes/no/true/false/on/off as booleans: quote the value, e.g. 'yes'"
    return Problem(message, filename, line, col, field_path(found))


# ----------------------------------------------------------------- schema walking


def _unwrap(tp: Any) -> Any:
    """Strip Annotated and Optional."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
            continue
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) == 1:
                tp = args[0]
                continue
        return tp


def _members(tp: Any) -> list[type[BaseModel]]:
    tp = _unwrap(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        out = []
        for arg in typing.get_args(tp):
            out.extend(_members(arg))
        return out
    return [tp] if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def _tag(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("kind")
    if field is None:
        return None
    args = typing.get_args(field.annotation)
    return args[0] if args else None


def _type_at(loc: tuple) -> Any:
    """The schema type found by following ``loc`` from :class:`Recipe` (None if lost)."""
    tp: Any = Recipe
    i = 0
    while i < len(loc):
        part = loc[i]
        tp = _unwrap(tp)
        origin = typing.get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            tp = field.annotation
        elif origin is dict:
            tp = typing.get_args(tp)[1]
        elif origin is list:
            tp = typing.get_args(tp)[0]
        else:
            members = _members(tp)
            if not members:
                return None
            tagged = [m for m in members if _tag(m) == part]
            if tagged:
                tp = tagged[0]
            elif len(members) == 1:
                tp = members[0]
                continue  # do not consume `part`
            else:
                return None
        i += 1
    return tp


def _allowed_fields(loc: tuple) -> list[str]:
    tp = _type_at(loc)
    members = _members(tp) if tp is not None else []
    names: set[str] = set()
    for m in members:
        names.update(m.model_fields)
    return sorted(names)


def _union_tags(loc: tuple) -> list[str]:
    tp = _type_at(loc)
    return [t for t in (_tag(m) for m in _members(tp)) if t] if tp is not None else []
