"""``tunec run OUT --dry-run``: everything a run checks before its first step, and the cost, without training.

Per stage to run: the shards are checked as a run checks them, the model is
built on torch's meta device (no memory, no weights read; a hub model's
config must be reachable or cached) with its LoRA adapter, its vocabulary is
checked against the tokenizer, and the estimates of ``compiler/estimate.py``
are computed again for the settings this run would use (``--set``,
``--max-steps``), with the parameters counted on the built model. A stage
whose estimated peak memory exceeds the device's is an error. Nothing is
written: no lock, no ``runs/``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from tunec.compiler import estimate as est
from tunec.compiler.errors import TunecError
from tunec.compiler.plan import Estimate, Plan, StagePlan, read_plan
from tunec.compiler.recipe import ConfigModel, HubModel, LocalModel, LoraPeft, StageModel

from . import model as models
from .data import ShardSet
from .run import apply_overrides


def base_config(plan: Plan, sp: StagePlan):
    """The transformers config of the model a stage trains (an earlier stage's: that stage's base)."""
    from transformers import AutoConfig

    spec = sp.settings.model
    while isinstance(spec, StageModel):
        spec = plan.stage(spec.stage).settings.model
    try:
        if isinstance(spec, ConfigModel):
            args = dict(spec.config)
            return AutoConfig.for_model(args.pop("model_type"), **args)
        if isinstance(spec, LocalModel):
            return AutoConfig.from_pretrained(spec.path)
        assert isinstance(spec, HubModel)
        return AutoConfig.from_pretrained(spec.id, revision=spec.revision)
    except (OSError, ValueError, TypeError) as exc:
        raise TunecError(f"stage '{sp.name}': cannot read the model's config: {str(exc).splitlines()[0]}") from None


def meta_model(plan: Plan, sp: StagePlan, config) -> Any:
    """The stage's model on the meta device, with its LoRA adapter: shapes without memory."""
    from transformers import AutoModelForCausalLM

    models.quiet_transformers()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        models.check_vocab(model, plan.tokenizer.vocab_size)
        if isinstance(sp.settings.peft, LoraPeft):
            model = models.add_lora(model, sp.settings.peft, plan.seed)
    return model


def local_device(choice: str) -> tuple[str, float, int | None]:
    """``(name, peak FLOP/s, memory bytes)`` of the device a run would use: a GPU's published bf16 peak
    (an H100's when the model is not in the table) and its memory; the CPU's measured rate and RAM."""
    device = models.pick_device(choice)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        known = next((g for g in est.GPUS if g in props.name.lower()), "h100")
        return props.name, est.GPUS[known][0], int(props.total_memory)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return "cpu", est.cpu_peak(), int(ram)


def _peak(e: Estimate, checkpointing: bool | str, memory: int) -> int:
    """The peak a run would reach: with activation checkpointing when the stage asks for it, or under
    `auto` when one micro-batch's activations would take over a quarter of the device (runtime/memory.py)."""
    if e.memory_peak is None or e.memory_peak_checkpointed is None:
        return 0
    on = checkpointing is True or (checkpointing == "auto" and (e.memory_activations or 0) * 4 > memory)
    return e.memory_peak_checkpointed if on else e.memory_peak


def dry_run(out: str | Path, stage: str | None = None, overrides: tuple[str, ...] = (), max_steps: int | None = None,
            device: str = "auto", mfu: float = est.DEFAULT_MFU, echo: Callable[[str], None] = print) -> None:
    """Check and estimate each stage, ``echo`` its lines; a TunecError for anything a run would stop on."""
    out = Path(out)
    plan = read_plan(out)
    stages = [plan.stage(stage)] if stage else list(plan.stages)
    stages, _ = apply_overrides(plan, stages, overrides, stage)
    name, peak, memory = local_device(device)
    too_big = []
    for sp in stages:
        lines: list[str] = []
        ShardSet(out, sp.train, False, plan.tokenizer.vocab_size)  # headers and values, as a run checks them
        config = base_config(plan, sp)
        model = meta_model(plan, sp, config)
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        shape = est.shape_of(config.to_dict())
        sum_sq, docs = est.document_squares(out, sp.train, plan.tokenizer.pad_id)
        settings = sp.settings
        e = est.estimate(settings, sp.train, shape, sum_sq, docs, mfu)
        if max_steps is not None and e.steps > max_steps:
            settings = settings.model_copy(update={"max_steps": max_steps})
            e = est.estimate(settings, sp.train, shape, sum_sq, docs, mfu)
        if e.params_total is None:
            e = e.model_copy(update={"params_total": total, "params_trainable": trainable})
        elif (e.params_total, e.params_trainable) != (total, trainable):
            lines.append(f"note: stage {sp.name}: the model built has {total:,} parameters ({trainable:,} trainable); "
                         f"the estimate counted {e.params_total:,} ({e.params_trainable:,})")
        shown = sp.model_copy(update={"settings": settings, "estimate": e})
        lines.extend(est.summary_lines([shown], name, peak, memory, mfu))
        for line in lines:
            echo(line)
        if memory is not None and _peak(e, settings.activation_checkpointing, memory) > memory:
            too_big.append(sp.name)
    if too_big and memory is not None:
        raise TunecError([f"stage(s) {', '.join(too_big)}: the estimated peak memory exceeds the {name}'s "
                          f"{est.human_bytes(memory)}; lower micro_batch_rows (--set) or seq_len, or use LoRA"])
    echo(f"dry run: {len(stages)} stage(s) checked on the meta device; nothing trained, nothing written")
