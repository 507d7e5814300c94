"""Preference objectives at run time: DPO (and IPO, hinge, robust), SimPO, ORPO and KTO.

The compiler packs the two documents of a pair into one row and marks every
token with its ``pair_ids`` and ``sides`` (0 chosen, 1 rejected; for KTO, 0
desirable, 1 undesirable). One packed forward pass, attention kept inside
each document, gives per-token log-probabilities; summing them per
``(row, pair, side)`` gives each document's log-likelihood of its response::

    labels     -  -  c0 c1 | -  -  r0 | pad         log p(c0) + log p(c1) -> logps[pair 7, chosen]
    pair_ids   7  7  7  7  | 7  7  7  | -1          log p(r0)             -> logps[pair 7, rejected]
    sides      0  0  0  0  | 1  1  1  | -1

The loss of a step is the mean over the step's pairs (all micro-batches, all
ranks) of each pair's loss; the number of pairs is known from the rows before
the forward passes, so, as for SFT (``runtime/loop.py``), every micro-batch's
summed loss is divided by it and a step gives the same gradient however it is
split into micro-batches and ranks.

Reference log-probabilities (DPO, KTO) are computed once, at the start of the
stage, with the starting weights (``reference: initial``; with LoRA, the base
model with the adapter disabled) or an earlier stage's model, for the train
rows and every eval set, and saved in ``runs/<stage>/reference.safetensors``:
the reference model never stays in memory and a resumed run reads them back.

Metrics are named as TRL names them: ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``
(and ``kl`` for KTO), means over the pairs since the previous record.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias, cast

import numpy as np
import torch
import torch.nn.functional as F

from tunec.compiler.errors import TunecError
from tunec.compiler.fileio import atomic_write_bytes
from tunec.compiler.recipe import (
    PREFERENCE_OBJECTIVES,
    DpoObjective,
    KtoObjective,
    OrpoObjective,
    SimpoObjective,
    Stage,
)

from .data import IGNORE, ShardSet, micro_batches, step_rows, trained_tokens
from .dist import Dist

REFERENCE_FILE = "reference.safetensors"
Objective: TypeAlias = DpoObjective | SimpoObjective | OrpoObjective | KtoObjective


def is_preference(stage: Stage) -> bool:
    return stage.objective.kind in PREFERENCE_OBJECTIVES


def needs_reference(objective: Any) -> bool:
    return isinstance(objective, (DpoObjective, KtoObjective))


# ----------------------------------------------------------------- per-document log-probs


def doc_sums(token_logps: torch.Tensor, labels: torch.Tensor, pair_ids: torch.Tensor,
             sides: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed log-probs of every document of a micro-batch: ``(pair, side, logps, tokens)``, one entry per
    document, ordered by row, then pair, then side (chosen before rejected).

    ``token_logps[b, t]`` is ``log p(labels[b, t] | tokens before t)``; only labelled positions count.
    The row is part of the key, so a row that appears twice in a step (at an epoch boundary) counts twice.
    """
    mask = labels != IGNORE
    b = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
    stride = 2 * (int(pair_ids.max().item()) + 1) if pair_ids.numel() else 2
    keys = (b * stride + pair_ids * 2 + sides)[mask]
    uniq, inverse = torch.unique(keys, return_inverse=True)
    logps = torch.zeros(len(uniq), dtype=torch.float32, device=labels.device).index_add(
        0, inverse, token_logps[mask].float())
    tokens = torch.bincount(inverse, minlength=len(uniq))
    within = uniq % stride
    return within // 2, within % 2, logps, tokens


def join_pairs(pair: torch.Tensor, side: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen, rejected)`` values of each pair from :func:`doc_sums` order (chosen right before rejected)."""
    if len(pair) % 2 or not (bool((side[0::2] == 0).all()) and bool((side[1::2] == 1).all())
                             and bool((pair[0::2] == pair[1::2]).all())):
        raise TunecError("a micro-batch holds half a pair: the shards break the pair layout; compile the recipe again")
    return values[0::2], values[1::2]


class PreferenceLM(torch.nn.Module):
    """The model's packed forward, returning per-document summed log-probs (one module, so DDP can wrap it)."""

    def __init__(self, model, attn: str):
        super().__init__()
        self.model = model
        self.attn = attn

    def forward(self, input_ids, position_ids, labels, pair_ids, sides):
        from .loss import OutputHead, token_logprobs
        from .model import packed_hidden

        hidden = packed_hidden(self.model, input_ids, position_ids, self.attn)
        return doc_sums(token_logprobs(OutputHead.of(self.model), hidden, labels), labels, pair_ids, sides)


# ----------------------------------------------------------------- losses


def pair_losses(objective: Objective, chosen: torch.Tensor, rejected: torch.Tensor, n_chosen: torch.Tensor,
                n_rejected: torch.Tensor, ref_chosen: torch.Tensor | None = None,
                ref_rejected: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses and metrics of a paired objective from summed log-probs and response token counts.

    ``chosen``/``rejected``: the policy's summed log-probs of each response (with gradients);
    ``ref_*``: the reference model's (DPO only). Length-normalised objectives (SimPO, ORPO, DPO's
    ``ipo`` loss) divide by the token counts, as TRL does.
    """
    avg_c, avg_r = chosen / n_chosen, rejected / n_rejected
    if isinstance(objective, DpoObjective):
        assert ref_chosen is not None and ref_rejected is not None, "DPO needs reference log-probs"
        pc, pr, rc, rr = chosen, rejected, ref_chosen, ref_rejected
        beta, ls = objective.beta, objective.label_smoothing
        logits = (pc - pr) - (rc - rr)
        if objective.loss == "ipo":  # per-token log-ratios (as TRL, with the IPO authors); rewards stay summed
            logits = (pc - rc) / n_chosen - (pr - rr) / n_rejected
        if objective.loss == "sigmoid":
            losses = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
        elif objective.loss == "robust":
            losses = (-F.logsigmoid(beta * logits) * (1 - ls) + F.logsigmoid(-beta * logits) * ls) / (1 - 2 * ls)
        elif objective.loss == "hinge":
            losses = torch.relu(1 - beta * logits)
        else:  # ipo
            losses = (logits - 1 / (2 * beta)) ** 2
        reward_c, reward_r = beta * (pc - rc).detach(), beta * (pr - rr).detach()
        if objective.sft_weight:
            losses = losses - objective.sft_weight * avg_c
        shown_c, shown_r = pc, pr
    elif isinstance(objective, SimpoObjective):
        beta, ls = objective.beta, objective.label_smoothing
        logits = beta * (avg_c - avg_r) - objective.gamma
        losses = -F.logsigmoid(logits) * (1 - ls) - F.logsigmoid(-logits) * ls
        if objective.sft_weight:
            losses = losses - objective.sft_weight * avg_c
        reward_c, reward_r = beta * avg_c.detach(), beta * avg_r.detach()
        shown_c, shown_r = avg_c, avg_r
    elif isinstance(objective, OrpoObjective):
        # log(1 - p) of a mean log-prob, as log(-expm1(x)): exact where p is close to 1
        log_odds = (avg_c - avg_r) - (torch.log(-torch.expm1(avg_c)) - torch.log(-torch.expm1(avg_r)))
        ratio = F.logsigmoid(log_odds)
        losses = -avg_c - objective.beta * ratio
        reward_c, reward_r = objective.beta * avg_c.detach(), objective.beta * avg_r.detach()
        shown_c, shown_r = avg_c, avg_r
    else:
        raise TypeError(f"not a paired objective: {objective!r}")
    metrics = {
        "rewards/chosen": reward_c, "rewards/rejected": reward_r,
        "rewards/accuracies": (reward_c > reward_r).float(), "rewards/margins": reward_c - reward_r,
        "logps/chosen": shown_c.detach(), "logps/rejected": shown_r.detach(),
    }
    return losses, metrics


def kto_losses(objective: KtoObjective, logps: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor,
               kl: torch.Tensor) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per-example KTO losses and metrics (each metric: values and the mask of examples it averages over).

    ``kl`` is the reference point z0, detached: ``max(0, mean(logps - ref))`` over the step's examples
    (TRL estimates it on mismatched prompt/completion pairs; here the step's own examples give it).
    """
    ratio = logps - ref
    beta = objective.beta
    losses = torch.where(desirable, objective.desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         objective.undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    rewards = beta * ratio.detach()
    return losses, {"rewards/chosen": (rewards, desirable), "rewards/rejected": (rewards, ~desirable),
                    "logps/chosen": (logps.detach(), desirable), "logps/rejected": (logps.detach(), ~desirable)}


# ----------------------------------------------------------------- whole sets (reference, eval)


def _tensors(arrays: dict[str, np.ndarray], part, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v[part]).to(device, non_blocking=True) for k, v in arrays.items()}


@torch.no_grad()
def set_logps(module: PreferenceLM, data: ShardSet, micro_batch_rows: int, dist: Dist, device: torch.device,
              autocast: Callable[[], Any]) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probs and token counts of every document of a set, indexed ``2 * pair + side``
    (float64, int64); the ranks split the rows and the sums are all-reduced."""
    size = 2 * data.pairs()
    logps, tokens = np.zeros(size), np.zeros(size, np.int64)
    mine = np.arange(dist.rank, len(data), dist.world_size)
    was_training = module.training
    module.eval()
    try:
        for rows in micro_batches(mine, micro_batch_rows):
            t = _tensors(data.gather(rows), slice(None), device)
            with autocast():
                pair, side, lp, n = module(t["input_ids"], t["position_ids"], t["labels"], t["pair_ids"], t["sides"])
            keys = (2 * pair + side).cpu().numpy()
            logps[keys] += lp.double().cpu().numpy()
            tokens[keys] += n.cpu().numpy()
    finally:
        module.train(was_training)
    if dist.active:
        logps = np.asarray(dist.sum(logps.tolist(), device))
        tokens = np.asarray(dist.sum(tokens.tolist(), device)).astype(np.int64)
    return logps, tokens


def set_metrics(objective: Objective, logps: np.ndarray, tokens: np.ndarray,
                ref: np.ndarray | None) -> dict[str, float]:
    """Loss and metrics over a whole set (eval): means over its pairs (KTO: its examples)."""
    present = tokens > 0
    lp, n = torch.from_numpy(logps), torch.from_numpy(tokens).double()
    rf = torch.from_numpy(ref) if ref is not None else None
    if isinstance(objective, KtoObjective):
        assert rf is not None, "KTO needs reference log-probs"
        idx = torch.from_numpy(np.flatnonzero(present))
        desirable = idx % 2 == 0
        kl = torch.clamp((lp[idx] - rf[idx]).mean(), min=0) if len(idx) else torch.zeros((), dtype=torch.float64)
        losses, masked = kto_losses(objective, lp[idx], rf[idx], desirable, kl)
        out = {"loss": float(losses.mean()) if len(idx) else 0.0, "kl": float(kl), "examples": float(len(idx))}
        for name, (values, mask) in masked.items():
            out[name] = float(values[mask].mean()) if bool(mask.any()) else 0.0
        return out
    pairs = np.flatnonzero(present[0::2] & present[1::2])
    c, r = torch.from_numpy(2 * pairs), torch.from_numpy(2 * pairs + 1)
    losses, mets = pair_losses(objective, lp[c], lp[r], n[c], n[r], None if rf is None else rf[c],
                               None if rf is None else rf[r])
    out = {"loss": float(losses.mean()) if len(pairs) else 0.0, "pairs": float(len(pairs))}
    out.update({k: float(v.mean()) if len(pairs) else 0.0 for k, v in mets.items()})
    return out


# ----------------------------------------------------------------- the stage


@dataclass
class PreferenceRun:
    """What a preference stage's loop needs besides the SFT loop's state: the objective and reference log-probs."""

    objective: Objective
    module: PreferenceLM  # unwrapped (eval, reference)
    reference: dict[str, np.ndarray] = field(default_factory=dict)  # "train", "eval/<task>" -> [2 * pairs]

    def ref(self, name: str, pair: torch.Tensor, side: torch.Tensor) -> torch.Tensor | None:
        if not needs_reference(self.objective):
            return None
        keys = (2 * pair + side).cpu().numpy()
        return torch.from_numpy(self.reference[name][keys]).to(pair.device, torch.float32)

    def losses(self, name: str, pair, side, logps, tokens, kl=None) -> tuple[torch.Tensor, dict[str, tuple]]:
        """Per-example losses of a micro-batch's documents, and metric (values, mask) pairs."""
        ref = self.ref(name, pair, side)
        if isinstance(self.objective, KtoObjective):
            assert ref is not None and kl is not None
            return kto_losses(self.objective, logps, ref, side == 0, kl)
        c_ref, r_ref = join_pairs(pair, side, ref) if ref is not None else (None, None)
        chosen, rejected = join_pairs(pair, side, logps)
        n_c, n_r = join_pairs(pair, side, tokens.to(logps.dtype))
        losses, mets = pair_losses(self.objective, chosen, rejected, n_c, n_r, c_ref, r_ref)
        every = torch.ones_like(losses, dtype=torch.bool)
        return losses, {k: (v, every) for k, v in mets.items()}

    def step(self, loop, progress) -> None:
        """One optimizer step of ``loop`` (a :class:`tunec.runtime.loop.Loop`) with this objective."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        from .loop import real_tokens

        rows = step_rows(loop.stream, loop.batching, progress.step, loop.dist.rank)
        batch = loop.data.gather(rows)
        if loop.trace is not None:
            with (loop.trace / f"rank-{loop.dist.rank}.txt").open("a") as fh:
                fh.write(f"{progress.step} " + " ".join(map(str, rows.tolist())) + "\n")
        local = [_examples(batch), trained_tokens(batch["labels"]),
                 real_tokens(batch["input_ids"], batch["labels"], loop.pad_id)]
        n_examples, n_trained, n_tokens = loop.dist.sum(local, loop.device)
        scale = loop.dist.world_size / max(n_examples, 1.0)
        parts = micro_batches(np.arange(len(rows)), loop.batching.micro_batch_rows)
        kl = self._kl(loop, batch, parts) if isinstance(self.objective, KtoObjective) else None
        total = torch.zeros((), dtype=torch.float64, device=loop.device)
        sums = {name: torch.zeros(2, dtype=torch.float64, device=loop.device) for name in METRIC_NAMES}
        for i, part in enumerate(parts):
            t = _tensors(batch, part, loop.device)
            last = i == len(parts) - 1
            sync = nullcontext() if last or not loop.dist.active else cast(DDP, loop.module).no_sync()
            with sync:
                with loop.autocast():
                    pair, side, logps, tokens = loop.module(t["input_ids"], t["position_ids"], t["labels"],
                                                            t["pair_ids"], t["sides"])
                losses, mets = self.losses("train", pair, side, logps, tokens, kl)
                summed = losses.sum()
                scaled = summed * scale
                (scaled if loop.scaler is None else loop.scaler.scale(scaled)).backward()
            total += summed.detach().double()
            for name, (values, mask) in mets.items():
                sums[name] += torch.stack([values[mask].double().sum(), mask.double().sum()])
        if loop.scaler is not None:
            loop.scaler.unscale_(loop.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(loop.params, loop.stage.max_grad_norm)
        if loop.scaler is not None:
            loop.scaler.step(loop.optimizer)
            loop.scaler.update()
        else:
            loop.optimizer.step()
        loop.scheduler.step()
        loop.optimizer.zero_grad(set_to_none=True)

        names = sorted(sums)
        reduced = loop.dist.sum([total.item()] + [v for n in names for v in sums[n].tolist()]
                                + ([float(kl)] if kl is not None else []), loop.device)
        progress.step += 1
        progress.tokens += int(n_tokens)
        progress.trained_tokens += int(n_trained)
        w = progress.window
        w["loss"] += reduced[0]
        w["trained"] += int(n_examples)  # the record's loss is a mean over pairs (KTO: examples)
        w["tokens"] += int(n_tokens)
        w["grad_norm"] = float(grad_norm)
        pref = w.setdefault("preference", {})
        for k, n in enumerate(names):
            s, c = pref.get(n, [0.0, 0.0])
            pref[n] = [s + reduced[1 + 2 * k], c + reduced[2 + 2 * k]]
        if kl is not None:
            pref["kl"] = [reduced[-1] / loop.dist.world_size, 1.0]  # every rank used the same kl

    def _kl(self, loop, batch: dict[str, np.ndarray], parts) -> torch.Tensor:
        """KTO's reference point for this step: ``max(0, mean(policy - reference))`` over the step's
        examples on every rank, from a pass without gradients."""
        assert isinstance(self.objective, KtoObjective)
        total, count = 0.0, 0.0
        with torch.no_grad():
            for part in parts:
                t = _tensors(batch, part, loop.device)
                with loop.autocast():
                    pair, side, logps, _ = self.module(t["input_ids"], t["position_ids"], t["labels"],
                                                       t["pair_ids"], t["sides"])
                ref = self.ref("train", pair, side)
                assert ref is not None
                total += float((logps - ref).double().sum())
                count += len(logps)
        total, count = loop.dist.sum([total, count], loop.device)
        return torch.tensor(max(total / max(count, 1.0), 0.0), device=loop.device)

    def record(self, window: dict) -> dict[str, float]:
        """The metrics of a training record, from the window's sums."""
        return {name: s / c for name, (s, c) in sorted(window.get("preference", {}).items()) if c}

    def evaluate(self, evals: dict[str, ShardSet], micro_batch_rows: int, dist: Dist, device: torch.device,
                 autocast) -> tuple[dict[str, float], dict[str, int], dict[str, dict[str, float]]]:
        """``(losses, pairs, metrics)`` per eval task and ``all``: the record ``run_eval`` writes."""
        losses: dict[str, float] = {}
        counts: dict[str, int] = {}
        metrics: dict[str, dict[str, float]] = {}
        every: dict[str, list[np.ndarray]] = {"logps": [], "tokens": [], "ref": []}
        for task, data in evals.items():
            logps, tokens = set_logps(self.module, data, micro_batch_rows, dist, device, autocast)
            ref = self.reference.get(f"eval/{task}") if needs_reference(self.objective) else None
            found = set_metrics(self.objective, logps, tokens, ref)
            losses[task] = found.pop("loss")
            counts[task] = int(found.pop("pairs", found.pop("examples", 0)))
            for name, value in found.items():
                metrics.setdefault(f"eval_{name}", {})[task] = value
            every["logps"].append(logps)
            every["tokens"].append(tokens)
            every["ref"].append(ref if ref is not None else np.zeros(0))
        if evals:
            ref_all = np.concatenate(every["ref"]) if needs_reference(self.objective) else None
            found = set_metrics(self.objective, np.concatenate(every["logps"]), np.concatenate(every["tokens"]),
                                ref_all)
            losses["all"] = found.pop("loss")
            found.pop("pairs", found.pop("examples", None))
            for name, value in found.items():
                metrics.setdefault(f"eval_{name}", {})["all"] = value
        return losses, counts, metrics


METRIC_NAMES = ("logps/chosen", "logps/rejected", "rewards/accuracies", "rewards/chosen", "rewards/margins",
                "rewards/rejected")


def _examples(batch: dict[str, np.ndarray]) -> int:
    """Pairs (KTO: examples) in a batch's rows, each row counted on its own."""
    n = 0
    for pair, labels in zip(batch["pair_ids"], batch["labels"]):
        n += len(np.unique(pair[labels != IGNORE]))
    return n


# ----------------------------------------------------------------- setting a stage up


def wrap(stage: Stage, module: Any) -> torch.nn.Module:
    """The module a preference stage trains through (a :class:`PreferenceLM` over the same model),
    or ``module`` unchanged for the other objectives."""
    if not is_preference(stage):
        return module
    return PreferenceLM(module.model, module.attn)  # a PackedLM's model and attention back end


def setup(out: Path, stage_name: str, stage: Stage, module: torch.nn.Module, data: ShardSet,
          evals: dict[str, ShardSet], dist: Dist, device: torch.device, fingerprint: str, resuming: bool,
          autocast, log) -> PreferenceRun | None:
    """A preference stage's state: reference log-probs computed now (a fresh run) or read back (a resume)."""
    if not is_preference(stage):
        return None
    if not data.paired or any(not e.paired for e in evals.values()):
        raise TunecError(f"stage `{stage_name}`: objective `{stage.objective.kind}` needs shards with preference "
                         "pairs (format version 2); compile the recipe again")
    assert isinstance(module, PreferenceLM)
    objective = cast(Objective, stage.objective)
    run = PreferenceRun(objective, module)
    if not isinstance(objective, (DpoObjective, KtoObjective)):  # no reference model
        return run
    from .outputs import run_dir

    path = run_dir(out, stage_name) / REFERENCE_FILE
    if resuming:
        run.reference = _read_reference(path, fingerprint)
        return run
    log.note(f"stage {stage_name}: reference log-probs ({objective.reference}) of {data.rows} train rows and "
             f"{sum(e.rows for e in evals.values())} eval rows")
    sets = {"train": data, **{f"eval/{t}": e for t, e in evals.items()}}
    rows = stage.micro_batch_rows
    if not isinstance(rows, int):  # runtime/run.py resolves `auto` before this
        raise TunecError(f"stage `{stage_name}`: micro_batch_rows must be resolved before the reference pass")
    if objective.reference == "initial":
        model = module.model
        off = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()  # LoRA: the base
        with off:
            run.reference = {k: set_logps(module, v, rows, dist, device, autocast)[0] for k, v in sets.items()}
    else:
        from .outputs import load_for_inference

        other = load_for_inference(out, objective.reference, module.attn).to(device)
        ref_module = PreferenceLM(other, module.attn)
        run.reference = {k: set_logps(ref_module, v, rows, dist, device, autocast)[0] for k, v in sets.items()}
        del ref_module, other
    if dist.is_main:
        _write_reference(path, run.reference, fingerprint)
    dist.barrier()
    return run


def _write_reference(path: Path, arrays: dict[str, np.ndarray], fingerprint: str) -> None:
    from safetensors.numpy import save

    blob = save({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()},
                metadata={"tunec": json.dumps({"format": "tunec.reference", "fingerprint": fingerprint})})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, blob)


def _read_reference(path: Path, fingerprint: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = json.loads((fh.metadata() or {}).get("tunec", "{}"))
            arrays = {k: fh.get_tensor(k) for k in fh.keys()}
    except (FileNotFoundError, SafetensorError, ValueError, OSError) as exc:
        raise TunecError(f"{path}: the reference log-probs of the interrupted run cannot be read ({exc}); "
                         "--force starts the stage over") from None
    if meta.get("fingerprint") != fingerprint:
        raise TunecError(f"{path}: reference log-probs of another build or settings; --force starts the stage over")
    return arrays
