"""promptsource interop: read a ``templates.yaml`` of ``!Template`` entries.

A promptsource template is one Jinja string whose output holds the input and
the target separated by ``|||``; ``answer_choices`` is a Jinja string whose
output lists the choices separated by ``|||``. Templates are rendered with
promptsource's extra filters (``choice``, ``most_frequent``) and globals
(``zip``), so community templates work unchanged. ``choice`` draws from a
generator seeded per row and template, so a build stays deterministic.

>>> rows = parse_templates('''
... dataset: demo
... templates:
...   a1: !Template
...     answer_choices: no ||| yes
...     id: a1
...     jinja: "{{ question }} ||| {{ answer_choices[label] }}"
...     metadata: !TemplateMetadata {original_task: true}
...     name: ask
...     reference: ''
... ''', "templates.yaml")
>>> [(t.name, t.jinja, t.answer_choices) for t in rows]
[('ask', '{{ question }} ||| {{ answer_choices[label] }}', 'no ||| yes')]
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import Problem, TunecError, did_you_mean


@dataclass(frozen=True)
class PromptsourceTemplate:
    name: str
    jinja: str
    answer_choices: str | None
    id: str
    line: int  # where the entry starts in the file


class _Loader(yaml.SafeLoader):
    pass


def _mapping(loader: _Loader, node: yaml.Node) -> dict:
    data = loader.construct_mapping(node, deep=True)
    data["__line__"] = node.start_mark.line + 1
    return data


_Loader.add_constructor("!Template", _mapping)
_Loader.add_constructor("!TemplateMetadata", _mapping)


def parse_templates(text: str, filename: str) -> list[PromptsourceTemplate]:
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass with two mapping tags
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        raise TunecError(Problem(f"invalid promptsource YAML: {exc.problem}", filename,
                                 mark.line + 1 if mark else None, mark.column + 1 if mark else None)) from None
    entries = data.get("templates") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise TunecError(Problem("a promptsource file has a `templates:` mapping of `!Template` entries", filename, 1))
    out = []
    for key, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("jinja"), str):
            raise TunecError(Problem(f"template `{key}` has no `jinja` string", filename))
        choices = entry.get("answer_choices")
        out.append(PromptsourceTemplate(
            name=str(entry.get("name", key)),
            jinja=entry["jinja"],
            answer_choices=choices if isinstance(choices, str) and choices.strip() else None,
            id=str(entry.get("id", key)),
            line=int(entry.get("__line__", 1)),
        ))
    return out


def select(templates: list[PromptsourceTemplate], names: list[str] | None, filename: str) -> tuple[list[PromptsourceTemplate], list[str]]:
    """The templates named (in the order given), and the names that are not in the file."""
    if names is None:
        return sorted(templates, key=lambda t: t.name), []
    by_name = {t.name: t for t in templates}
    missing = [f"'{n}'{did_you_mean(n, by_name)}" for n in names if n not in by_name]
    return [by_name[n] for n in names if n in by_name], missing


def load_file(path: Path) -> list[PromptsourceTemplate]:
    return parse_templates(path.read_text(encoding="utf-8"), str(path))


# ----------------------------------------------------------------- Jinja extras


def most_frequent(items):
    """The most common element (the first seen among equals)."""
    items = list(items)
    if not items:
        return None
    counts = collections.Counter(items)
    best = max(counts.values())
    return next(x for x in items if counts[x] == best)


def install(env, rng_holder) -> None:
    """promptsource's filters and globals; ``rng_holder.rng`` is a seeded ``random.Random``."""
    env.filters["choice"] = lambda seq: rng_holder.rng.choice(list(seq))
    env.filters["most_frequent"] = most_frequent
    env.globals["zip"] = zip
