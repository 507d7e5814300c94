"""Load a recipe file into a typed :class:`~compiler.recipe.Recipe`, with located errors.

Every validation error becomes ``recipe.yaml:LINE:COL: field.path: message``;
misspelt keys and tags get a "did you mean" from the names the schema allows.

Command-line overrides (``--set stages.0.lr=1e-4``) are applied to the YAML
data before validation, so they go through the same checks; an error in an
overridden value is located at the override: ``--set stages.0.lr: message``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from pydantic import ValidationError

from .errors import Problem, TunecError, field_path
from .recipe import RECIPE_VERSION, Recipe
from .schema_errors import collapse_unions, schema_problem
from .yamlpos import Position, load_yaml_text, locate


@dataclass(frozen=True)
class Override:
    """One ``--set PATH=VALUE``, with PATH resolved to a path in the recipe's data."""

    text: str  # as given on the command line
    path: tuple  # e.g. ("stages", 0, "lr")

    @property
    def place(self) -> str:
        return f"--set {self.text.partition('=')[0]}"


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe plus what is needed to point back into its file."""

    recipe: Recipe
    path: Path  # absolute path of the recipe file
    text: str
    data: Any  # the raw YAML data
    where: dict[tuple, Position]
    overrides: tuple[Override, ...] = ()  # applied to `data`, in order

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
        """Line and column of the recipe field ``loc`` (or of its nearest existing parent).

        None for a field that an override set: it is written nowhere in the file.
        """
        found, pos = locate(self.where, self.data, loc)
        if pos is None or _override_of(found, self.overrides) is not None:
            return None, None
        return pos

    def problem(self, loc: tuple, message: str) -> Problem:
        return _located(message, locate(self.where, self.data, loc), self.display, self.overrides, loc)


def display_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _override_of(found: tuple, overrides: Sequence[Override]) -> Override | None:
    """The last override that set ``found`` or one of its parents."""
    for o in reversed(overrides):
        if found[: len(o.path)] == o.path:
            return o
    return None


def _located(message: str, located: tuple[tuple, Position | None], shown: str, overrides: Sequence[Override],
             loc: tuple | None = None) -> Problem:
    found, pos = located
    over = _override_of(found, overrides)
    if over is not None:
        deeper = found != over.path
        return Problem(message, over.place, None, None, field_path(found) if deeper else None)
    line, col = pos if pos else (None, None)
    return Problem(message, shown, line, col, field_path(found if loc is None else loc))


# Each step turns a recipe written for format version N (the key) into one for
# version N + 1. When RECIPE_VERSION grows, the step from the old version goes
# here, and old recipes keep loading.
MIGRATIONS: dict[int, Callable[[dict], dict]] = {}


def _migrate(data: dict, where: dict[tuple, Position], shown: str) -> dict:
    version = data.get("version", RECIPE_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        return data  # the schema reports it, with the other errors
    if version > RECIPE_VERSION:
        line, col = where.get(("version",), (None, None))
        raise TunecError(Problem(
            f"this recipe is written for recipe format version {version}, and this tunec reads versions up to "
            f"{RECIPE_VERSION}: upgrade tunec (pip install -U tunec)", shown, line, col, "version"))
    while version < RECIPE_VERSION:
        data = MIGRATIONS[version](data)
        version += 1
    return {**data, "version": version} if "version" in data else data


def apply_overrides(data: dict, where: dict[tuple, Position], overrides: Sequence[str]) -> tuple[Override, ...]:
    """Apply ``PATH=VALUE`` overrides to recipe data, in place; all problems at once.

    PATH is dotted, list items by their 0-based index (``stages.0.lr``); a
    mapping key may itself hold dots (task names do), the longest key that
    exists wins; missing mapping keys are created. VALUE is read as YAML
    (``1e-4``, ``drop``, ``[a, b]``, ``{kind: lora, r: 8}``). The positions of
    the replaced values leave ``where``: they are no longer in the file.

    >>> data = {"stages": [{"lr": 0.1}], "tasks": {"a.b": {"truncation": "drop"}}}
    >>> [o.path for o in apply_overrides(data, {}, ["stages.0.lr=1e-4", "tasks.a.b.truncation=error"])]
    [('stages', 0, 'lr'), ('tasks', 'a.b', 'truncation')]
    >>> data
    {'stages': [{'lr': 0.0001}], 'tasks': {'a.b': {'truncation': 'error'}}}
    """
    applied, problems = [], []
    for text in overrides:
        key, sep, raw = text.partition("=")
        place = f"--set {key}"
        if not sep or not key.strip():
            problems.append(Problem(f"`--set {text}`: write PATH=VALUE, e.g. `--set stages.0.lr=1e-4`"))
            continue
        try:
            value, _ = load_yaml_text(raw, place)
        except TunecError as exc:
            problems.extend(exc.problems)
            continue
        try:
            path = _set(data, key.split("."), value)
        except ValueError as exc:
            problems.append(Problem(str(exc), place))
            continue
        for p in [p for p in where if p[: len(path)] == path]:
            del where[p]
        applied.append(Override(text, path))
    if problems:
        raise TunecError(problems)
    return tuple(applied)


def _set(data: Any, parts: list[str], value: Any) -> tuple:
    cur: Any = data
    path: tuple = ()
    i = 0
    key: str | int
    while True:
        shown = ".".join(map(str, path)) or "the recipe"
        if isinstance(cur, list):
            if not re.fullmatch(r"[0-9]+", parts[i]) or int(parts[i]) >= len(cur):
                raise ValueError(f"`{shown}` is a list of {len(cur)} item(s): `{parts[i]}` is not an index "
                                 f"(0 to {len(cur) - 1})")
            key, i = int(parts[i]), i + 1
        elif isinstance(cur, dict):
            j = next((j for j in range(len(parts), i, -1) if ".".join(parts[i:j]) in cur), i + 1)
            key, i = ".".join(parts[i:j]), j
        else:
            raise ValueError(f"`{shown}` is {'empty' if cur is None else repr(cur)}, not a mapping or a list")
        path += (key,)
        if i == len(parts):
            cur[key] = value
            return path
        if isinstance(cur, dict) and key not in cur:
            cur[key] = {}
        cur = cur[key]


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> LoadedRecipe:
    """Read, check against the schema and type a recipe; ``overrides`` are ``PATH=VALUE`` strings."""
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
    data = _migrate(data, where, shown)
    applied = apply_overrides(data, where, overrides)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        errors: list[dict] = [dict(e) for e in exc.errors()]
        problems = [_problem_from_error(err, data, where, shown, applied) for err in collapse_unions(errors, data)]
        # Misspelt names are reported together with schema errors, in one pass.
        from .refs import reference_problems, template_dirs

        def problem_at(loc: tuple, message: str) -> Problem:
            return _located(message, locate(where, data, loc), shown, applied, loc)

        resolve = lambda rel: (path.parent / rel).expanduser().resolve()  # noqa: E731
        problems += reference_problems(data, problem_at, template_dirs(data, resolve))
        raise TunecError(_sorted_unique(problems, applied)) from None
    return LoadedRecipe(recipe, path, text, data, where, applied)


def _sorted_unique(problems: list[Problem], overrides: Sequence[Override] = ()) -> list[Problem]:
    """The file's problems by line, then the overrides' in the order they were given."""
    seen, out = set(), []
    for p in problems:
        if str(p) not in seen:
            seen.add(str(p))
            out.append(p)
    given = {o.place: i for i, o in enumerate(overrides)}
    return sorted(out, key=lambda p: (p.line is None, p.line or given.get(p.file or "", 0), p.col or 0))


def _problem_from_error(err: dict, data: Any, where: dict, filename: str,
                        overrides: Sequence[Override] = ()) -> Problem:
    problem = schema_problem(err, data, where, filename)
    found, _ = locate(where, data, tuple(err["loc"]))
    if _override_of(found, overrides) is None:
        return problem
    return _located(problem.message, (found, None), filename, overrides)
