#!/usr/bin/env python
"""Benchmark: does instruction tuning transfer to held-out tasks, and does fine-tuning win on its task?

Runs the three evidence recipes of ``recipes/`` from the same real pretrained
model, SmolLM2-135M-Instruct (built offline by ``bench/get_model.py``), over
the real classification tasks in ``../shared/data/tasks``:

1. ``evidence_instruct.yaml``: instruction tuning on ten tasks, two templates each;
2. ``evidence_target.yaml``: fine-tuning on the target task (sst2) alone;
3. ``evidence_hybrid.yaml``: the instruction tuning of 1, then the target task.

Each is compiled with the model's own tokenizer (``--set tokenizer=...``) and
its first stage starting from the model (``--set stages.0.model=...``), then
trained by ``tunec run``, which scores every stage on its eval sets with answer
choices and the starting model once (``runs/<stage>/eval.json``). The table
has one row per model: the mean zero-shot accuracy over the five held-out
tasks (rte, wic, is_humor, mrpc, student_question_categories: no stage of any
recipe trains on them) and the accuracy on the target task's test split; the
base row is the starting model. ``acc`` ranks the choices by summed
log-likelihood, ``acc_norm`` per character (see README, "Evaluation").

The default is the reduced run for a CPU (``--max-steps 1`` per stage of
``--batch-tokens 384``, one row, and only the first ``--limit 3`` test rows of
each eval task compiled, which bounds the eval loss pass as well as the
accuracy): it proves the machinery end to end, its numbers are noise. Raise
the three options for a longer CPU run. ``--full`` trains every stage as its recipe says and
scores every record (meant for a GPU). Without ../shared/data it prints
``skip: ...`` and exits 0.

    python bench/evidence.py                 # reduced (CPU, a few minutes)
    python bench/evidence.py --full          # the recipes as written, every record (GPU)
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
DEFAULT_SHARED = REPO.parent / "shared"

RECIPES = {  # the table's rows, in order, with the stage whose model each row scores
    "instruction tuning": ("evidence_instruct.yaml", "instruct"),
    "fine-tuning": ("evidence_target.yaml", "target"),
    "hybrid": ("evidence_hybrid.yaml", "target"),
}
TARGET = "sst2"
HELD_OUT = ("rte", "wic", "is_humor", "mrpc", "student_question_categories")
METRICS = ("acc", "acc_norm")


def tunec(*args: str) -> float:
    """Run the CLI; its output goes to ours. Returns the wall time."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tunec", *args], cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"error: `tunec {' '.join(args)}` exited with {proc.returncode}")
    return time.perf_counter() - started


def stages_of(recipe: Path) -> list[str]:
    from tunec.compiler.load import load_recipe

    return [s.name for s in load_recipe(recipe).recipe.stages]


def build(name: str, recipe: Path, model: Path, out: Path, limit: int | None, max_steps: int | None,
          batch_tokens: int | None, device: str, base_cache: Path | None) -> dict[str, Any]:
    """Compile ``recipe`` for ``model`` and train it; the wall times. ``base_cache``: an earlier build's
    ``runs/.base-eval``, whose scores of the same starting model on the same records `tunec run` reuses."""
    sets = ["--set", f"tokenizer={{kind: local, path: {model}}}",
            "--set", f"stages.0.model={{kind: local, path: {model}}}"]
    for task in (*HELD_OUT, TARGET) if limit is not None else ():  # eval loss and accuracy: the first rows only
        sets += ["--set", f"tasks.{task}.eval={{split: test, stop: {limit}}}"]
    print(f"== {name}: {recipe.name}", flush=True)
    compile_s = tunec("compile", str(recipe), "-o", str(out), "--force", *sets)
    if base_cache is not None and base_cache.is_dir():
        shutil.copytree(base_cache, out / "runs" / base_cache.name, dirs_exist_ok=True)
    run_args = ["run", str(out), "--device", device, "--force", "--no-progress", "--eval-accuracy"]
    if max_steps is not None:
        run_args += ["--max-steps", str(max_steps)]
    for stage in stages_of(recipe) if batch_tokens is not None else []:
        run_args += ["--set", f"stages.{stage}.batch_tokens={batch_tokens}"]
    run_s = tunec(*run_args)
    return {"compile_s": round(compile_s, 1), "run_s": round(run_s, 1)}


def scores(part: dict[str, Any]) -> dict[str, Any]:
    """The held-out mean and the target's metrics of one eval.json part, with every task's."""
    tasks = part["tasks"]
    missing = [t for t in (*HELD_OUT, TARGET) if t not in tasks]
    if missing:
        raise SystemExit(f"error: eval.json lacks {', '.join(missing)}")
    return {
        "held_out": {m: sum(tasks[t][m] for t in HELD_OUT) / len(HELD_OUT) for m in METRICS},
        "target": {m: tasks[TARGET][m] for m in METRICS},
        "n": {t: tasks[t]["n"] for t in (*HELD_OUT, TARGET)},
        "tasks": {t: {m: tasks[t][m] for m in (*METRICS, "acc_calibrated", "chance", "majority")}
                  for t in (*HELD_OUT, TARGET)},
    }


def table(rows: dict[str, dict[str, Any]]) -> list[str]:
    header = ["model", "held-out acc", "held-out acc_norm", f"target ({TARGET}) acc", "target acc_norm"]
    cells = [[name, f"{r['held_out']['acc']:.3f}", f"{r['held_out']['acc_norm']:.3f}", f"{r['target']['acc']:.3f}",
              f"{r['target']['acc_norm']:.3f}"] for name, r in rows.items()]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in [header, *cells]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="every step and every record (for a GPU)")
    parser.add_argument("--limit", type=int, default=None,
                        help="test rows per eval task, compiled [reduced: 3; --full: all]")
    parser.add_argument("--max-steps", type=int, default=None, help="steps per stage [reduced: 1; --full: all]")
    parser.add_argument("--batch-tokens", type=int, default=None,
                        help="tokens per step [reduced: 384, one row; --full: as the recipes say]")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--model", type=Path, default=None, help="the model folder [default: bench/get_model.py's]")
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the folder holding data/")
    parser.add_argument("--workdir", type=Path, default=None, help="the builds [default: a temporary folder]")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "evidence.json")
    args = parser.parse_args()
    if not (args.shared / "data" / "tasks").is_dir():
        print(f"skip: {args.shared / 'data' / 'tasks'} is absent (the real tasks live outside the repository)")
        return
    if not (REPO / "recipes" / "../../shared").resolve().samefile(args.shared.resolve()):
        raise SystemExit("error: the evidence recipes read ../shared/data beside the repository; "
                         f"{args.shared} is another folder")
    limit = args.limit if args.limit is not None else (None if args.full else 3)
    max_steps = args.max_steps if args.max_steps is not None else (None if args.full else 1)
    batch_tokens = args.batch_tokens if args.batch_tokens is not None else (None if args.full else 384)

    from get_model import get_model

    model = (args.model or get_model()).resolve()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tunec-evidence-"))
    started = time.perf_counter()
    timings, rows, base = {}, {}, None
    for name, (recipe, stage) in RECIPES.items():
        out = work / Path(recipe).stem
        cache = work / Path(RECIPES["instruction tuning"][0]).stem / "runs" / ".base-eval"
        timings[name] = build(name, REPO / "recipes" / recipe, model, out, limit, max_steps, batch_tokens,
                              args.device, cache if out != cache.parents[1] else None)
        saved = json.loads((out / "runs" / stage / "eval.json").read_text(encoding="utf-8"))
        if base is None:
            base = scores(saved["base"])
        elif scores(saved["base"])["tasks"] != base["tasks"]:
            print(f"warning: {name}: the starting model scored differently in this build", file=sys.stderr)
        rows[name] = scores(saved["stage"])
    assert base is not None
    rows = {"base (SmolLM2-135M-Instruct)": base, **rows}
    lines = table(rows)
    settings = (f"{'full' if args.full else 'reduced'}: max_steps {max_steps or 'as the recipes say'}, "
                f"batch_tokens {batch_tokens or 'as the recipes say'}, limit {limit or 'none'} per task, "
                f"held-out = mean of {', '.join(HELD_OUT)}")
    print()
    print(settings)
    for line in lines:
        print(line)
    import torch

    result = {"format": "tunec.bench.evidence",
              "settings": {"full": args.full, "limit": limit, "max_steps": max_steps, "batch_tokens": batch_tokens,
                           "device": args.device, "model": str(model)},
              "machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
              "held_out_tasks": list(HELD_OUT), "target": TARGET, "rows": rows, "timings": timings,
              "wall_s": round(time.perf_counter() - started, 1), "table": lines}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    from tunec.compiler.fileio import atomic_write_json

    atomic_write_json(args.json, result)
    print(f"\n{args.json}")


if __name__ == "__main__":
    main()
