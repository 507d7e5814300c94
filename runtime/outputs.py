"""A stage's outputs under ``OUT/runs/<stage>/`` and how later stages (and ``generate``) load them.

::

    runs/<stage>/
      model/          full fine-tuning: save_pretrained folder (+ the tokenizer)
      adapter/        LoRA: the peft adapter (+ the tokenizer); its base_model_name_or_path names the base
      merged/         LoRA with `save_merged: true`: the adapter merged into the base
      base/           LoRA on a base that exists nowhere else (built from a config, or an earlier
                      adapter merged in): the base weights, saved before training
      checkpoints/    see runtime/checkpoint.py
      metrics.jsonl, tensorboard/
      result.json     written last: the stage is complete (the commit marker, like plan.json)

Every folder is written under a temporary name and renamed when complete.
Paths in ``result.json`` are relative to the build folder when they are inside it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from tunec.compiler.errors import TunecError
from tunec.compiler.fileio import atomic_dir, atomic_write_json
from tunec.compiler.recipe import HubModel, LocalModel, StageModel

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
    """What peft's ``base_model_name_or_path`` should say: an absolute folder or a hub id."""
    return str(resolve(out, base.path).resolve()) if isinstance(base, LocalModel) else base.id


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


def start_from_stage(out: Path, spec: StageModel, stage: str, lora: bool, attn: str):
    """Load an earlier stage's output to train on: ``(model, attn, base, continued)``.

    ``base`` is where the model's weights can be found again (None: nowhere on disk);
    ``continued`` is True when the earlier stage's LoRA adapter is loaded to keep training.
    """
    prev = _finished(out, spec.stage, stage)
    if prev.kind == "full":
        model, attn = models.load_pretrained(str(resolve(out, prev.model)), attn, what=f"stage {prev.stage} model")
        return model, attn, LocalModel(kind="local", path=prev.model), False
    if spec.adapter == "continue":
        if not lora:
            raise TunecError(f"stage `{stage}`: `model.adapter: continue` keeps training stage `{spec.stage}`'s "
                             "LoRA adapter, so the stage needs `peft: {kind: lora}`")
        base, attn = load_base(out, prev.base, attn)
        return models.load_adapter(base, resolve(out, prev.adapter), trainable=True), attn, prev.base, True
    if prev.merged is not None:
        model, attn = models.load_pretrained(str(resolve(out, prev.merged)), attn, what=f"stage {prev.stage} merged model")
        return model, attn, LocalModel(kind="local", path=prev.merged), False
    base, attn = load_base(out, prev.base, attn)
    merged = models.load_adapter(base, resolve(out, prev.adapter), trainable=False).merge_and_unload()
    return merged, attn, None, False


def load_for_inference(out: Path, stage: str, attn: str = "sdpa"):
    """A finished stage's model, ready to generate (a LoRA adapter is merged in)."""
    result = read_result(out, stage)
    if result is None:
        raise TunecError(f"stage `{stage}` has no trained model in {run_dir(out, stage)}; "
                         f"train it first (`tunec run {out} --stage {stage}`)")
    if result.kind == "full":
        return models.load_pretrained(str(resolve(out, result.model)), attn, what=f"stage {stage} model")[0]
    if result.merged is not None:
        return models.load_pretrained(str(resolve(out, result.merged)), attn, what=f"stage {stage} merged model")[0]
    base, _ = load_base(out, result.base, attn)
    return models.load_adapter(base, resolve(out, result.adapter), trainable=False).merge_and_unload()


def save_model(out: Path, stage: str, model, lora: bool, save_merged: bool, base, tokenizer_dir: Path) -> dict:
    """Write the final model (rank 0): ``{"model": ...}`` or ``{"adapter": ..., "merged": ...}`` for the result."""
    rd = run_dir(out, stage)
    models.quiet_transformers()

    def with_tokenizer(write):
        def inner(tmp: Path):
            write(tmp)
            for f in tokenizer_dir.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        return inner

    if not lora:
        atomic_dir(rd / "model", with_tokenizer(lambda tmp: model.save_pretrained(tmp)))
        return {"model": relative(out, rd / "model")}
    for config in model.peft_config.values():
        config.base_model_name_or_path = base_target(out, base)
    atomic_dir(rd / "adapter", with_tokenizer(lambda tmp: model.save_pretrained(tmp)))
    paths = {"adapter": relative(out, rd / "adapter"), "merged": None}
    if save_merged:
        merged = model.merge_and_unload()  # end of the stage: the peft wrapper is not needed any more
        atomic_dir(rd / "merged", with_tokenizer(lambda tmp: merged.save_pretrained(tmp)))
        paths["merged"] = relative(out, rd / "merged")
    return paths


def save_base(out: Path, stage: str, model) -> LocalModel:
    """Save a LoRA stage's base weights (rank 0) so the adapter can always be applied again."""
    folder = run_dir(out, stage) / "base"
    atomic_dir(folder, lambda tmp: model.save_pretrained(tmp))
    return LocalModel(kind="local", path=relative(out, folder))
