"""Pydantic's validation errors, turned into the messages a recipe's author needs.

Each error is located in the YAML (``locate``), misspelt keys and tags get a
"did you mean" from the names the schema allows at that place (found by
walking the schema's types along the error's location), and the errors of
every member of a failed union collapse to those of the member the input was
meant for.
"""

from __future__ import annotations

import re
import typing
from typing import Any

from pydantic import BaseModel, Tag

from .errors import Problem, did_you_mean, field_path
from .recipe import Recipe
from .yamlpos import locate


def schema_problem(err: dict, data: Any, where: dict, filename: str) -> Problem:
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
        tag = str(ctx.get("tag"))
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
    message += err.get("hint") or _literal_hint(err)
    if kind == "int_parsing_size":  # pydantic's words speak of parsing a string
        message = "Input is too large (got {!r})".format(err.get("input"))
    # pydantic speaks of Python dictionaries; a recipe's author wrote YAML mappings
    message = re.sub(r"a valid dictionary( or (object to extract fields from|instance of \w+))?", "a mapping", message)
    if kind == "string_type" and isinstance(err.get("input"), bool):
        message += f"; YAML reads true/false as booleans: quote the value, e.g. '{str(err['input']).lower()}'"
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


def _members(tp: Any, tag: str | None = None) -> list[tuple[str | None, type[BaseModel]]]:
    """The models of a (possibly nested) union, each with its tag: `kind`'s literal or a pydantic `Tag`."""
    while typing.get_origin(tp) is typing.Annotated:
        tag = next((m.tag for m in tp.__metadata__ if isinstance(m, Tag)), tag)
        tp = typing.get_args(tp)[0]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        out = []
        for arg in typing.get_args(tp):
            out.extend(_members(arg))
        return out
    return [(tag or _tag(tp), tp)] if isinstance(tp, type) and issubclass(tp, BaseModel) else []


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
            tagged = [m for t, m in members if t == part]
            if tagged:
                tp = tagged[0]
            elif len(members) == 1:
                tp = members[0][1]
                continue  # do not consume `part`
            # else: pydantic's name of a union member (`list[str]`, `tagged-union[...]`): skip it
        i += 1
    return tp


def _allowed_fields(loc: tuple) -> list[str]:
    members = _members(_type_at(loc)) if _type_at(loc) is not None else []
    if loc:
        # A union told apart by the keys written (eval: split | fraction | file):
        # a misspelt key may belong to any member.
        siblings = _members(_type_at(loc[:-1])) if _type_at(loc[:-1]) is not None else []
        if any(t == loc[-1] and "kind" not in m.model_fields for t, m in siblings):
            members = siblings
    names: set[str] = set()
    for _, m in members:
        names.update(m.model_fields)
    return sorted(names)


def _union_tags(loc: tuple) -> list[str]:
    tp = _type_at(loc)
    return [t for t, _ in _members(tp) if t] if tp is not None else []


# ----------------------------------------------------------------- union errors


def _literal_hint(err: dict) -> str:
    if err["type"] != "literal_error" or not isinstance(err.get("input"), str):
        return ""
    return did_you_mean(err["input"], re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", ""))))


def _is_type_error(err: dict) -> bool:
    """The input is not even of the member's type (a string where a list goes)."""
    return err["type"].endswith("_type") or err["type"] == "literal_error"


def _member_segments(err: dict, data: Any) -> list[int]:
    """Indices of ``err["loc"]`` that name a union member rather than a key or index of the data."""
    out, cur, loc = [], data, err["loc"]
    for i, part in enumerate(loc):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            cur = cur[part]
        elif not (err["type"] == "missing" and i == len(loc) - 1):  # a missing field is not a member
            out.append(i)
    return out


def collapse_unions(errors: list[dict], data: Any) -> list[dict]:
    """Of the members of a union that all failed, keep the errors of the one the input came closest to.

    Pydantic reports every member's failure; ``answer_choices: {kind: column, colum: x}`` would also
    say "Input should be a valid list". The member whose errors lie deepest in the input, and are
    more than a wrong type, is the one the user meant. Members that all fail on the type alone
    become one error ("a valid string or a valid dictionary").
    """
    errors = list(errors)
    changed = True
    while changed:
        changed = False
        groups: dict[tuple, dict[Any, list[int]]] = {}
        for n, err in enumerate(errors):
            for i in _member_segments(err, data):
                groups.setdefault(tuple(err["loc"][:i]), {}).setdefault(err["loc"][i], []).append(n)
        for prefix in sorted(groups, key=len):
            members = groups[prefix]
            if len(members) < 2:
                continue
            # how far into the input the member got, and whether it got past the type
            rank = {n: (len(errors[n]["loc"]) - len(prefix) - 1, not _is_type_error(errors[n]))
                    for ns in members.values() for n in ns}
            score = {label: max(rank[n] for n in ns) for label, ns in members.items()}
            best = max(score.values())
            drop = {n for label, ns in members.items() if score[label] != best for n in ns}
            kept = sorted(n for label, ns in members.items() if score[label] == best for n in ns)
            if not drop and best == (0, False) and len(kept) > 1:
                wants = [errors[n]["msg"].removeprefix("Input should be ") for n in kept]
                hint = "".join(_literal_hint(errors[n]) for n in kept)
                merged = dict(errors[kept[0]], loc=prefix, type="union_type", hint=hint,
                              msg="Input should be " + " or ".join(dict.fromkeys(wants)))
                errors = [merged if n == kept[0] else e for n, e in enumerate(errors) if n not in kept[1:]]
                changed = True
            elif drop:
                errors = [e for n, e in enumerate(errors) if n not in drop]
                changed = True
            if changed:
                break
    return errors
