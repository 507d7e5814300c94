"""``tunec compile``: link compile units into packed shards and write the plan last.

Order of writes, so an interrupted build is never mistaken for a finished one:
the old ``plan.json`` is removed first; the tokenizer and shards are written
(each to a temporary name, then renamed); then ``manifest.json``; then
``plan.json``, the commit marker.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import FORMAT_VERSION, __version__
from .check import Checked, check
from .errors import Problem, TunecError
from .load import LoadedRecipe
from . import leakage, lock
from .lock import BuildLock
from .link import Linker, leak_reports
from .plan import (
    MANIFEST_FILE,
    MARKER_FILE,
    LeakReport,
    PLAN_FILE,
    Plan,
    RecipeInfo,
    StagePlan,
    TaskPlan,
    TemplatePlan,
    TokenizerPlan,
)
from .recipe import LocalModel, StageModel
from .fileio import atomic_dir, atomic_write_text, canonical_json, sha256_file, sha256_folder, sha256_text
from .sources import fingerprint, load_part
from .tokens import load_tokenizer, tokenizer_info
from .units import Chunk, RowError, UnitResult, UnitSpec, chunks_of, compile_chunk, init_worker, join, plan_docs

logger = logging.getLogger(__name__)

DEFAULT_SHARD_ROWS = 2048
COMPILED = ("stages", "tokenizer", MANIFEST_FILE)  # what a rebuild replaces (runs/ is kept)


@dataclass(frozen=True)
class Options:
    workers: int = 1
    force: bool = False
    shard_rows: int = DEFAULT_SHARD_ROWS
    progress: bool = False


def compile_recipe(recipe_path: str | Path, out: str | Path, options: Options = Options(),
                   overrides: tuple[str, ...] = ()) -> Plan:
    from .load import load_recipe

    checked = check(load_recipe(recipe_path, overrides))
    return build(checked, Path(out), options)


def build(checked: Checked, out: Path, options: Options) -> Plan:
    # Held from the first look at `out` to the plan: a second compile, or a run training
    # on the shards this one would delete, is refused instead (see compiler/lock.py).
    with BuildLock(out, "compile"):
        return _build(checked, out, options)


def _build(checked: Checked, out: Path, options: Options) -> Plan:
    loaded = checked.loaded
    recipe = loaded.recipe
    tok = load_tokenizer(loaded)
    info = tokenizer_info(tok)
    _check_chat(checked, info)

    # Units: a task's train part when a stage trains on it (or it is held out
    # without an eval part, or it draws few-shot exemplars); its eval part when it has one.
    trained = {t for s in recipe.stages for t in s.tasks}
    held = {t for s in recipe.stages for t in s.held_out}
    specs: list[UnitSpec] = []
    for name in checked.used_tasks():
        task = recipe.tasks[name]
        wanted = []
        if name in trained or (name in held and task.eval is None) or task.few_shot is not None:
            wanted.append("train")
        if task.eval is not None:
            wanted.append("eval")
        for part in wanted:
            specs.append(UnitSpec(
                task=name, part=part, templates=checked.templates[name], truncation=task.truncation,
                seq_len=recipe.seq_len, seed=recipe.seed, policy=task.template_policy, format=task.format,
                few_shot=task.few_shot, answer_choices=task.answer_choices,
                record_choices=part == "eval" or name in held,
            ))
    parts = {(s.task, s.part): load_part(loaded, s.task, recipe.tasks[s.task], s.part) for s in specs}
    pools = {s.task: parts[(s.task, "train")].columns for s in specs if s.few_shot is not None and s.part == "train"}

    inputs = {f"source:{n}": fingerprint(loaded, recipe.tasks[n]) for n in checked.used_tasks()}
    inputs.update(
        {f"templates:{n}": {t.name: t.sha256 for t in checked.templates[n]} for n in checked.used_tasks()}
    )

    _check_out(out, loaded, options.force)  # refuse early, before the long work

    chunks = []
    for i, spec in enumerate(specs):
        rows = parts[(spec.task, spec.part)]
        docs = plan_docs(spec, rows.count, len(pools[spec.task][next(iter(pools[spec.task]))]) if spec.task in pools else 0)
        chunks.extend(chunks_of(i, rows.columns, rows.index.tolist(), docs))
    total_rows = sum(p.count for p in parts.values())
    results: list[list[UnitResult]] = [[] for _ in specs]
    with _progress(options.progress, total_rows, "compile") as bar:
        for chunk, result in _run_chunks(chunks, info, specs, pools, options.workers):
            results[chunk.unit].append(result)
            bar(len(chunk.rows))
    units = {(s.task, s.part): join(r, len(s.templates)) for s, r in zip(specs, results)}

    linker = Linker(out=out, seq_len=recipe.seq_len, pad_id=info.pad_id, shard_rows=options.shard_rows,
                    seed=recipe.seed, template_names={n: [t.name for t in checked.templates[n]] for n in recipe.tasks})
    mixes = {s.name: linker.select(s, {t: units[(t, "train")] for t in s.tasks}) for s in recipe.stages}
    leaks = _leakage(recipe, units, parts, mixes)

    # Every user error in the data has surfaced by now: only here is a previous
    # build in `out` replaced.
    _prepare_out(out, loaded, options.force)
    tok_dir = out / "tokenizer"
    _save_tokenizer(tok, tok_dir)
    tok_plan = TokenizerPlan(
        path="tokenizer", sha256=sha256_folder(tok_dir), vocab_size=info.vocab_size,
        bos_id=info.bos_id, eos_id=info.eos_id, pad_id=info.pad_id,
    )

    stages = []
    for stage in recipe.stages:
        train, counts = linker.train(stage, {t: units[(t, "train")] for t in stage.tasks}, mixes[stage.name])
        evals = {}
        for t in list(stage.tasks) + list(stage.held_out):
            unit = units.get((t, "eval")) or (units[(t, "train")] if t in stage.held_out else None)
            if unit is not None:
                evals[t] = linker.eval(stage, t, unit, held_out=t in stage.held_out)
        settings = stage
        if isinstance(stage.model, LocalModel):
            settings = stage.model_copy(update={"model": LocalModel(kind="local", path=str(loaded.resolve(stage.model.path)))})
        stages.append(StagePlan(name=stage.name, settings=settings, train=train, tasks=counts, eval=evals,
                                leakage=leaks.get(stage.name, {})))

    recipe_hash = sha256_text(canonical_json({
        "format_version": FORMAT_VERSION,
        "recipe": recipe.model_dump(mode="json"),
        "inputs": inputs,
        "tokenizer": tok_plan.sha256,
        # only when given, so that a build without overrides keeps its hash
        **({"overrides": [o.text for o in loaded.overrides]} if loaded.overrides else {}),
    }))
    plan = Plan(
        versions=_versions(),
        recipe=RecipeInfo(file=loaded.path.name, sha256=sha256_text(loaded.text), hash=recipe_hash,
                          overrides=[o.text for o in loaded.overrides]),
        seq_len=recipe.seq_len,
        seed=recipe.seed,
        tokenizer=tok_plan,
        inputs=inputs,
        tasks={n: _task_plan(checked, n) for n in checked.used_tasks()},
        stages=stages,
    )
    _write_manifest(out)
    atomic_write_text(out / PLAN_FILE, canonical_json(plan.model_dump(mode="json")))
    return plan


def _task_plan(checked: Checked, name: str) -> TaskPlan:
    task = checked.recipe.tasks[name]
    return TaskPlan(
        columns=checked.columns[name],
        templates=[TemplatePlan(name=t.name, sha256=t.sha256, source=t.text, kind=t.kind,
                                answer_choices=t.answer_choices, separator=t.separator)
                   for t in checked.templates[name]],
        format=task.format.kind,
        system=getattr(task.format, "system", None),
        answer_choices=task.answer_choices,
    )


def _check_chat(checked: Checked, info) -> None:
    chat = [n for n in checked.used_tasks() if checked.recipe.tasks[n].format.kind == "chat"]
    if chat and not info.chat_template:
        raise TunecError(checked.loaded.problem(
            ("tokenizer",), f"task(s) {', '.join(chat)} use `format: chat`, but the tokenizer has no chat "
            "template; give one with `tokenizer.chat_template: FILE`"))


def _leakage(recipe, units, parts, mixes) -> dict[str, dict[str, LeakReport]]:
    """Per stage, eval and held-out examples whose text the model has trained on by then.

    A stage's model has seen its own mixture and those of the stages it starts
    from (``model: {kind: stage}``, transitively): a task held out of a first
    stage and fine-tuned on in a second one leaks only into the second stage's eval.
    """
    def texts_of(task: str, part: str, rows: np.ndarray) -> list[set[str]]:
        src = parts[(task, part)]
        pos = {int(r): i for i, r in enumerate(src.index.tolist())}
        return [leakage.texts({k: v[pos[int(r)]] for k, v in src.columns.items()}) for r in np.unique(rows)]

    if not any((t, "eval") in units or t in s.held_out for s in recipe.stages for t in [*s.tasks, *s.held_out]):
        return {}  # nothing is evaluated: nothing can leak
    own: dict[str, dict[str, list[set[str]]]] = {
        stage.name: {t: texts_of(t, "train", units[(t, "train")].row[mixes[stage.name].docs[t]]) for t in stage.tasks}
        for stage in recipe.stages
    }
    by_name = {stage.name: stage for stage in recipe.stages}
    reports: dict[str, dict[str, LeakReport]] = {}
    problems = []
    for stage in recipe.stages:
        seen: dict[str, list[set[str]]] = {}
        name: str | None = stage.name
        while name is not None:  # this stage and the stages its model comes from
            for t, rows in own[name].items():
                seen.setdefault(t, []).extend(rows)
            model = by_name[name].model
            name = model.stage if isinstance(model, StageModel) else None
        evals = {}
        for t in list(stage.tasks) + list(stage.held_out):
            part = "eval" if (t, "eval") in units else ("train" if t in stage.held_out else None)
            if part is not None:
                evals[t] = texts_of(t, part, units[(t, part)].row)
        found = leak_reports(seen, evals)
        if found:
            reports[stage.name] = found
            for t, r in found.items():
                with_ = ", ".join(f"{k} ({v})" for k, v in r.by_task.items())
                problems.append(f"stage '{stage.name}': {r.leaked} of {r.examples} eval examples of task '{t}' "
                                f"also appear in the training mixture: {with_}")
    if problems and recipe.leakage == "error":
        raise TunecError([Problem(p + "; remove them, or set `leakage: warn` to train anyway") for p in problems])
    if problems and recipe.leakage == "warn":
        for p in problems:
            logger.warning(p)
    return reports


# ----------------------------------------------------------------- output folder


def _check_out(out: Path, loaded: LoadedRecipe, force: bool) -> str | None:
    """Refuse a folder holding something else; return the recipe of the build it holds."""
    marker = out / MARKER_FILE
    if out.exists() and not out.is_dir():
        raise TunecError(f"output {out} exists and is not a folder")
    if not out.is_dir() or all(p.name in lock.FILES for p in out.iterdir()):
        return None
    if not marker.is_file():
        raise TunecError(
            f"output folder {out} is not empty and is not a tunec build folder; "
            "choose an empty or new folder"
        )
    try:
        previous = json.loads(marker.read_text(encoding="utf-8")).get("recipe")
    except (json.JSONDecodeError, AttributeError):
        previous = None
    if previous != str(loaded.path) and not force:
        raise TunecError(
            f"output folder {out} holds the build of another recipe ({previous}); "
            "pass --force to replace it, or choose another folder"
        )
    return previous


def _prepare_out(out: Path, loaded: LoadedRecipe, force: bool) -> None:
    """Clear a previous build of ours (its `runs/` stay when the recipe is the same)."""
    marker = out / MARKER_FILE
    previous = _check_out(out, loaded, force)
    if out.is_dir():
        # Commit marker first: from here on the folder is an unfinished build.
        (out / PLAN_FILE).unlink(missing_ok=True)
        for name in COMPILED:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        if force and previous != str(loaded.path):
            shutil.rmtree(out / "runs", ignore_errors=True)  # trained on another recipe's data
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps({"recipe": str(loaded.path)}) + "\n")  # a kill never leaves half of it


def _save_tokenizer(tok, folder: Path) -> None:
    atomic_dir(folder, lambda tmp: tok.save_pretrained(str(tmp)))


def _write_manifest(out: Path) -> None:
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        if rel.split("/")[0] in COMPILED:
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    atomic_write_text(out / MANIFEST_FILE, canonical_json({"format_version": FORMAT_VERSION, "files": files}))


# ----------------------------------------------------------------- workers


def _run_chunks(chunks: list[Chunk], info, specs, pools, workers: int) -> Iterator[tuple[Chunk, UnitResult]]:
    workers = min(workers, len(chunks))  # a process per chunk at most: spawning costs ~1 s
    try:
        if workers <= 1:
            with _single_threaded_tokenizers():
                init_worker(info, specs, pools, single_thread=True)
                for chunk in chunks:
                    yield chunk, compile_chunk(chunk)
            return
        # spawn: a clean interpreter per worker (fork after the tokenizer's thread
        # pool has started can deadlock), importing only the light worker modules.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=init_worker, initargs=(info, specs, pools, True)) as pool:
            for chunk, result in zip(chunks, pool.imap(compile_chunk, chunks, chunksize=1)):
                yield chunk, result
    except RowError as exc:
        part = "eval" if exc.part == "eval" else "train"
        where = f" [{exc.file}:{exc.line}]" if exc.line else (f" [{exc.file}]" if exc.file else "")
        row = "" if exc.row is None else f" row {exc.row}"  # None: a template that no row can render
        raise TunecError(Problem(f"task '{exc.task}', {part}{row}: {exc.message}{where}")) from None


@contextmanager
def _single_threaded_tokenizers():
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


@contextmanager
def _progress(enabled: bool, total: int, desc: str) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda n: None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="rows", disable=None, leave=False) as bar:
        yield bar.update


def _versions() -> dict[str, str]:
    out = {"tunec": __version__}
    for dist in ("tokenizers", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out

