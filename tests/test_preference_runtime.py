"""Preference objectives at run time: losses against an independent computation, training end to end.

The reference computation here runs every document alone through a tiny llama
(no packing), sums the log-probs of its labelled tokens, and applies each
paper's formula written out again; tunec's packed path must agree to 1e-5.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_preference import build, documents, sums
from tiny import QUIET, Interrupt, interrupt_after

from tunec.compiler.plan import read_plan
from tunec.compiler.recipe import DpoObjective, KtoObjective, OrpoObjective, SimpoObjective
from tunec.runtime.data import ShardSet
from tunec.runtime.dist import Dist
from tunec.runtime.preference import PreferenceLM, PreferenceRun, set_logps
from tunec.runtime.run import RunOptions, run


def tiny_model(seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                                  max_position_embeddings=128)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()


def alone(model, doc: dict) -> tuple[float, int]:
    """Summed log-prob of a document's labelled tokens, the document run on its own."""
    ids = torch.tensor([doc["ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    total, n = 0.0, 0
    for t, label in enumerate(doc["labels"]):
        if label != -100:
            total += float(logp[t - 1, label])
            n += 1
    return total, n


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def expected(objective, c: float, r: float, nc: int, nr: int, rc: float, rr: float) -> float:
    """Each objective's loss for one pair, from the papers (and TRL's conventions for normalisation)."""
    if isinstance(objective, DpoObjective):
        b, ls = objective.beta, objective.label_smoothing
        if objective.loss == "ipo":
            z = (c / nc - r / nr) - (rc / nc - rr / nr)
            return (z - 1 / (2 * b)) ** 2
        z = (c - r) - (rc - rr)
        sft = -objective.sft_weight * c / nc
        if objective.loss == "sigmoid":
            return -(1 - ls) * logsig(b * z) - ls * logsig(-b * z) + sft
        if objective.loss == "robust":
            return (-(1 - ls) * logsig(b * z) + ls * logsig(-b * z)) / (1 - 2 * ls) + sft
        return max(0.0, 1 - b * z) + sft
    if isinstance(objective, SimpoObjective):
        z = objective.beta * (c / nc - r / nr) - objective.gamma
        return -logsig(z)
    assert isinstance(objective, OrpoObjective)
    ac, ar = c / nc, r / nr
    odds = math.log(math.exp(ac) / (1 - math.exp(ac))) - math.log(math.exp(ar) / (1 - math.exp(ar)))
    return -ac - objective.beta * logsig(odds)


OBJECTIVES = [
    DpoObjective(kind="dpo"),
    DpoObjective(kind="dpo", beta=0.5, label_smoothing=0.2, sft_weight=0.3),
    DpoObjective(kind="dpo", loss="robust", label_smoothing=0.1),
    DpoObjective(kind="dpo", loss="hinge", beta=2.0),
    DpoObjective(kind="dpo", loss="ipo", beta=0.3),
    SimpoObjective(kind="simpo"),
    OrpoObjective(kind="orpo", beta=0.2),
]


@pytest.fixture(scope="module")
def pairs_build(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("pairs"), rows=sums(12), seq_len=64)


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: f"{o.kind}-{getattr(o, 'loss', '')}")
@pytest.mark.parametrize("rows_per_batch", [1, 3, 100])
def test_losses_equal_an_independent_reference(pairs_build, objective, rows_per_batch, one_thread):
    out = pairs_build
    policy, reference = tiny_model(1), tiny_model(2)
    docs = documents(out)
    want_lp = {(d["pair"], d["side"]): alone(policy, d) for d in docs}
    want_ref = {(d["pair"], d["side"]): alone(reference, d)[0] for d in docs}
    pairs = sorted({d["pair"] for d in docs})
    want = {p: expected(objective, want_lp[p, 0][0], want_lp[p, 1][0], want_lp[p, 0][1], want_lp[p, 1][1],
                        want_ref[p, 0], want_ref[p, 1]) for p in pairs}

    data = ShardSet(out, read_plan(out).stage("align").train)
    run_ = PreferenceRun(objective, PreferenceLM(policy, "sdpa"))
    ref_lp, ref_n = set_logps(PreferenceLM(reference, "sdpa"), data, rows_per_batch, Dist(), torch.device("cpu"),
                              nullcontext)
    run_.reference = {"train": ref_lp}
    got = {}
    for lo in range(0, data.rows, rows_per_batch):
        arrays = data.gather(np.arange(lo, min(lo + rows_per_batch, data.rows)))
        t = {k: torch.from_numpy(v) for k, v in arrays.items()}
        with torch.no_grad():
            pair, side, lp, n = run_.module(t["input_ids"], t["position_ids"], t["labels"], t["pair_ids"], t["sides"])
        for p, s, v, k in zip(pair.tolist(), side.tolist(), lp.tolist(), n.tolist()):
            assert v == pytest.approx(want_lp[p, s][0], abs=1e-4) and k == want_lp[p, s][1]
        losses, metrics = run_.losses("train", pair, side, lp, n)
        got.update(zip(pair[0::2].tolist(), losses.tolist()))
        acc = metrics["rewards/accuracies"][0]
        assert acc.shape == losses.shape
    assert sorted(got) == pairs
    for p in pairs:
        assert got[p] == pytest.approx(want[p], abs=1e-5, rel=1e-5)
    for (p, s), (_, n) in want_lp.items():  # the reference pass saw every document, with its token count
        assert ref_n[2 * p + s] == n and ref_lp[2 * p + s] == pytest.approx(want_ref[p, s], abs=1e-4)


def test_kto_losses_equal_an_independent_reference(tmp_path, one_thread):
    rows = [{"q": f"{a}+{a}", "answer": f" {2 * a + (a % 3 == 0)}", "ok": a % 3 != 0} for a in range(1, 13)]
    fmt = '{kind: unpaired, prompt: "Q: {{ q }}\\nA:", completion: answer, label: ok}'
    out = build(tmp_path, rows=rows, fmt=fmt, objective="{kind: kto, beta: 0.3, undesirable_weight: 1.5}")
    docs = documents(out)
    assert len(docs) == 12 and sorted(d["pair"] for d in docs) == list(range(12))
    assert {d["pair"]: d["side"] for d in docs} == {i: int(not rows[i]["ok"]) for i in range(12)}
    policy, reference = tiny_model(3), tiny_model(4)
    lp = {d["pair"]: alone(policy, d)[0] for d in docs}
    ref = {d["pair"]: alone(reference, d)[0] for d in docs}
    kl = max(0.0, sum(lp[i] - ref[i] for i in lp) / len(lp))
    objective = KtoObjective(kind="kto", beta=0.3, undesirable_weight=1.5)

    def one(i: int) -> float:
        z = lp[i] - ref[i]
        sig = 1 / (1 + math.exp(-objective.beta * ((z - kl) if rows[i]["ok"] else (kl - z))))
        return (objective.desirable_weight if rows[i]["ok"] else objective.undesirable_weight) * (1 - sig)

    data = ShardSet(out, read_plan(out).stage("align").train)
    run_ = PreferenceRun(objective, PreferenceLM(policy, "sdpa"))
    run_.reference = {"train": set_logps(PreferenceLM(reference, "sdpa"), data, 2, Dist(), torch.device("cpu"),
                                         nullcontext)[0]}
    arrays = data.gather(np.arange(data.rows))
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    with torch.no_grad():
        pair, side, logps, n = run_.module(t["input_ids"], t["position_ids"], t["labels"], t["pair_ids"], t["sides"])
        losses, _ = run_.losses("train", pair, side, logps, n, torch.tensor(kl))
    for p, value in zip(pair.tolist(), losses.tolist()):
        assert value == pytest.approx(one(p), abs=1e-5)


# ----------------------------------------------------------------- training end to end


def metrics(out: Path, stage: str = "align") -> list[dict]:
    return [json.loads(line) for line in (out / "runs" / stage / "metrics.jsonl").read_text().splitlines()]


def test_a_step_is_the_same_whatever_the_micro_batches(tmp_path, one_thread):
    out = build(tmp_path, rows=sums(24), stage_opts="    batch_tokens: 512\n    max_steps: 2\n    lr: 1.0e-3\n")
    other = tmp_path / "other"
    shutil.copytree(out, other)
    run(out, RunOptions(overrides=("stages.align.micro_batch_rows=8",), **QUIET))
    run(other, RunOptions(overrides=("stages.align.micro_batch_rows=1",), **QUIET))
    a, b = metrics(out)[0], metrics(other)[0]
    for key in ("loss", "rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert a["loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 1: policy == reference
    wa = load_file(out / "runs" / "align" / "model" / "model.safetensors")
    wb = load_file(other / "runs" / "align" / "model" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_layers_train_the_same_pairs_as_eager_ones(tmp_path, one_thread):
    """`compile: true` changes how a DPO step runs (reference log-probs included), not what it computes."""
    out = build(tmp_path, rows=sums(24), stage_opts="    batch_tokens: 512\n    max_steps: 2\n    lr: 1.0e-3\n")
    other = tmp_path / "compiled"
    shutil.copytree(out, other)
    run(out, RunOptions(**QUIET))
    run(other, RunOptions(overrides=("stages.align.compile=true",), **QUIET))
    assert "loss" in metrics(out)[0] and "logps/chosen" in metrics(out)[0]
    for a, b in zip(metrics(out), metrics(other), strict=True):
        for key in ("loss", "rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    wa = load_file(out / "runs" / "align" / "model" / "model.safetensors")
    wb = load_file(other / "runs" / "align" / "model" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_resume_reads_the_reference_back_and_matches_an_uninterrupted_run(tmp_path, one_thread):
    out = build(tmp_path, rows=sums(24), stage_opts="    batch_tokens: 256\n    max_steps: 4\n    lr: 1.0e-3\n"
                "    checkpoint_every_steps: 1\n")
    other = tmp_path / "other"
    shutil.copytree(out, other)
    run(out, RunOptions(**QUIET))
    with pytest.raises(Interrupt):
        run(other, RunOptions(on_step=interrupt_after(2), **QUIET))
    ref = other / "runs" / "align" / "reference.safetensors"
    before = ref.stat().st_mtime_ns
    run(other, RunOptions(resume=True, **QUIET))
    assert ref.stat().st_mtime_ns == before  # not computed again
    assert [r["loss"] for r in metrics(out) if "loss" in r] == \
        pytest.approx([r["loss"] for r in metrics(other) if "loss" in r], abs=1e-6)
    wa = load_file(out / "runs" / "align" / "model" / "model.safetensors")
    wb = load_file(other / "runs" / "align" / "model" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


REVIEWS = {
    "fmt": ('{kind: preference, prompt: "Review: {{ review }}\\nSentiment:", chosen: "{{ \' \' ~ sentiment }}", '
            "rejected: \"{{ ' negative' if sentiment == 'positive' else ' positive' }}\"}"),
}


@pytest.mark.slow
def test_dpo_learns_a_toy_preference_on_held_out_pairs(tmp_path, one_thread):
    """Prefer the right sentiment label to the wrong one: reward accuracy on unseen reviews rises well above 0.5."""
    from tiny import DEMO

    rows = [json.loads(line) for line in (DEMO / "data" / "reviews" / "train.jsonl").read_text().splitlines()]
    out = build(tmp_path, rows=rows[:320], fmt=REVIEWS["fmt"], seq_len=128,
                task_opts="    eval: {fraction: 0.2}\n",
                stage_opts="    lr: 1.0e-2\n    batch_tokens: 1024\n    max_steps: 30\n    eval_every_steps: 15\n",
                objective="{kind: dpo, beta: 0.5}")
    run(out, RunOptions(**QUIET))
    evals = [r for r in metrics(out) if "eval_rewards/accuracies" in r]
    assert [r["step"] for r in evals] == [15, 30] and evals[-1]["eval_tokens"]["pairs"] == 64
    assert evals[-1]["eval_rewards/accuracies"]["pairs"] >= 0.8
    assert evals[-1]["eval_loss"]["pairs"] < 0.6
    train = [r for r in metrics(out) if "loss" in r]
    assert train[-1]["rewards/margins"] > 0 and train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("objective", ["{kind: simpo}", "{kind: orpo}", "{kind: dpo, loss: ipo}", "{kind: kto}"])
def test_every_objective_trains_and_logs_trl_metrics(tmp_path, objective, one_thread, caplog):
    fmt = None
    rows = sums(16)
    if "kto" in objective:
        rows = [{"q": r["q"], "answer": r["good"] if i % 2 else r["bad"], "ok": bool(i % 2)} for i, r in enumerate(rows)]
        fmt = '{kind: unpaired, prompt: "Q: {{ q }}\\nA:", completion: answer, label: ok}'
    kw = {"fmt": fmt} if fmt else {}
    out = build(tmp_path, rows=rows, objective=objective, task_opts="    eval: {fraction: 0.25}\n",
                stage_opts="    batch_tokens: 256\n    max_steps: 3\n    lr: 1.0e-3\n", **kw)
    with caplog.at_level(logging.INFO, logger="tunec.runtime.log"):
        run(out, RunOptions(**QUIET))
    records = metrics(out)
    progress = [m for m in caplog.messages if m.startswith("step 3/3: loss")]
    assert len(progress) == 1 and ("rewards/accuracies" in progress[0]) == ("kto" not in objective)
    train = [r for r in records if "loss" in r]
    assert len(train) == 3 and all(math.isfinite(r["loss"]) for r in train)
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"} <= set(train[-1])
    if "kto" in objective:
        assert "kl" in train[-1]
        assert train[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # 1 - sigmoid(0) on every example at step 1
    else:
        assert {"rewards/accuracies", "rewards/margins"} <= set(train[-1])
    (ev,) = [r for r in records if "eval_loss" in r]
    assert set(ev["eval_loss"]) == {"pairs", "all"} and "eval_rewards/chosen" in ev
    has_reference = (out / "runs" / "align" / "reference.safetensors").is_file()
    assert has_reference == ("dpo" in objective or "kto" in objective)


def test_reference_from_an_earlier_stage(tmp_path, one_thread):
    """`reference: align` (an SFT stage) for a policy built afresh: the saved reference log-probs are the
    SFT model's, and policy and reference differ at step 1."""
    from safetensors.numpy import load_file as load_numpy
    from tiny import tiny_llama

    from tunec.runtime.outputs import load_for_inference

    extra = ('  plain:\n    source: {kind: jsonl, path: pairs.jsonl}\n'
             '    templates: [{kind: inline, prompt: "Q: {{ q }}\\nA:", completion: "{{ good }}"}]\n')
    path_opts = ("    batch_tokens: 256\n    max_steps: 3\n    lr: 1.0e-2\n"
                 "  - name: dpo\n    objective: {kind: dpo, reference: align}\n    tasks: [pairs]\n"
                 f"    model: {tiny_llama(layers=2)}\n    batch_tokens: 256\n    max_steps: 2\n")
    out = build(tmp_path, extra_task=extra, tasks="[plain]", objective="sft", stage_opts=path_opts)
    run(out, RunOptions(**QUIET))
    first = metrics(out, "dpo")[0]
    assert abs(first["loss"] - math.log(2)) > 1e-4 and first["rewards/margins"] != 0.0
    saved = load_numpy(out / "runs" / "dpo" / "reference.safetensors")["train"]
    sft = PreferenceLM(load_for_inference(out, "align"), "sdpa")
    data = ShardSet(out, read_plan(out).stage("dpo").train)
    again, _ = set_logps(sft, data, 4, Dist(), torch.device("cpu"), nullcontext)
    np.testing.assert_allclose(saved, again, rtol=1e-5, atol=1e-5)


def test_lora_reference_is_the_base_with_the_adapter_disabled(tmp_path, one_thread):
    """With LoRA, `reference: initial` is the base model: the saved reference log-probs equal the base's
    (the stage's starting weights, rebuilt from the same seeded config), and training moves the adapter only."""
    from safetensors.numpy import load_file as load_numpy
    from tiny import tiny_llama

    from tunec.compiler.recipe import ConfigModel
    from tunec.runtime.model import build_from_config

    out = build(tmp_path, rows=sums(16), stage_opts="    batch_tokens: 256\n    max_steps: 2\n    lr: 1.0e-2\n"
                "    peft: {kind: lora, r: 4, alpha: 8, dropout: 0.0}\n")
    run(out, RunOptions(**QUIET))
    plan = read_plan(out)
    spec = plan.stage("align").settings.model
    assert isinstance(spec, ConfigModel) and "llama" in tiny_llama()
    base, _ = build_from_config(spec, plan.seed, "sdpa")
    data = ShardSet(out, plan.stage("align").train)
    want, _ = set_logps(PreferenceLM(base.eval(), "sdpa"), data, 4, Dist(), torch.device("cpu"), nullcontext)
    saved = load_numpy(out / "runs" / "align" / "reference.safetensors")["train"]
    np.testing.assert_allclose(saved, want, rtol=1e-5, atol=1e-5)
    first, second = [r for r in metrics(out) if "loss" in r]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and second["rewards/margins"] != 0.0
    assert (out / "runs" / "align" / "adapter").is_dir()
