"""A stage's outputs under ``OUT/runs/<stage>/`` and how later stages (and ``generate``) load them.

::

    runs/<stage>/
      model/          full fine-tuning: save_pretrained folder (+ the tokenizer, a model card README.md)
      adapter/        LoRA: the peft adapter (+ the tokenizer, README.md); its base_model_name_or_path
                      names the base: a hub id, or a path relative to the build folder
      merged/         LoRA with `save_merged: true`: the adapter merged into the base (+ README.md)
      base/           LoRA on a base that exists nowhere else (built from a config, or an earlier
                      adapter merged in): the base weights in float32, saved before training
      checkpoints/    see runtime/checkpoint.py
      metrics.jsonl, tensorboard/, wandb/   see runtime/log.py
      result.json     written last: the stage is complete (the commit marker, like plan.json)

Every folder is written under a temporary name and renamed when complete.
Paths in ``result.json`` and in adapters are relative to the build folder when
they are inside it, so a build folder can be moved as a whole. ``model/`` and
``merged/`` hold the weights in the dtype the forward pass ran in
(:func:`tunec.runtime.model.save_dtype`); ``base/`` stays float32, because a
resumed run trains on it again and must see the very same weights.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from tunec.compiler.errors import TunecError
from tunec.compiler.fileio import atomic_dir, atomic_write_json, atomic_write_text
from tunec.compiler.plan import Plan, StagePlan
from tunec.compiler.recipe import ConfigModel, HubModel, LocalModel, LoraPeft, StageModel

from . import model as models

RUNS = "runs"
RESULT = "result.json"


class StageResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["tunec.run"] = "tunec.run"
    stage: str
    fingerprint: str  # settings, data and upstream of the stage: a changed build is not "complete"
    kind: Literal["full", "lora"]
    model: str | None = None  # full: folder of the trained model
    adapter: str | None = None  # lora: folder of the adapter
    merged: str | None = None  # lora with save_merged
    base: LocalModel | HubModel | None = None  # lora: the model the adapter applies to
    steps: int
    rows_per_step: int
    tokens: int
    trained_tokens: int
    train_loss: float | None
    eval_loss: dict[str, float]
    run_options: dict[str, Any] = {}  # what `tunec run` changed of the plan: {"set": {...}, "max_steps": N}
    wall_s: float


def run_dir(out: Path, stage: str) -> Path:
    return Path(out) / RUNS / stage


def read_result(out: Path, stage: str) -> StageResult | None:
    path = run_dir(out, stage) / RESULT
    if not path.is_file():
        return None
    return StageResult.model_validate_json(path.read_text())


def write_result(out: Path, result: StageResult) -> None:
    atomic_write_json(run_dir(out, result.stage) / RESULT, result.model_dump(mode="json"))


def relative(out: Path, path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path(out).resolve()))
    except ValueError:
        return str(path.resolve())


def resolve(out: Path, path: str) -> Path:
    return Path(out) / path  # an absolute path stays absolute


def base_target(out: Path, base: LocalModel | HubModel) -> str:
    """What peft's ``base_model_name_or_path`` should say: a hub id, or the folder relative to the build.

    Never an absolute path: it would name a folder of this machine, and the
    adapter would stop loading once the build is copied elsewhere. peft
    resolves a relative path against the current folder, so from the build
    folder ``AutoPeftModelForCausalLM.from_pretrained("runs/<stage>/adapter")``
    finds its base; tunec's own loader resolves it against the build folder.
    """
    if isinstance(base, HubModel):
        return base.id
    return Path(os.path.relpath(resolve(out, base.path).resolve(), Path(out).resolve())).as_posix()


def load_base(out: Path, base: LocalModel | HubModel, attn: str):
    if isinstance(base, LocalModel):
        return models.load_pretrained(str(resolve(out, base.path)), attn, what="base model")
    return models.load_pretrained(base.id, attn, revision=base.revision, what="hub model")


def _finished(out: Path, stage: str, needed_by: str) -> StageResult:
    result = read_result(out, stage)
    if result is None:
        raise TunecError(f"stage `{needed_by}` starts from stage `{stage}`, which has not finished in "
                         f"{run_dir(out, stage)}; run it first (`tunec run {out} --stage {stage}`)")
    return result


def _saved(out: Path, result: StageResult, part: Literal["model", "adapter", "merged"]) -> str:
    """The folder ``part`` of a finished stage, which its kind says was saved (result.json may be damaged)."""
    folder: str | None = getattr(result, part)
    if folder is None:
        raise TunecError(f"{run_dir(out, result.stage) / RESULT}: the {result.kind} stage names no `{part}` folder; "
                         f"train it again (`tunec run {out} --stage {result.stage} --force`)")
    return folder


def _base_of(out: Path, result: StageResult) -> LocalModel | HubModel:
    """The model a finished LoRA stage's adapter applies to."""
    if result.base is None:
        raise TunecError(f"{run_dir(out, result.stage) / RESULT}: the {result.kind} stage names no `base` model; "
                         f"train it again (`tunec run {out} --stage {result.stage} --force`)")
    return result.base


def start_from_stage(out: Path, spec: StageModel, stage: str, lora: bool, attn: str):
    """Load an earlier stage's output to train on: ``(model, attn, base, continued)``.

    ``base`` is where the model's weights can be found again (None: nowhere on disk);
    ``continued`` is True when the earlier stage's LoRA adapter is loaded to keep training.
    """
    prev = _finished(out, spec.stage, stage)
    if prev.kind == "full":
        folder = _saved(out, prev, "model")
        model, attn = models.load_pretrained(str(resolve(out, folder)), attn, what=f"stage {prev.stage} model")
        return model, attn, LocalModel(kind="local", path=folder), False
    if spec.adapter == "continue":
        if not lora:
            raise TunecError(f"stage `{stage}`: `model.adapter: continue` keeps training stage `{spec.stage}`'s "
                             "LoRA adapter, so the stage needs `peft: {kind: lora}`")
        base_spec = _base_of(out, prev)
        base, attn = load_base(out, base_spec, attn)
        adapter = models.load_adapter(base, resolve(out, _saved(out, prev, "adapter")), trainable=True)
        return adapter, attn, base_spec, True
    if prev.merged is not None:
        model, attn = models.load_pretrained(str(resolve(out, prev.merged)), attn,
                                             what=f"stage {prev.stage} merged model")
        return model, attn, LocalModel(kind="local", path=prev.merged), False
    base, attn = load_base(out, _base_of(out, prev), attn)
    merged = models.load_adapter(base, resolve(out, _saved(out, prev, "adapter")), trainable=False).merge_and_unload()
    return merged, attn, None, False


def load_for_inference(out: Path, stage: str, attn: str = "sdpa"):
    """A finished stage's model, ready to generate (a LoRA adapter is merged in)."""
    result = read_result(out, stage)
    if result is None:
        raise TunecError(f"stage `{stage}` has no trained model in {run_dir(out, stage)}; "
                         f"train it first (`tunec run {out} --stage {stage}`)")
    if result.kind == "full":
        return models.load_pretrained(str(resolve(out, _saved(out, result, "model"))), attn,
                                      what=f"stage {stage} model")[0]
    if result.merged is not None:
        return models.load_pretrained(str(resolve(out, result.merged)), attn, what=f"stage {stage} merged model")[0]
    base, _ = load_base(out, _base_of(out, result), attn)
    return models.load_adapter(base, resolve(out, _saved(out, result, "adapter")), trainable=False).merge_and_unload()


def end_of_turn(out: Path, plan: Plan, sp: StagePlan) -> list[int]:
    """The chat template's end-of-turn token when the stage trains chat tasks (else nothing)."""
    if not any(plan.tasks[t].format == "chat" for t in sp.settings.tasks if t in plan.tasks):
        return []
    from transformers import AutoTokenizer

    from .generate import end_of_turn_ids  # generate imports this module

    tokenizer = AutoTokenizer.from_pretrained(str(Path(out) / plan.tokenizer.path), local_files_only=True)
    return end_of_turn_ids(tokenizer) if tokenizer.chat_template else []


def save_model(out: Path, stage: str, model, lora: bool, save_merged: bool, base, tokenizer_dir: Path,
               dtype=None) -> dict:
    """Write the final model (rank 0): ``{"model": ...}`` or ``{"adapter": ..., "merged": ...}`` for the result.

    Full weights (``model/``, ``merged/``) are cast to ``dtype`` (in place: the
    stage is over) so that ``config.json`` says the dtype they are in; the
    adapter keeps its float32 weights (peft casts it to its base's dtype when
    it loads, and a few megabytes do not matter).
    """
    rd = run_dir(out, stage)
    models.quiet_transformers()

    def with_tokenizer(write):
        def inner(tmp: Path):
            write(tmp)
            for f in tokenizer_dir.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        return inner

    def cast(m):
        return m if dtype is None else m.to(dtype)

    if not lora:
        atomic_dir(rd / "model", with_tokenizer(lambda tmp: cast(model).save_pretrained(tmp)))
        return {"model": relative(out, rd / "model")}
    for config in model.peft_config.values():
        config.base_model_name_or_path = base_target(out, base)
    # tunec never resizes or trains the base's embeddings, so they are never saved with the adapter; peft's
    # "auto" would look the (relative) base up from the current folder, then on the hub, to find out.
    atomic_dir(rd / "adapter", with_tokenizer(lambda tmp: model.save_pretrained(tmp, save_embedding_layers=False)))
    paths = {"adapter": relative(out, rd / "adapter"), "merged": None}
    if save_merged:
        merged = model.merge_and_unload()  # end of the stage: the peft wrapper is not needed any more
        atomic_dir(rd / "merged", with_tokenizer(lambda tmp: cast(merged).save_pretrained(tmp)))
        paths["merged"] = relative(out, rd / "merged")
    return paths


def save_base(out: Path, stage: str, model) -> LocalModel:
    """Save a LoRA stage's base weights (rank 0) so the adapter can always be applied again."""
    folder = run_dir(out, stage) / "base"
    atomic_dir(folder, lambda tmp: model.save_pretrained(tmp))
    return LocalModel(kind="local", path=relative(out, folder))


# ----------------------------------------------------------------- model cards

CARD = "README.md"


def write_cards(out: Path, plan: Plan, sp: StagePlan, result: StageResult) -> None:
    """A model card (``README.md``) in every folder the stage saved a model to (rank 0).

    Written after the folders and before ``result.json``: a crash in between
    leaves an unfinished stage, never a finished one without its cards.
    """
    for what in ("model", "adapter", "merged"):
        folder = getattr(result, what)
        if folder is not None:
            atomic_write_text(resolve(out, folder) / CARD, model_card(out, plan, sp, result, what))


def _describe_model(out: Path, spec, seed: int) -> str:
    if isinstance(spec, HubModel):
        return f"`{spec.id}` (hub" + (f", revision `{spec.revision}`)" if spec.revision else ")")
    if isinstance(spec, LocalModel):
        return f"`{base_target(out, spec)}` (a local folder, relative to the build folder)"
    if isinstance(spec, ConfigModel):
        return f"random weights from a `{spec.config['model_type']}` config (seed {seed})"
    prev = read_result(out, spec.stage)
    if prev is None or prev.kind == "full":
        return f"the model stage `{spec.stage}` trained"
    if spec.adapter == "continue":
        return f"the LoRA adapter of stage `{spec.stage}`, trained further"
    return f"the model of stage `{spec.stage}` with its LoRA adapter merged in"


def _fmt_loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def model_card(out: Path, plan: Plan, sp: StagePlan, result: StageResult, what: str) -> str:
    """The card of ``what`` (``model``, ``adapter`` or ``merged``): every number from the plan or the result."""
    from tunec import __version__

    settings = sp.settings
    lora = settings.peft if isinstance(settings.peft, LoraPeft) else None
    hub = settings.model.id if isinstance(settings.model, HubModel) else None
    front = ["---", f"library_name: {'peft' if what == 'adapter' else 'transformers'}"]
    if hub:
        front.append(f"base_model: {hub}")
    front += ["tags: [tunec]", "---", ""]
    contents = {"model": "the fine-tuned model (all weights)",
                "adapter": (f"a LoRA adapter (r {lora.r}, alpha {lora.alpha:g}, dropout {lora.dropout:g})"
                            if lora else ""),
                "merged": "the model with the stage's LoRA adapter merged in"}[what]
    objective = settings.objective
    doc = (type(objective).__doc__ or "").strip().rstrip(".").lower()
    lines = [
        f"# {settings.name}",
        "",
        f"Stage `{settings.name}` of the recipe `{Path(plan.recipe.file).name}`, trained by tunec {__version__}: "
        f"{contents}.",
        "",
        "| | |",
        "| --- | --- |",
        f"| recipe | `{Path(plan.recipe.file).name}`, sha256 `{plan.recipe.sha256}` |",
        f"| recipe hash | `{plan.recipe.hash}` (the validated recipe and every input) |",
        f"| stage | `{settings.name}` |",
        f"| base model | {_describe_model(out, settings.model, plan.seed)} |",
    ]
    if what == "adapter" and result.base is not None:
        lines.append(f"| adapter applies to | `{base_target(out, result.base)}` |")
    lines += [
        f"| objective | `{objective.kind}`" + (f": {doc}" if doc else "") + " |",
        f"| sequence length | {plan.seq_len} (packed rows) |",
        f"| tunec | {__version__} |",
        "",
        "## Tasks",
        "",
        "| task | documents | tokens | trained tokens | share of trained tokens |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, counts in sp.tasks.items():
        share = "" if counts.trained_share is None else f"{counts.trained_share:.1%}"
        lines.append(f"| {name} | {counts.examples:,} | {counts.tokens:,} | {counts.trained_tokens:,} | {share} |")
    lines += [
        "",
        "## Training",
        "",
        "| | |",
        "| --- | --- |",
        f"| steps | {result.steps:,} of {result.rows_per_step:,} rows |",
        f"| tokens | {result.tokens:,} ({result.trained_tokens:,} trained) |",
        f"| final training loss | {_fmt_loss(result.train_loss)} |",
        f"| eval loss | {_fmt_loss(result.eval_loss.get('all'))} |",
        f"| wall time | {result.wall_s:.1f} s |",
    ]
    tasks = [t for t in result.eval_loss if t != "all"]
    if tasks:
        lines += ["", "## Eval loss per task", "", "| task | loss |", "| --- | ---: |"]
        lines += [f"| {t} | {result.eval_loss[t]:.4f} |" for t in tasks]
    lines += ["", "Losses are summed token cross-entropies divided by the number of trained tokens "
              "(see tunec's runtime/README.md)."]
    return "\n".join(front + lines) + "\n"
