"""YAML loading that remembers where every value came from.

PyYAML's composer gives each node a start mark; we build the plain Python data
ourselves from the node tree and record, for every path, the line and column of
its key (mapping entries) or value (sequence items). Error messages then point
at ``recipe.yaml:LINE:COL``.

Scalars are read as the YAML 1.2 core schema reads them (PyYAML implements
YAML 1.1): ``1e-5`` is a float, ``yes``/``no``/``on``/``off`` are strings,
``true``/``false`` the only booleans, ``2024-01-01`` a string.

Whatever the file holds, loading ends in data or in located problems: unknown
or Python tags, recursive aliases and alias bombs (a few lines that expand to
billions of values) are refused, never constructed.

>>> data, where = load_yaml_text("a:\\n  b: [1, 2e-5, no]\\n", "r.yaml")
>>> data
{'a': {'b': [1, 2e-05, 'no']}}
>>> where[("a", "b", 1)]
(2, 10)
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from .errors import Problem, TunecError

Position = tuple[int, int]  # 1-based line, column

# A recipe is a few hundred values; these bounds only stop hostile input
# (nesting that exhausts the stack, aliases that expand exponentially).
MAX_DEPTH = 100
MAX_VALUES = 100_000

MERGE_TAG = "tag:yaml.org,2002:merge"
_CORE = "tag:yaml.org,2002:"
PLAIN_TAGS = {_CORE + t for t in ("str", "int", "float", "bool", "null", "seq", "map")}
_NODE_TAGS = {yaml.SequenceNode: {_CORE + "seq"}, yaml.MappingNode: {_CORE + "map"},
              yaml.ScalarNode: PLAIN_TAGS - {_CORE + "seq", _CORE + "map"}}


class _TooDeep(yaml.composer.ComposerError):
    pass


class Core12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with the YAML 1.2 core schema's implicit types."""

    yaml_implicit_resolvers: dict = {}  # not inherited: YAML 1.1's resolvers are what we replace

    def compose_node(self, parent, index):
        # The composer recurses once per nesting level: refuse before Python's stack runs out.
        self._depth = getattr(self, "_depth", 0) + 1
        if self._depth > MAX_DEPTH:
            raise _TooDeep(None, None, f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node)
        if text[:2] in ("0o", "0x"):
            return int(text[2:], 8 if text[1] == "o" else 16)
        return int(text, 10)  # `010` is ten in YAML 1.2, not eight


Core12Loader.add_constructor(_CORE + "int", Core12Loader.construct_yaml_int)
for _tag, _pattern, _first in [
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    ("float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
              r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+.0123456789"),
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("merge", r"^<<$", "<"),
]:
    Core12Loader.add_implicit_resolver(_CORE + _tag, re.compile(_pattern), list(_first))


if getattr(yaml, "__with_libyaml__", False):
    from yaml.composer import Composer

    class _CCore12Loader(yaml.cyaml.CParser, Core12Loader):
        """:class:`Core12Loader` with libyaml's C scanner and parser producing the events: the nodes are
        still composed here (the depth guard above, the same start marks), about 7 times faster on a
        40-task recipe. Used only for text that PyYAML's reader accepts; any error is reported by the
        pure-Python loader (see :func:`load_yaml_text`)."""

        def __init__(self, stream):
            yaml.cyaml.CParser.__init__(self, stream)
            Composer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)

        # the Python composer over the C parser's events (CParser composes in C, without the depth guard)
        check_node = Composer.check_node
        get_node = Composer.get_node
        get_single_node = Composer.get_single_node
        compose_document = Composer.compose_document
        compose_node = Core12Loader.compose_node
        compose_scalar_node = Composer.compose_scalar_node
        compose_sequence_node = Composer.compose_sequence_node
        compose_mapping_node = Composer.compose_mapping_node

    _FAST: type[Core12Loader] | None = _CCore12Loader
else:
    _FAST = None


def _fast_node(text: str) -> tuple[yaml.Node | None, Core12Loader] | None:
    """The node tree by the C parser, or None where only the pure-Python loader may answer: no libyaml,
    a character PyYAML's reader refuses, or any YAML error (whose message and position must be
    PyYAML's, so the Python loader reads the text again and reports it)."""
    if _FAST is None or yaml.reader.Reader.NON_PRINTABLE.search(text):
        return None
    loader = _FAST(text)
    try:
        return loader.get_single_node(), loader
    except yaml.YAMLError:
        return None
    finally:
        loader.dispose()


def load_yaml_text(text: str, filename: str) -> tuple[Any, dict[tuple, Position]]:
    """Parse YAML text into plain data plus a map ``path tuple -> (line, col)``."""
    fast = _fast_node(text)
    if fast is not None:
        return _data(*fast, filename)
    loader = None
    try:
        loader = Core12Loader(text)  # the reader checks for forbidden characters here
        node = loader.get_single_node()
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        col = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        raise TunecError(
            Problem(f"invalid YAML: character U+{exc.character:04X} is not allowed in YAML text", filename, line, col)
        ) from None
    except yaml.MarkedYAMLError as exc:
        raise TunecError(_marked_problem(exc, filename)) from None
    finally:
        if loader is not None:
            loader.dispose()
    return _data(node, loader, filename)


def _data(node: yaml.Node | None, loader: Core12Loader, filename: str) -> tuple[Any, dict[tuple, Position]]:
    where: dict[tuple, Position] = {}
    if node is None:
        return None, where
    where[()] = _pos(node)
    builder = _Builder(loader, filename)
    data = builder.build(node, (), where)
    if builder.problems:
        raise TunecError(builder.problems)
    return data, where


def _marked_problem(exc: yaml.MarkedYAMLError, filename: str) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    return Problem(
        f"invalid YAML: {exc.problem or exc.context}",
        file=filename,
        line=mark.line + 1 if mark else None,
        col=mark.column + 1 if mark else None,
    )


def _pos(node: yaml.Node) -> Position:
    return node.start_mark.line + 1, node.start_mark.column + 1


class _TooBig(Exception):
    pass


class _Builder:
    """Builds plain data from a node tree, collecting problems instead of raising."""

    def __init__(self, loader: Core12Loader, filename: str):
        self.loader = loader
        self.filename = filename
        self.problems: list[Problem] = []
        self.count = 0
        self.ancestors: set[int] = set()  # ids of the nodes being built: an alias to one of them is a cycle
        self.entry: Position | None = None  # the top-level entry being built: where a bomb is reported

    def problem(self, message: str, pos: Position | None) -> None:
        line, col = pos if pos else (None, None)
        self.problems.append(Problem(message, self.filename, line, col))

    def build(self, node, path, where):
        try:
            return self._build(node, path, where)
        except _TooBig:
            return None

    def _build(self, node, path, where):
        self.count += 1
        if self.count > MAX_VALUES:
            self.problem(
                f"the YAML expands to more than {MAX_VALUES:,} values (aliases repeated inside aliases?); "
                "a recipe is far smaller",
                self.entry,
            )
            raise _TooBig
        if id(node) in self.ancestors:
            self.problem("recursive alias: a value cannot contain itself", where.get(path, _pos(node)))
            return None
        if node.tag not in _NODE_TAGS[type(node)]:
            self.problem(
                f"unsupported YAML tag `{node.tag.replace(_CORE, '!!')}`: a recipe holds plain strings, numbers, "
                "booleans, lists and mappings; remove the tag",
                _pos(node),
            )
            return None
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node)
        self.ancestors.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                items = []
                for i, item in enumerate(node.value):
                    where[path + (i,)] = _pos(item)
                    items.append(self._build(item, path + (i,), where))
                return items
            return self._mapping(node, path, where)
        finally:
            self.ancestors.discard(id(node))

    def _scalar(self, node):
        try:
            return self.loader.construct_object(node, deep=True)
        except (yaml.constructor.ConstructorError, ValueError, KeyError):  # e.g. `!!int abc`, `!!bool maybe`
            self.problem(f"`{node.value}` is not a valid {node.tag.replace(_CORE, '!!')}", _pos(node))
            return None

    def _key(self, key_node):
        key = None
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag in PLAIN_TAGS:
            key = self._scalar(key_node)
        if key is None:
            self.problem("mapping keys must be plain scalars", _pos(key_node))
        return key

    def _mapping(self, node, path, where):
        # `<<: *anchor` merge keys: the merged entries come first; an explicit
        # key overrides a merged one (that is what merge keys are for), so
        # only explicit repeats are duplicates. With a list of merged mappings
        # the first listed wins.
        explicit = [(k, v) for k, v in node.value if k.tag != MERGE_TAG]
        sources = []
        for key_node, value_node in node.value:
            if key_node.tag != MERGE_TAG:
                continue
            listed = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for source in listed:
                if not isinstance(source, yaml.MappingNode):
                    self.problem("a merge key `<<` takes a mapping or a list of mappings", _pos(source))
                else:
                    sources.append(source)
        keys = [self._key(k) for k, _ in explicit]
        explicit_keys = set(keys)
        merged: dict = {}  # key -> (value, its positions)
        for source in sources:
            sub_where: dict[tuple, Position] = {}
            values = self._build(source, path, sub_where)
            if not isinstance(values, dict):
                continue
            depth = len(path)
            by_key: dict = {}
            for p, pos in sub_where.items():
                by_key.setdefault(p[depth], {})[p] = pos
            for key, value in values.items():
                if key not in merged and key not in explicit_keys:
                    merged[key] = (value, by_key.get(key, {}))
        out: dict = {}
        for key, (value, positions) in merged.items():
            out[key] = value
            where.update(positions)
        for key, (key_node, value_node) in zip(keys, explicit):
            if key is None:
                continue
            if key in out and key not in merged:  # merged holds no explicit key: this is a repeat
                first = where.get(path + (key,), ("?", "?"))[0]
                self.problem(
                    f"duplicate key `{key}` (first given on line {first}); YAML keeps only the last one, "
                    "so remove one of them",
                    _pos(key_node),
                )
                continue
            where[path + (key,)] = _pos(key_node)
            if not path:
                self.entry = _pos(key_node)
            out[key] = self._build(value_node, path + (key,), where)
        return out


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
