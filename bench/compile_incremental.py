#!/usr/bin/env python
"""Benchmark: incremental ``tunec compile`` (full, no-change, one-template edit) and peak memory by data size.

A benchmark, not a test: it measures, prints a table and writes JSON; it fails
(exit 1) only when a compile fails or an incremental build differs from a
clean one. See ``bench/README.md``.

1. Writes a 40-task recipe over ``shared/data/tasks`` (each task: its
   config's two instructions as two templates over its inference prompt, its
   options as answer choices, the test split as eval; one ``sft`` stage over
   all of them; GPT-2 tokenizer from ``shared/data/tokenizers/gpt2``).
2. Times, each as a fresh ``tunec compile`` process into the same folder and
   one cache folder: the full build (empty cache), a rebuild with nothing
   changed, and a rebuild after editing one template of one task; then a clean
   build of the edited recipe (``--no-cache``, another folder), whose every
   byte the incremental build must equal.
3. The memory curve: ``tunec compile --no-cache`` of one task over
   ``alpaca_data_cleaned_1000.json`` replicated to 10k, 100k (and, with
   ``--sizes``, 1M) rows, each compile's peak RSS (its own process, and the
   largest of its worker processes) and time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = Path(__file__).resolve().parents[2] / "shared"
TASKS = Path("data") / "tasks"
ALPACA = Path("data") / "instruct" / "alpaca_data_cleaned_1000.json"
GPT2 = Path("data") / "tokenizers" / "gpt2"
TARGET_NO_CHANGE = 0.05  # a rebuild with nothing changed, as a share of the full build
TARGET_ONE_TEMPLATE = 0.10  # a rebuild after one template edit
TARGET_FLAT = 2.0  # peak RSS at the largest size / at the smallest
TARGET_RSS_1M = 1 << 30


# ----------------------------------------------------------------- inputs


def jinja(prompt: str) -> str:
    """A task config's ``{column}`` prompt as Jinja."""
    return re.sub(r"\{(\w+)\}", r"{{ \1 }}", prompt.replace("{%", "{ %").replace("{{", "{ {"))


def write_tasks_recipe(shared: Path, folder: Path, count: int) -> tuple[Path, Path]:
    """The recipe and the template file the edit step changes."""
    names = sorted(p.name for p in (shared / TASKS).iterdir() if (p / "config.json").is_file())[:count]
    tdir = folder / "templates"
    tdir.mkdir(parents=True, exist_ok=True)
    lines = ["# Written by bench/compile_incremental.py",
             f"tokenizer: {{kind: local, path: {json.dumps(str((shared / GPT2).resolve()))}}}",
             "seq_len: 1024", "seed: 7", "leakage: warn", "tasks:"]
    for name in names:
        cfg = json.loads((shared / TASKS / name / "config.json").read_text(encoding="utf-8"))
        refs = []
        for i, key in enumerate(("instruction", "instruction_2")):
            path = tdir / f"{name}_{i}.j2"
            path.write_text("{% block prompt %}" + jinja(cfg[key] + "\n" + cfg["inference_prompt"])
                            + "{% endblock %}\n{% block completion %} {{ label }}{% endblock %}\n", encoding="utf-8")
            refs.append(f"{{kind: file, path: {json.dumps(str(path))}}}")
        data = (shared / TASKS / name).resolve()
        lines += [f"  {name}:",
                  f"    source: {{kind: jsonl, path: {{train: {json.dumps(str(data / 'train.jsonl'))}, "
                  f"test: {json.dumps(str(data / 'test.jsonl'))}}}}}",
                  f"    templates: [{', '.join(refs)}]",
                  f"    answer_choices: {json.dumps([str(o) for o in cfg['options']])}",
                  "    eval: {split: test}",
                  "    truncation: drop"]
    lines += ["stages:", "  - name: sft", "    objective: sft", f"    tasks: [{', '.join(names)}]",
              "    model: {kind: config, config: {model_type: llama}}"]
    recipe = folder / "tasks.yaml"
    recipe.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return recipe, tdir / f"{names[len(names) // 2]}_0.j2"


def write_alpaca(shared: Path, folder: Path, rows: int) -> Path:
    src = json.loads((shared / ALPACA).read_text(encoding="utf-8"))
    data = folder / f"alpaca_{rows}.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for i in range(rows):
            r = src[i % len(src)]
            fh.write(json.dumps({"id": i, "instruction": r["instruction"], "input": r["input"],
                                 "output": r["output"]}, ensure_ascii=False) + "\n")
    recipe = folder / f"alpaca_{rows}.yaml"
    recipe.write_text(
        "# Written by bench/compile_incremental.py\n"
        f"tokenizer: {{kind: local, path: {json.dumps(str((shared / GPT2).resolve()))}}}\n"
        "seq_len: 2048\n"
        "tasks:\n"
        f"  alpaca: {{source: {{kind: jsonl, path: {json.dumps(str(data))}}}, templates: [qa/alpaca], "
        "truncation: drop}\n"
        "stages:\n"
        "  - {name: sft, objective: sft, tasks: [alpaca], model: {kind: config, config: {model_type: llama}}}\n",
        encoding="utf-8")
    return recipe


# ----------------------------------------------------------------- runs


# Each timed compile: the CLI run as the `tunec` script runs it, then its peak RSS written; a `-c`
# program that imports no more than the script does, so that the time is tunec's and not also that of
# importing this benchmark.
CHILD = """
import json, resource, sys
from tunec import cli
code = 0
try:
    cli.main(sys.argv[2:], prog_name="tunec")
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
finally:
    with open(sys.argv[1], "w") as fh:
        fh.write(json.dumps({"self_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                             "workers_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
cli.leave(code)  # as the `tunec` script ends (tunec.cli.console)
"""


def compile_(recipe: Path, out: Path, args: list[str], env: dict[str, str], workers: int) -> dict:
    result = out.with_name(out.name + ".rss.json")
    cmd = [sys.executable, "-c", CHILD, str(result),
           "compile", str(recipe), "-o", str(out), "--workers", str(workers), "--force", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"compile failed (exit {proc.returncode}): {' '.join(cmd)}")
    rss = json.loads(result.read_text())
    units = next((ln for ln in proc.stdout.splitlines() if ln.startswith("units:")), "")
    kept = sum("shards kept" in ln for ln in proc.stdout.splitlines())
    return {"seconds": round(seconds, 3), "peak_rss_mib": round(rss["self_kib"] / 1024, 1),
            "worker_peak_rss_mib": round(rss["workers_kib"] / 1024, 1), "units": units, "stages_kept": kept}


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".tunec")}


def prime(data: Path, env: dict[str, str]) -> None:
    """Convert a JSONL to Arrow once (datasets' cache in the work folder), as compile would."""
    code = ("import sys, datasets; datasets.disable_progress_bars(); "
            "datasets.load_dataset('json', data_files={'rows': sys.argv[1]}, split='rows')")
    subprocess.run([sys.executable, "-c", code, str(data)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def bench(args, shared: Path, work: Path) -> int:
    env = dict(os.environ, HF_DATASETS_CACHE=str(work / "hf-datasets-cache"), HF_HUB_OFFLINE="1",
               TUNEC_CACHE=str(work / "cache"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    # Python's bytecode cache as an installed tunec has it: without it every compile first compiles
    # tunec's sources (~0.07 s), which a no-change rebuild would mostly be measuring.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    results: dict = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                 "platform": platform.platform()},
                     "workers": args.workers}

    recipe, template = write_tasks_recipe(shared, work, args.tasks)
    for d in sorted((shared / TASKS).iterdir())[: args.tasks]:
        for split in ("train.jsonl", "test.jsonl"):
            if (d / split).is_file():
                prime(d / split, env)
    out = work / "out"
    full = compile_(recipe, out, [], env, args.workers)
    again = compile_(recipe, out, [], env, args.workers)
    template.write_text(template.read_text(encoding="utf-8").replace("{% block prompt %}",
                                                                     "{% block prompt %}Task: "), encoding="utf-8")
    edit = compile_(recipe, out, [], env, args.workers)
    clean = compile_(recipe, work / "clean", ["--no-cache"], env, args.workers)
    identical = tree(out) == tree(work / "clean")
    results["incremental"] = {"tasks": args.tasks, "full": full, "no_change": again, "one_template": edit,
                              "clean_after_edit": clean, "identical_to_clean": identical,
                              "no_change_share": round(again["seconds"] / full["seconds"], 4),
                              "one_template_share": round(edit["seconds"] / full["seconds"], 4)}

    curve = []
    for rows in args.sizes:
        r = write_alpaca(shared, work, rows)
        prime(work / f"alpaca_{rows}.jsonl", env)
        m = compile_(r, work / f"alpaca_{rows}_out", ["--no-cache"], env, args.workers)
        m["rows"] = rows
        curve.append(m)
        shutil.rmtree(work / f"alpaca_{rows}_out", ignore_errors=True)
    results["memory"] = curve

    inc = results["incremental"]

    def ok(good: bool) -> str:
        return "ok" if good else "MISSED"

    print(f"incremental compile, {args.tasks} tasks over {shared / TASKS}, --workers {args.workers}")
    print(f"  {'build':<26}{'seconds':>9}{'share':>8}{'peak RSS':>11}  units / stages")
    for name, r, share, target in (("full (empty cache)", full, 1.0, None),
                                   ("no change", again, inc["no_change_share"], TARGET_NO_CHANGE),
                                   ("one template edited", edit, inc["one_template_share"], TARGET_ONE_TEMPLATE),
                                   ("clean, --no-cache", clean, clean["seconds"] / full["seconds"], None)):
        mark = "" if target is None else f"  target <= {target:.0%}: {ok(share <= target)}"
        print(f"  {name:<26}{r['seconds']:>9.2f}{share:>8.1%}{r['peak_rss_mib']:>8.0f} MiB  {r['units']}"
              f"{', ' + str(r['stages_kept']) + ' stage(s) kept' if r['stages_kept'] else ''}{mark}")
    print(f"  incremental build byte-identical to the clean build: {identical}")
    print("memory curve: tunec compile --no-cache, alpaca rows replicated")
    print(f"  {'rows':>9}{'seconds':>9}{'main RSS':>12}{'worker RSS':>12}")
    for m in curve:
        print(f"  {m['rows']:>9,}{m['seconds']:>9.1f}{m['peak_rss_mib']:>8.0f} MiB{m['worker_peak_rss_mib']:>8.0f} MiB")
    if len(curve) >= 2:
        growth = curve[-1]["peak_rss_mib"] / curve[0]["peak_rss_mib"]
        results["memory_growth"] = round(growth, 3)
        print(f"  peak RSS {curve[-1]['rows']:,} / {curve[0]['rows']:,} rows: {growth:.2f}x "
              f"(target <= {TARGET_FLAT:.0f}x: {ok(growth <= TARGET_FLAT)})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"results: {args.json}")
    return 0 if identical else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=40, help="tasks from shared/data/tasks [40]")
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[10_000, 100_000],
                    help="alpaca rows for the memory curve, comma-separated [10000,100000]; add 1000000 for 1M")
    ap.add_argument("--workers", type=int, default=1, help="--workers of every compile [1]")
    ap.add_argument("--workdir", type=Path, default=None, help="work folder (kept) [a temporary one, removed]")
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help=f"the shared folder [{DEFAULT_SHARED}]")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "compile_incremental.json",
                    help="where to write the results [bench/results/compile_incremental.json]")
    args = ap.parse_args()
    shared = args.shared.resolve()
    if not (shared / TASKS).is_dir() or not (shared / ALPACA).is_file() or not (shared / GPT2).is_dir():
        print(f"skip: shared data not found under {shared} (need {TASKS}, {ALPACA}, {GPT2})")
        return 0
    tmp = None
    if args.workdir is None:
        tmp = tempfile.mkdtemp(prefix="tunec-incr-")
        work = Path(tmp)
    else:
        work = args.workdir.resolve()
        work.mkdir(parents=True, exist_ok=True)
    try:
        return bench(args, shared, work)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
