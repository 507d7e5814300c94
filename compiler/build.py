"""``tunec compile``: link compile units into packed shards and write the plan last.

A compile never loses a finished build: the new build is written whole into a
staging folder beside ``OUT`` (``.OUT.tunec-new-PID``, same filesystem), the
tokenizer and shards each to a temporary name then renamed, then
``manifest.json``, then ``plan.json``. What ``OUT`` holds besides the compiled
files (``runs/``, the lock) is hard-linked into it, and one atomic exchange of
the two folders swaps it in. Until that exchange the previous build is
untouched, whatever fails or kills the compile; after it, the staging path
holds the old build and is removed. The next compile removes staging folders
a killed one left behind.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import functools
import json
import logging
import os
import shutil
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from . import FORMAT_VERSION, __version__, audit, estimate, leakage, lint, lock, preference, tokcache
from .cache import Cache, code_versions, default_dir
from .check import Checked, check, start_model_checks
from .errors import Problem, TunecError
from .executors import SPARE_CORES_FROM, Workers, can_fork, usable_cpus
from .fileio import (
    atomic_dir,
    atomic_write_text,
    canonical_json,
    compact_json,
    on_two_threads,
    sha256_file,
    sha256_folder,
    sha256_text,
)
from .incremental import EARLY_SPAWN_BYTES, LeakKeys, Part, cache_of, compile_units, leak_reports_cached, unit_keys
from .link import Linker
from .load import LoadedRecipe
from .lock import BuildLock
from .modelconfig import checks_running
from .plan import (
    MANIFEST_FILE,
    MARKER_FILE,
    PLAN_FILE,
    EvalSet,
    LeakReport,
    Plan,
    RecipeInfo,
    StagePlan,
    TaskPlan,
    TemplatePlan,
    TokenizerPlan,
    read_plan,
)
from .recipe import LocalModel, LocalTokenizer, Stage, StageModel
from .sources import fingerprint, prefetch_arrow, quiet_datasets, unconverted_bytes
from .tokens import TokenizerInfo
from .units import UnitSpec
from .unitstore import release
from .versions import dist_version

logger = logging.getLogger(__name__)

DEFAULT_SHARD_ROWS = 2048
COMPILED = ("stages", "tokenizer", MANIFEST_FILE)  # what a rebuild replaces (runs/ is kept)
UNITS_SCRATCH = ".units"


@dataclass(frozen=True)
class Options:
    workers: int = 1
    force: bool = False
    shard_rows: int = DEFAULT_SHARD_ROWS
    progress: bool = False
    use_cache: bool = True  # False: compile every unit and link every stage; read and store nothing
    cache: Path | None = None  # the cache folder; None: $TUNEC_CACHE or the user's cache folder (at build time)
    executor: str = "local"  # local | ray (compiler/executors.py)
    ray_address: str | None = None  # a running Ray cluster; None: a local one for this compile
    # told, once the units are compiled, which were reused from the cache and which were rebuilt
    on_units: Callable[[list[tuple[str, str]], list[tuple[str, str]]], None] | None = None

    def cache_dir(self) -> Path | None:
        return None if not self.use_cache else (self.cache if self.cache is not None else default_dir())


def compile_recipe(recipe_path: str | Path, out: str | Path, options: Options = Options(),
                   overrides: tuple[str, ...] = ()) -> Plan:
    from .load import load_recipe

    check_output(Path(out))  # before any work: the recipe may take a while to check
    loaded = load_recipe(recipe_path, overrides)
    # Where this process may fork (Linux, no thread running yet), the workers for source files new to
    # the cache are forked now: nearly free, idle until handed their setup, so on any number of cores.
    # Where cores are to spare, local files are converted in a child process while the tokenizer loads
    # (sources.py); when they are new to the cache (so their units are to be compiled) and large
    # enough to start workers early for, spawned workers start now too, beside both. On fewer cores (the
    # tokenizer's load and the model-config check's child take them), spawned workers start once the
    # tokenizer is loaded, beside this process importing `datasets` while it waits for that check.
    spare = usable_cpus() >= SPARE_CORES_FROM
    cache = options.cache_dir()
    ahead: Workers | None = None
    try:
        forking = _parallel(options) and can_fork()
        if forking:
            ahead = _ahead(options, unconverted_bytes(loaded, cache)[0], fork=True)
        if spare:
            fresh = prefetch_arrow(loaded, cache)
            if ahead is None:
                ahead = _ahead(options, fresh)
        tokenizer = _early_tokenizer(loaded, cache)
        waiting = checks_running()  # check() would wait for its child
        may_start = ahead is None and _parallel(options) and not forking  # else decided above, the same way
        if waiting or may_start:
            later, hub = unconverted_bytes(loaded, cache)  # what `datasets` will read here (not prefetched)
            if may_start:
                ahead = _ahead(options, later)
            if waiting and (later or hub):  # import it meanwhile
                quiet_datasets()
        checked = check(loaded, cache)
        return build(checked, Path(out), options, tokenizer, ahead)
    finally:
        if ahead is not None:
            ahead.close()  # unless the build used them (and has closed them already): never handed over


def _parallel(options: Options) -> bool:
    """Whether the compile's units run in worker processes of this machine."""
    return options.executor == "local" and options.workers > 1


def _ahead(options: Options, fresh: int, fork: bool = False) -> Workers | None:
    """Worker processes started now (``fork``: forked, where :func:`.executors.can_fork`), for a compile
    in local workers whose source files new to the cache (``fresh`` bytes: their units will be compiled)
    are large enough to give each worker chunks of its own; None otherwise."""
    if _parallel(options) and fresh >= EARLY_SPAWN_BYTES * options.workers:
        return Workers.ahead(options.workers, fork)
    return None


def _early_tokenizer(loaded: LoadedRecipe, cache: Path | None) -> tuple[Any, TokenizerInfo] | None:
    """The tokenizer, loaded while the model configs are checked, when that check has to start a child
    process (transformers imported there: about a second, which the load then overlaps); None when it
    does not, or when the load fails (the check then says why, located, and the build loads it again).
    Only a local tokenizer: a hub one may go to the network, which must not delay the check's errors."""
    spec = loaded.recipe.tokenizer
    if not start_model_checks(loaded, cache) or not isinstance(spec, LocalTokenizer) or \
            not loaded.resolve(spec.path).is_dir():
        return None
    try:
        return tokcache.load(loaded, cache)
    except Exception:  # noqa: BLE001 - any failure here is the check's to report, or the build's
        return None


def build(checked: Checked, out: Path, options: Options, tokenizer: tuple[Any, TokenizerInfo] | None = None,
          ahead: Workers | None = None) -> Plan:
    check_output(out)
    # Held from the first look at `out` to the swap: a second compile, or a run training
    # on the shards this one replaces, is refused instead (see compiler/lock.py).
    with BuildLock(out, "compile"):
        # A symlinked OUT: build beside its target, on the target's filesystem.
        real = out.resolve()
        _remove_leftovers(real)
        staging = real.with_name(f"{STAGING_PREFIX % real.name}{os.getpid()}")
        try:
            plan = _build(checked, out, staging, options, tokenizer, ahead)
            _swap_in(real, staging, checked.loaded, options.force)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # the unfinished new build, or the old one
        return plan


def _build(checked: Checked, out: Path, staging: Path, options: Options,
           tokenizer: tuple[Any, TokenizerInfo] | None = None, ahead: Workers | None = None) -> Plan:
    with ExitStack() as cleanup:  # the worker processes, kept from the units to the shards
        return _build_in(checked, out, staging, options, tokenizer, cleanup, ahead)


def _build_in(checked: Checked, out: Path, staging: Path, options: Options,
              tokenizer: tuple[Any, TokenizerInfo] | None, cleanup: ExitStack, ahead: Workers | None = None) -> Plan:
    loaded = checked.loaded
    recipe = loaded.recipe
    estimate.prefetch(list(recipe.stages), options.cache_dir())  # model configs built beside the compile
    # loaded (or read back from the cache) now, unless the compile did so while the configs were checked
    tok, info = tokenizer if tokenizer is not None else tokcache.load(loaded, options.cache_dir())
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
                record_choices=part == "eval" or name in held, audit=recipe.audit,
            ))
    inputs = {f"source:{n}": fingerprint(loaded, recipe.tasks[n]) for n in checked.used_tasks()}
    inputs.update(
        {f"templates:{n}": {t.name: t.sha256 for t in checked.templates[n]} for n in checked.used_tasks()}
    )

    _check_out(out, loaded, options.force)  # refuse early, before the long work

    # Every key is known before any unit is read: a rebuild whose units, stages, eval sets and leakage
    # settings all match the build in OUT (and whose stages' files are intact) reads no unit at all.
    keyed = unit_keys(checked, specs, info)
    linker = Linker(out=staging, seq_len=recipe.seq_len, pad_id=info.pad_id, shard_rows=options.shard_rows,
                    seed=recipe.seed, template_names={n: [t.name for t in checked.templates[n]] for n in recipe.tasks})
    have = {(s.task, s.part) for s in specs}
    settings_of: dict[str, Stage] = {}
    eval_parts_of: dict[str, dict[str, Part]] = {}
    link_keys: dict[str, str] = {}
    eval_keys: dict[str, str] = {}
    for stage in recipe.stages:
        settings = stage
        if isinstance(stage.model, LocalModel):
            local = LocalModel(kind="local", path=str(loaded.resolve(stage.model.path)))
            settings = stage.model_copy(update={"model": local})
        settings_of[stage.name] = settings
        link_keys[stage.name] = _link_key(settings, keyed.units, linker, info)
        eval_parts_of[stage.name] = {
            t: (t, "eval") if (t, "eval") in have else (t, "train")
            for t in [*stage.tasks, *stage.held_out] if (t, "eval") in have or t in stage.held_out}
        for t, evaluated in eval_parts_of[stage.name].items():
            eval_keys[f"{stage.name}/{t}"] = _eval_key(stage, t, keyed.units[evaluated], linker, info)
    leak_parts = _leak_parts(recipe, specs)
    build_key = _build_key(checked, keyed.units, link_keys, eval_keys, leak_parts)
    previous = _Previous(out.resolve())  # the build in OUT, whose unchanged stages and eval sets are kept
    # ... and whose units are all in the cache (marked used, for `cache prune --older-than`; read, and
    # checked against their sha256, only by a compile that needs them)
    unchanged = (options.use_cache and _all_kept(previous, recipe, build_key)
                 and _touch_units(Cache(options.cache_dir() or default_dir()), keyed.units))

    staging.mkdir()
    scratch = staging / UNITS_SCRATCH  # units of a compile without a cache; removed before the swap
    warnings: dict[str, list[str]] = {"units": [], "leakage": []}
    if unchanged:
        order = [(s.task, s.part) for s in specs]
        if options.on_units is not None:
            options.on_units(order, [])
        warnings = previous.manifest["warnings"]
        for message in warnings["units"]:
            logger.warning(message)
        findings = lint.for_compile(checked, options.cache_dir(), {})  # prompt lint: warnings, in the plan
        leaks = {s.name: previous.stages[s.name].leakage for s in recipe.stages if previous.stages[s.name].leakage}
        for message in warnings["leakage"]:  # `leakage: error` with leaks fails before a build is written
            logger.warning(message)
    else:
        linting = lint.Background(checked, options.cache_dir())  # the prompt lint, beside the workers
        with _progress(options.progress, None, "compile") as bar:
            compiled = compile_units(checked, specs, info, cache_of(options.cache_dir()), leak_parts,
                                     options.workers, scratch, options.executor, options.ray_address, bar, keyed,
                                     on_rows=linting.start, keep_workers=True, ahead=ahead)
        if compiled.workers is not None:  # they build and write the shards too, beside each other
            cleanup.callback(compiled.workers.close)
            linker = dataclasses.replace(linker, pool=compiled.workers.ready())
        if options.on_units is not None:
            options.on_units(compiled.reused, compiled.rebuilt)
        units = compiled.units
        with _recorded(warnings["units"]):
            _warn_double_spaces(units, checked.templates)
            preference.warn_checks(units)  # pairs dropped under `format.checks: warn`
            audit.warn_failures(units)  # `audit: warn`: failures counted in the plan (compiler/audit.py)
        # prompt lint: warnings, in the plan
        findings = lint.for_compile(checked, options.cache_dir(), compiled.rows, linting.found())

        mixes = {s.name: linker.select(s, {t: units[(t, "train")] for t in s.tasks}) for s in recipe.stages}
        release(*units.values())  # the mapped pages the mixtures read (per-document counts) go back to the page cache
        with _recorded(warnings["leakage"]):
            leaks = _leakage(recipe, units, compiled.leak, mixes, cache_of(options.cache_dir()))

    atomic_write_text(staging / MARKER_FILE, json.dumps({"recipe": str(loaded.path)}) + "\n")
    tok_dir = staging / "tokenizer"
    _save_tokenizer(tok, tok_dir)
    tok_plan = TokenizerPlan(
        path="tokenizer", sha256=sha256_folder(tok_dir), vocab_size=info.vocab_size,
        bos_id=info.bos_id, eos_id=info.eos_id, pad_id=info.pad_id,
    )

    stages = []
    for stage in recipe.stages:
        settings = settings_of[stage.name]
        kept = _kept_stage(previous, staging, stage.name, link_keys[stage.name]) if options.use_cache else None
        if kept is not None:  # its units and settings are those of the stage in OUT: its shards are kept
            logger.info(f"stage {stage.name}: unchanged, shards kept from the previous build")
            stages.append(kept.model_copy(update={"leakage": leaks.get(stage.name, {})}))
            continue
        if unchanged:
            raise AssertionError(f"stage {stage.name} was found unchanged, yet it cannot be kept")
        train, counts = linker.train(stage, {t: units[(t, "train")] for t in stage.tasks}, mixes[stage.name])
        evals = {}
        for t, evaluated in eval_parts_of[stage.name].items():
            key = eval_keys[f"{stage.name}/{t}"]
            kept_eval = _kept_eval(previous, staging, stage.name, t, key) if options.use_cache else None
            # an eval set made from the same unit under the same settings: its files are kept
            evals[t] = kept_eval or linker.eval(stage, t, units[evaluated], held_out=t in stage.held_out)
        stages.append(StagePlan(name=stage.name, settings=settings, train=train, tasks=counts, eval=evals,
                                leakage=leaks.get(stage.name, {})))
    stages = estimate.estimated(loaded, staging, stages, info.pad_id,  # cost per stage (compiler/estimate.py)
                                options.cache_dir())

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
        lint=findings,
    )
    shards = {e.path: (e.sha256, e.bytes) for sp in stages for packed in (sp.train, *(e.data for e in sp.eval.values()))
              for e in packed.shards}
    _write_manifest(staging, {f"{t}/{part}": key for (t, part), key in keyed.units.items()}, link_keys,
                    eval_keys, shards, build_key, warnings)
    shutil.rmtree(scratch, ignore_errors=True)  # mapped units stay readable until dropped (unlinked, not gone)
    atomic_write_text(staging / PLAN_FILE, canonical_json(plan.model_dump(mode="json")))
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


def _warn_double_spaces(units, templates) -> None:
    """A prompt ending in a space before a completion starting with one: the model learns to write a
    second space after the prompt, which inference never asks for; say which template does it."""
    per: dict[tuple[str, int], int] = {}
    for (task, _), unit in units.items():
        for t, n in unit.spaced.items():
            per[(task, t)] = per.get((task, t), 0) + n
    for (task, t), n in sorted(per.items()):
        logger.warning(f"task '{task}', template '{templates[task][t].name}': {n} example(s) have a prompt "
                       "ending in a space and a completion starting with one (two spaces at the boundary, the "
                       "second one trained); end the prompt without the space")


def _leak_parts(recipe, specs: list[UnitSpec]) -> set[Part]:
    """The parts the leakage check reads: every trained part and every evaluated one (none when nothing
    is evaluated)."""
    have = {(s.task, s.part) for s in specs}
    out: set[Part] = set()
    for stage in recipe.stages:
        for t in [*stage.tasks, *stage.held_out]:
            part = "eval" if (t, "eval") in have else ("train" if t in stage.held_out else None)
            if part is not None:
                out.add((t, part))
    if not out:
        return out  # nothing is evaluated: nothing can leak
    return out | {(t, "train") for stage in recipe.stages for t in stage.tasks}


def _leakage(recipe, units, leak: dict[Part, LeakKeys], mixes, cache=None) -> dict[str, dict[str, LeakReport]]:
    """Per stage, eval and held-out examples whose text the model has trained on by then.

    A stage's model has seen its own mixture and those of the stages it starts
    from (``model: {kind: stage}``, transitively): a task held out of a first
    stage and fine-tuned on in a second one leaks only into the second stage's eval.
    """
    if not leak:
        return {}  # nothing is evaluated: nothing can leak
    own: dict[str, dict[str, leakage.Hashed]] = {
        stage.name: {t: leak[(t, "train")].rows(units[(t, "train")].row[mixes[stage.name].docs[t]])
                     for t in stage.tasks}
        for stage in recipe.stages
    }
    by_name = {stage.name: stage for stage in recipe.stages}
    reports: dict[str, dict[str, LeakReport]] = {}
    problems = []
    for stage in recipe.stages:
        seen_parts: dict[str, list[leakage.Hashed]] = {}
        name: str | None = stage.name
        while name is not None:  # this stage and the stages its model comes from
            for t, rows in own[name].items():
                seen_parts.setdefault(t, []).append(rows)
            model = by_name[name].model
            name = model.stage if isinstance(model, StageModel) else None
        evals = {}
        for t in list(stage.tasks) + list(stage.held_out):
            part = "eval" if (t, "eval") in units else ("train" if t in stage.held_out else None)
            if part is not None:
                evals[t] = leak[(t, part)].rows(units[(t, part)].row)
        seen = {t: leakage.Hashed.concat(rows) for t, rows in seen_parts.items()}
        found = leak_reports_cached(cache, seen, evals)  # compared once per content
        if found:
            reports[stage.name] = found
            for t, r in found.items():
                with_ = ", ".join(f"{k} ({v})" for k, v in r.by_task.items())
                kinds = ", ".join(f"{v} {leakage.KIND_WORDS[k]}" for k, v in r.by_kind.items())
                problems.append(f"stage '{stage.name}': {r.leaked} of {r.examples} eval examples of task '{t}' "
                                f"also appear in the training mixture: {with_} ({kinds})")
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


STAGING_PREFIX = ".%s.tunec-new-"  # + pid; beside OUT, hidden
OLD_PREFIX = ".%s.tunec-old-"  # + pid: the previous build, while three renames stand in for an exchange


def check_output(out: Path) -> None:
    """Refuse, in one line and before any work, an output path no build can be written at.

    The build is staged beside ``out``, so its parent folder must be writable as well.
    """
    if out.exists() and not out.is_dir():
        raise TunecError(f"output {out} exists and is not a folder")
    if out.is_dir() and os.path.ismount(out):
        raise TunecError(f"output {out} is a mount point; tunec builds beside the output folder and swaps it "
                         "in, so choose a folder inside it")
    parent = out.resolve().parent  # a symlinked OUT is staged beside its target
    folder = parent
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        folder = folder.parent  # the folders that do not exist yet are made in the nearest that does
    if not folder.is_dir():
        raise TunecError(f"output {out}: {folder} is a file, not a folder")
    for where in ([out] if out.is_dir() else []) + [folder]:
        if _read_only(where):
            raise TunecError(f"output {out}: {where} is on a read-only filesystem")
        if not os.access(where, os.W_OK | os.X_OK):
            what = ("the output folder" if where == out else "its parent folder, where the build is staged"
                    if where == parent else "the folder it would be made in")
            raise TunecError(f"output {out}: cannot write in {where} ({what}); permission denied")


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _remove_leftovers(out: Path) -> None:
    """Staging folders of compiles killed before they finished (none runs now: we hold the lock)."""
    for path in out.parent.glob(f"{STAGING_PREFIX % out.name}*"):
        if path.name.removeprefix(STAGING_PREFIX % out.name).isdigit():
            shutil.rmtree(path, ignore_errors=True)
    if (out / PLAN_FILE).is_file():  # a finished build is in place: an old one set aside is not needed
        for path in out.parent.glob(f"{OLD_PREFIX % out.name}*"):
            if path.name.removeprefix(OLD_PREFIX % out.name).isdigit():
                shutil.rmtree(path, ignore_errors=True)


def _swap_in(out: Path, staging: Path, loaded: LoadedRecipe, force: bool) -> None:
    """Carry over what ``out`` holds besides the compiled files, then exchange the two folders."""
    previous = _check_out(out, loaded, force)
    keep_runs = not (force and previous != str(loaded.path))  # runs/ trained on another recipe's data go
    replaced = {*COMPILED, PLAN_FILE, MARKER_FILE, *lock.FILES}
    try:
        for entry in sorted(out.iterdir()):
            temporary = entry.name.endswith((".tmp", ".old"))  # of a write a kill cut short
            if entry.name in replaced or (entry.name == "runs" and not keep_runs) or temporary:
                continue
            _link_tree(entry, staging / entry.name)
        # The lock file by hard link: the same inode, so the lock this process holds on it
        # holds the new folder too, from the exchange until release (compiler/lock.py).
        for name in lock.FILES:
            if (out / name).exists():
                os.link(out / name, staging / name)
        _exchange(staging, out)
    except OSError as exc:
        raise TunecError(f"output {out}: cannot put the new build in place ({exc}); the previous build is "
                         "unchanged") from None


def _link_tree(src: Path, dst: Path) -> None:
    """``src`` at ``dst`` by hard links: instant, no extra space, whatever ``runs/`` holds."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=os.link)
    else:
        os.link(src, dst)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> None:
    """Swap two folders in one step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Where the kernel or filesystem lacks it (NFS), three renames: a kill between
    the first two leaves no ``b`` and the previous build at ``.OUT.tunec-old-PID``
    (rename it back; tunec removes it only once a finished build is at ``b``).
    """
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename is not None:
        if rename(-100, os.fsencode(a), -100, os.fsencode(b), _RENAME_EXCHANGE) == 0:  # -100: AT_FDCWD
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(code, os.strerror(code))
    aside = b.with_name(f"{OLD_PREFIX % b.name}{os.getpid()}")
    os.replace(b, aside)
    try:
        os.replace(a, b)
    except OSError:
        os.replace(aside, b)
        raise
    os.replace(aside, a)


def _save_tokenizer(tok, folder: Path) -> None:
    atomic_dir(folder, lambda tmp: tok.save_pretrained(str(tmp)))


def _write_manifest(out: Path, units: dict[str, str], stages: dict[str, str], evals: dict[str, str],
                    known: dict[str, tuple[str, int]], build_key: str, warnings: dict[str, list[str]]) -> None:
    """sha256 and size of every compiled file, the cache key of every unit the build linked, each
    stage's link key (what its shards were made from: a rebuild with the same key keeps them) and each
    eval set's; the build key (:func:`_build_key`) and the warnings the units and the leakage check
    gave, which a rebuild under the same build key repeats without reading a unit. ``known``: the
    sha256 and size of files hashed as they were written (the shards), or checked against the previous
    manifest (kept ones), which are not read again."""
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        if rel.split("/")[0] in COMPILED:
            size = path.stat().st_size
            sha = known[rel][0] if rel in known and known[rel][1] == size else sha256_file(path)
            files[rel] = {"sha256": sha, "bytes": size}
    atomic_write_text(out / MANIFEST_FILE, canonical_json({"format_version": FORMAT_VERSION, "files": files,
                                                           "units": units, "stages": stages, "evals": evals,
                                                           "build_key": build_key, "warnings": warnings}))


def _build_key(checked: Checked, units: dict[Part, str], stages: dict[str, str], evals: dict[str, str],
               leak_parts: set[Part]) -> str:
    """What every unit-derived part of a build is made from: the keys of all its units, stages and eval
    sets, and the leakage settings (the recipe's mode; each task's key and context: the leakage keys are
    hashed under them, yet they are in no unit's key). Two builds with the same one have the same
    shards, counts, leakage reports and warnings."""
    recipe = checked.recipe
    return sha256_text(compact_json({
        "code": code_versions(), "format_version": FORMAT_VERSION,
        "units": {f"{t}/{p}": k for (t, p), k in sorted(units.items())}, "stages": stages, "evals": evals,
        "leakage": {"mode": recipe.leakage, "parts": sorted(f"{t}/{p}" for t, p in leak_parts),
                    "tasks": {t: recipe.tasks[t].leakage.model_dump(mode="json") for t in checked.used_tasks()}},
    }))


def _all_kept(previous: _Previous, recipe, build_key: str) -> bool:
    """Whether the build in OUT was made under ``build_key`` and every stage of it can be kept whole."""
    manifest = previous.manifest
    warnings = manifest.get("warnings")
    if manifest.get("build_key") != build_key or not isinstance(warnings, dict) or \
            not all(isinstance(warnings.get(k), list) for k in ("units", "leakage")):
        return False
    return all(previous.manifest.get("stages", {}).get(s.name) is not None and s.name in previous.stages
               and previous.intact(f"stages/{s.name}", f"stage {s.name}") for s in recipe.stages)


def _touch_units(cache: Cache, units: dict[Part, str]) -> bool:
    """Mark each unit's entry used now; whether all of them are there."""
    for key in units.values():
        try:
            os.utime(cache.path("units", key))
        except OSError:
            return False
    return True


class _Recorder(logging.Handler):
    def __init__(self, into: list[str]):
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


@contextmanager
def _recorded(into: list[str]) -> Iterator[None]:
    """The warnings tunec's compiler logs inside, also appended to ``into`` whatever the loggers'
    level (what a later rebuild repeats must not depend on how this compile's logging was set up):
    where that level hides warnings, they are recorded and go no further."""
    handler = _Recorder(into)
    root = logging.getLogger(__name__.rpartition(".")[0])  # tunec.compiler
    saved = root.level, root.propagate
    if not root.isEnabledFor(logging.WARNING):
        root.setLevel(logging.WARNING)
        root.propagate = False
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        root.propagate = saved[1]


def _link_key(settings: Stage, unit_keys: dict[Part, str], linker: Linker, info) -> str:
    """What a stage's shards and counts are made from: its settings, the keys of the units it links,
    and how the linker packs and names them."""
    names = set(settings.tasks) | set(settings.held_out)
    return sha256_text(compact_json({
        "code": code_versions(), "format_version": FORMAT_VERSION,
        "settings": settings.model_dump(mode="json"),
        "units": {f"{t}/{p}": k for (t, p), k in sorted(unit_keys.items()) if t in names},
        "linker": {"seq_len": linker.seq_len, "pad_id": info.pad_id, "shard_rows": linker.shard_rows,
                   "seed": linker.seed, "templates": {t: linker.template_names.get(t, []) for t in sorted(names)}},
    }))


class _Previous:
    """The build in OUT: its manifest and plan, each read once, when first asked for."""

    def __init__(self, out: Path):
        self.out = out
        self._intact: dict[str, bool] = {}

    @functools.cached_property
    def manifest(self) -> dict:
        try:
            manifest = json.loads((self.out / MANIFEST_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return manifest if isinstance(manifest, dict) else {}

    @functools.cached_property
    def stages(self) -> dict[str, StagePlan]:
        try:
            return {s.name: s for s in read_plan(self.out).stages}
        except (OSError, ValueError, AttributeError, TunecError):
            return {}

    def intact(self, folder: str, what: str) -> bool:
        """Whether ``folder`` holds exactly the files the manifest lists under it, each with its sha256
        (found once per folder)."""
        if folder not in self._intact:
            self._intact[folder] = self._check(folder, what)
        return self._intact[folder]

    def _check(self, folder: str, what: str) -> bool:
        prefix = folder + "/"
        listed = {rel: f for rel, f in self.manifest.get("files", {}).items() if rel.startswith(prefix)}
        path = self.out / folder
        present = {p.relative_to(self.out).as_posix() for p in path.rglob("*") if p.is_file()} \
            if path.is_dir() else set()
        if not listed or present != set(listed):
            return False
        sized = {rel: f["bytes"] for rel, f in listed.items() if (self.out / rel).stat().st_size == f.get("bytes")}
        hashes = _hashed(self.out, list(sized), threaded=sum(sized.values()) >= _THREADED_BYTES)
        for rel, f in listed.items():
            if hashes.get(rel) != f.get("sha256"):
                logger.warning(f"{what}: {rel} differs from the previous build's manifest; linking it again")
                return False
        return True


_THREADED_BYTES = 4 << 20  # below this, a second thread costs more than it saves


def _hashed(root: Path, files: list[str], threaded: bool = True) -> dict[str, str]:
    """sha256 of each file, on two threads when ``threaded`` (hashlib lets go of the GIL while it
    hashes): a kept stage's shards are checked in less time on two cores."""
    hashes: dict[str, str] = {}

    def hashed(rel: str) -> None:
        hashes[rel] = sha256_file(root / rel)

    if threaded:
        on_two_threads(files, hashed, "tunec-hash")
    else:
        for rel in files:
            hashed(rel)
    return hashes


def _kept_stage(previous: _Previous, staging: Path, name: str, key: str) -> StagePlan | None:
    """The previous build's plan of stage ``name`` when it was linked under ``key`` and its files are
    intact (sha256 against the previous manifest); its folder is then hard-linked into ``staging``."""
    if previous.manifest.get("stages", {}).get(name) != key:
        return None
    plan = previous.stages.get(name)
    if plan is None or not previous.intact(f"stages/{name}", f"stage {name}"):
        return None
    _link_tree(previous.out / "stages" / name, staging / "stages" / name)
    return plan


def _eval_key(stage: Stage, task: str, unit_key: str, linker: Linker, info) -> str:
    """What one eval set's files and counts are made from: its unit, the stage's name (in its shards'
    metadata) and objective, whether the task is held out, and how the linker packs and names it."""
    return sha256_text(compact_json({
        "code": code_versions(), "format_version": FORMAT_VERSION, "stage": stage.name,
        "objective": stage.objective.model_dump(mode="json"), "held_out": task in stage.held_out,
        "task": task, "unit": unit_key,
        "linker": {"seq_len": linker.seq_len, "pad_id": info.pad_id, "shard_rows": linker.shard_rows,
                   "templates": linker.template_names.get(task, [])},
    }))


def _kept_eval(previous: _Previous, staging: Path, stage: str, task: str, key: str) -> EvalSet | None:
    """The previous build's eval set of ``task`` in ``stage`` when it was made under ``key`` and its
    files are intact; its folder is then hard-linked into ``staging``."""
    if previous.manifest.get("evals", {}).get(f"{stage}/{task}") != key:
        return None
    plan = previous.stages.get(stage)
    kept = plan.eval.get(task) if plan is not None else None
    rel = f"stages/{stage}/eval/{task}"
    if kept is None or not previous.intact(rel, f"stage {stage}, eval set {task}"):
        return None
    (staging / rel).parent.mkdir(parents=True, exist_ok=True)
    _link_tree(previous.out / rel, staging / rel)
    return kept


# ----------------------------------------------------------------- workers


@contextmanager
def _progress(enabled: bool, total: int | None, desc: str) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda n: None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="rows", disable=None, leave=False) as bar:
        yield bar.update


def _versions() -> dict[str, str]:
    return {"tunec": __version__, **{dist: dist_version(dist) for dist in ("tokenizers", "transformers")}}

