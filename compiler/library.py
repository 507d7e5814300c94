"""Browsing template folders: what ``tunec templates list`` and ``tunec templates show`` print.

A template's description is its leading Jinja comment (``{# … #}``); its
variables are found statically, as ``tunec validate`` finds them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import jinja2
from jinja2 import meta

from .errors import TunecError, did_you_mean
from .templates import LIBRARY_DIR, find_library_template, make_env

_LEADING_COMMENT = re.compile(r"\A\s*\{#-?\s*(.*?)\s*-?#\}", re.S)
_COLUMNS_NOTE = re.compile(r"\s*Columns?:.*\Z", re.S)


@dataclass(frozen=True)
class Entry:
    name: str  # what a recipe writes: 'sentiment/review_short'
    path: Path
    description: str
    variables: tuple[str, ...]  # every name the template reads (columns, answer_choices, ...)


def entries(dirs: list[Path] | None = None) -> list[Entry]:
    """Every template under ``dirs`` (default: the built-in library), sorted by name.

    A name found in several folders is listed once, from the first folder, as the
    compiler resolves it.
    """
    seen: dict[str, Entry] = {}
    for folder in dirs if dirs is not None else [LIBRARY_DIR]:
        for path in sorted(Path(folder).rglob("*.j2")):
            name = path.relative_to(folder).with_suffix("").as_posix()
            if name not in seen:
                seen[name] = _entry(name, path)
    return [seen[n] for n in sorted(seen)]


def find(name: str, dirs: list[Path] | None = None) -> Entry:
    dirs = dirs if dirs is not None else [LIBRARY_DIR]
    path = find_library_template(name, dirs)
    if path is None:
        known = [e.name for e in entries(dirs)]
        raise TunecError(f"no template '{name}' in {', '.join(str(d) for d in dirs)}{did_you_mean(name, known)}")
    return _entry(name, path)


def _entry(name: str, path: Path) -> Entry:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TunecError(f"{path}: cannot read template: {exc}") from None
    match = _LEADING_COMMENT.match(text)
    description = " ".join(_COLUMNS_NOTE.sub("", match.group(1)).split()) if match else ""
    try:
        env = make_env()
        variables = tuple(sorted(meta.find_undeclared_variables(env.parse(text)) - set(env.globals)))
    except jinja2.TemplateSyntaxError as exc:
        raise TunecError(f"{path}:{exc.lineno}: template '{name}': syntax error: {exc.message}") from None
    return Entry(name, path, description, variables)
