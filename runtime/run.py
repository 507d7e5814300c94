"""``tunec run OUT``: check the build, then train its stages in order.

For each stage: decide what its run folder allows (start, resume, skip, or
refuse), load the model (from a config, a folder, the hub, or an earlier
stage), add LoRA when asked, train (:mod:`tunec.runtime.loop`), evaluate
(:mod:`tunec.runtime.evaluate`), checkpoint (:mod:`tunec.runtime.checkpoint`), and save
the final model (:mod:`tunec.runtime.outputs`) with ``result.json`` last.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from tunec.compiler.errors import TunecError, did_you_mean
from tunec.compiler.fileio import atomic_write_text
from tunec.compiler.lock import BuildLock
from tunec.compiler.plan import Plan, StagePlan, read_plan
from tunec.compiler.recipe import ConfigModel, FsdpParallelism, LoraPeft, QLoraPeft, Stage, StageModel
from tunec.compiler.schema_errors import collapse_unions
from tunec.compiler.yamlpos import load_yaml_text

from . import accuracy, checkpoint, eval_auto, fsdp, kernels, loggers, memory, outputs, preference
from . import dist as distmod
from . import model as models
from .data import RowStream, ShardSet, plan_batching
from .evaluate import evaluate
from .log import METRICS, MetricsLog
from .loop import Loop, Progress, make_optimizer, make_scheduler, train

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    stage: str | None = None  # only this stage
    resume: bool = False  # continue from checkpoints, skip completed stages
    force: bool = False  # discard previous results of the stages run
    device: str = "auto"  # auto | cpu | cuda
    verify: bool = False  # sha256 of every shard, not only sizes and headers
    progress: bool = True  # a progress bar on rank 0
    on_step: Callable[[int], None] | None = None  # called after every optimizer step (tests interrupt runs with it)
    max_steps: int | None = None  # --max-steps: at most this many steps in every stage run
    overrides: tuple[str, ...] = ()  # --set [stages.NAME.]SETTING=VALUE, training settings only
    log: tuple[str, ...] = ()  # --log: experiment trackers, besides TUNEC_LOG (runtime/loggers.py)
    eval_accuracy: bool | None = None  # accuracy after each stage: True/False force it on/off, None: the recipe's


# What `--set` may change: how a stage trains, not what it trains on (the compiled shards fix that).
TRAINING_SETTINGS = ("lr", "batch_tokens", "epochs", "max_steps", "warmup_steps", "weight_decay", "max_grad_norm",
                     "micro_batch_rows", "eval_every_steps", "checkpoint_every_steps", "log_every_steps",
                     "chunked_loss", "activation_checkpointing", "compile")


def fingerprint(out: Path, plan: Plan, sp: StagePlan, max_steps: int | None = None) -> str:
    """What a stage's results depend on: its settings (``--set`` applied), its data, the seed, the stage it
    starts from, and ``--max-steps`` when given."""
    upstream = None
    if isinstance(sp.settings.model, StageModel):
        prev = outputs.read_result(out, sp.settings.model.stage)
        upstream = prev.fingerprint if prev else None
    # `eval` says what is measured after training, not how it trains (and stages trained before it existed match)
    # memory settings (runtime/memory.py) change how much a step needs, not what it computes: a run stopped by
    # an out-of-memory error resumes with them changed
    data = {"settings": sp.settings.model_dump(mode="json", exclude={"eval", *memory.MEMORY_SETTINGS}),
            "train": [s.sha256 for s in sp.train.shards],
            "seed": plan.seed, "tokenizer": plan.tokenizer.sha256, "upstream": upstream}
    if max_steps is not None:  # absent otherwise, so runs without the option keep their fingerprints
        data["max_steps_cap"] = max_steps
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _value(text: str, item: str) -> Any:
    """A ``--set`` value, read as YAML like the recipe and ``tunec compile --set`` (``1e-4``, ``3``, ``null``)."""
    return load_yaml_text(text, f"--set {item}")[0]


def apply_overrides(plan: Plan, stages: list[StagePlan], overrides: tuple[str, ...],
                    only: str | None) -> tuple[list[StagePlan], dict[str, dict[str, Any]]]:
    """The stages with ``--set`` applied, validated by the recipe's own ``Stage`` model, and per stage the
    settings changed; every bad override is reported at once, each naming itself."""
    problems: list[str] = []
    wanted: dict[str, dict[str, tuple[str, Any]]] = {}
    running = [sp.name for sp in stages]
    names = [s.name for s in plan.stages]
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if sep and key.startswith("stages.") and key.count(".") >= 2:
            stage, _, setting = key[len("stages."):].rpartition(".")  # stage names may hold dots
            if stage not in names and stage.isdigit() and int(stage) < len(names):
                stage = names[int(stage)]  # by index, as `tunec compile --set stages.0.lr=...` says it
        elif sep and key and "." not in key and only is not None:
            stage, setting = only, key
        elif sep and key and "." not in key:
            problems.append(f"--set {item}: which stage? write stages.STAGE.{key}=VALUE, or add --stage STAGE")
            continue
        else:
            problems.append(f"--set {item}: expected SETTING=VALUE (with --stage) or stages.STAGE.SETTING=VALUE")
            continue
        if stage not in names:
            problems.append(f"--set {item}: no stage '{stage}' in the plan{did_you_mean(stage, names)}")
        elif stage not in running:
            problems.append(f"--set {item}: stage `{stage}` is not run by this command (--stage {only})")
        elif setting not in TRAINING_SETTINGS:
            if setting in Stage.model_fields:
                problems.append(f"--set {item}: `{setting}` is fixed by the compiled build; change it in the recipe "
                                "and compile again (at run time only these can be set: "
                                f"{', '.join(TRAINING_SETTINGS)})")
            else:
                problems.append(f"--set {item}: stages have no setting `{setting}`"
                                f"{did_you_mean(setting, TRAINING_SETTINGS)}")
        else:
            try:
                wanted.setdefault(stage, {})[setting] = (item, _value(text, item))
            except TunecError as exc:
                problems.extend(str(p) for p in exc.problems)
    out, changed = [], {}
    for sp in stages:
        if sp.name not in wanted:
            out.append(sp)
            continue
        data = sp.settings.model_dump(mode="json")
        data.update({k: v for k, (_, v) in wanted[sp.name].items()})
        try:
            settings = Stage.model_validate(data)
        except ValidationError as exc:
            found = []
            # `micro_batch_rows=0`: one message, not one per type
            for err in collapse_unions([dict(e) for e in exc.errors()], data):
                field = str(err["loc"][0]) if err["loc"] else ""
                item = wanted[sp.name][field][0] if field in wanted[sp.name] else f"stages.{sp.name}"
                found.append((overrides.index(item) if item in overrides else len(overrides), item, err["msg"]))
            problems.extend(f"--set {item}: {msg}" for _, item, msg in sorted(found))  # in the order given
            continue
        out.append(sp.model_copy(update={"settings": settings}))
        changed[sp.name] = {k: getattr(settings, k) for k in wanted[sp.name]}
    if problems:
        raise TunecError(problems)
    return out, changed


def run(out: str | Path, options: RunOptions = RunOptions()) -> list[outputs.StageResult]:
    out = Path(out)
    dist = distmod.from_env()
    device = models.pick_device(options.device, dist.local_rank)
    distmod.init(dist, device)
    try:
        with _hold(out, dist, device):
            return _run(out, options, dist, device)
    finally:
        gc.collect()  # sharded modules (and the communication work they hold) go before their process group
        fsdp.release()  # the one-process group of an FSDP stage, when one stopped early
        distmod.shutdown(dist)


@contextmanager
def _hold(out: Path, dist: distmod.Dist, device: torch.device) -> Iterator[None]:
    """The build folder's lock (:mod:`tunec.compiler.lock`), held by rank 0 for the whole job; every rank
    learns whether rank 0 got it, so that none of them trains on a folder someone else is using."""
    held, refused = None, None
    if dist.is_main and out.is_dir():  # a missing folder is read_plan's error to report
        try:
            held = BuildLock(out, "run").acquire()
        except TunecError as exc:
            refused = exc
    (failed,) = dist.sum([1.0 if refused else 0.0], device)
    if refused is not None:
        raise refused
    if failed:
        raise TunecError(f"{out}: rank 0 could not lock the build folder (its message says why)")
    try:
        yield
    finally:
        if held is not None:
            held.release()


def _run(out: Path, options: RunOptions, dist: distmod.Dist, device: torch.device) -> list[outputs.StageResult]:
    plan = read_plan(out)
    loggers.requested(options.log)  # a tracker asked for but not installed: stop before any training
    stages = [plan.stage(options.stage)] if options.stage else list(plan.stages)
    stages, changed = apply_overrides(plan, stages, options.overrides, options.stage)
    tokenizer_dir = out / plan.tokenizer.path
    if not (tokenizer_dir / "tokenizer.json").is_file() and not (tokenizer_dir / "tokenizer_config.json").is_file():
        raise TunecError(f"{tokenizer_dir}: the build's tokenizer is missing; compile the recipe again")
    # Every shard of every stage to run is checked before any training starts.
    vocab = plan.tokenizer.vocab_size
    data = {sp.name: (ShardSet(out, sp.train, options.verify, vocab),
                      {t: ShardSet(out, ev.data, options.verify, vocab) for t, ev in sp.eval.items() if ev.data.rows})
            for sp in stages}
    run_options = {sp.name: _run_options(changed.get(sp.name, {}), options.max_steps) for sp in stages}
    if options.eval_accuracy is True and dist.is_main and not any(accuracy.has_choices(sp) for sp in stages):
        logger.warning("--eval-accuracy: no stage run has an eval set with answer choices; nothing will be scored")
    results = []
    for sp in stages:
        results.append(run_stage(out, plan, sp, *data[sp.name], options, dist, device, run_options[sp.name]))
        # accuracy from the saved model, as `tunec eval` scores it, with the lock this command holds
        eval_auto.after_stage(out, plan, sp, results[-1].fingerprint, device, dist, options.eval_accuracy)
    return results


def _run_options(changed: dict[str, Any], max_steps: int | None) -> dict[str, Any]:
    """What this command changed of a stage's plan, as results and checkpoints record it."""
    found: dict[str, Any] = {}
    if changed:
        found["set"] = dict(changed)
    if max_steps is not None:
        found["max_steps"] = max_steps
    return found


def _describe(run_options: dict[str, Any] | None) -> str:
    found = run_options or {}
    parts = [f"--set {k}={v}" for k, v in sorted(found.get("set", {}).items())]
    if found.get("max_steps") is not None:
        parts.append(f"--max-steps {found['max_steps']}")
    return " ".join(parts) or "no --set or --max-steps"


def _changed_how(saved: dict[str, Any] | None, now: dict[str, Any]) -> str:
    """Why a fingerprint differs, when run-time options explain it."""
    if (saved or {}) == now:
        return "another build or settings"
    return f"other run-time options ({_describe(saved)}; this command: {_describe(now)})"


def _decide(out: Path, sp: StagePlan, fp: str, options: RunOptions,
            run_options: dict[str, Any]) -> tuple[str, Path | None]:
    """``("skip" | "resume" | "fresh", checkpoint)`` for a stage's run folder, or a user error."""
    rd = outputs.run_dir(out, sp.name)
    done = outputs.read_result(out, sp.name)
    if options.force:
        return "fresh", None
    if done is not None:
        if not options.resume:
            raise TunecError(f"{rd}: stage `{sp.name}` is already trained; --resume skips finished stages, "
                             "--force trains it again (replacing its results)")
        if done.fingerprint != fp:
            raise TunecError(f"{rd}: stage `{sp.name}` was trained with {_changed_how(done.run_options, run_options)}"
                             "; --force trains it again")
        return "skip", None
    found = checkpoint.all_checkpoints(rd / "checkpoints")
    if not found:
        return "fresh", None
    if not options.resume:
        raise TunecError(f"{rd}: stage `{sp.name}` has an interrupted run (checkpoint {found[-1].name}); "
                         "--resume continues it, --force starts over")
    ckpt, warnings = checkpoint.usable(rd / "checkpoints")
    for w in warnings:
        logger.warning(w)
    if ckpt is None:
        logger.warning(f"stage `{sp.name}` has no usable checkpoint; starting it over")
        return "fresh", None
    state = checkpoint.read_state(ckpt)
    if state.get("fingerprint") != fp:
        raise TunecError(f"{ckpt}: saved for {_changed_how(state.get('run_options'), run_options)}; resume with "
                         "the options it was started with, or --force starts the stage over")
    return "resume", ckpt


def _remove_run(rd: Path) -> None:
    """Delete a stage's run folder for a fresh start. Renamed away first: a kill half-way through the
    deletion must not leave a ``result.json`` beside half a model, which would read as a finished stage."""
    gone = rd.with_name(f".{rd.name}.deleted")
    shutil.rmtree(gone, ignore_errors=True)  # left by a kill during an earlier deletion
    if rd.exists():
        os.replace(rd, gone)
        shutil.rmtree(gone, ignore_errors=True)


def _clean_leftovers(rd: Path) -> None:
    """What a killed run left behind: half-written temporary folders and files (``atomic_dir``'s
    ``.NAME.PID.tmp`` / ``.old``, ``.tmp-step-*`` checkpoints). Only the lock holder gets here."""
    if not rd.is_dir():
        return
    checkpoint.clean(rd / "checkpoints")
    for p in rd.iterdir():
        if p.name.startswith(".") and p.name.endswith((".tmp", ".old")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _rewind_lines(path: Path, keep: Callable[[str], bool]) -> None:
    """Keep the whole lines of an append-only log that ``keep`` accepts; a last line without its newline
    (cut by a kill) goes too. Rewritten atomically, so a kill now leaves the old file or the new one."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    if lines[-1]:
        logger.warning(f"{path}: dropped an incomplete last line (the run was killed while writing it)")
    lines = lines[:-1]  # the piece after the last newline: torn, or empty
    kept = [line for line in lines if line.strip() and keep(line)]
    if kept != lines or not text.endswith("\n") and text:
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def _rewind_metrics(path: Path, step: int) -> None:
    """``metrics.jsonl`` as it was at checkpoint ``step``: whole records of steps up to ``step``."""
    def keep(line: str) -> bool:
        try:
            record = json.loads(line)
        except ValueError:
            logger.warning(f"{path}: dropped a damaged line: {line[:60]!r}")
            return False
        return isinstance(record, dict) and record.get("step", 0) <= step
    _rewind_lines(path, keep)


def _prepare_model(out: Path, plan: Plan, sp: StagePlan, resuming: bool, dist: distmod.Dist,
                   device: torch.device):
    """The model to train, on ``device``: ``(model, attn, base)``; ``base`` says where a LoRA
    stage's base weights live (saved to ``runs/<stage>/base`` first when they live nowhere else)."""
    spec, lora = sp.settings.model, sp.settings.peft if isinstance(sp.settings.peft, LoraPeft) else None
    attn, continued = models.attention_for(device), False
    if isinstance(spec, StageModel):
        model, attn, base, continued = outputs.start_from_stage(out, spec, sp.name, lora is not None, attn)
    else:
        quantized = models.quantization(lora, device, sp.name) if isinstance(lora, QLoraPeft) else None
        model, attn = models.load_spec(spec, plan.seed, attn, quantized)
        base = None if isinstance(spec, ConfigModel) else spec  # a config-built base exists nowhere on disk
    models.check_vocab(model, plan.tokenizer.vocab_size)
    models.set_special_tokens(model, plan.tokenizer.bos_id, plan.tokenizer.eos_id, plan.tokenizer.pad_id,
                              outputs.end_of_turn(out, plan, sp),
                              keep_own=not isinstance(spec, ConfigModel) or "eos_token_id" in spec.config)
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
    if isinstance(lora, QLoraPeft):  # loaded onto its GPU already; a 4-bit model refuses .to()
        return model.train(), attn, base
    return model.to(device).train(), attn, base


def run_stage(out: Path, plan: Plan, sp: StagePlan, data: ShardSet, evals: dict[str, ShardSet],
              options: RunOptions, dist: distmod.Dist, device: torch.device,
              run_options: dict[str, Any] | None = None) -> outputs.StageResult:
    started = time.perf_counter()
    stage, rd = sp.settings, outputs.run_dir(out, sp.name)
    run_options = run_options if run_options is not None else _run_options({}, options.max_steps)
    fp = fingerprint(out, plan, sp, options.max_steps)
    # Rank 0 alone reads the folder and decides (a damaged checkpoint is warned about once); the others follow.
    decision: Any = None
    if dist.is_main:
        try:
            decision = _decide(out, sp, fp, options, run_options)
        except TunecError as exc:
            decision = exc
    decision = _broadcast(decision, dist)
    if isinstance(decision, TunecError):
        raise decision
    action, ckpt = decision
    if action == "skip":
        if dist.is_main:
            logger.info(f"stage {sp.name}: already trained ({rd / outputs.RESULT}), skipped")
        done = outputs.read_result(out, sp.name)
        if done is None:
            raise TunecError(f"{rd / outputs.RESULT}: removed while `tunec run` was starting; run it again")
        return done
    if action == "fresh" and dist.is_main:
        _remove_run(rd)
    if action == "resume" and dist.is_main:
        _clean_leftovers(rd)
    dist.barrier()

    lora = stage.peft if isinstance(stage.peft, LoraPeft) else None
    model, attn, base = _prepare_model(out, plan, sp, action == "resume", dist, device)

    auto_rows = not isinstance(stage.micro_batch_rows, int)  # `auto`: found below by trying; one row until then
    first_rows = stage.micro_batch_rows if isinstance(stage.micro_batch_rows, int) else 1
    batching = plan_batching(data.rows, data.seq_len, stage.batch_tokens, first_rows,
                             stage.epochs, stage.max_steps, dist.world_size)
    if options.max_steps is not None:
        batching = replace(batching, total_steps=min(batching.total_steps, options.max_steps))
    precision, memory_note = memory.prepare(model, stage.activation_checkpointing, lora is not None, device,
                                            batching.micro_batch_rows * data.seq_len)
    fused = kernels.compile_layers(model) if stage.compile else kernels.use_liger(model, device)
    if fused:
        memory_note += f", {fused}"
    # a preference objective (DPO, ...) trains through per-document log-probs: runtime/preference.py
    module = preference.wrap(stage, models.PackedLM(model, attn, chunked=stage.chunked_loss))
    wrapped: torch.nn.Module = module
    sharded = isinstance(stage.parallelism, FsdpParallelism)
    if isinstance(stage.parallelism, FsdpParallelism):  # in place: parameters become shards (runtime/fsdp.py)
        fsdp.shard(module, model, precision, device, stage.parallelism.reshard_after_forward)
    elif dist.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    if auto_rows:  # the plain forward of the same model, on this process alone; every rank then takes the least
        rows, note = memory.auto_micro_batch_rows(models.PackedLM(model, attn, chunked=stage.chunked_loss), params,
                                                  data, batching.rows_per_rank, device, precision)
        rows = dist.min(rows, device)
        if rows == 0:
            raise TunecError(f"stage `{sp.name}`: out of GPU memory with a micro-batch of one row of {data.seq_len} "
                             "tokens; turn `activation_checkpointing` on, use LoRA, or lower `seq_len`")
        batching = replace(batching, micro_batch_rows=rows)
        stage = stage.model_copy(update={"micro_batch_rows": rows})  # what the rest of the stage reads
        memory_note += f"; {note}"
    optimizer = make_optimizer(model, stage, device)
    scheduler = make_scheduler(optimizer, stage.warmup_steps, batching.total_steps)
    loop = Loop(wrapped, params, optimizer, scheduler, data, RowStream(plan.seed, data.rows), batching, stage,
                dist, device, plan.tokenizer.pad_id, precision=precision, scaler=precision.scaler(device))
    progress = Progress()
    index = [s.name for s in plan.stages].index(sp.name)
    torch.manual_seed(plan.seed * 1000 + index * 100 + dist.rank)  # dropout; restored on resume
    state: dict[str, Any] = {}
    if ckpt is not None:
        state = checkpoint.load(ckpt, model, optimizer, scheduler, dist, loop.scaler)
        if state.get("rows_per_step", batching.rows_per_step) != batching.rows_per_step:  # another process count
            raise TunecError(f"{ckpt}: saved by {state.get('world_size')} process(es) taking {state['rows_per_step']} "
                             f"rows per step; with {dist.world_size} a step takes {batching.rows_per_step}, so the "
                             "data order would differ; resume with a process count that divides the step's rows")
        progress = Progress(state["step"], state["tokens"], state["trained_tokens"])
        if "window" in state:  # the loss since the last record, so the next record reads as uninterrupted
            progress.window.update(state["window"])
        if dist.is_main:
            _rewind_metrics(rd / METRICS, progress.step)
    if os.environ.get("TUNEC_TRACE_ROWS"):  # see runtime/README.md, "Debugging"
        loop.trace = rd / "trace"
        loop.trace.mkdir(parents=True, exist_ok=True)
        _rewind_lines(loop.trace / f"rank-{dist.rank}.txt", lambda line: int(line.split()[0]) < progress.step)
    log = MetricsLog(rd, dist.is_main, progress.step if ckpt else None, batching.total_steps, progress.step,
                     sp.name, options.progress, loggers.requested(options.log), sp.settings.model_dump(mode="json"))
    if state.get("first_loss"):  # what this stage's earlier runs logged, for the result and the summary line
        log.first_loss = tuple(state["first_loss"])
    log.last_loss = state.get("last_loss")
    log.note(f"stage {sp.name}: {sum(p.numel() for p in params):,} trainable parameters, {batching.total_steps} "
             f"steps of {batching.rows_per_step} rows x {data.seq_len} tokens ({batching.micro_steps} micro-batch(es) "
             f"of <= {batching.micro_batch_rows} rows per rank, {dist.world_size} rank(s)), {device}, {attn}"
             + f"; {memory_note}, {'chunked' if stage.chunked_loss else 'full-logits'} loss"
             + (f", resuming at step {progress.step}" if ckpt else ""))
    loop.preference = preference.setup(out, sp.name, stage, module, data, evals, dist, device, fp, ckpt is not None,
                                       loop.autocast, log)

    last = {"eval": state.get("eval_loss", {}), "eval_step": state.get("eval_step")}

    def run_eval(p: Progress) -> None:
        if not evals:
            return
        extra: dict[str, Any] = {}
        if loop.preference is not None:  # per task: loss, rewards/accuracies, ... (counts: pairs)
            losses, counts, extra = loop.preference.evaluate(evals, batching.micro_batch_rows, dist, device,
                                                             loop.autocast)
        else:
            losses, counts = evaluate(module, evals, batching.micro_batch_rows, dist, device, loop.autocast,
                                      lockstep=sharded)
        log.write({"step": p.step, "eval_loss": losses, "eval_tokens": counts, **extra})
        log.note(f"step {p.step}: eval loss " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        if "eval_rewards/accuracies" in extra:
            log.note(f"step {p.step}: eval rewards/accuracies "
                     + ", ".join(f"{k} {v:.3f}" for k, v in extra["eval_rewards/accuracies"].items()))
        last["eval"], last["eval_step"] = losses, p.step

    def between_steps(p: Progress) -> None:
        at_end = p.step == batching.total_steps
        if at_end or (stage.eval_every_steps and p.step % stage.eval_every_steps == 0):
            run_eval(p)
        if at_end or (stage.checkpoint_every_steps and p.step % stage.checkpoint_every_steps == 0):
            window = {k: v for k, v in p.window.items() if k != "t0"}
            checkpoint.save(rd / "checkpoints", p.step, model, optimizer, scheduler,
                            {"fingerprint": fp, "tokens": p.tokens, "trained_tokens": p.trained_tokens,
                             "world_size": dist.world_size, "rows_per_step": batching.rows_per_step,
                             "run_options": run_options, "window": window, "first_loss": log.first_loss,
                             "last_loss": log.last_loss, "eval_loss": last["eval"], "eval_step": last["eval_step"]},
                            dist, loop.scaler)
        if options.on_step is not None:
            options.on_step(p.step)

    try:
        if progress.step >= batching.total_steps and last["eval_step"] != progress.step:
            run_eval(progress)  # resumed from a final checkpoint saved before evaluation existed in its state
        train(loop, progress, log, between_steps)
    except torch.OutOfMemoryError:
        raise TunecError(
            f"stage `{sp.name}`: out of GPU memory at step {progress.step + 1} with micro batches of "
            f"{batching.micro_batch_rows} rows x {data.seq_len} tokens; lower `micro_batch_rows` (gradient "
            f"accumulation keeps `batch_tokens` as it is) or turn `activation_checkpointing` on, and continue: "
            f"`tunec run {out} --resume --set stages.{sp.name}.micro_batch_rows=N`") from None
    finally:
        log.close()

    paths = {}
    saved = fsdp.gathered(module, model, dist) if sharded else model  # FSDP: every rank sends its shards
    if dist.is_main:
        paths = outputs.save_model(out, sp.name, saved, lora is not None, bool(lora and lora.save_merged), base,
                                   out / plan.tokenizer.path, models.save_dtype(device))
    result = outputs.StageResult(
        stage=sp.name, fingerprint=fp, kind="lora" if lora else "full", base=base if lora else None,
        steps=batching.total_steps, rows_per_step=batching.rows_per_step, tokens=progress.tokens,
        trained_tokens=progress.trained_tokens, train_loss=log.last_loss, eval_loss=last["eval"],
        run_options=run_options, wall_s=round(time.perf_counter() - started, 3), **paths)
    if dist.is_main:
        outputs.write_cards(out, plan, sp, result)
        outputs.write_result(out, result)
        first = f"{log.first_loss[1]:.4f} (step {log.first_loss[0]}) -> " if log.first_loss else ""
        last_loss = f"{result.train_loss:.4f}" if result.train_loss is not None else "n/a"
        eval_note = f", eval loss {result.eval_loss['all']:.4f}" if "all" in result.eval_loss else ""
        folder = result.model or result.merged or result.adapter
        assert folder is not None, "save_model returns the folder it saved"
        logger.info(f"stage {sp.name}: done in {result.wall_s:.1f}s, loss {first}{last_loss} (step {result.steps})"
                    f"{eval_note}; model in {out / folder}")
    dist.barrier()
    if sharded:
        fsdp.release()
    return result


def _broadcast(value: Any, dist: distmod.Dist) -> Any:
    """Rank 0's ``value`` on every rank (a small picklable object)."""
    if not dist.active:
        return value
    import torch.distributed as td

    box = [value]
    td.broadcast_object_list(box, src=0)
    return box[0]
