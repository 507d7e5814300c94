"""promptsource interop: read a ``templates.yaml`` of ``!Template`` entries.

A promptsource template is one Jinja string whose output holds the input and
the target separated by ``|||``; ``answer_choices`` is a Jinja string whose
output lists the choices separated by ``|||`` (older files write a YAML list
of choices, read as the same string). Templates are rendered with
promptsource's extra filters (``choice``, ``most_frequent``) and globals
(``zip``), so community templates work unchanged. ``choice`` draws from a
generator seeded per row and template, so a build stays deterministic.

A ``|||`` inside a data value is not a separator: values are rendered with it
escaped (see :func:`protect`) and it is restored in each part after the split,
so ``12 ||| 3`` in a premise stays in the prompt.

>>> parts = split(protect({"q": "a ||| b"})["q"] + " ||| yes")
>>> parts
['a ||| b', 'yes']

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
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import Problem, TunecError, did_you_mean
from .yamltext import lines_of_scalars


@dataclass(frozen=True)
class PromptsourceTemplate:
    name: str
    jinja: str
    answer_choices: str | None
    id: str
    line: int  # where the entry starts in the file
    jinja_lines: tuple[int, ...] = ()  # the file line of each line of `jinja`


class _Loader(yaml.SafeLoader):
    pass


def _mapping(loader: _Loader, node: yaml.Node) -> dict:
    data = loader.construct_mapping(node, deep=True)
    data["__line__"] = node.start_mark.line + 1
    for key, value in node.value:
        if key.value == "jinja" and isinstance(value, yaml.ScalarNode):
            data["__jinja_node__"] = value  # its lines: for all entries at once, once the file is read
        if key.value == "answer_choices" and isinstance(value, yaml.SequenceNode):
            # the choices as written: YAML would read `no`, `yes` as booleans
            data["answer_choices"] = [n.value if isinstance(n, yaml.ScalarNode) else data["answer_choices"][i]
                                      for i, n in enumerate(value.value)]
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
    jinja_nodes = [e["__jinja_node__"] for e in entries.values() if isinstance(e, dict) and "__jinja_node__" in e]
    jinja_lines = {id(n): tuple(lines) for n, lines in zip(jinja_nodes, lines_of_scalars(jinja_nodes))}
    out = []
    for key, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("jinja"), str):
            raise TunecError(Problem(f"template `{key}` has no `jinja` string", filename))
        choices = entry.get("answer_choices")
        if isinstance(choices, list):  # older files list the choices; the string form separates them by `|||`
            if not all(isinstance(c, (str, int, float)) for c in choices):  # YAML reads `yes`, `1`... as scalars
                raise TunecError(Problem(f"template `{key}`: `answer_choices` is a list of strings or a "
                                         "string of choices separated by `|||`", filename, entry.get("__line__")))
            choices = " ||| ".join(str(c) for c in choices)
        out.append(PromptsourceTemplate(
            name=str(entry.get("name", key)),
            jinja=entry["jinja"],
            answer_choices=choices if isinstance(choices, str) and choices.strip() else None,
            id=str(entry.get("id", key)),
            line=int(entry.get("__line__", 1)),
            jinja_lines=jinja_lines.get(id(entry.get("__jinja_node__")), ()),
        ))
    return out


def select(templates: list[PromptsourceTemplate], names: list[str] | None,
           filename: str) -> tuple[list[PromptsourceTemplate], list[str]]:
    """The templates named (in the order given), and the names that are not in the file."""
    if names is None:
        return sorted(templates, key=lambda t: t.name), []
    by_name = {t.name: t for t in templates}
    missing = [f"'{n}'{did_you_mean(n, by_name)}" for n in names if n not in by_name]
    return [by_name[n] for n in names if n in by_name], missing


def load_file(path: Path, shown: str | None = None) -> list[PromptsourceTemplate]:
    from .sources import read_utf8  # (sources loads recipes: imported when a file is read)

    return parse_templates(read_utf8(path, shown or str(path)), shown or str(path))


# ----------------------------------------------------------------- the separator

SEPARATOR = "|||"
# Data's `|||` (and the escape character itself) are written as an escape character
# followed by a code, all private-use characters: no filter changes them (case, trim,
# title), and a value that happens to hold them still comes back exactly, because every
# escape character in protected text starts a pair.
ESCAPE = "\ue000"
_CODES = {"\ue001": ESCAPE, "\ue002": SEPARATOR}
_PAIR = re.compile(ESCAPE + "(.)", re.DOTALL)


def _protect_text(text: str) -> str:
    return text.replace(ESCAPE, ESCAPE + "\ue001").replace(SEPARATOR, ESCAPE + "\ue002")


def _restore_text(text: str) -> str:
    return _PAIR.sub(lambda m: _CODES.get(m.group(1), m.group(0)), text)


def protect(value):
    """``value`` with every ``|||`` in its strings (nested in lists and dicts too) escaped.

    >>> split(protect("a ||| b \ue000\ue002") + " ||| c")
    ['a ||| b \ue000\ue002', 'c']
    """
    if isinstance(value, str):
        return _protect_text(value)
    if isinstance(value, list):
        return [protect(v) for v in value]
    if isinstance(value, tuple):
        return tuple(protect(v) for v in value)
    if isinstance(value, dict):
        return {k: protect(v) for k, v in value.items()}
    return value


def split(text: str) -> list[str]:
    """The stripped parts of rendered text between the template's own ``|||``, data's ``|||`` restored."""
    return [_restore_text(p.strip()) for p in text.split(SEPARATOR)]


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
