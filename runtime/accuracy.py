"""``tunec eval``: accuracy on the eval sets with answer choices, by rank classification.

Each record of a task's compiled ``choices.jsonl`` (docs/build-format.md) is
scored by the model's log-likelihood of every choice after the prompt: the text
``prompt + choice_prefix + choice`` is tokenized by the compiler's own encoder
(:func:`tunec.compiler.tokens.encode_texts`, special tokens as compiled, no EOS),
so the ids are those of the compiled document, and the choice's tokens are
those holding its characters (a token merged across the boundary counts as the
choice's, as training's mask counts it). One forward pass per prompt+choice::

    prompt  "Review: dull.\\nIs this review positive or negative?\\nAnswer:"
    choices [" negative", " positive"]  log-likelihoods [-0.41, -2.07]  -> predicted 0

``acc``: the choice with the highest summed log-likelihood is right;
``acc_norm``: the same with each log-likelihood divided by the choice's length
in characters (lm-evaluation-harness's definition). Ties go to the first
choice. ``chance`` is the mean of ``1 / len(choices)``; ``majority`` the share
of the most frequent right answer (by its text). Records whose target is not
among their choices (``answer: -1``) cannot be scored and are counted as
``skipped``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunec.compiler.errors import TunecError, did_you_mean
from tunec.compiler.fileio import atomic_write_json, atomic_write_text, sha256_text
from tunec.compiler.lock import BuildLock
from tunec.compiler.plan import Plan, StagePlan
from tunec.compiler.recipe import ConfigModel, HubModel, StageModel
from tunec.compiler.tokens import TokenizerInfo, encode_texts

from . import model as models
from . import outputs
from .dist import Dist

logger = logging.getLogger(__name__)

EVAL = "eval.json"
PREDICTIONS = "predictions"
GROUPS = ("trained", "held-out")
METRICS = ("chance", "majority", "acc", "acc_norm")


@dataclass(frozen=True)
class Scored:
    loglikelihoods: list[float]
    tokens: list[int]  # tokens scored per choice
    truncated: bool  # the text was longer than the build's seq_len and lost its first tokens


def stage_with_choices(plan: Plan, stage: str, tasks: tuple[str, ...]) -> tuple[StagePlan, list[str]]:
    """The stage's plan and the tasks to evaluate (all with choices when ``tasks`` is empty)."""
    sp = plan.stage(stage)
    with_choices = [t for t, ev in sp.eval.items() if ev.choices is not None]
    if not with_choices:
        raise TunecError(f"stage `{stage}` has no eval set with answer choices to score; give its tasks "
                         "`answer_choices:` and an `eval:` split (or `held_out:` tasks), then compile again")
    for t in tasks:
        if t not in with_choices:
            why = "has no answer choices in its eval set" if t in sp.eval else "is not evaluated by the stage"
            raise TunecError(f"--tasks {t}: task `{t}` {why}{did_you_mean(t, with_choices)}; "
                             f"tasks with choices: {', '.join(with_choices)}")
    return sp, list(dict.fromkeys(tasks)) or with_choices


def read_choices(out: Path, sp: StagePlan, task: str) -> list[dict]:
    """A task's ``choices.jsonl``, checked against the plan's hash."""
    entry = sp.eval[task].choices
    assert entry is not None, "stage_with_choices keeps tasks with choices only"
    path = Path(out) / entry.path
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TunecError(f"{path}: cannot read it ({exc}); compile the recipe again") from None
    if sha256_text(text) != entry.sha256:
        raise TunecError(f"{path}: changed since it was compiled (sha256 differs from plan.json); compile again")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@torch.no_grad()
def score(model, backend, info: TokenizerInfo, record: dict, chat: bool, seq_len: int,
          device: torch.device) -> Scored:
    """Log-likelihood of each of ``record``'s choices after its prompt (see the module docstring)."""
    prompt, prefix = record["prompt"], record.get("choice_prefix", "")
    texts = [prompt + prefix + c for c in record["choices"]]
    spans = [[(len(prompt), len(t))] for t in texts]
    encoded = encode_texts(backend, info, texts, spans, add_special=not chat, append_eos=False)
    lls, counts, truncated = [], [], False
    for choice, enc in zip(record["choices"], encoded):
        if not enc.spans:
            raise TunecError(f"row {record.get('row')}: choice {choice!r} has no token to score")
        ids, (first, end) = enc.ids, enc.spans[0]
        if first == 0:
            raise TunecError(f"row {record.get('row')}: the prompt is empty; nothing predicts choice {choice!r}")
        if len(ids) > seq_len:  # as long as the model ever saw: keep the end, where the choice is
            cut = min(len(ids) - seq_len, first - 1)
            ids, first, end, truncated = ids[cut:], first - cut, end - cut, True
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
        logprobs = torch.log_softmax(logits[first - 1 : end - 1], dim=-1)
        targets = torch.tensor(ids[first:end], device=device)
        lls.append(float(logprobs.gather(1, targets[:, None]).sum()))
        counts.append(end - first)
    return Scored(lls, counts, truncated)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties: the first


def predict(model, backend, info: TokenizerInfo, records: list[dict], chat: bool, seq_len: int,
            device: torch.device) -> list[dict]:
    """One prediction per record (records whose target is not among their choices included: they
    are left out of the metrics by :func:`summarise`, not scored)."""
    predictions = []
    for r in records:
        if r["answer"] < 0:
            continue
        s = score(model, backend, info, r, chat, seq_len, device)
        norm = [ll / max(len(c), 1) for ll, c in zip(s.loglikelihoods, r["choices"])]
        predictions.append({"row": r["row"], "template": r["template"], "prompt": r["prompt"],
                            "choice_prefix": r.get("choice_prefix", ""), "choices": r["choices"],
                            "loglikelihoods": s.loglikelihoods, "tokens": s.tokens, "truncated": s.truncated,
                            "predicted": _argmax(s.loglikelihoods), "predicted_norm": _argmax(norm),
                            "answer": r["answer"], "target": r["target"]})
    return predictions


def summarise(records: int, predictions: list[dict]) -> dict[str, Any]:
    """A task's metrics from its predictions; ``records``: how many there were, scored or not."""
    n = len(predictions)
    answers = Counter(p["choices"][p["answer"]] for p in predictions)
    return {
        "n": n, "skipped": records - n, "truncated": sum(p["truncated"] for p in predictions),
        "chance": sum(1 / len(p["choices"]) for p in predictions) / n if n else None,
        "majority": max(answers.values()) / n if n else None,
        "acc": sum(p["predicted"] == p["answer"] for p in predictions) / n if n else None,
        "acc_norm": sum(p["predicted_norm"] == p["answer"] for p in predictions) / n if n else None,
    }


def evaluate_task(model, backend, info: TokenizerInfo, records: list[dict], chat: bool, seq_len: int,
                  device: torch.device) -> tuple[dict[str, Any], list[dict]]:
    """``(metrics, predictions)`` of one task's records, in one process."""
    predictions = predict(model, backend, info, records, chat, seq_len, device)
    return summarise(len(records), predictions), predictions


def _gather(mine: list[dict], dist: Dist) -> list[dict]:
    """Every rank's predictions in record order, rank ``r`` having scored records ``r, r + W, ...``."""
    if not dist.active:
        return mine
    import torch.distributed as td

    parts: list[Any] = [None] * dist.world_size
    td.all_gather_object(parts, mine)
    total = sum(len(p) for p in parts)
    return [parts[i % dist.world_size][i // dist.world_size] for i in range(total)]


def macro(tasks: dict[str, dict[str, Any]], held_out: dict[str, bool]) -> dict[str, dict[str, Any]]:
    """Per group (``trained``, ``held-out``): the mean of each metric over its tasks."""
    groups = {}
    for group in GROUPS:
        members = [t for t in tasks if held_out[t] == (group == "held-out") and tasks[t]["n"]]
        if members:
            groups[group] = {"tasks": len(members), **{m: sum(tasks[t][m] for t in members) / len(members)
                                                       for m in METRICS}}
    return groups


def last_run_stage(out: Path, plan: Plan) -> str:
    done = [s.name for s in plan.stages if outputs.read_result(out, s.name) is not None]
    if not done:
        raise TunecError(f"{out}: no stage has run yet; train with `tunec run {out}`, or evaluate a stage's "
                         "starting model with --stage S --base")
    return done[-1]


def load_model(out: Path, plan: Plan, sp: StagePlan, base: bool):
    """The stage's trained model, or (``base``) the model it starts from, as `tunec run` makes it."""
    if not base:
        return outputs.load_for_inference(out, sp.name)
    spec = sp.settings.model
    if isinstance(spec, StageModel):
        return outputs.load_for_inference(out, spec.stage)
    model, _ = models.load_spec(spec, plan.seed, "sdpa")  # a config: the same seeded weights a run starts with
    return model


def describe_base(sp: StagePlan) -> str:
    spec = sp.settings.model
    if isinstance(spec, StageModel):
        return f"stage {spec.stage}"
    if isinstance(spec, HubModel):
        return f"hub {spec.id}"
    return spec.kind if isinstance(spec, ConfigModel) else f"local {spec.path}"


def run_eval(out: Path, plan: Plan, stage: str, base: bool, tasks: tuple[str, ...], limit: int | None,
             device: str) -> dict[str, Any]:
    """Evaluate and write ``runs/<stage>/eval.json`` and the predictions; returns what eval.json holds.

    The build folder's lock is held throughout: a `tunec run` replacing the stage's folder meanwhile
    would mix two models' results."""
    lock = BuildLock(out, "eval").acquire()
    try:
        return evaluate_stage(Path(out), plan, stage, base, tasks, limit, models.pick_device(device), Dist())
    finally:
        lock.release()


def has_choices(sp: StagePlan) -> bool:
    return any(ev.choices is not None for ev in sp.eval.values())


def evaluate_stage(out: Path, plan: Plan, stage: str, base: bool, tasks: tuple[str, ...], limit: int | None,
                   dev: torch.device, dist: Dist) -> dict[str, Any]:
    """:func:`run_eval` without the lock (``tunec run --eval-accuracy`` holds it already). Under
    torchrun every rank scores a share of each task's records and rank 0 writes the files."""
    from tunec.compiler.tokens import load_local_tokenizer, tokenizer_info

    sp, names = stage_with_choices(plan, stage, tasks)
    result = outputs.read_result(out, stage)
    if result is None and not base:
        raise TunecError(f"stage `{stage}` has not run (no {outputs.run_dir(out, stage) / outputs.RESULT}); "
                         f"train it first (`tunec run {out} --stage {stage}`), or evaluate its starting model "
                         "with --base")
    records = {t: read_choices(out, sp, t) for t in names}
    if limit is not None:
        records = {t: r[:limit] for t, r in records.items()}
    tokenizer = load_local_tokenizer(out / plan.tokenizer.path)
    info = tokenizer_info(tokenizer)
    model = load_model(out, plan, sp, base)
    models.check_vocab(model, plan.tokenizer.vocab_size)
    model = model.to(dev).eval()
    which = "base" if base else "stage"
    if dist.is_main:
        logger.info(f"stage {stage}: scoring {sum(map(len, records.values()))} records of {len(names)} task(s) "
                    f"with the {'starting' if base else 'trained'} model on {dev}"
                    + (f", {dist.world_size} ranks" if dist.active else ""))
    metrics, predictions = {}, {}
    for t in names:
        scored = [r for r in records[t] if r["answer"] >= 0]
        mine = predict(model, tokenizer.backend_tokenizer, info, scored[dist.rank::dist.world_size],
                       plan.tasks[t].format == "chat", plan.seq_len, dev)
        predictions[t] = _gather(mine, dist)
        metrics[t] = summarise(len(records[t]), predictions[t])
        if metrics[t]["truncated"] and dist.is_main:
            logger.warning(f"task {t}: {metrics[t]['truncated']} record(s) longer than seq_len {plan.seq_len} "
                           "lost their first prompt tokens")
    held_out = {t: sp.eval[t].held_out for t in names}
    part = {"model": describe_base(sp) if base else f"stage {stage}",
            "fingerprint": None if base or result is None else result.fingerprint,
            "limit": limit, "tasks": {t: {**metrics[t], "group": "held-out" if held_out[t] else "trained"}
                                      for t in names},
            "groups": macro(metrics, held_out)}
    if not dist.is_main:
        return {}
    rd = outputs.run_dir(out, stage)
    saved = read_eval(out, stage) or {}
    if "stage" in saved and saved["stage"].get("fingerprint") != (result.fingerprint if result else None):
        saved.pop("stage")  # of an earlier training of the stage
    saved.update({"format": "tunec.eval", "stage_name": stage, which: part})
    folder = rd / PREDICTIONS / "base" if base else rd / PREDICTIONS
    folder.mkdir(parents=True, exist_ok=True)
    for t in names:
        atomic_write_text(folder / f"{t}.jsonl",
                          "".join(json.dumps(p, ensure_ascii=False, sort_keys=True) + "\n" for p in predictions[t]))
    atomic_write_json(rd / EVAL, saved)
    return saved


def read_eval(out: Path, stage: str) -> dict[str, Any] | None:
    path = outputs.run_dir(out, stage) / EVAL
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TunecError(f"{path}: unreadable ({exc}); delete it and evaluate again") from None


def table(saved: dict[str, Any]) -> list[str]:
    """Lines of the result table: a row per task, tasks grouped, macro averages per group; a delta
    (stage minus base) where both were evaluated."""
    stage, base = saved.get("stage"), saved.get("base")
    both = stage is not None and base is not None
    header = ["task", "group", "n", "chance", "majority"]
    for label, part in (("base", base), ("stage", stage)):
        if part is not None:
            header += [f"{label} acc", f"{label} acc_norm"] if both else ["acc", "acc_norm"]
    if both:
        header += ["delta acc", "delta acc_norm"]
    main = stage if stage is not None else base
    assert main is not None, "eval.json holds at least one of them"

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    def deltas(kind: str, key: str) -> list[str]:
        if stage is None or base is None:
            return []
        t, b = stage[kind].get(key) or {}, base[kind].get(key) or {}
        return ["" if t.get(m) is None or b.get(m) is None else f"{t[m] - b[m]:+.3f}" for m in ("acc", "acc_norm")]

    rows = []
    for group in GROUPS:
        tasks = [t for t, m in main["tasks"].items() if m["group"] == group]
        for t in tasks:
            m = main["tasks"][t]
            row = [t, group, str(m["n"]), fmt(m["chance"]), fmt(m["majority"])]
            for part in (base, stage):
                if part is not None:
                    got = part["tasks"].get(t, {})
                    row += [fmt(got.get("acc")), fmt(got.get("acc_norm"))]
            rows.append(row + deltas("tasks", t))
        g = main["groups"].get(group)
        if g:
            row = ["mean", group, "", fmt(g["chance"]), fmt(g["majority"])]
            for part in (base, stage):
                if part is not None:
                    got = part["groups"].get(group, {})
                    row += [fmt(got.get("acc")), fmt(got.get("acc_norm"))]
            rows.append(row + deltas("groups", group))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    note = []
    if stage is not None and base is not None and stage.get("limit") != base.get("limit"):
        note = [f"note: the stage was scored with --limit {stage.get('limit')}, the base with --limit "
                f"{base.get('limit')}: the deltas compare different records"]
    return ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in [header, *rows]] + note
