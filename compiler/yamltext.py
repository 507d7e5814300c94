"""Where the text of a YAML scalar sits in its file, line by line.

Templates written inside YAML (a recipe's inline templates, promptsource's
``jinja:`` strings) report Jinja's line numbers; these functions turn them
into the file's lines, whatever the scalar's style.

>>> text = 'a: 1\\nprompt: "one\\\\ntwo"\\nb: >-\\n  x\\n  x\\n\\n  y\\n'
>>> value_lines(text, 2, 1), value_lines(text, 3, 1)
([2, 2], [4, 7])
"""

from __future__ import annotations

import functools
import re

import yaml
from jinja2.lexer import newline_re


def jinja_line_count(text: str) -> int:
    """Lines of ``text`` as Jinja counts them (its line numbers are what errors carry)."""
    return len(newline_re.findall(text)) + 1


_YAML_BREAK = re.compile(r"\r\n|\r|\n|\x85|\u2028|\u2029")  # what PyYAML counts as a new line


def lines_of_scalars(scalars: list[yaml.ScalarNode]) -> list[list[int]]:
    """For each scalar of one YAML text, the 1-based file line of each Jinja line of its value.

    YAML folds lines (``>``, plain and quoted scalars turn single line breaks
    into spaces), keeps blank lines as line breaks, and a double-quoted
    ``\\n`` breaks a line without leaving the file's line, so value lines and
    file lines part ways. Rather than re-implement those rules, each file line
    inside a scalar gets a marker character where its text starts, the YAML is
    parsed again (once for all the scalars), and the markers say where each
    value line came from. A scalar whose marked value does not read back gets
    lines counted on from its first one.
    """
    out = [_counted(node) for node in scalars]
    buffer = scalars[0].start_mark.buffer if scalars else None  # PyYAML keeps the text it parsed from a string
    if buffer is None:
        return out
    src = _YAML_BREAK.split(buffer.rstrip("\0"))
    for node in scalars:
        first = node.start_mark.line
        # A block scalar ends where the next token starts: at column 0 of a line that is not its own.
        last = min(node.end_mark.line - (node.end_mark.column == 0), len(src) - 1, first + _MARKERS - 1)
        for l in range(first + 1, last + 1):
            text = src[l]
            at = len(text) - len(text.lstrip(" \t"))
            if at < len(text) and not _MARKER_RE.match(text[at:]):  # blank lines stay blank: they are line breaks
                src[l] = text[:at] + chr(_MARKER0 + l - first) + text[at:]
    try:
        marked = _scalars_by_start(yaml.compose("\n".join(src), Loader=yaml.SafeLoader))
    except yaml.YAMLError:
        return out
    for i, node in enumerate(scalars):
        found = marked.get((node.start_mark.line, node.start_mark.column))
        if found is not None and _MARKER_RE.sub("", found.value) == node.value:
            lines = _read_markers(found.value, node.start_mark.line)
            if len(lines) == len(out[i]):
                out[i] = lines
    return out


def _counted(node: yaml.ScalarNode) -> list[int]:
    block = node.style in ("|", ">")  # the text starts on the line after the indicator
    return [node.start_mark.line + 1 + block + i for i in range(jinja_line_count(node.value))]


def _read_markers(value: str, first: int) -> list[int]:
    # a `\r\n` escape cut at a line's end still makes one line break, as Jinja counts them
    value = re.sub(f"\r({_MARKER_RE.pattern}+)\n", "\\1\r\n", value)
    out, line = [], first
    for piece in newline_re.split(value)[::2]:  # split keeps the separators at odd positions
        start = None
        for ch in piece:
            if _MARKER0 < ord(ch) < _MARKER0 + _MARKERS:
                line = first + ord(ch) - _MARKER0
            elif start is None and not ch.isspace():
                start = line
        out.append((start if start is not None else line) + 1)  # a blank line: where the text before it is
    return out


_MARKER0, _MARKERS = 0xE000, 6000  # private-use characters: printable to YAML, absent from real text
_MARKER_RE = re.compile(f"[{chr(_MARKER0 + 1)}-{chr(_MARKER0 + _MARKERS - 1)}]")


def _walk(root: yaml.Node | None):
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:  # an alias: already walked
            continue
        seen.add(id(node))
        yield node
        if isinstance(node, yaml.MappingNode):
            stack.extend(n for pair in node.value for n in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def _scalars_by_start(root: yaml.Node | None) -> dict[tuple[int, int], yaml.ScalarNode]:
    return {(n.start_mark.line, n.start_mark.column): n for n in _walk(root) if isinstance(n, yaml.ScalarNode)}


def value_lines(text: str, key_line: int, key_col: int) -> list[int] | None:
    """The file line of each Jinja line of the scalar whose mapping key is at ``key_line:key_col`` of
    YAML ``text`` (see :func:`lines_of_scalars`); None where there is no such scalar."""
    return _values_by_key(text).get((key_line, key_col))


@functools.lru_cache(maxsize=4)
def _values_by_key(text: str) -> dict[tuple[int, int], list[int]]:
    """:func:`lines_of_scalars` of every scalar value of a mapping in ``text``, by its key's place
    (a recipe is read once for all its inline templates)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    pairs = [(key, value) for node in _walk(root) if isinstance(node, yaml.MappingNode)
             for key, value in node.value if isinstance(value, yaml.ScalarNode)]
    lines = lines_of_scalars([value for _, value in pairs])
    return {(key.start_mark.line + 1, key.start_mark.column + 1): found for (key, _), found in zip(pairs, lines)}
