"""Name references inside a recipe (stage -> task, task -> library template).

These checks read the raw YAML data, so they also run when the schema check
fails: a user then sees a misspelt task name together with a misspelt key, in
one pass, instead of one after the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .errors import Problem, did_you_mean
from .templates import LIBRARY_DIR, find_library_template, library_names

ProblemAt = Callable[[tuple, str], Problem]


def template_dirs(data: Any, resolve: Callable[[str], Path]) -> list[Path]:
    """The recipe's template folders (first) and the built-in library (last)."""
    extra = data.get("template_dirs") if isinstance(data, dict) else None
    dirs = [resolve(d) for d in extra if isinstance(d, str)] if isinstance(extra, list) else []
    return dirs + [LIBRARY_DIR]


def reference_problems(data: Any, problem_at: ProblemAt, dirs: list[Path]) -> list[Problem]:
    if not isinstance(data, dict):
        return []
    problems = []
    tasks: dict = data["tasks"] if isinstance(data.get("tasks"), dict) else {}
    stages: list = data["stages"] if isinstance(data.get("stages"), list) else []
    for i, stage in enumerate(stages):
        for key in ("tasks", "held_out"):
            names = stage.get(key) if isinstance(stage, dict) else None
            for j, name in enumerate(names if isinstance(names, list) else []):
                if isinstance(name, str) and name not in tasks:
                    problems.append(problem_at(("stages", i, key, j),
                                               f"unknown task '{name}'{did_you_mean(name, tasks)}"))
    known: list[str] | None = None
    for tname, task in tasks.items():
        refs = task.get("templates") if isinstance(task, dict) else None
        for k, ref in enumerate(refs if isinstance(refs, list) else []):
            library = isinstance(ref, dict) and ref.get("kind") == "library"
            name = ref if isinstance(ref, str) else (ref.get("name") if library else None)
            if isinstance(name, str) and find_library_template(name, dirs) is None:
                known = library_names(dirs) if known is None else known
                problems.append(
                    problem_at(("tasks", tname, "templates", k),
                               f"unknown template '{name}'{did_you_mean(name, known)}")
                )
    return problems
