"""YAML loading that remembers where every value came from.

PyYAML's composer gives each node a start mark; we build the plain Python data
ourselves from the node tree and record, for every path, the line and column of
its key (mapping entries) or value (sequence items). Error messages then point
at ``recipe.yaml:LINE:COL``.

>>> data, where = load_yaml_text("a:\\n  b: [1, 2]\\n", "r.yaml")
>>> data
{'a': {'b': [1, 2]}}
>>> where[("a", "b", 1)]
(2, 10)
"""

from __future__ import annotations

from typing import Any

import yaml

from .errors import Problem, TunecError

Position = tuple[int, int]  # 1-based line, column


def load_yaml_text(text: str, filename: str) -> tuple[Any, dict[tuple, Position]]:
    """Parse YAML text into plain data plus a map ``path tuple -> (line, col)``."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise TunecError(
            Problem(
                f"invalid YAML: {exc.problem or exc.context}",
                file=filename,
                line=mark.line + 1 if mark else None,
                col=mark.column + 1 if mark else None,
            )
        ) from None
    finally:
        loader.dispose()
    where: dict[tuple, Position] = {}
    problems: list[Problem] = []
    if node is None:
        return None, where
    where[()] = _pos(node)
    explicit: dict[int, set[int]] = {}
    _explicit_keys(node, set(), explicit)
    data = _build(loader, node, (), where, problems, filename, explicit)
    if problems:
        raise TunecError(problems)
    return data, where


def _pos(node: yaml.Node) -> Position:
    return node.start_mark.line + 1, node.start_mark.column + 1


MERGE_TAG = "tag:yaml.org,2002:merge"


def _explicit_keys(node, seen: set[int], out: dict[int, set[int]]) -> None:
    """Record, for every mapping node, the key nodes written in it (before merges are flattened)."""
    if id(node) in seen:  # an alias: already walked
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        out[id(node)] = {id(k) for k, _ in node.value if k.tag != MERGE_TAG}
        children = [n for pair in node.value for n in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    else:
        return
    for child in children:
        _explicit_keys(child, seen, out)


def _build(loader, node, path, where, problems, filename, explicit_keys):
    if isinstance(node, yaml.MappingNode):
        # Resolve `<<: *anchor` merge keys. flatten_mapping puts the merged
        # entries first; an explicit key then overrides a merged one (that is
        # what merge keys are for), so only explicit repeats are duplicates.
        # flatten_mapping mutates the node, hence the explicit keys recorded
        # beforehand (an aliased node is built again, already flattened).
        explicit = explicit_keys.get(id(node), set())
        loader.flatten_mapping(node)
        out: dict = {}
        merged: set = set()  # keys whose current value came from a merge
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) or key is None:
                line, col = _pos(key_node)
                problems.append(Problem("mapping keys must be plain scalars", filename, line, col))
                continue
            if key in merged:  # a merged value, overridden (in place, as PyYAML does)
                merged.discard(key)
                for stale in [p for p in where if p[: len(path) + 1] == path + (key,)]:
                    del where[stale]
            elif key in out:
                line, col = _pos(key_node)
                first = where.get(path + (key,), ("?", "?"))[0]
                problems.append(
                    Problem(
                        f"duplicate key `{key}` (first given on line {first}); YAML keeps only "
                        "the last one, so remove one of them",
                        filename,
                        line,
                        col,
                    )
                )
                continue
            if id(key_node) not in explicit:
                merged.add(key)
            where[path + (key,)] = _pos(key_node)
            out[key] = _build(loader, value_node, path + (key,), where, problems, filename, explicit_keys)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            where[path + (i,)] = _pos(item)
            items.append(_build(loader, item, path + (i,), where, problems, filename, explicit_keys))
        return items
    return loader.construct_object(node, deep=True)


def locate(where: dict[tuple, Position], data: Any, loc: tuple) -> tuple[tuple, Position | None]:
    """Map a validation ``loc`` onto the YAML data.

    Pydantic locations can contain segments that do not exist in the data
    (discriminated-union tags such as ``jsonl``, validator names); those are
    skipped. Returns the part of the path that exists in the data and the
    position of its deepest existing node.
    """
    found: list = []
    cur = data
    for part in loc:
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
            found.append(part)
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            cur = cur[part]
            found.append(part)
        # else: a union tag or validator name: skip it
    path = tuple(found)
    while path and path not in where:
        path = path[:-1]
    return tuple(found), where.get(path)
