"""Accuracy at the end of every stage of `tunec run`, and once on the model the run starts from.

A stage whose eval sets have answer choices is scored as `tunec eval` scores it
as soon as its model is saved (the recipe's ``eval: {accuracy: false}`` turns
that off, ``--no-eval-accuracy`` turns it off for a run, ``--eval-accuracy``
on for every stage). Its ``eval.json`` also gets a ``base`` part: the model the
*run* starts from (the first stage's ``model:``, followed through
``kind: stage`` links), scored on the stage's own tasks, so that every
stage's table shows the gain over the starting point. Those base scores are
cached per task in ``runs/.base-eval/<task>.json`` under a key of everything
they depend on (the starting model, the seed, the tokenizer, the task's
``choices.jsonl``, the limit): a later stage, or a later run, with the same
task reuses them instead of scoring the same model again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from tunec.compiler.fileio import atomic_write_json, sha256_text
from tunec.compiler.plan import Plan, StagePlan
from tunec.compiler.recipe import ConfigModel, HubModel, LocalModel, StageModel

from . import accuracy, outputs
from . import model as models
from .dist import Dist

logger = logging.getLogger(__name__)

BASE_CACHE = ".base-eval"  # under runs/: a stage's name cannot start with a dot


def wanted(sp: StagePlan, switch: bool | None) -> bool:
    """Whether the stage is scored after training: ``switch`` is ``--eval-accuracy`` (True),
    ``--no-eval-accuracy`` (False) or neither (None: the recipe's ``eval.accuracy``)."""
    if switch is False or not accuracy.has_choices(sp):
        return False
    return switch is True or sp.settings.eval.accuracy


def starting_model(plan: Plan, sp: StagePlan) -> LocalModel | HubModel | ConfigModel:
    """The model the run starts from on the way to ``sp``: its ``model:``, through earlier stages."""
    spec = sp.settings.model
    seen = {sp.name}
    while isinstance(spec, StageModel):
        assert spec.stage not in seen, "the recipe loader refuses cycles of stages"
        seen.add(spec.stage)
        spec = plan.stage(spec.stage).settings.model
    return spec


def describe(spec: LocalModel | HubModel | ConfigModel) -> str:
    if isinstance(spec, HubModel):
        return f"hub {spec.id}" + (f"@{spec.revision}" if spec.revision else "")
    if isinstance(spec, LocalModel):
        return f"local {spec.path}"
    return "config (seeded)"


def cache_key(plan: Plan, spec: LocalModel | HubModel | ConfigModel, choices_sha256: str,
              limit: int | None) -> str:
    """What a task's base scores depend on; a local folder's files by name, size and time."""
    identity: dict[str, Any] = spec.model_dump(mode="json")
    if isinstance(spec, LocalModel) and Path(spec.path).is_dir():
        identity["files"] = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                   for p in Path(spec.path).iterdir() if p.is_file())
    data = {"model": identity, "seed": plan.seed, "tokenizer": plan.tokenizer.sha256, "choices": choices_sha256,
            "limit": limit, "metrics": accuracy.METRICS}
    return sha256_text(json.dumps(data, sort_keys=True))


def _read_cached(path: Path, key: str) -> dict[str, Any] | None:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent or damaged: scored again
    return found if isinstance(found, dict) and found.get("key") == key else None


def score_start(out: Path, plan: Plan, sp: StagePlan, limit: int | None, stage_fingerprint: str | None,
                dev: torch.device, dist: Dist) -> dict[str, Any]:
    """The run's starting model on ``sp``'s tasks with choices, from the cache where it holds them; written
    as the ``base`` part of the stage's eval.json. Returns what eval.json holds (rank 0)."""
    scoring = accuracy.Scoring.prepare(out, plan, sp.name, (), limit)
    spec = starting_model(plan, sp)
    folder = outputs.run_dir(out, BASE_CACHE)
    keys = {}
    for t in scoring.names:
        choices = sp.eval[t].choices
        assert choices is not None, "Scoring keeps tasks with choices only"
        keys[t] = cache_key(plan, spec, choices.sha256, limit)
    cached = {t: _read_cached(folder / f"{t}.json", keys[t]) for t in scoring.names}
    missing = [t for t in scoring.names if cached[t] is None]
    metrics: dict[str, dict] = {t: c["metrics"] for t, c in cached.items() if c is not None}
    predictions: dict[str, list[dict]] = {t: c["predictions"] for t, c in cached.items() if c is not None}
    if missing:
        model, _ = models.load_spec(spec, plan.seed, "sdpa")  # a config: the very weights the run started with
        models.check_vocab(model, plan.tokenizer.vocab_size)
        if dist.is_main:
            logger.info(f"stage {sp.name}: scoring the run's starting model ({describe(spec)}) on "
                        f"{len(missing)} task(s) on {dev}")
        found, made = scoring.score(model.to(dev).eval(), missing, dev, dist, quiet=True)
        del model
        metrics.update(found)
        predictions.update(made)
        if dist.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            for t in missing:
                atomic_write_json(folder / f"{t}.json", {"key": keys[t], "model": describe(spec),
                                                         "metrics": found[t], "predictions": made[t]})
    part = scoring.part(f"{describe(spec)}, where the run starts", None, limit,
                        {t: metrics[t] for t in scoring.names})
    part["cached"] = [t for t in scoring.names if t not in missing]
    if not dist.is_main:
        return {}
    saved = accuracy.read_eval(out, sp.name) or {}
    if not missing and {k: v for k, v in (saved.get("base") or {}).items() if k != "cached"} == {
            k: v for k, v in part.items() if k != "cached"}:
        return saved  # already there (a resumed run): nothing to write
    return accuracy.write_part(out, sp.name, "base", part, predictions, stage_fingerprint)


def after_stage(out: Path, plan: Plan, sp: StagePlan, stage_fingerprint: str, dev: torch.device, dist: Dist,
                switch: bool | None) -> bool:
    """Score a trained stage (unless its eval.json already holds this training's scores at this limit)
    and the run's starting model on its tasks; ``False`` when the stage is not scored at all."""
    if not wanted(sp, switch):
        return False
    limit = sp.settings.eval.limit
    done = (accuracy.read_eval(out, sp.name) or {}).get("stage") or {}
    if done.get("fingerprint") != stage_fingerprint or done.get("limit") != limit:
        accuracy.evaluate_stage(out, plan, sp.name, False, (), limit, dev, dist)  # from the saved model
        dist.barrier()
    score_start(out, plan, sp, limit, stage_fingerprint, dev, dist)
    dist.barrier()
    return True
