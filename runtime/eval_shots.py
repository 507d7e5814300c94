"""``tunec eval --shots K``: the eval sets again, each example after K exemplars from its task's train rows.

The exemplars are chosen, rendered, joined and fitted to ``seq_len`` by the
compiler itself: the recipe that made the build (named in its
``.tunec-build`` marker, unchanged since: its sha256 must be the plan's) is
compiled again into a temporary folder, with the build's own ``--set``
overrides and, for every task scored, ``few_shot: {shots: K}`` (every example
K exemplars, dropped from the first one when the document would not fit,
never the example itself). Only the eval sets of that build are read; the
model scored is the original build's. Results go to
``runs/<stage>/eval-Kshot.json`` and ``predictions-Kshot/``, beside the
zero-shot ones.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.errors import TunecError
from tunec.compiler.fileio import sha256_file
from tunec.compiler.plan import MARKER_FILE, Plan


def recipe_of(out: Path, plan: Plan) -> Path:
    """The recipe file that compiled ``out``, as it was then."""
    marker = Path(out) / MARKER_FILE
    try:
        recipe = Path(json.loads(marker.read_text(encoding="utf-8"))["recipe"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TunecError(f"{marker}: unreadable ({exc}); --shots compiles the build's recipe again and needs "
                         "its path; compile the recipe again") from None
    if not recipe.is_file():
        raise TunecError(f"--shots: {recipe}, the recipe {out} was compiled from, is gone; few-shot exemplars "
                         "come from its tasks' train rows")
    if sha256_file(recipe) != plan.recipe.sha256:
        raise TunecError(f"--shots: {recipe} changed since {out} was compiled; compile it again first, so that "
                         "the exemplars come from the data the model was trained with")
    return recipe


def few_shot_build(out: Path, plan: Plan, tasks: list[str], shots: int, into: Path) -> Plan:
    """Compile the build's recipe into ``into`` with ``shots`` exemplars for each of ``tasks``."""
    overrides = (*plan.recipe.overrides, *(f"tasks.{t}.few_shot={{shots: {shots}}}" for t in tasks))
    return compile_recipe(recipe_of(out, plan), into, Options(workers=1), tuple(overrides))


def eval_name(shots: int) -> str:
    return "eval.json" if not shots else f"eval-{shots}shot.json"


def predictions_name(shots: int) -> str:
    return "predictions" if not shots else f"predictions-{shots}shot"
