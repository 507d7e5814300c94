"""The example recipes that read ../shared/data: compiled for real, checked against their plans.

Every recipe under ``recipes/`` whose text mentions ``../shared`` is compiled
(one worker) and its plan checked against what the recipe asks for: held-out
tasks only as held-out eval sets, requested and trained shares for every
trained task, no leakage, every listed template used, few-shot documents where
configured, answer choices recorded. Some recipes get more specific checks
(`instruction_tuning.yaml`, `chat.yaml`).

The data is not part of the repository (see ../shared/data/README.md): these
tests skip when the folder is absent, as in a fresh clone.
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.load import load_recipe
from tunec.compiler.pack import IGNORE
from tunec.compiler.plan import Plan
from tunec.compiler.recipe import ChatFormat, ProportionalMixture, Recipe
from tunec.compiler.shards import open_shard

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "../shared" in p.read_text(encoding="utf-8"))
SKIP_REASON = f"needs {SHARED} (the ../shared/data folder is absent, as in a fresh clone)"


def test_shared_recipes_are_found():
    names = {p.name for p in RECIPES}
    assert {"instruction_tuning.yaml", "fine_tune.yaml", "hybrid.yaml", "chat.yaml"} <= names, names


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Compile each recipe once per module: ``compiled(path) -> (recipe, plan, out)``."""
    cache: dict[Path, tuple[Recipe, Plan, Path]] = {}

    def get(path: Path):
        if not SHARED.is_dir():
            pytest.skip(SKIP_REASON)
        if path not in cache:
            out = tmp_path_factory.mktemp(path.stem) / "build"
            plan = compile_recipe(path, out, Options(workers=1))
            cache[path] = (load_recipe(path).recipe, plan, out)
        return cache[path]

    return get


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_shared_recipe_plan_matches_the_recipe(compiled, path):
    recipe, plan, out = compiled(path)
    assert (out / "plan.json").is_file()
    assert [s.name for s in plan.stages] == [s.name for s in recipe.stages]
    for stage, sp in zip(recipe.stages, plan.stages):
        where = f"{path.name}, stage {stage.name}"
        # Trained tasks, and only those, have training counts with both shares.
        assert set(sp.tasks) == set(stage.tasks), where
        for t, c in sp.tasks.items():
            assert c.examples > 0 and c.trained_tokens > 0, (where, t)
            assert c.requested_share is not None and c.trained_share is not None, (where, t)
            assert 0 < c.requested_share <= 1 and 0 < c.trained_share <= 1, (where, t, c)
        assert sum(c.requested_share for c in sp.tasks.values()) == pytest.approx(1, abs=1e-3), where
        assert sum(c.trained_share for c in sp.tasks.values()) == pytest.approx(1, abs=1e-3), where
        assert sp.train.rows > 0 and sp.train.seq_len == recipe.seq_len and sp.train.fill_rate > 0.9, where

        # Held-out tasks appear only as eval sets marked held_out; other eval sets are not.
        for t in stage.held_out:
            assert t not in sp.tasks, (where, t)
            assert t in sp.eval and sp.eval[t].held_out, (where, t)
            assert sp.eval[t].counts.examples > 0, (where, t)
        for t, ev in sp.eval.items():
            assert ev.held_out == (t in stage.held_out), (where, t)
            if t not in stage.held_out:
                assert t in stage.tasks and recipe.tasks[t].eval is not None, (where, t)
            if isinstance(recipe.tasks[t].answer_choices, list):  # recorded for scoring
                assert ev.choices is not None and ev.choices.count == ev.counts.examples, (where, t)

        assert sp.leakage == {}, (where, sp.leakage)

        for t, c in sp.tasks.items():
            task = recipe.tasks[t]
            listed = len(task.templates)
            if listed >= 2:  # every listed template made documents, whatever the policy
                used = [n for n, k in c.templates.items() if k > 0]
                assert len(used) == listed, (where, t, c.templates)
            if task.few_shot is None:
                assert c.fewshot == 0, (where, t)
            elif not isinstance(task.format, ChatFormat):  # chat few-shot turns are not counted (yet)
                assert 0 < c.fewshot <= c.examples, (where, t, c.fewshot)
                if task.few_shot.share < 1 or task.few_shot.min_shots == 0:
                    assert c.fewshot < c.examples, (where, t, c.fewshot)
            if isinstance(stage.mixture, ProportionalMixture) and stage.mixture.cap and stage.budget is None:
                assert c.examples <= stage.mixture.cap, (where, t, c.examples)

    for t, tp in plan.tasks.items():
        if isinstance(recipe.tasks[t].answer_choices, list):
            assert tp.answer_choices == list(recipe.tasks[t].answer_choices), t

    extra = SPECIFIC.get(path.name)
    if extra is not None:
        extra(recipe, plan, out)


# ----------------------------------------------------------------- recipe-specific checks


def _instruction_tuning(recipe: Recipe, plan: Plan, out: Path) -> None:
    (stage,) = recipe.stages
    sp = plan.stages[0]
    assert len(sp.tasks) >= 12 and len(stage.held_out) >= 3
    assert {recipe.tasks[t].template_policy for t in stage.tasks} == {"all", "sample", "round_robin"}
    fewshot = [t for t in stage.tasks if recipe.tasks[t].few_shot is not None]
    assert len(fewshot) >= 2 and all(sp.tasks[t].fewshot > 0 for t in fewshot)
    # several templates per task, mostly
    assert sum(len(c.templates) >= 2 for c in sp.tasks.values()) >= 12
    # the cap binds: the largest tasks give exactly `cap` documents
    cap = stage.mixture.cap
    assert max(c.examples for c in sp.tasks.values()) == cap
    # held out: eval sets with answer choices, built from the test split (100 rows per template)
    for t in stage.held_out:
        ev = sp.eval[t]
        assert ev.held_out and ev.choices is not None
        rows = len(recipe_file(recipe, t, "test").read_text(encoding="utf-8").splitlines())
        assert ev.counts.examples == rows * len(recipe.tasks[t].templates)  # policy `all`, nothing dropped


def recipe_file(recipe: Recipe, task: str, split: str) -> Path:
    return (ROOT / "recipes" / recipe.tasks[task].source.path[split]).resolve()


def _docs(out: Path, packed):
    """Every packed document of a set, as (ids, labels)."""
    for shard in packed.shards:
        arrays = open_shard(out / shard.path, shard.bytes)
        for ids, labels, pos in zip(arrays["input_ids"], arrays["labels"], arrays["position_ids"]):
            ids, labels, pos = np.asarray(ids), np.asarray(labels), np.asarray(pos)
            starts = list(np.flatnonzero(pos == 0)) + [len(ids)]
            for lo, hi in pairwise(starts):
                if np.all(labels[lo:hi] == IGNORE):
                    continue  # padding (or a document with nothing trained, which chat never makes)
                yield ids[lo:hi], labels[lo:hi]


def _trained_runs(ids: np.ndarray, labels: np.ndarray) -> list[tuple[int, int]]:
    mask = labels != IGNORE
    runs, lo = [], None
    for i, m in enumerate(mask.tolist() + [False]):
        if m and lo is None:
            lo = i
        elif not m and lo is not None:
            runs.append((lo, i))
            lo = None
    return runs


def _chat(recipe: Recipe, plan: Plan, out: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / plan.tokenizer.path), local_files_only=True)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template  # the recipe's template travels with the build
    eos = tok.eos_token

    def decode(ids) -> str:
        return tok.decode(np.asarray(ids).tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    conv_task = recipe.tasks["conversations"]
    conversations = json.loads((ROOT / "recipes" / conv_task.source.path).resolve().read_text(encoding="utf-8"))
    alpaca = json.loads((ROOT / "recipes" / recipe.tasks["alpaca"].source.path).resolve().read_text(encoding="utf-8"))
    expected_turns = Counter(t["value"] + eos for c in conversations for t in c["conversations"] if t["from"] == "gpt")
    alpaca_outputs = {r["output"].strip() + eos for r in alpaca}

    sp = plan.stages[0]
    assert sp.tasks["conversations"].examples == len(conversations) and sp.tasks["conversations"].dropped == 0
    seen_turns: Counter = Counter()
    n_alpaca = 0
    for ids, labels in _docs(out, sp.train):
        text = decode(ids)
        runs = _trained_runs(ids, labels)
        assert runs, text[:200]
        for lo, hi in runs:
            trained = decode(ids[lo:hi])
            # an assistant turn's text plus the end-of-turn marker (EOS), right after the assistant header
            assert trained.endswith(eos) and decode(ids[:lo]).endswith("<|im_start|>assistant\n"), trained[-200:]
            assert int(ids[hi - 1]) == plan.tokenizer.eos_id
        if text.startswith("<|im_start|>system\n"):  # a ShareGPT conversation, with the recipe's system prompt
            assert conv_task.format.system.strip() in text
            seen_turns.update(decode(ids[lo:hi]) for lo, hi in runs)
        else:  # an Alpaca row rendered as one user turn and one assistant turn
            assert text.startswith("<|im_start|>user\n") and len(runs) == 1, text[:200]
            assert decode(ids[runs[0][0]:runs[0][1]]) in alpaca_outputs
            n_alpaca += 1
    # every assistant turn of every conversation, trained exactly once (train_on: all, proportional, no cap)
    assert seen_turns == expected_turns
    assert n_alpaca == sp.tasks["alpaca"].examples


SPECIFIC = {
    "instruction_tuning.yaml": _instruction_tuning,
    "chat.yaml": _chat,
}
