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

import copy
import inspect
import json
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunec.compiler.errors import TunecError, did_you_mean
from tunec.compiler.fileio import atomic_write_json, atomic_write_text, sha256_text
from tunec.compiler.lock import BuildLock
from tunec.compiler.plan import Plan, StagePlan
from tunec.compiler.recipe import ConfigModel, HubModel, SftObjective, StageModel
from tunec.compiler.tokens import Encoded, TokenizerInfo, encode_texts

from . import model as models
from . import outputs
from .dist import Dist

logger = logging.getLogger(__name__)

GROUPS = ("trained", "held-out")
METRICS = ("chance", "majority", "acc", "acc_norm", "acc_calibrated")


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


def encode_choices(backend, info: TokenizerInfo, record: dict, chat: bool) -> list[Encoded]:
    """The ids of ``prompt + choice_prefix + choice`` for each choice, by the compiler's encoder, with the
    choice's tokens as the one trained span: for the right choice, the compiled document without its EOS."""
    prompt, prefix = record["prompt"], record.get("choice_prefix", "")
    texts = [prompt + prefix + c for c in record["choices"]]
    spans = [[(len(prompt), len(t))] for t in texts]
    return encode_texts(backend, info, texts, spans, add_special=not chat, append_eos=False)


def _cache_argument(model) -> str | None:
    """The name a model's forward gives its key/value cache, in its arguments and in its output
    (``cache`` since transformers 5.2x, ``past_key_values`` before); None: it takes none."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _shared_prefix(encoded: list[Encoded]) -> int:
    """How many first tokens every choice's text shares, all of them before any choice's first scored token."""
    n = min(e.spans[0][0] for e in encoded)
    first = encoded[0].ids
    for e in encoded[1:]:
        n = next((k for k in range(n) if e.ids[k] != first[k]), n)
    return n


@torch.no_grad()
def score(model, backend, info: TokenizerInfo, record: dict, chat: bool, seq_len: int,
          device: torch.device) -> Scored:
    """Log-likelihood of each of ``record``'s choices after its prompt (see the module docstring).

    The tokens the choices share (the prompt, up to where BPE may merge it with a choice) go through the
    model once, and every choice continues from a copy of their key/value cache; a text longer than
    ``seq_len``, or a model that takes no cache, gets one whole forward pass per choice instead."""
    encoded = encode_choices(backend, info, record, chat)
    for choice, enc in zip(record["choices"], encoded):
        if not enc.spans:
            raise TunecError(f"row {record.get('row')}: choice {choice!r} has no token to score")
        if enc.spans[0][0] == 0:
            raise TunecError(f"row {record.get('row')}: the prompt is empty; nothing predicts choice {choice!r}")
    shared = _shared_prefix(encoded)
    head, cache, arg = None, None, _cache_argument(model) or ""
    if arg and shared and all(len(e.ids) <= seq_len for e in encoded):
        out = model(input_ids=torch.tensor([encoded[0].ids[:shared]], device=device), use_cache=True)
        cache = getattr(out, arg, None)
        head = out.logits[0].float() if cache is not None else None
    lls, counts, truncated = [], [], False
    for enc in encoded:
        ids, (first, end) = enc.ids, enc.spans[0]
        if head is not None:  # a copy: the forward pass extends the cache it is given
            rest = model(input_ids=torch.tensor([ids[shared:]], device=device), use_cache=True,
                         **{arg: copy.deepcopy(cache)})
            logits = torch.cat([head, rest.logits[0].float()])
        else:
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
            device: torch.device, content_free: dict[str, str] | None = None) -> list[dict]:
    """One prediction per record whose target is among its choices (the others are counted as skipped by
    :func:`summarise`). ``content_free``: per template, the prompt rendered with every column ``N/A``;
    given, each choice's log-likelihood after it is subtracted for ``predicted_calibrated``."""
    predictions, baseline = [], {}
    for r in records:
        if r["answer"] < 0:
            continue
        s = score(model, backend, info, r, chat, seq_len, device)
        norm = [ll / max(len(c), 1) for ll, c in zip(s.loglikelihoods, r["choices"])]
        p = {"row": r["row"], "template": r["template"], "prompt": r["prompt"],
             "choice_prefix": r.get("choice_prefix", ""), "choices": r["choices"],
             "loglikelihoods": s.loglikelihoods, "tokens": s.tokens, "truncated": s.truncated,
             "predicted": _argmax(s.loglikelihoods), "predicted_norm": _argmax(norm),
             "answer": r["answer"], "target": r["target"]}
        free = (content_free or {}).get(r["template"])
        if free is not None:
            key = (r["template"], r.get("choice_prefix", ""), tuple(r["choices"]))
            if key not in baseline:  # once per template and choice list: the prompt carries no example
                baseline[key] = score(model, backend, info, {**r, "prompt": free}, chat, seq_len,
                                      device).loglikelihoods
            p["content_free"] = baseline[key]
            p["predicted_calibrated"] = _argmax([a - b for a, b in zip(s.loglikelihoods, baseline[key])])
        predictions.append(p)
    return predictions


def summarise(records: int, predictions: list[dict]) -> dict[str, Any]:
    """A task's metrics from its predictions; ``records``: how many there were, scored or not.
    ``acc_calibrated`` is ``None`` unless every prediction has a content-free baseline."""
    n = len(predictions)
    answers = Counter(p["choices"][p["answer"]] for p in predictions)
    calibrated = n > 0 and all("predicted_calibrated" in p for p in predictions)
    return {
        "n": n, "skipped": records - n, "truncated": sum(p["truncated"] for p in predictions),
        "chance": sum(1 / len(p["choices"]) for p in predictions) / n if n else None,
        "majority": max(answers.values()) / n if n else None,
        "acc": sum(p["predicted"] == p["answer"] for p in predictions) / n if n else None,
        "acc_norm": sum(p["predicted_norm"] == p["answer"] for p in predictions) / n if n else None,
        "acc_calibrated": (sum(p["predicted_calibrated"] == p["answer"] for p in predictions) / n
                           if calibrated else None),
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


def _mean(values: list[Any]) -> float | None:
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def macro(tasks: dict[str, dict[str, Any]], held_out: dict[str, bool],
          metrics: tuple[str, ...] = METRICS) -> dict[str, dict[str, Any]]:
    """Per group (``trained``, ``held-out``): the mean of each metric over its tasks (``None`` when a task
    lacks it)."""
    groups = {}
    for group in GROUPS:
        members = [t for t in tasks if held_out[t] == (group == "held-out") and tasks[t]["n"]]
        if members:
            groups[group] = {"tasks": len(members), **{m: _mean([tasks[t].get(m) for t in members])
                                                       for m in metrics}}
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


def load_named_model(out: Path, plan: Plan, name: str):
    """``--model PATH_OR_STAGE``: a finished stage of the plan, or a ``save_pretrained`` folder."""
    if name in [s.name for s in plan.stages]:
        return outputs.load_for_inference(out, name), f"stage {name}"
    if not Path(name).is_dir():
        stages = [s.name for s in plan.stages]
        raise TunecError(f"--model {name}: neither a stage of the plan{did_you_mean(name, stages)} nor a folder")
    model, _ = models.load_pretrained(str(Path(name).resolve()), "sdpa", what="--model")
    return model, f"folder {Path(name).resolve()}"


def describe_base(sp: StagePlan) -> str:
    spec = sp.settings.model
    if isinstance(spec, StageModel):
        return f"stage {spec.stage}"
    if isinstance(spec, HubModel):
        return f"hub {spec.id}"
    return spec.kind if isinstance(spec, ConfigModel) else f"local {spec.path}"


def run_eval(out: Path, plan: Plan, stage: str, base: bool, tasks: tuple[str, ...], limit: int | None,
             device: str, model: str | None = None, generation: bool = False,
             max_new_tokens: int = 32, shots: int = 0) -> dict[str, Any]:
    """Evaluate and write ``runs/<stage>/eval.json`` (``eval-Kshot.json`` for ``shots`` K) and the
    predictions; returns what the file holds.

    The build folder's lock is held throughout: a `tunec run` replacing the stage's folder meanwhile
    would mix two models' results."""
    lock = BuildLock(out, "eval").acquire()
    try:
        return evaluate_stage(Path(out), plan, stage, base, tasks, limit, models.pick_device(device), Dist(),
                              model=model, generation=generation, max_new_tokens=max_new_tokens, shots=shots)
    finally:
        lock.release()


def has_choices(sp: StagePlan) -> bool:
    return any(ev.choices is not None for ev in sp.eval.values())


@dataclass
class Scoring:
    """What scoring a model on a stage's eval sets needs besides the model (built once per stage)."""

    out: Path
    plan: Plan
    sp: StagePlan
    tokenizer: Any
    info: TokenizerInfo
    records: dict[str, list[dict]]  # task -> choices.jsonl records (``--limit`` applied)
    generated: dict[str, list[dict]]  # task without choices -> its eval documents (eval_generate.documents)
    content_free: dict[str, dict[str, str]]  # task -> template -> content-free prompt
    max_new_tokens: int = 32

    @classmethod
    def prepare(cls, out: Path, plan: Plan, stage: str, tasks: tuple[str, ...], limit: int | None,
                generation: bool = False, max_new_tokens: int = 32) -> "Scoring":
        from tunec.compiler.tokens import load_local_tokenizer, tokenizer_info

        from . import eval_generate

        sp, names, gen_names = select_tasks(plan, stage, tasks, generation)
        records = {t: read_choices(out, sp, t)[:limit] if limit else read_choices(out, sp, t) for t in names}
        tokenizer = load_local_tokenizer(out / plan.tokenizer.path)
        info = tokenizer_info(tokenizer)
        generated = {t: eval_generate.documents(out, plan, sp, t, info.eos_id)[:limit] if limit
                     else eval_generate.documents(out, plan, sp, t, info.eos_id) for t in gen_names}
        content_free = {t: content_free_prompts(plan, sp, t, tokenizer) for t in names}
        return cls(out, plan, sp, tokenizer, info, records, generated, content_free, max_new_tokens)

    def score(self, model, names: list[str], dev: torch.device, dist: Dist,
              quiet: bool = False) -> tuple[dict[str, dict], dict[str, list[dict]]]:
        """Per task: its metrics and its predictions (every rank scores a share; all get everything)."""
        from . import eval_generate

        metrics, predictions = {}, {}
        for t in names:
            if t in self.generated:
                mine = eval_generate.predict(model, self.tokenizer, self.generated[t][dist.rank::dist.world_size],
                                             eval_generate.stop_ids(self.plan, t, self.tokenizer),
                                             self.max_new_tokens, self.plan.tokenizer.pad_id, dev)
                predictions[t] = _gather(mine, dist)
                metrics[t] = eval_generate.summarise(predictions[t])
                continue
            scored = [r for r in self.records[t] if r["answer"] >= 0]
            mine = predict(model, self.tokenizer.backend_tokenizer, self.info, scored[dist.rank::dist.world_size],
                           self.plan.tasks[t].format == "chat", self.plan.seq_len, dev, self.content_free[t])
            predictions[t] = _gather(mine, dist)
            metrics[t] = summarise(len(self.records[t]), predictions[t])
            if metrics[t]["truncated"] and dist.is_main and not quiet:
                logger.warning(f"task {t}: {metrics[t]['truncated']} record(s) longer than seq_len "
                               f"{self.plan.seq_len} lost their first prompt tokens")
        return metrics, predictions

    @property
    def names(self) -> list[str]:
        return [*self.records, *self.generated]

    def part(self, label: str, fingerprint: str | None, limit: int | None,
             metrics: dict[str, dict]) -> dict[str, Any]:
        """What eval.json holds for one model: choice tasks under ``tasks``/``groups``, generation tasks
        under ``generation``."""
        held_out = {t: self.sp.eval[t].held_out for t in self.names}
        choice = {t: m for t, m in metrics.items() if t in self.records}
        made = {t: m for t, m in metrics.items() if t in self.generated}
        part: dict[str, Any] = {
            "model": label, "fingerprint": fingerprint, "limit": limit,
            "tasks": {t: {**m, "group": "held-out" if held_out[t] else "trained"} for t, m in choice.items()},
            "groups": macro(choice, held_out)}
        if made:
            from .eval_generate import GEN_METRICS

            part["generation"] = {
                "max_new_tokens": self.max_new_tokens,
                "tasks": {t: {**m, "group": "held-out" if held_out[t] else "trained"} for t, m in made.items()},
                "groups": macro(made, held_out, GEN_METRICS)}
        return part


def select_tasks(plan: Plan, stage: str, tasks: tuple[str, ...],
                 generation: bool) -> tuple[StagePlan, list[str], list[str]]:
    """The stage's plan, its tasks scored by their choices, and (``generation``) those scored by generating."""
    if not generation:
        sp, names = stage_with_choices(plan, stage, tasks)
        return sp, names, []
    sp = plan.stage(stage)
    with_choices = [t for t, ev in sp.eval.items() if ev.choices is not None]
    without = [t for t, ev in sp.eval.items() if ev.choices is None and ev.data.rows]
    if not with_choices and not without:
        raise TunecError(f"stage `{stage}` has no eval set; give its tasks an `eval:` split (or `held_out:` "
                         "tasks), then compile again")
    for t in tasks:
        if t not in with_choices and t not in without:
            raise TunecError(f"--tasks {t}: task `{t}` is not evaluated by the stage"
                             f"{did_you_mean(t, [*with_choices, *without])}; eval sets: "
                             f"{', '.join([*with_choices, *without])}")
    wanted = list(dict.fromkeys(tasks)) or [*with_choices, *without]
    if without and not isinstance(sp.settings.objective, SftObjective):
        raise TunecError(f"stage `{stage}` trains with objective `{sp.settings.objective.kind}`: its eval "
                         "documents do not say where the prompt ends; generation needs an `sft` stage")
    return sp, [t for t in wanted if t in with_choices], [t for t in wanted if t in without]


CONTENT_FREE = "N/A"


def content_free_prompts(plan: Plan, sp: StagePlan, task: str, tokenizer) -> dict[str, str]:
    """Per template of ``task``: its prompt with every column ``N/A`` (Zhao et al., 2021), rendered as
    `tunec generate` renders one (a chat task's through its chat template). A template that cannot be
    rendered so (it indexes with a label, say) gets none, and the task no calibrated accuracy."""
    from .generate import build_prompt, prompt_ids

    info = plan.tasks[task]
    found = {}
    for template in info.templates:
        values = {c: CONTENT_FREE for c in info.columns or []}
        try:
            asked = build_prompt(plan, sp.name, task=task, template=template.name, values=values)
            found[template.name] = prompt_ids(asked, tokenizer)[0]
        except TunecError as exc:
            logger.debug(f"task {task}, template {template.name}: no content-free prompt ({exc})")
    return found


def evaluate_stage(out: Path, plan: Plan, stage: str, base: bool, tasks: tuple[str, ...], limit: int | None,
                   dev: torch.device, dist: Dist, model: str | None = None, generation: bool = False,
                   max_new_tokens: int = 32, shots: int = 0) -> dict[str, Any]:
    """:func:`run_eval` without the lock (``tunec run`` holds it already). Under torchrun every rank scores
    a share of each task's records and rank 0 writes the files. ``model`` (``--model``): a stage or a
    folder, scored on this stage's eval sets and written under ``model``. ``shots``: the eval sets of
    the recipe compiled again with that many exemplars per example (:mod:`tunec.runtime.eval_shots`)."""
    if not shots:
        scoring = Scoring.prepare(out, plan, stage, tasks, limit, generation, max_new_tokens)
    else:
        from .eval_shots import few_shot_build

        _, names, made = select_tasks(plan, stage, tasks, generation)
        with tempfile.TemporaryDirectory(prefix="tunec-shots-") as tmp:  # read whole before it goes
            shown = few_shot_build(out, plan, [*names, *made], shots, Path(tmp) / "build")
            scoring = Scoring.prepare(Path(tmp) / "build", shown, stage, tuple([*names, *made]), limit, generation,
                                      max_new_tokens)
    result = outputs.read_result(out, stage)
    if result is None and not base and model is None:
        raise TunecError(f"stage `{stage}` has not run (no {outputs.run_dir(out, stage) / outputs.RESULT}); "
                         f"train it first (`tunec run {out} --stage {stage}`), or evaluate its starting model "
                         "with --base")
    if model is not None:
        which = "model"
        loaded, label = load_named_model(out, plan, model)
        fp = outputs.read_result(out, model).fingerprint if label.startswith("stage ") else None  # type: ignore[union-attr]
    else:
        which = "base" if base else "stage"
        loaded = load_model(out, plan, scoring.sp, base)
        label = describe_base(scoring.sp) if base else f"stage {stage}"
        fp = None if base or result is None else result.fingerprint
    models.check_vocab(loaded, plan.tokenizer.vocab_size)
    loaded = loaded.to(dev).eval()
    if dist.is_main:
        logger.info(f"stage {stage}: scoring {sum(map(len, scoring.records.values()))} records"
                    + (f" and generating for {sum(map(len, scoring.generated.values()))}" if scoring.generated
                       else "")
                    + f" of {len(scoring.names)} task(s) with {label} on {dev}"
                    + (f", {dist.world_size} ranks" if dist.active else ""))
    metrics, predictions = scoring.score(loaded, scoring.names, dev, dist)
    part = scoring.part(label, fp, limit, metrics)
    part["shots"] = shots
    if not dist.is_main:
        return {}
    return write_part(out, stage, which, part, predictions, result.fingerprint if result else None, shots)


def write_part(out: Path, stage: str, which: str, part: dict[str, Any], predictions: dict[str, list[dict]],
               stage_fingerprint: str | None, shots: int = 0) -> dict[str, Any]:
    """Put one model's results into ``runs/<stage>/eval.json`` (``which``: stage, base or model) and its
    predictions into ``predictions/`` (``predictions/<which>/`` but for the stage); the stage's results of
    an earlier training of the stage are dropped."""
    from .eval_shots import eval_name, predictions_name

    rd = outputs.run_dir(out, stage)
    saved = read_eval(out, stage, shots) or {}
    if "stage" in saved and saved["stage"].get("fingerprint") != stage_fingerprint:
        saved.pop("stage")  # of an earlier training of the stage
    saved.update({"format": "tunec.eval", "stage_name": stage, which: part})
    folder = rd / predictions_name(shots) if which == "stage" else rd / predictions_name(shots) / which
    folder.mkdir(parents=True, exist_ok=True)
    for t, found in predictions.items():
        atomic_write_text(folder / f"{t}.jsonl",
                          "".join(json.dumps(p, ensure_ascii=False, sort_keys=True) + "\n" for p in found))
    atomic_write_json(rd / eval_name(shots), saved)
    return saved


def read_eval(out: Path, stage: str, shots: int = 0) -> dict[str, Any] | None:
    from .eval_shots import eval_name

    path = outputs.run_dir(out, stage) / eval_name(shots)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TunecError(f"{path}: unreadable ({exc}); delete it and evaluate again") from None


PARTS = ("base", "model", "stage")
SHORT = {"acc_calibrated": "acc_cal"}


def _grid(saved: dict[str, Any], section: str | None, metrics: tuple[str, ...], extra: tuple[str, ...]) -> list[str]:
    """One table over ``section`` (None: the choice tasks; ``generation``: the generated ones): a row per
    task, tasks grouped, macro averages per group; the delta of each part against the base."""
    def of(part: dict[str, Any] | None) -> dict[str, Any] | None:
        if part is None:
            return None
        return part if section is None else part.get(section)

    parts = [(label, of(saved.get(label))) for label in PARTS]
    present = [(label, p) for label, p in parts if p is not None]
    if not present:
        return []
    several = len(present) > 1
    base = of(saved.get("base"))
    compared = [(label, p) for label, p in present if label != "base"] if base is not None else []
    header = ["task", "group", "n", *extra]
    for label, _ in present:
        header += [f"{label} {SHORT.get(m, m)}" if several else SHORT.get(m, m) for m in metrics]
    for label, _ in compared:
        header += [f"delta {m}" if label == "stage" else f"{label} delta {m}" for m in metrics[:2]]
    main = next(p for label, p in reversed(present))

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    def cells(kind: str, key: str) -> list[str]:
        row = []
        for _, part in present:
            got = part[kind].get(key) or {}
            row += [fmt(got.get(m)) for m in metrics]
        for _, part in compared:
            t, b = part[kind].get(key) or {}, base[kind].get(key) or {}  # type: ignore[index]
            row += ["" if t.get(m) is None or b.get(m) is None else f"{t[m] - b[m]:+.3f}" for m in metrics[:2]]
        return row

    rows = []
    for group in GROUPS:
        for t in [t for t, m in main["tasks"].items() if m["group"] == group]:
            m = main["tasks"][t]
            rows.append([t, group, str(m["n"]), *[fmt(m.get(x)) for x in extra], *cells("tasks", t)])
        g = main["groups"].get(group)
        if g:
            rows.append(["mean", group, "", *[fmt(g.get(x)) for x in extra], *cells("groups", group)])
    if not rows:  # the model scored last had no task of this kind
        return []
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in [header, *rows]]


def table(saved: dict[str, Any]) -> list[str]:
    """Lines of the result tables: accuracy on the choice tasks (``acc``, ``acc_norm``, ``acc_cal``: after
    content-free calibration), then exact match and F1 on the generated ones; a column per model scored
    (base, ``--model``, stage) and the deltas against the base."""
    from .eval_generate import GEN_METRICS

    lines = _grid(saved, None, ("acc", "acc_norm", "acc_calibrated"), ("chance", "majority"))
    made = _grid(saved, "generation", GEN_METRICS, ())
    if made:
        lines += ([""] if lines else []) + made
    parts = {label: saved[label] for label in PARTS if saved.get(label) is not None}
    limits = {label: p.get("limit") for label, p in parts.items()}
    if len(set(limits.values())) > 1:
        lines.append("note: scored with different --limit values (" + ", ".join(
            f"{label} {limit}" for label, limit in limits.items()) + "): the deltas compare different records")
    if len(parts) > 1:
        lines.append("models: " + "; ".join(f"{label} = {p['model']}" for label, p in parts.items()))
    return lines
