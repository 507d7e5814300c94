#!/usr/bin/env python
"""Benchmark: DPO training throughput, pairs packed (tunec) vs. each pair padded to its longest side (TRL).

A benchmark, not a test: it measures, prints a table and writes JSON. What it does:

1. compiles preference pairs with ``tunec compile``: the 1,000 HH-RLHF dialogue pairs of
   ``shared/data/preference/`` (GPT-2 tokenizer, ``seq_len`` rows) when that folder exists,
   else the demo's review pairs (the demo tokenizer), and reads every document back out of
   the shards, so both modes train on the same token ids and labels;
2. builds a model with random weights from a config (default: Qwen2.5-0.5B's architecture;
   ``--tiny``: a 2-layer toy for the CPU);
3. times DPO steps (forward, per-document log-probs, DPO loss, backward, AdamW; bf16
   autocast on CUDA) in two modes over the same pairs, micro-batch for micro-batch:
   - **packed**: one packed row per micro-batch (both sides of every pair in it, attention kept
     inside documents): tunec's runtime path (``runtime/preference.py``);
   - **padded**: the same pairs, as TRL's collator makes them: ``[2 x pairs, longest side]``,
     right-padded, with a 2D attention mask;
4. reports non-padding tokens/s, pairs/s, the padding share and the packed/padded ratio.

Reference log-probs are precomputed in a real run (once per stage), so both modes use fixed
ones here and time the policy's steps only.

    python bench/preference_throughput.py --tiny --steps 4            # CPU, a few seconds per mode
    python bench/preference_throughput.py --steps 10                  # GPU: Qwen2.5-0.5B architecture
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_SHARED = REPO.parent / "shared"
HH = Path("data") / "preference" / "hh_rlhf_harmless_base_test_1000.jsonl"
GPT2 = Path("data") / "tokenizers" / "gpt2"
DEMO = REPO / "recipes" / "demo"

QWEN25_05B = {
    "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu",
}
TINY = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50304, "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}


def compile_pairs(shared: Path, work: Path, seq_len: int) -> tuple[Path, str]:
    """Compile the pairs; return the build folder and what was compiled."""
    from tunec.compiler.build import Options, compile_recipe

    if (shared / HH).is_file():
        what = f"HH-RLHF harmless-base, 1000 dialogue pairs, GPT-2 tokenizer, seq_len {seq_len}"
        task = (f"    source: {{kind: jsonl, path: {(shared / HH).resolve()}}}\n"
                "    format: {kind: preference, chosen: chosen, rejected: rejected, dialogue: {}, checks: warn}\n"
                "    truncation: truncate\n")
        tokenizer = (shared / GPT2).resolve()
    else:
        what = f"demo review pairs (no {shared / HH}), demo tokenizer, seq_len {seq_len}"
        task = (f"    source: {{kind: jsonl, path: {DEMO / 'data' / 'reviews' / 'train.jsonl'}}}\n"
                "    format: {kind: preference, prompt: \"Review: {{ review }}\\nSentiment:\", "
                "chosen: \"{{ ' ' ~ sentiment }}\", "
                "rejected: \"{{ ' negative' if sentiment == 'positive' else ' positive' }}\"}\n")
        tokenizer = DEMO / "tokenizer"
    recipe = work / "recipe.yaml"
    recipe.write_text(
        "# Written by bench/preference_throughput.py\n"
        f"tokenizer: {{kind: local, path: {tokenizer}}}\nseq_len: {seq_len}\nseed: 0\n"
        f"tasks:\n  pairs:\n{task}"
        "stages:\n  - {name: dpo, objective: dpo, tasks: [pairs],\n"
        "     model: {kind: config, config: {model_type: llama}}}\n")
    out = work / "build"
    compile_recipe(recipe, out, Options(workers=1))
    return out, what


def rows_and_pairs(out: Path):
    """The packed rows, and per row the pairs in it: ``[(chosen ids, chosen labels, rejected ids, ...)]``."""
    from tunec.compiler.plan import read_plan
    from tunec.runtime.data import ShardSet

    plan = read_plan(out)
    data = ShardSet(out, plan.stage("dpo").train)
    arrays = data.gather(np.arange(data.rows))
    per_row = []
    for r in range(data.rows):
        pos, side = arrays["position_ids"][r], arrays["sides"][r]
        starts = list(np.flatnonzero(pos == 0)) + [len(pos)]
        docs = [(arrays["input_ids"][r, a:b], arrays["labels"][r, a:b]) for a, b in zip(starts, starts[1:])
                if side[a] >= 0]
        per_row.append([(docs[k][0], docs[k][1], docs[k + 1][0], docs[k + 1][1]) for k in range(0, len(docs), 2)])
    return arrays, per_row, plan.tokenizer.pad_id


def padded(pairs, pad_id: int) -> dict[str, np.ndarray]:
    """TRL's layout: chosen then rejected sequences, right-padded to the longest, with an attention mask."""
    seqs = [(c, cl) for c, cl, _, _ in pairs] + [(r, rl) for _, _, r, rl in pairs]
    width = max(len(s) for s, _ in seqs)
    ids = np.full((len(seqs), width), pad_id, np.int64)
    labels = np.full((len(seqs), width), -100, np.int64)
    mask = np.zeros((len(seqs), width), np.int64)
    for i, (s, lab) in enumerate(seqs):
        ids[i, : len(s)], labels[i, : len(s)], mask[i, : len(s)] = s, lab, 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy model (CPU)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per mode (after one warm-up step)")
    ap.add_argument("--rows", type=int, default=4, help="packed rows per step (one per micro-batch)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "preference_throughput.json")
    args = ap.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunec.compiler.recipe import DpoObjective
    from tunec.runtime.loss import OutputHead, causal_lm, token_logprobs
    from tunec.runtime.model import pick_device
    from tunec.runtime.preference import PreferenceLM, PreferenceRun, pair_losses

    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        out, what = compile_pairs(args.shared, Path(tmp), args.seq_len)
        arrays, per_row, pad_id = rows_and_pairs(out)
    n_rows = len(per_row)
    need = (args.steps + 1) * args.rows
    order = np.random.default_rng(0).permutation(n_rows)
    order = np.resize(order, need)  # repeats when there are fewer rows than the steps need

    spec = dict(TINY if args.tiny else QWEN25_05B)
    model_type = str(spec.pop("model_type"))
    config = AutoConfig.for_model(model_type, **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").to(device)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    objective = DpoObjective(kind="dpo")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")
    module = PreferenceLM(model, "sdpa")
    run = PreferenceRun(objective, module)
    run.reference = {"train": np.zeros(2 * int(arrays["pair_ids"].max() + 1))}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def packed_step(rows: np.ndarray) -> tuple[int, int]:
        tokens = pairs = 0
        for r in rows:
            t = {k: torch.from_numpy(v[r : r + 1]).to(device) for k, v in arrays.items()}
            with autocast:
                pair, side, lp, n = module(t["input_ids"], t["position_ids"], t["labels"], t["pair_ids"], t["sides"])
            losses, _ = run.losses("train", pair, side, lp, n)
            losses.sum().backward()
            tokens += int((t["sides"] >= 0).sum())
            pairs += len(losses)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return tokens, pairs

    def padded_step(rows: np.ndarray) -> tuple[int, int, int]:
        tokens = pairs = cells = 0
        head = OutputHead.of(model)
        for r in rows:
            b = {k: torch.from_numpy(v).to(device) for k, v in padded(per_row[r], pad_id).items()}
            with autocast:
                hidden = causal_lm(model).base_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                                     use_cache=False).last_hidden_state
            lp = token_logprobs(head, hidden, b["labels"])
            sums, counts = lp.sum(1), (b["labels"] != -100).sum(1).to(lp.dtype)
            p = len(per_row[r])
            zero = torch.zeros(p, device=device)
            losses, _ = pair_losses(objective, sums[:p], sums[p:], counts[:p], counts[p:], zero, zero)
            losses.sum().backward()
            tokens += int(b["attention_mask"].sum())
            cells += b["input_ids"].numel()
            pairs += p
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return tokens, pairs, cells

    results = {}
    for mode in ("packed", "padded"):
        steps = [order[i * args.rows : (i + 1) * args.rows] for i in range(args.steps + 1)]
        (packed_step if mode == "packed" else padded_step)(steps[0])  # warm-up (kernels, allocator)
        sync()
        tokens = pairs = cells = 0
        started = time.perf_counter()
        for rows in steps[1:]:
            if mode == "packed":
                t, p = packed_step(rows)
                c = len(rows) * args.seq_len
            else:
                t, p, c = padded_step(rows)
            tokens, pairs, cells = tokens + t, pairs + p, cells + c
        sync()
        seconds = time.perf_counter() - started
        results[mode] = {"tokens": tokens, "pairs": pairs, "seconds": round(seconds, 4),
                         "tokens_per_s": round(tokens / seconds, 1), "pairs_per_s": round(pairs / seconds, 2),
                         "padding_share": round(1 - tokens / cells, 4)}

    ratio = results["packed"]["tokens_per_s"] / results["padded"]["tokens_per_s"]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(f"data: {what}; {n_rows} packed rows")
    print(f"model: {'tiny llama' if args.tiny else 'Qwen2.5-0.5B architecture'}, {params / 1e6:.1f} M parameters, "
          f"random weights; device: {gpu or platform.processor() or 'cpu'}")
    print(f"{'mode':<8} {'tokens/s':>12} {'pairs/s':>9} {'padding':>8} {'seconds':>8}")
    for mode, r in results.items():
        print(f"{mode:<8} {r['tokens_per_s']:>12,.0f} {r['pairs_per_s']:>9.2f} {r['padding_share']:>8.1%} "
              f"{r['seconds']:>8.2f}")
    print(f"packed / padded: {ratio:.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"data": what, "model": "tiny" if args.tiny else "qwen2.5-0.5b", "params": params,
                                     "device": gpu or "cpu", "steps": args.steps, "rows_per_step": args.rows,
                                     "seq_len": args.seq_len, "results": results, "ratio": round(ratio, 3)},
                                    indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
