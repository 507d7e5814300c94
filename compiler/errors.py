"""User-facing errors: every problem carries a place (file, line, column, field).

The compiler collects problems and raises them together, so a user fixes a
recipe in one pass instead of one error per run.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Problem:
    """One user error, located as precisely as we know."""

    message: str
    file: str | None = None
    line: int | None = None  # 1-based
    col: int | None = None  # 1-based
    field: str | None = None  # dotted path inside the recipe, e.g. tasks.sst2.source.path

    def __str__(self) -> str:
        place = ""
        if self.file:
            place = self.file
            if self.line is not None:
                place += f":{self.line}"
                if self.col is not None:
                    place += f":{self.col}"
            place += ": "
        field = f"{self.field}: " if self.field else ""
        return f"{place}{field}{self.message}"


class TunecError(Exception):
    """An error caused by user input (recipe, data, templates, output folder).

    The CLI prints one line per problem and exits 1, without a traceback.
    """

    def __init__(self, problems: Problem | str | Sequence[Problem] | Sequence[str]):
        items: Sequence[Problem | str] = [problems] if isinstance(problems, (str, Problem)) else problems
        # A bare message is a problem without a place.
        self.problems: list[Problem] = [p if isinstance(p, Problem) else Problem(p) for p in items]
        super().__init__("\n".join(str(p) for p in self.problems))


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when a close name exists, else an empty string."""
    close = difflib.get_close_matches(str(name), sorted(set(map(str, choices))), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def field_path(loc: Sequence[str | int]) -> str:
    """('tasks', 'sst2', 'templates', 1) -> 'tasks.sst2.templates[1]'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out
