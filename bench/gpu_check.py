#!/usr/bin/env python
"""The GPU check suite: one short script that proves the runtime's GPU paths, in a few minutes.

Run it on a machine with a CUDA GPU (``python bench/gpu_check.py``); ``--device
cpu --tiny`` runs every check that can run without one, on toy shapes, to
prove the script itself. It prints a table (check, status, figures) and
writes JSON (``bench/results/gpu_check.json``). Checks:

1. ``packed-sdpa`` / ``packed-flash``: the logits of packed rows equal those of
   each document run alone, through transformers' packed-sequence detection,
   under SDPA (float32) and flash-attention 2 when installed (bf16);
2. ``chunked-memory``: peak memory of one forward and backward pass with the
   chunked loss versus full logits, at 4 x 2,048 tokens on Qwen2.5-0.5B's
   architecture (151,936-token vocabulary); target: at most half;
3. ``train-bf16``: full fine-tuning of Qwen2.5-0.5B's architecture (random
   weights, 494 M parameters) in bf16 autocast with fused AdamW, the same batch
   each step: the loss must fall; tokens/s and MFU;
4. ``qlora``: a 4-bit NF4 base (bitsandbytes) with LoRA loads and trains;
5. ``oom-message`` and ``auto-rows``: ``tunec run`` of a stage whose
   ``micro_batch_rows`` cannot fit stops with the out-of-memory message, and
   ``micro_batch_rows: auto`` finds a size that fits and trains;
6. ``throughput``: packed versus padded tokens/s and MFU
   (``bench/train_throughput.py``, which needs ``../shared/data``).

A check whose requirement is missing (no GPU, bitsandbytes or flash-attn not
installed, no shared data) is ``skip`` with the reason; the exit status is 1
when any check fails.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.train_throughput import PEAK_BF16_TFLOPS, QWEN25_05B  # noqa: E402

TINY = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096, "max_position_embeddings": 2048,
        "tie_word_embeddings": True}


class Skip(Exception):
    """A check that cannot run here (the message says why)."""


def config(args, layers: int | None = None) -> dict:
    base = dict(TINY if args.tiny else QWEN25_05B)
    if layers is not None:
        base["num_hidden_layers"] = layers
    return base


def build(cfg: dict, attn: str):
    from tunec.compiler.recipe import ConfigModel
    from tunec.runtime.model import build_from_config

    return build_from_config(ConfigModel(kind="config", config=cfg), 0, attn)


def packed_rows(rows: int, seq_len: int, vocab: int, seed: int = 0, doc: tuple[int, int] = (32, 512)):
    """Random packed rows: documents of ``doc`` lengths, the second half of each trained."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq_len), generator=gen)
    pos = torch.zeros(rows, seq_len, dtype=torch.long)
    labels = torch.full((rows, seq_len), -100)
    for r in range(rows):
        t = 0
        while t < seq_len:
            n = min(int(torch.randint(doc[0], doc[1] + 1, (1,), generator=gen)), seq_len - t)
            pos[r, t:t + n] = torch.arange(n)
            labels[r, t + n // 2:t + n] = ids[r, t + n // 2:t + n]
            t += n
    return ids, pos, labels


# ----------------------------------------------------------------- checks


def check_packed(args, device, attn: str) -> dict:
    import torch

    from tunec.runtime.model import packed_logits

    if attn == "flash_attention_2" and (device.type != "cuda" or importlib.util.find_spec("flash_attn") is None):
        raise Skip("needs CUDA and flash-attn installed")
    dtype = torch.bfloat16 if attn.startswith("flash") else torch.float32
    model, got = build(config(args, layers=2), attn)
    if got != attn:
        raise Skip(f"the architecture has no {attn}")
    model = model.to(device, dtype).eval()
    ids, pos, _ = packed_rows(2, 256 if args.tiny else 2048, model.config.vocab_size, doc=(1, 300))
    ids, pos = ids.to(device), pos.to(device)
    worst, docs = 0.0, 0
    with torch.no_grad():
        packed = packed_logits(model, ids, pos, attn).float()
        for r in range(ids.shape[0]):
            starts = (pos[r] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
            for lo, hi in zip(starts[:-1], starts[1:]):
                alone = model(input_ids=ids[r:r + 1, lo:hi], use_cache=False).logits[0].float()
                worst = max(worst, float((packed[r, lo:hi] - alone).abs().max()))
                docs += 1
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
    return {"ok": worst <= tol, "figures": {"documents": docs, "max_abs_diff": worst, "tolerance": tol},
            "detail": f"{docs} documents, max |diff| {worst:.2e} (<= {tol:g})"}


def check_chunked_memory(args, device) -> dict:
    import torch

    from tunec.runtime import kernels
    from tunec.runtime.memory import precision_for
    from tunec.runtime.model import PackedLM

    model, attn = build(config(args), "sdpa")
    model = model.to(device).train()
    fused = kernels.use_liger(model, device) or "eager layers"  # as `tunec run` runs them
    rows, seq = (2, 256) if args.tiny else (4, 2048)
    ids, pos, labels = (t.to(device) for t in packed_rows(rows, seq, model.config.vocab_size))
    precision = precision_for(device)
    found = {}
    for chunked in (False, True):
        module = PackedLM(model, attn, chunked=chunked)
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        with precision.autocast(device):
            loss = module(ids, pos, labels)
        loss.backward()
        peak = torch.cuda.max_memory_allocated() - before if device.type == "cuda" else None
        found["chunked" if chunked else "full"] = {"loss": float(loss.detach()), "peak_gib": None if peak is None
                                                   else peak / 2**30}
        del loss
    same = abs(found["full"]["loss"] - found["chunked"]["loss"]) <= 1e-3 * abs(found["full"]["loss"])
    if device.type != "cuda":
        return {"ok": same, "figures": found, "detail": f"losses {found['full']['loss']:.4f} (full) = "
                f"{found['chunked']['loss']:.4f} (chunked); peak memory is measured on CUDA only"}
    ratio = found["chunked"]["peak_gib"] / found["full"]["peak_gib"]
    found["ratio"] = ratio
    found["layers"] = fused
    return {"ok": same and ratio <= 0.5, "figures": found,
            "detail": f"{rows}x{seq} tokens, {fused}: peak {found['full']['peak_gib']:.2f} GiB full, "
                      f"{found['chunked']['peak_gib']:.2f} GiB chunked ({ratio:.2f}x; target <= 0.5)"}


def train_steps(args, device, compiled: bool) -> dict:
    """Full fine-tuning steps on one batch, as `tunec run` takes them (``compile: true`` when ``compiled``)."""
    import torch

    from tunec.compiler.recipe import Stage
    from tunec.runtime import kernels
    from tunec.runtime.loop import make_optimizer
    from tunec.runtime.memory import precision_for
    from tunec.runtime.model import PackedLM, attention_for

    model, attn = build(config(args), attention_for(device))
    model = model.to(device).train()
    layers = kernels.compile_layers(model) if compiled else (kernels.use_liger(model, device) or "eager layers")
    n_params = sum(p.numel() for p in model.parameters())
    stage = Stage.model_validate({"name": "check", "objective": "lm", "tasks": ["t"], "lr": 1e-4,
                                  "model": {"kind": "config", "config": {"model_type": "qwen2"}}})
    optimizer = make_optimizer(model, stage, device)
    fused = bool(optimizer.defaults.get("fused"))
    precision = precision_for(device)
    module = PackedLM(model, attn)
    rows, seq = (2, 256) if args.tiny else (8, 2048)
    ids, pos, labels = (t.to(device) for t in packed_rows(rows, seq, model.config.vocab_size))
    trained = int((labels[:, 1:] != -100).sum())
    steps = 3 if args.tiny else 12
    losses, t0 = [], 0.0
    for i in range(steps):
        if i == 2:  # the first steps warm up kernels and the allocator (and compile)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
        with precision.autocast(device):
            loss = module(ids, pos, labels) / trained
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    tokens_per_s = rows * seq * (steps - 2) / secs
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items()
                                     if device.type == "cuda" and k in torch.cuda.get_device_name(device)), None)
    mfu = 6 * n_params * tokens_per_s / (peak * 1e12) if peak else None
    ok = losses[-1] < losses[0] and all(map(lambda x: x == x, losses)) and (fused or device.type != "cuda")
    return {"ok": ok, "parameters": n_params, "losses": losses, "tokens_per_s": tokens_per_s, "mfu": mfu,
            "precision": precision.name, "fused_adamw": fused, "attention": attn, "layers": layers,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def check_train(args, device) -> dict:
    """The same steps with the runtime's default layers, then compiled (``compile: true``)."""
    found = {}
    for name, compiled in (("default", False), ("compiled", True)):
        found[name] = train_steps(args, device, compiled)
        gc.collect()
    ok = all(r.pop("ok") for r in found.values())

    def said(r: dict) -> str:
        return (f"{r['layers']}: loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}, {r['tokens_per_s']:,.0f} "
                f"tokens/s" + (f", MFU {r['mfu']:.1%}" if r["mfu"] is not None else ""))

    r = found["default"]
    return {"ok": ok, "figures": found,
            "detail": f"{r['parameters'] / 1e6:.1f} M params, {r['precision']}, {r['attention']}, fused AdamW "
                      f"{r['fused_adamw']}; {said(r)}; {said(found['compiled'])}"}


def check_qlora(args, device) -> dict:
    import torch

    from tunec.compiler.recipe import QLoraPeft
    from tunec.runtime.model import PackedLM, add_lora, load_pretrained, quantization

    if device.type != "cuda":
        raise Skip("needs CUDA")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise Skip("bitsandbytes is not installed (pip install 'tunec[qlora]')")
    peft = QLoraPeft(kind="qlora", r=16, dropout=0.0)
    with tempfile.TemporaryDirectory(prefix="tunec-qlora-") as tmp:
        model, _ = build(config(args), "sdpa")
        model.save_pretrained(tmp)
        del model
        model, attn = load_pretrained(tmp, "sdpa", quantized=quantization(peft, device, "check"))
    four_bit = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    model = add_lora(model, peft, 0).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    module = PackedLM(model, attn)
    ids, pos, labels = (t.to(device) for t in packed_rows(2, 256 if args.tiny else 1024, model.config.vocab_size))
    trained = int((labels[:, 1:] != -100).sum())
    losses = []
    for _ in range(6):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module(ids, pos, labels) / trained
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return {"ok": four_bit > 0 and losses[-1] < losses[0],
            "figures": {"linear4bit_modules": four_bit, "losses": losses,
                        "memory_gib": torch.cuda.max_memory_allocated() / 2**30},
            "detail": f"{four_bit} Linear4bit layers; loss {losses[0]:.3f} -> {losses[-1]:.3f}"}


RUN_RECIPE = """
tokenizer: {{kind: local, path: {demo}/tokenizer}}
seq_len: {seq_len}
tasks:
  arithmetic:
    source: {{kind: jsonl, path: {demo}/data/arithmetic/train.jsonl}}
    templates: [arithmetic/qa]
stages:
  - name: big
    objective: sft
    tasks: [arithmetic]
    model: {{kind: config, config: {model}}}
    batch_tokens: {batch_tokens}
    micro_batch_rows: {rows}
    activation_checkpointing: false
    max_steps: 1
"""


def run_build(args, tmp: Path, rows: str, batch_tokens: int) -> Path:
    from tunec.compiler.build import Options, compile_recipe

    seq_len = 256 if args.tiny else 2048
    recipe = tmp / f"{rows}.yaml"
    recipe.write_text(RUN_RECIPE.format(demo=REPO / "recipes" / "demo", seq_len=seq_len, rows=rows,
                                        batch_tokens=batch_tokens, model=json.dumps(config(args))))
    compile_recipe(recipe, tmp / f"build-{rows}", Options(workers=1))
    return tmp / f"build-{rows}"


def check_oom(args, device) -> dict:
    from tunec.compiler.errors import TunecError
    from tunec.runtime.run import RunOptions, run

    if device.type != "cuda":
        raise Skip("the CPU has no out-of-memory error to catch (the system kills the process)")
    with tempfile.TemporaryDirectory(prefix="tunec-oom-") as tmp:
        out = run_build(args, Path(tmp), "1024", 1024 * 2048)  # 2M tokens in one forward pass
        try:
            run(out, RunOptions(progress=False, device=str(device.type)))
        except TunecError as exc:
            message = str(exc)
            return {"ok": "out of GPU memory" in message and "micro_batch_rows" in message,
                    "figures": {"message": message}, "detail": message[:140]}
    return {"ok": False, "figures": {}, "detail": "a micro-batch of 1,024 x 2,048 tokens trained without error"}


def check_auto_rows(args, device) -> dict:
    import logging

    from tunec.runtime.run import RunOptions, run

    notes: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            notes.append(record.getMessage())

    handler = Keep()
    logger = logging.getLogger("tunec")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # the stage's start line, which reports the size chosen
    try:
        with tempfile.TemporaryDirectory(prefix="tunec-auto-") as tmp:
            rows_per_step = 8 if args.tiny else 256
            seq_len = 256 if args.tiny else 2048
            out = run_build(args, Path(tmp), "auto", rows_per_step * seq_len)
            t0 = time.perf_counter()
            (result,) = run(out, RunOptions(progress=False, device=str(device.type)))
            secs = time.perf_counter() - t0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    line = next((n for n in notes if "micro_batch_rows auto" in n), "")
    chosen = line.split("micro_batch_rows auto: ")[1].split()[0] if line else "?"
    return {"ok": bool(line) and result.steps == 1, "figures": {"note": line, "seconds": secs},
            "detail": f"chose {chosen} of {rows_per_step} rows per step; one step in {secs:.0f}s"}


def check_throughput(args, device) -> dict:
    from bench import train_throughput

    shared = REPO.parent / "shared"
    if not (shared / train_throughput.ALPACA).is_file():
        raise Skip(f"{shared / train_throughput.ALPACA} not found")
    with tempfile.TemporaryDirectory(prefix="tunec-tp-") as tmp:
        path = Path(tmp) / "tp.json"
        argv = ["--device", device.type, "--json", str(path)] + (["--tiny"] if args.tiny else [])
        if args.peak_tflops:
            argv += ["--peak-tflops", str(args.peak_tflops)]
        train_throughput.main(argv)
        report = json.loads(path.read_text())
    ratio = report["packed_over_padded_tokens_per_s"]
    mfu = report["results"]["packed"]["mfu"]
    return {"ok": args.tiny or device.type != "cuda" or ratio >= 1.5, "figures": report,
            "detail": f"packed {report['results']['packed']['tokens_per_s']:,.0f} tokens/s, padded "
                      f"{report['results']['padded']['tokens_per_s']:,.0f}: {ratio:.2f}x (target >= 1.5)"
                      + (f", packed MFU {mfu:.1%} (target >= 40%)" if mfu is not None else "")}


# ----------------------------------------------------------------- driver


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--tiny", action="store_true", help="toy shapes (a 2-layer model, short rows): proves the script")
    ap.add_argument("--only", nargs="*", default=None, help="run only these checks")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak dense bf16 TFLOP/s, for MFU")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "gpu_check.json")
    args = ap.parse_args(argv)

    import torch

    from tunec.runtime.model import pick_device, quiet_transformers

    quiet_transformers()
    device = pick_device(args.device)
    checks = {
        "packed-sdpa": lambda: check_packed(args, device, "sdpa"),
        "packed-flash": lambda: check_packed(args, device, "flash_attention_2"),
        "chunked-memory": lambda: check_chunked_memory(args, device),
        "train-bf16": lambda: check_train(args, device),
        "qlora": lambda: check_qlora(args, device),
        "oom-message": lambda: check_oom(args, device),
        "auto-rows": lambda: check_auto_rows(args, device),
        "throughput": lambda: check_throughput(args, device),
    }
    results = {}
    for name, fn in checks.items():
        if args.only is not None and name not in args.only:
            continue
        t0 = time.perf_counter()
        try:
            found = fn()
            found["status"] = "pass" if found.pop("ok") else "FAIL"
        except Skip as why:
            found = {"status": "skip", "detail": str(why), "figures": {}}
        except Exception as exc:  # a crash is a failed check; the others still run
            found = {"status": "FAIL", "detail": f"{type(exc).__name__}: {str(exc)[:200]}", "figures": {},
                     "traceback": traceback.format_exc()}
        found["seconds"] = round(time.perf_counter() - t0, 2)
        results[name] = found
        gc.collect()  # what a failed check left (an out-of-memory traceback holds its frames)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{name:15} {found['status']:5} {found['seconds']:7.1f}s  {found['detail']}", flush=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    versions = {m: __import__(m).__version__ for m in ("torch", "transformers", "peft")}
    report = {"benchmark": "gpu_check", "device": name, "tiny": args.tiny, "versions": versions,
              "checks": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    failed = [k for k, v in results.items() if v["status"] == "FAIL"]
    print(f"{name}: {sum(v['status'] == 'pass' for v in results.values())} pass, {len(failed)} fail, "
          f"{sum(v['status'] == 'skip' for v in results.values())} skip; json: {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
