#!/usr/bin/env python
"""Benchmark: training throughput, packed and padding-free vs. padded per batch.

A benchmark, not a test: it measures, prints a table and writes JSON. See
``bench/README.md``. What it does:

1. compiles the Alpaca rows of ``shared/data/instruct/alpaca_data_cleaned_1000.json``
   with ``tunec compile`` (GPT-2 tokenizer, template ``qa/alpaca``, ``sft``,
   ``seq_len`` packed rows), and reads every document back out of the shards:
   the same token ids and labels in both modes;
2. builds a model with random weights from a public architecture config
   (default: Qwen2.5-0.5B's, 494 M parameters; ``--tiny``: a 2-layer toy);
3. times full fine-tuning steps (forward, backward, AdamW; bf16 autocast on
   CUDA) in two modes with the same number of examples per step, each step
   split into the same number of accumulated micro-batches (``--micro-batches``):
   - **packed**: ``--rows`` packed rows of ``seq_len`` tokens per step, attention
     kept inside documents (tunec's runtime forward: transformers' packed-sequence
     detection from ``position_ids``, flash attention's variable-length path
     when installed);
   - **padded**: the same examples per step (the packed mode's average), in the
     same shuffled order, each batch padded to its longest example
     (transformers' ``DataCollatorWithPadding``-style dynamic padding), with a
     2D attention mask;
4. reports non-padding tokens/s, examples/s, the padding share, MFU and the
   packed/padded ratio.

Both modes compute the loss the same way: chunked over trained tokens, as the
runtime does (``runtime/loss.py``), or through full logits with ``--loss full``.

MFU = achieved model FLOP/s / the GPU's peak dense bf16 FLOP/s, counting
``6 * N * T`` FLOPs for full fine-tuning (``N`` parameters, ``T`` non-padding
tokens: padding is wasted work, not model work; attention's own FLOPs are
left out, as in the usual 6NT estimate). With ``--lora`` the count is
``4 * N * T``: the frozen weights need the forward pass (2NT) and the
activation gradients (2NT) but no weight gradients; the adapter's own FLOPs
are negligible at small ranks.
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
ALPACA = Path("data") / "instruct" / "alpaca_data_cleaned_1000.json"
GPT2 = Path("data") / "tokenizers" / "gpt2"

# Qwen2.5-0.5B's architecture (config.json of Qwen/Qwen2.5-0.5B), weights random.
QWEN25_05B = {
    "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu",
}
TINY = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50304, "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def compile_alpaca(shared: Path, work: Path, seq_len: int):
    """Compile the Alpaca rows; return the plan and the build folder."""
    from tunec.compiler.build import Options, compile_recipe

    recipe = work / "recipe.yaml"
    recipe.write_text(
        "# Written by bench/train_throughput.py\n"
        f"tokenizer: {{kind: local, path: {(shared / GPT2).resolve()}}}\n"
        f"seq_len: {seq_len}\nseed: 0\n"
        "tasks:\n  alpaca:\n"
        f"    source: {{kind: json, path: {(shared / ALPACA).resolve()}}}\n"
        "    templates: [qa/alpaca]\n    truncation: drop\n"
        "stages:\n  - name: sft\n    objective: sft\n    tasks: [alpaca]\n"
        "    model: {kind: config, config: {model_type: llama}}\n"
    )
    out = work / "build"
    return compile_recipe(recipe, out, Options(workers=2)), out


def documents(plan, out: Path):
    """The packed rows, their non-padding token and document counts, and every document as (ids, labels)."""
    from tunec.runtime.data import ShardSet
    from tunec.runtime.loop import real_tokens

    data = ShardSet(out, plan.stages[0].train)
    rows = data.gather(np.arange(len(data)))
    pad_id = plan.tokenizer.pad_id
    ids, labels, per_row, tokens = [], [], [], []
    for r in range(len(data)):
        starts = list(np.flatnonzero(rows["position_ids"][r] == 0)) + [data.seq_len]
        n = 0
        for lo, hi in zip(starts[:-1], starts[1:]):
            if (rows["labels"][r, lo:hi] != -100).any():  # the padding pseudo-document has no labels
                ids.append(rows["input_ids"][r, lo:hi])
                labels.append(rows["labels"][r, lo:hi])
                n += 1
        per_row.append(n)
        tokens.append(real_tokens(rows["input_ids"][r : r + 1], rows["labels"][r : r + 1], pad_id))
    return rows, np.array(per_row), np.array(tokens), ids, labels


def packed_batches(rows, per_row, tokens, rows_per_step: int):
    """Packed rows in the runtime's seeded order: ``(batch, non-padding tokens, padding, examples)``."""
    from tunec.runtime.data import RowStream

    stream, start = RowStream(0, len(per_row)), 0
    while True:
        pick = stream.positions(start, start + rows_per_step)
        start += rows_per_step
        batch = {k: rows[k][pick] for k in ("input_ids", "position_ids", "labels")}
        real = int(tokens[pick].sum())
        yield batch, real, batch["input_ids"].size - real, int(per_row[pick].sum())


def padded_batches(ids, labels, per_batch: int, pad_id: int):
    """``per_batch`` examples per batch in a seeded shuffled order, right-padded to each batch's longest."""
    epoch = 0
    while True:
        order = np.random.default_rng([0, epoch]).permutation(len(ids))
        for i in range(0, len(order) - per_batch + 1, per_batch):
            pick = order[i : i + per_batch]
            width = max(len(ids[j]) for j in pick)
            x = np.full((len(pick), width), pad_id, dtype=np.int64)
            y = np.full((len(pick), width), -100, dtype=np.int64)
            mask = np.zeros((len(pick), width), dtype=np.int64)
            for k, j in enumerate(pick):
                x[k, : len(ids[j])], y[k, : len(ids[j])], mask[k, : len(ids[j])] = ids[j], labels[j], 1
            real = int(mask.sum())
            yield {"input_ids": x, "labels": y, "attention_mask": mask}, real, mask.size - real, len(pick)
        epoch += 1


def time_steps(step, batches, warmup: int, steps: int, sync) -> dict:
    """Run ``warmup`` untimed steps, then time ``steps`` steps; sums of the batches' counts."""
    for _ in range(warmup):
        step(next(batches)[0])
    sync()
    t0 = time.perf_counter()
    tokens = padding = examples = 0
    for _ in range(steps):
        batch, real, pad, ex = next(batches)
        step(batch)
        tokens, padding, examples = tokens + real, padding + pad, examples + ex
    sync()
    return {"seconds": time.perf_counter() - t0, "steps": steps, "tokens": tokens, "padding_tokens": padding,
            "examples": examples}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy model, short rows, few steps (CPU smoke run)")
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="folder holding data/ [../shared]")
    ap.add_argument("--seq-len", type=int, default=None, help="packed row length [2048; --tiny 512]")
    ap.add_argument("--rows", type=int, default=None, help="packed rows per step [8; --tiny 2]")
    ap.add_argument("--micro-batches", type=int, default=None,
                    help="gradient-accumulation parts per step, both modes [4; --tiny 1]")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per mode [20; --tiny 3]")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first [3; --tiny 1]")
    ap.add_argument("--lora", action="store_true", help="LoRA (r=16, all-linear) instead of full fine-tuning")
    ap.add_argument("--loss", choices=["chunked", "full"], default="chunked",
                    help="the loss without full logits (the runtime's default), or through them")
    ap.add_argument("--compile", action="store_true", help="compile each decoder layer (a stage's `compile: true`)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak dense bf16 TFLOP/s, for MFU")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "train_throughput.json")
    args = ap.parse_args(argv)
    seq_len = args.seq_len or (512 if args.tiny else 2048)
    rows_per_step = args.rows or (2 if args.tiny else 8)
    steps = args.steps or (3 if args.tiny else 20)
    micro_batches = args.micro_batches or (1 if args.tiny else 4)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    if not (args.shared / ALPACA).is_file():
        print(f"skip: {args.shared / ALPACA} not found (pass --shared)")
        return 0

    import torch

    from tunec.compiler.recipe import ConfigModel, LoraPeft
    from tunec.runtime import kernels
    from tunec.runtime.loss import OutputHead, causal_lm
    from tunec.runtime.loss import loss_sum as chunked_loss_sum
    from tunec.runtime.model import (
        PackedLM,
        add_lora,
        attention_for,
        build_from_config,
        loss_sum,
        pick_device,
    )

    device = pick_device(args.device)
    with tempfile.TemporaryDirectory(prefix="tunec-train-bench-") as tmp:
        plan, out = compile_alpaca(args.shared, Path(tmp), seq_len)
        rows, per_row, tokens, ids, labels = documents(plan, out)
    pad_id = plan.tokenizer.pad_id
    examples_per_step = max(1, round(per_row.mean() * rows_per_step))

    config = TINY if args.tiny else QWEN25_05B
    model, attn = build_from_config(ConfigModel(kind="config", config=config), 0, attention_for(device))
    n_params = sum(p.numel() for p in model.parameters())
    if args.lora:
        model = add_lora(model, LoraPeft(kind="lora", r=16, alpha=32, dropout=0.0), 0)
    model.to(device).train()
    # as `tunec run` does: compiled layers with `compile: true`, else Liger's kernels on CUDA when installed
    fused = kernels.compile_layers(model) if args.compile else kernels.use_liger(model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    on_cuda = device.type == "cuda"
    packed_lm = PackedLM(model, attn, chunked=args.loss == "chunked")
    head = OutputHead.of(model)

    def padded_loss(t: dict):
        """The padded batch's summed loss, computed as the packed mode computes it."""
        body = causal_lm(model).base_model  # the decoder stack, LoRA layers inside
        hidden = body(input_ids=t["input_ids"], attention_mask=t["attention_mask"], use_cache=False).last_hidden_state
        if args.loss == "chunked":
            return chunked_loss_sum(head, hidden, t["labels"])
        return loss_sum(head.logits(hidden), t["labels"])

    def step(batch: dict) -> None:
        """One optimizer step in ``micro_batches`` accumulated parts; the loss as tunec's runtime
        normalises it (summed token cross-entropy / trained tokens of the step)."""
        trained = max(int((batch["labels"][:, 1:] != -100).sum()), 1)
        for part in np.array_split(np.arange(len(batch["labels"])), micro_batches):
            t = {k: torch.from_numpy(v[part]).to(device) for k, v in batch.items()}
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
                if "position_ids" in t:
                    loss = packed_lm(t["input_ids"], t["position_ids"], t["labels"])
                else:
                    loss = padded_loss(t)
            (loss / trained).backward()
            del loss
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize()

    flops_per_token = (4 if args.lora else 6) * n_params
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items()
                                     if on_cuda and k in torch.cuda.get_device_name(device)), None)
    results = {}
    for mode, batches in (("packed", packed_batches(rows, per_row, tokens, rows_per_step)),
                          ("padded", padded_batches(ids, labels, examples_per_step, pad_id))):
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
        r = time_steps(step, batches, warmup, steps, sync)
        secs = r["seconds"]
        r.update(
            tokens_per_s=r["tokens"] / secs, examples_per_s=r["examples"] / secs,
            padding_share=r["padding_tokens"] / max(r["tokens"] + r["padding_tokens"], 1),
            model_tflops=flops_per_token * r["tokens"] / secs / 1e12,
            mfu=flops_per_token * r["tokens"] / secs / (peak * 1e12) if peak else None,
            peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else None,
        )
        results[mode] = r

    ratio = results["packed"]["tokens_per_s"] / results["padded"]["tokens_per_s"]
    report = {
        "benchmark": "train_throughput",
        "device": torch.cuda.get_device_name(device) if on_cuda else
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "model": "tiny" if args.tiny else "qwen2.5-0.5b-architecture (random weights)",
        "parameters": n_params,
        "mode": "lora" if args.lora else "full",
        "loss": args.loss,
        "layers": fused or "eager",
        "flops_per_token": f"{4 if args.lora else 6}*N",
        "peak_tflops": peak,
        "attention": attn,
        "seq_len": seq_len,
        "rows_per_step": rows_per_step,
        "examples_per_step": examples_per_step,
        "micro_batches": micro_batches,
        "documents": len(ids),
        "packed_rows": len(per_row),
        "versions": {"torch": torch.__version__},
        "results": results,
        "packed_over_padded_tokens_per_s": ratio,
    }
    print(f"{report['model']}, {n_params / 1e6:.1f} M parameters, {report['mode']}, {report['device']}, {attn}, "
          f"{report['layers']}")
    print(f"{examples_per_step} examples per step (packed: {rows_per_step} rows x {seq_len}), "
          f"{micro_batches} micro-batch(es) per step, {steps} timed steps")
    head = ("mode", "tokens/s", "examples/s", "padding", "model TFLOP/s", "MFU", "peak GiB")
    table = [head]
    for mode, r in results.items():
        table.append((mode, f"{r['tokens_per_s']:,.0f}", f"{r['examples_per_s']:,.1f}", f"{r['padding_share']:.1%}",
                      f"{r['model_tflops']:.2f}", "-" if r["mfu"] is None else f"{r['mfu']:.1%}",
                      "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print(f"packed / padded, non-padding tokens/s: {ratio:.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
