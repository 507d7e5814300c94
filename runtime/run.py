"""``tunec run OUT``: check the build, then train its stages in order.

For each stage: decide what its run folder allows (start, resume, skip, or
refuse), load the model (from a config, a folder, the hub, or an earlier
stage), add LoRA when asked, train (:mod:`tunec.runtime.loop`), evaluate
(:mod:`tunec.runtime.evaluate`), checkpoint (:mod:`tunec.runtime.checkpoint`), and save
the final model (:mod:`tunec.runtime.outputs`) with ``result.json`` last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tunec.compiler.errors import TunecError
from tunec.compiler.plan import Plan, StagePlan, read_plan
from tunec.compiler.recipe import ConfigModel, LoraPeft, StageModel

from . import checkpoint, outputs
from . import dist as distmod
from . import model as models
from .data import RowStream, ShardSet, plan_batching
from .evaluate import evaluate
from .log import MetricsLog
from .loop import Loop, Progress, make_optimizer, make_scheduler, train


@dataclass(frozen=True)
class RunOptions:
    stage: str | None = None  # only this stage
    resume: bool = False  # continue from checkpoints, skip completed stages
    force: bool = False  # discard previous results of the stages run
    device: str = "auto"  # auto | cpu | cuda
    verify: bool = False  # sha256 of every shard, not only sizes and headers
    progress: bool = True  # a progress bar on rank 0
    on_step: Callable[[int], None] | None = None  # called after every optimizer step (tests interrupt runs with it)


def fingerprint(out: Path, plan: Plan, sp: StagePlan) -> str:
    """What a stage's results depend on: its settings, its data, the seed and the stage it starts from."""
    upstream = None
    if isinstance(sp.settings.model, StageModel):
        prev = outputs.read_result(out, sp.settings.model.stage)
        upstream = prev.fingerprint if prev else None
    data = {"settings": sp.settings.model_dump(mode="json"), "train": [s.sha256 for s in sp.train.shards],
            "seed": plan.seed, "tokenizer": plan.tokenizer.sha256, "upstream": upstream}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def run(out: str | Path, options: RunOptions = RunOptions()) -> list[outputs.StageResult]:
    out = Path(out)
    plan = read_plan(out)
    stages = [plan.stage(options.stage)] if options.stage else list(plan.stages)
    tokenizer_dir = out / plan.tokenizer.path
    if not (tokenizer_dir / "tokenizer.json").is_file() and not (tokenizer_dir / "tokenizer_config.json").is_file():
        raise TunecError(f"{tokenizer_dir}: the build's tokenizer is missing; compile the recipe again")
    # Every shard of every stage to run is checked before any training starts.
    data = {sp.name: (ShardSet(out, sp.train, options.verify),
                      {t: ShardSet(out, ev.data, options.verify) for t, ev in sp.eval.items() if ev.data.rows})
            for sp in stages}
    dist = distmod.from_env()
    device = models.pick_device(options.device, dist.local_rank)
    distmod.init(dist, device)
    try:
        return [run_stage(out, plan, sp, *data[sp.name], options, dist, device) for sp in stages]
    finally:
        distmod.shutdown(dist)


def _decide(out: Path, sp: StagePlan, fp: str, options: RunOptions) -> tuple[str, Path | None]:
    """``("skip" | "resume" | "fresh", checkpoint)`` for a stage's run folder, or a user error."""
    rd = outputs.run_dir(out, sp.name)
    done = outputs.read_result(out, sp.name)
    ckpt = checkpoint.latest(rd / "checkpoints")
    if options.force:
        return "fresh", None
    if done is not None:
        if not options.resume:
            raise TunecError(f"{rd}: stage `{sp.name}` is already trained; --resume skips finished stages, "
                             "--force trains it again (replacing its results)")
        if done.fingerprint != fp:
            raise TunecError(f"{rd}: stage `{sp.name}` was trained on another build or settings; "
                             "--force trains it again")
        return "skip", None
    if ckpt is not None:
        if not options.resume:
            step = checkpoint.read_state(ckpt)["step"]
            raise TunecError(f"{rd}: stage `{sp.name}` has an interrupted run (checkpoint at step {step}); "
                             "--resume continues it, --force starts over")
        if checkpoint.read_state(ckpt).get("fingerprint") != fp:
            raise TunecError(f"{ckpt}: saved for another build or settings; --force starts the stage over")
        return "resume", ckpt
    return "fresh", None


def _prepare_model(out: Path, plan: Plan, sp: StagePlan, resuming: bool, dist: distmod.Dist,
                   device: torch.device):
    """The model to train, on ``device``: ``(model, attn, base)``; ``base`` says where a LoRA
    stage's base weights live (saved to ``runs/<stage>/base`` first when they live nowhere else)."""
    spec, lora = sp.settings.model, sp.settings.peft if isinstance(sp.settings.peft, LoraPeft) else None
    attn, continued = models.attention_for(device), False
    if isinstance(spec, StageModel):
        model, attn, base, continued = outputs.start_from_stage(out, spec, sp.name, lora is not None, attn)
    else:
        model, attn = models.load_spec(spec, plan.seed, attn)
        base = None if isinstance(spec, ConfigModel) else spec  # a config-built base exists nowhere on disk
    models.check_vocab(model, plan.tokenizer.vocab_size)
    models.set_special_tokens(model, plan.tokenizer.bos_id, plan.tokenizer.eos_id, plan.tokenizer.pad_id)
    if lora and base is None:
        folder = outputs.run_dir(out, sp.name) / "base"
        if resuming:  # the very weights the checkpointed adapter was trained on
            model, attn = models.load_pretrained(str(folder), attn, what="saved base model")
        elif dist.is_main:
            outputs.save_base(out, sp.name, model)
        base = outputs.LocalModel(kind="local", path=outputs.relative(out, folder))
    if lora and not continued:
        model = models.add_lora(model, lora, plan.seed)
    elif not lora:
        model.requires_grad_(True)  # weights that come out of a peft merge are frozen
    return model.to(device).train(), attn, base


def run_stage(out: Path, plan: Plan, sp: StagePlan, data: ShardSet, evals: dict[str, ShardSet],
              options: RunOptions, dist: distmod.Dist, device: torch.device) -> outputs.StageResult:
    started = time.perf_counter()
    stage, rd = sp.settings, outputs.run_dir(out, sp.name)
    fp = fingerprint(out, plan, sp)
    action, ckpt = _decide(out, sp, fp, options)
    dist.barrier()  # every rank has decided before rank 0 changes anything
    if action == "skip":
        if dist.is_main:
            print(f"stage {sp.name}: already trained ({rd / outputs.RESULT}), skipped", flush=True)
        return outputs.read_result(out, sp.name)
    if action == "fresh" and dist.is_main and rd.exists():
        shutil.rmtree(rd)
    dist.barrier()

    lora = stage.peft if isinstance(stage.peft, LoraPeft) else None
    model, attn, base = _prepare_model(out, plan, sp, action == "resume", dist, device)

    batching = plan_batching(data.rows, data.seq_len, stage.batch_tokens, stage.micro_batch_rows,
                             stage.epochs, stage.max_steps, dist.world_size)
    module = models.PackedLM(model, attn)
    wrapped = module
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, stage, device)
    scheduler = make_scheduler(optimizer, stage.warmup_steps, batching.total_steps)
    loop = Loop(wrapped, params, optimizer, scheduler, data, RowStream(plan.seed, data.rows), batching, stage,
                dist, device, plan.tokenizer.pad_id)
    if os.environ.get("TUNEC_TRACE_ROWS"):  # see runtime/README.md, "Debugging"
        loop.trace = rd / "trace"
        loop.trace.mkdir(parents=True, exist_ok=True)

    progress = Progress()
    torch.manual_seed(plan.seed * 1000 + plan.stages.index(sp) * 100 + dist.rank)  # dropout; restored on resume
    if ckpt is not None:
        state = checkpoint.load(ckpt, model, optimizer, scheduler, dist)
        progress = Progress(state["step"], state["tokens"], state["trained_tokens"])
    log = MetricsLog(rd, dist.is_main, progress.step if ckpt else None, batching.total_steps, progress.step,
                     sp.name, options.progress)
    log.note(f"stage {sp.name}: {sum(p.numel() for p in params):,} trainable parameters, {batching.total_steps} "
             f"steps of {batching.rows_per_step} rows x {data.seq_len} tokens ({batching.micro_steps} micro-batch(es) "
             f"of <= {batching.micro_batch_rows} rows per rank, {dist.world_size} rank(s)), {device}, {attn}"
             + (f", resuming at step {progress.step}" if ckpt else ""))

    last = {"eval": {}}

    def run_eval(p: Progress) -> None:
        if not evals:
            return
        losses, counts = evaluate(module, evals, batching.micro_batch_rows, dist, device, loop.autocast)
        log.write({"step": p.step, "eval_loss": losses, "eval_tokens": counts})
        log.note(f"step {p.step}: eval loss " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        last["eval"] = losses

    def between_steps(p: Progress) -> None:
        at_end = p.step == batching.total_steps
        if at_end or (stage.eval_every_steps and p.step % stage.eval_every_steps == 0):
            run_eval(p)
        if at_end or (stage.checkpoint_every_steps and p.step % stage.checkpoint_every_steps == 0):
            checkpoint.save(rd / "checkpoints", p.step, model, optimizer, scheduler,
                            {"fingerprint": fp, "tokens": p.tokens, "trained_tokens": p.trained_tokens,
                             "world_size": dist.world_size, "rows_per_step": batching.rows_per_step}, dist)
        if options.on_step is not None:
            options.on_step(p.step)

    try:
        if progress.step >= batching.total_steps:  # resumed from the final checkpoint
            run_eval(progress)
        train(loop, progress, log, between_steps)
    except torch.OutOfMemoryError:
        raise TunecError(
            f"stage `{sp.name}`: out of GPU memory at step {progress.step + 1} with micro batches of "
            f"{batching.micro_batch_rows} rows x {data.seq_len} tokens; lower `micro_batch_rows` in the stage "
            f"(gradient accumulation keeps `batch_tokens` as it is), then `tunec run {out} --resume`") from None
    finally:
        log.close()

    paths = {}
    if dist.is_main:
        paths = outputs.save_model(out, sp.name, model, lora is not None, bool(lora and lora.save_merged), base,
                                   out / plan.tokenizer.path)
    result = outputs.StageResult(
        stage=sp.name, fingerprint=fp, kind="lora" if lora else "full", base=base if lora else None,
        steps=batching.total_steps, rows_per_step=batching.rows_per_step, tokens=progress.tokens,
        trained_tokens=progress.trained_tokens, train_loss=log.last_loss, eval_loss=last["eval"],
        wall_s=round(time.perf_counter() - started, 3), **paths)
    if dist.is_main:
        outputs.write_result(out, result)
        first = f"{log.first_loss[1]:.4f} (step {log.first_loss[0]}) -> " if log.first_loss else ""
        last_loss = f"{result.train_loss:.4f}" if result.train_loss is not None else "n/a"
        evals = f", eval loss {result.eval_loss['all']:.4f}" if "all" in result.eval_loss else ""
        print(f"stage {sp.name}: done in {result.wall_s:.1f}s, loss {first}{last_loss} (step {result.steps}){evals}; "
              f"model in {out / (result.model or result.merged or result.adapter)}", flush=True)
    dist.barrier()
    return result
