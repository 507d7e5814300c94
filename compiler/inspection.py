"""``tunec inspect``: what a build holds, per stage and task, and decoded packed rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import leakage
from .errors import TunecError
from .pack import IGNORE
from .plan import Plan
from .shards import check_values, open_shard

BOUNDARY = " ¦ "  # between documents of a packed row
TRAIN_OPEN, TRAIN_CLOSE = "«", "»"  # around trained spans when colour is off


def summary_lines(plan: Plan) -> list[str]:
    lines = [
        f"recipe {plan.recipe.file}  hash {plan.recipe.hash[:12]}  seq_len {plan.seq_len}  seed {plan.seed}",
        "versions " + ", ".join(f"{k} {v}" for k, v in sorted(plan.versions.items())),
    ]
    for stage in plan.stages:
        t = stage.train
        lines.append("")
        lines.append(
            f"stage {stage.name} ({stage.settings.objective.kind}): {t.rows} rows in {len(t.shards)} shard(s), "
            f"{t.tokens} tokens, {t.trained_tokens} trained, fill {t.fill_rate:.1%}"
        )
        budget = stage.settings.budget
        lines.extend(_table(stage.tasks, t.trained_tokens,
                            "tokens" if budget is not None and budget.kind == "tokens" else "examples"))
        for task, ev in stage.eval.items():
            kind = "held-out" if ev.held_out else "eval"
            choices = f", {ev.choices.count} with answer choices" if ev.choices else ""
            lines.append(f"  {kind} {task}: {ev.counts.examples} examples, {ev.data.rows} rows, "
                         f"{ev.counts.trained_tokens} trained tokens, {ev.counts.dropped} dropped{choices}")
        for task, leak in stage.leakage.items():
            by = ", ".join(f"{k} {v}" for k, v in leak.by_task.items())
            kinds = "".join(f"; {v} {leakage.KIND_WORDS.get(k, k)}" for k, v in leak.by_kind.items())
            lines.append(f"  LEAK {task}: {leak.leaked} of {leak.examples} eval examples appear in training "
                         f"({by}{kinds})")
    return lines


def _table(tasks, stage_trained: int, asked_in: str = "examples") -> list[str]:
    """One row per task. Two shares in different units, so both headers say which: the share of
    trained tokens the task got after packing, and the share of examples (or of tokens, under a
    token budget) the mixture asked for."""
    head = ("task", "examples", "tokens", "trained", "% trained tokens", f"% {asked_in} asked", "few-shot",
            "truncated", "dropped", "merges")
    rows = [head]
    for name, c in tasks.items():
        share = (c.trained_share if c.trained_share is not None
                 else (c.trained_tokens / stage_trained if stage_trained else 0.0))
        asked = "-" if c.requested_share is None else f"{c.requested_share:.1%}"
        rows.append((name, c.examples, c.tokens, c.trained_tokens, f"{share:.1%}", asked, c.fewshot,
                     c.truncated, c.dropped, c.boundary_merges))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    out = []
    for r in rows:
        cells = [str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths))]
        out.append("  " + "  ".join(cells))
    out.append(f"  (% trained tokens: the task's share of the stage's trained tokens, after packing; "
               f"% {asked_in} asked: the share of the mixture's {asked_in} the mixture asked for)")
    for name, c in tasks.items():
        per = ", ".join(f"{k} {v}" for k, v in c.templates.items())
        skipped = ", ".join(f"{k} {v}" for k, v in c.skipped.items())
        out.append(f"    {name} templates: {per}" + (f"; skipped (did not apply): {skipped}" if skipped else ""))
    return out


def tokenizer_folder(plan: Plan, out: Path) -> Path:
    """The build's own tokenizer folder, checked (never a hub id: a build is self-contained)."""
    folder = out / plan.tokenizer.path
    if not folder.is_dir() or not any(folder.iterdir()):
        raise TunecError(f"{folder}: the build's tokenizer folder is missing or empty; compile the recipe again")
    return folder


def decode_rows(plan: Plan, out: Path, stage: str, count: int, tokenizer, color: bool) -> list[str]:
    """Decode the first ``count`` packed rows of a stage, trained spans highlighted."""
    import click

    sp = plan.stage(stage)
    lines: list[str] = []
    shown = 0
    for entry in sp.train.shards:
        arrays = open_shard(out / entry.path, entry.bytes, seq_len=sp.train.seq_len)
        check_values(out / entry.path, arrays, plan.tokenizer.vocab_size)
        for r in range(arrays["input_ids"].shape[0]):
            if shown >= count:
                return lines
            ids = np.asarray(arrays["input_ids"][r])
            labels = np.asarray(arrays["labels"][r])
            pos = np.asarray(arrays["position_ids"][r])
            lines.append(f"--- {stage} row {shown} ({entry.path}, row {r})")
            lines.append(_render_row(ids, labels, pos, tokenizer, plan.tokenizer.pad_id, color, click))
            shown += 1
    return lines


def _render_row(ids, labels, pos, tokenizer, pad_id, color, click) -> str:
    starts = list(np.flatnonzero(pos == 0)) + [len(ids)]
    docs = []
    for lo, hi in zip(starts[:-1], starts[1:]):
        if np.all(ids[lo:hi] == pad_id) and np.all(labels[lo:hi] == IGNORE):
            docs.append(f"[{hi - lo} pad]")
            continue
        pieces, i = [], lo
        while i < hi:  # runs of equal trained-ness, decoded together
            trained = labels[i] != IGNORE
            j = i
            while j < hi and (labels[j] != IGNORE) == trained:
                j += 1
            text = tokenizer.decode(ids[i:j].tolist(), skip_special_tokens=False)
            if trained:
                text = click.style(text, fg="green", bold=True) if color else f"{TRAIN_OPEN}{text}{TRAIN_CLOSE}"
            pieces.append(text)
            i = j
        docs.append("".join(pieces))
    return BOUNDARY.join(docs)
