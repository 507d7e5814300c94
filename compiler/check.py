"""Static checks of a loaded recipe: everything that can be known before touching the data.

``tunec validate`` runs these; ``tunec compile`` runs them first. All problems
are collected and reported together, each with the recipe's line, and for
template problems the template's line too.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import jinja2

from . import preference, promptsource
from .errors import Problem, TunecError, did_you_mean
from .hubmeta import hub_columns
from .load import LoadedRecipe, display_path
from .modelconfig import Finding, config_findings, start_config_findings
from .recipe import (
    PAIRED_FORMATS,
    ChatFormat,
    ColumnChoices,
    ConfigModel,
    FileTemplate,
    HubSource,
    InlineTemplate,
    JinjaChoices,
    LibraryTemplate,
    LocalModel,
    LocalTokenizer,
    PromptsourceTemplates,
    StageModel,
    Task,
    WeightsMixture,
    field_column,
)
from .refs import reference_problems, template_dirs
from .sources import check_files, file_hash, peek_columns, read_utf8, source_files
from .templates import TemplateSource, analyse, find_library_template, string_problems, unknown_names
from .yamltext import value_lines

COULD_NOT_CHECK = "could not check the model config"  # modelconfig's finding when its child process fails


@dataclass(frozen=True)
class Checked:
    """A recipe that passed every static check, with its templates resolved."""

    loaded: LoadedRecipe
    templates: dict[str, tuple[TemplateSource, ...]]  # task -> its templates, in recipe order
    columns: dict[str, list[str] | None]  # task -> columns after the field map (None: unknown offline)
    warnings: tuple[Problem, ...] = ()  # what could not be checked, or looks wrong without being an error

    @property
    def recipe(self):
        return self.loaded.recipe

    def used_tasks(self) -> list[str]:
        """Tasks that some stage trains on or holds out, in recipe order."""
        used = {t for s in self.recipe.stages for t in [*s.tasks, *s.held_out]}
        return [t for t in self.recipe.tasks if t in used]


logger = logging.getLogger(__name__)


def check(loaded: LoadedRecipe, cache: Path | None = None) -> Checked:
    """Every static check of ``loaded``; ``cache``: the compile cache folder, where the findings of
    building each ``kind: config`` model's config are kept by its content (:func:`model_config_findings`)."""
    recipe = loaded.recipe
    problems: list[Problem] = []
    warnings: list[Problem] = []

    for i, d in enumerate(recipe.template_dirs):
        if not loaded.resolve(d).is_dir():
            problems.append(loaded.problem(("template_dirs", i), f"template folder not found: {loaded.resolve(d)}"))
    dirs = template_dirs(loaded.data, loaded.resolve)
    problems.extend(reference_problems(loaded.data, loaded.problem, dirs))

    tok = recipe.tokenizer
    if isinstance(tok, LocalTokenizer) and not loaded.resolve(tok.path).is_dir():
        problems.append(loaded.problem(("tokenizer", "path"),
                                       f"tokenizer folder not found: {loaded.resolve(tok.path)}"))
    if tok.chat_template and not loaded.resolve(tok.chat_template).is_file():
        problems.append(loaded.problem(("tokenizer", "chat_template"),
                                       f"file not found: {loaded.resolve(tok.chat_template)}"))
    elif tok.chat_template:
        problems.extend(_chat_template_problems(loaded, loaded.resolve(tok.chat_template)))

    templates: dict[str, tuple[TemplateSource, ...]] = {}
    columns: dict[str, list[str] | None] = {}
    for name, task in recipe.tasks.items():
        problems.extend(check_files(loaded, name, task))
        cols = _task_columns(loaded, name, task, problems, warnings, cache)
        columns[name] = cols
        sources = []
        for i, ref in enumerate(task.templates):
            loc = ("tasks", name, "templates", i)
            for source in _resolve_template(loaded, ref, loc, dirs, problems):
                sources.append(source)
                problems.extend(_template_problems(loaded, source, cols, loc, cache))
        templates[name] = tuple(sources)
        problems.extend(_format_problems(loaded, name, task, cols))
        if isinstance(task.format, PAIRED_FORMATS):
            problems.extend(preference.format_problems(loaded, name, task.format, cols))
        problems.extend(_leakage_problems(loaded, name, task, cols))

    problems.extend(_check_stages(loaded, warnings, cache))
    problems.extend(preference.stage_problems(loaded))
    for w in warnings:  # the command line shows them (tunec/console.py); callers also get them in Checked
        logger.warning(w)
    if problems:
        raise TunecError(sorted(problems, key=lambda p: (p.file != loaded.display, p.line or 0, p.col or 0)))
    return Checked(loaded, templates, columns, tuple(warnings))


def _template_problems(loaded: LoadedRecipe, source: TemplateSource, cols, loc,
                       cache: Path | None = None) -> list[Problem]:
    """:func:`.templates.analyse`'s problems, located in the recipe. With a compile cache folder, a
    template found without problems is remembered there (``checks/``, an empty file under a hash of
    everything the analysis reads: the template, its place, the columns, Jinja's version and the
    code), so that a recompile parses it again only when one of those changed."""
    clean = _clean_template_path(source, cols, cache) if cache is not None else None
    if clean is not None and clean.is_file():
        from .cache import touch

        touch(clean)  # used now, for `cache prune --older-than`
        return []
    problems = []
    for p in analyse(source, cols):
        where = f" [{p.file}:{p.line}]" if p.line and p.file != loaded.display else ""
        here = loaded.problem(loc, p.message + where)
        if p.file == loaded.display and p.line:  # inline template: point at its own line
            here = Problem(here.message, here.file, p.line, None, here.field)
        problems.append(here)
    if clean is not None and not problems:
        try:
            clean.parent.mkdir(parents=True, exist_ok=True)
            clean.touch()  # empty: being there is what it says
        except OSError:
            pass  # a cache that cannot be written only costs time
    return problems


def _peeked_columns(loaded: LoadedRecipe, task: Task, cache: Path | None) -> list[str] | None:
    """:func:`.sources.peek_columns` of the task's train split. With a compile cache folder, the columns
    found in a file are remembered there (``checks/``) under the sha256 of its bytes, which the unit
    keys hash anyway (:func:`.sources.file_hash` hashes a file once per compile), and how it is read."""
    path = source_files(loaded, task).get(task.train.split)
    if cache is None or isinstance(task.source, HubSource) or path is None or not path.is_file():
        return peek_columns(loaded, task, task.train.split)
    from .cache import code_versions, touch
    from .fileio import atomic_write_text, compact_json, sha256_text

    key = sha256_text(compact_json({"what": "columns", "file": file_hash(path), "kind": task.source.kind,
                                    "code": code_versions()}))
    memo = cache / "checks" / key[:2] / f"{key}.json"
    try:
        stored = json.loads(memo.read_text(encoding="utf-8"))
        if isinstance(stored, dict) and "columns" in stored and (
                stored["columns"] is None or all(isinstance(c, str) for c in stored["columns"])):
            touch(memo)
            return stored["columns"]
    except (OSError, ValueError):
        pass  # absent or damaged: peek again
    found = peek_columns(loaded, task, task.train.split)  # a file that cannot be read raises: nothing kept
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo, compact_json({"columns": found}))
    except OSError:
        pass  # a cache that cannot be written only costs time
    return found


_TEMPLATE_CHECK_FORMAT = 1  # bump when what a template check decides changes outside compiler/


def _clean_template_path(source: TemplateSource, cols: list[str] | None, cache: Path) -> Path:
    from dataclasses import asdict

    from .cache import code_versions
    from .fileio import compact_json, sha256_text
    from .versions import dist_version

    key = sha256_text(compact_json({"format": _TEMPLATE_CHECK_FORMAT, "what": "template-check",
                                    "template": asdict(source), "columns": cols, "code": code_versions(),
                                    "jinja2": dist_version("jinja2")}))
    return cache / "checks" / key[:2] / f"{key}.clean"


def _format_problems(loaded: LoadedRecipe, name: str, task: Task, cols: list[str] | None) -> list[Problem]:
    """Columns that the chat format and answer choices read must exist."""
    problems = []
    needed = []
    if isinstance(task.format, ChatFormat) and task.format.messages is not None:
        needed.append((("tasks", name, "format", "messages"), task.format.messages))
    if isinstance(task.answer_choices, ColumnChoices):
        needed.append((("tasks", name, "answer_choices", "column"), task.answer_choices.column))
    for loc, col in needed:
        if cols is not None and col not in cols:
            problems.append(loaded.problem(loc, f"column `{col}` is not in the task{did_you_mean(col, cols)}; "
                                                f"columns: {', '.join(cols)}"))
    jinja = []  # one-string templates: checked like the task's templates
    if isinstance(task.format, ChatFormat) and task.format.system:
        jinja.append((("tasks", name, "format", "system"), task.format.system))
    if isinstance(task.answer_choices, JinjaChoices):
        jinja.append((("tasks", name, "answer_choices", "template"), task.answer_choices.template))
    for loc, text in jinja:
        problems.extend(loaded.problem(loc, message) for message in string_problems(text, cols))
    return problems


def _task_columns(loaded: LoadedRecipe, name: str, task: Task, problems: list[Problem],
                  warnings: list[Problem], cache: Path | None = None) -> list[str] | None:
    try:
        source_cols = _peeked_columns(loaded, task, cache)
    except TunecError as exc:
        problems.extend(exc.problems)
        return None
    if source_cols is None and isinstance(task.source, HubSource):
        source_cols = hub_columns(task.source)
        if source_cols is None:
            what = "field map" if task.fields is not None else "templates"
            warnings.append(loaded.problem(
                ("tasks", name, "source"),
                f"the columns of hub dataset '{task.source.id}' could not be read (offline, or not in its card), "
                f"so the {what} of task `{name}` cannot be checked before compile; list them in `columns:`"))
    if task.fields is None:
        return source_cols
    if source_cols is not None:
        for new, spec in task.fields.items():
            old = field_column(spec)
            if old not in source_cols:
                problems.append(
                    loaded.problem(
                        ("tasks", name, "fields", new),
                        f"column `{old}` is not in the source{did_you_mean(old, source_cols)}; "
                        f"columns: {', '.join(source_cols)}",
                    )
                )
    return list(task.fields)


def _leakage_problems(loaded: LoadedRecipe, name: str, task: Task, cols: list[str] | None) -> list[Problem]:
    """`leakage.key` and `leakage.context` name the task's columns (after its field map)."""
    if cols is None:
        return []
    out = []
    for what, names in (("key", task.leakage.key or []), ("context", task.leakage.context)):
        for i, col in enumerate(names):
            if col not in cols:
                out.append(loaded.problem(("tasks", name, "leakage", what, i),
                                          f"`{col}` is not a column of task `{name}`{did_you_mean(col, cols)}; "
                                          f"columns: {', '.join(cols)}"))
    return out


def _resolve_template(loaded, ref, loc, dirs, problems) -> list[TemplateSource]:
    if isinstance(ref, InlineTemplate):
        lines = {}
        for key in ("prompt", "completion"):
            line, col = loaded.position(loc + (key,))
            lines[key] = value_lines(loaded.text, line, col) if line and col else None
        line, _ = loaded.position(loc + ("prompt",))
        return [TemplateSource.inline(ref.name, ref.prompt, ref.completion, loaded.display, line or 1,
                                      lines["prompt"], lines["completion"])]
    if isinstance(ref, LibraryTemplate):
        path = find_library_template(ref.name, dirs)
        if path is None:  # reported by reference_problems
            return []
        return [TemplateSource(ref.name, read_utf8(path, display_path(path)), display_path(path), 1)]
    path = loaded.resolve(ref.path)
    if not path.is_file():
        problems.append(loaded.problem(loc + ("path",), f"template file not found: {path}"))
        return []
    if isinstance(ref, FileTemplate):
        return [TemplateSource(ref.path, read_utf8(path, display_path(path)), display_path(path), 1)]
    assert isinstance(ref, PromptsourceTemplates)
    try:
        found, missing = promptsource.select(promptsource.load_file(path, display_path(path)), ref.names,
                                             display_path(path))
    except TunecError as exc:
        problems.extend(exc.problems)
        return []
    for m in missing:
        problems.append(loaded.problem(loc + ("names",), f"no promptsource template named {m} in {display_path(path)}"))
    return [
        TemplateSource(t.name, t.jinja, display_path(path), t.line, kind="promptsource",
                       answer_choices=t.answer_choices, separator=ref.separator, lines=t.jinja_lines)
        for t in found
    ]


def _check_stages(loaded: LoadedRecipe, warnings: list[Problem], cache: Path | None = None) -> list[Problem]:
    recipe = loaded.recipe
    problems = []
    seen: set[str] = set()
    for i, stage in enumerate(recipe.stages):
        if stage.name in seen:
            problems.append(loaded.problem(("stages", i, "name"), f"stage name '{stage.name}' is used twice"))
        for j, task in enumerate(stage.tasks):
            if task in stage.tasks[:j]:  # unknown names: see reference_problems
                problems.append(loaded.problem(("stages", i, "tasks", j), f"task '{task}' is listed twice"))
        for j, task in enumerate(stage.held_out):
            if task in stage.tasks:
                problems.append(loaded.problem(("stages", i, "held_out", j),
                                               f"task '{task}' is held out and also trained in this stage"))
        if isinstance(stage.mixture, WeightsMixture):
            weights = stage.mixture.weights
            for t in weights:
                if t not in stage.tasks:
                    problems.append(loaded.problem(("stages", i, "mixture", "weights", t),
                                                   f"task '{t}' is not trained in this stage"
                                                   f"{did_you_mean(t, stage.tasks)}"))
            for t in stage.tasks:
                if t not in weights:
                    problems.append(loaded.problem(("stages", i, "mixture", "weights"), f"no weight for task '{t}'"))
            if sum(weights.values()) <= 0 or any(w < 0 for w in weights.values()):
                problems.append(loaded.problem(("stages", i, "mixture", "weights"),
                                               "weights must be non-negative and not all zero"))
        model = stage.model
        if isinstance(model, StageModel) and model.stage not in seen:
            later = [s.name for s in recipe.stages]
            why = "a stage can only start from an earlier stage" if model.stage in later else "no such stage"
            problems.append(
                loaded.problem(
                    ("stages", i, "model", "stage"),
                    f"{why}: '{model.stage}'{did_you_mean(model.stage, seen) if model.stage not in later else ''}",
                )
            )
        if isinstance(model, ConfigModel):
            for where in _non_finite(model.config):
                problems.append(loaded.problem(("stages", i, "model", "config") + where,
                                               "not a finite number (NaN and infinity cannot be stored in a plan)"))
            for key, message, level in model_config_findings(model.config, cache):
                found = loaded.problem(("stages", i, "model", "config") + ((key,) if key else ()), message)
                (problems if level == "error" else warnings).append(found)
        if isinstance(model, LocalModel) and not loaded.resolve(model.path).is_dir():
            problems.append(loaded.problem(("stages", i, "model", "path"),
                                           f"model folder not found: {loaded.resolve(model.path)}"))
        if stage.peft.kind == "qlora":  # the compiler never imports torch: whether there is a GPU is run's question
            warnings.append(loaded.problem(("stages", i, "peft"), "qlora needs a CUDA GPU and bitsandbytes at "
                                           "`tunec run` (4-bit NF4 base); on a CPU use `kind: lora`"))
        seen.add(stage.name)
    return problems


_CONFIG_CHECK_FORMAT = 1  # bump when what a cached entry holds changes


def model_config_findings(config: dict, cache: Path | None = None) -> list[Finding]:
    """:func:`.modelconfig.config_findings` of a ``kind: config`` model's config, kept in the compile cache
    (``checks/``) under a hash of the config and the versions of transformers and tunec, which is all
    they depend on: a recompile builds no config and starts no child process. A check that could not
    run (its child failed) is never kept."""
    if cache is None:
        return config_findings(config)
    from .cache import touch
    from .fileio import atomic_write_text, canonical_json

    path = _config_check_path(config, cache)
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(stored, list) and all(isinstance(f, list) and len(f) == 3 for f in stored):
            touch(path)
            return [(f[0], f[1], f[2]) for f in stored]
    except (OSError, ValueError):
        pass  # absent or damaged: check it again
    found = config_findings(config)
    if not any(m.startswith(COULD_NOT_CHECK) for _, m, _ in found):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, canonical_json([list(f) for f in found]))
        except OSError:
            pass  # a cache that cannot be written only costs time
    return found


def _config_check_path(config: dict, cache: Path) -> Path:
    from . import __version__
    from .cache import code_versions
    from .fileio import canonical_json, sha256_text
    from .versions import dist_version

    transformers = dist_version("transformers")
    key = sha256_text(canonical_json({"format": _CONFIG_CHECK_FORMAT, "what": "model-config", "config": config,
                                      "transformers": transformers, "tunec": __version__,
                                      "code": code_versions()}))
    return cache / "checks" / key[:2] / f"{key}.json"


def start_model_checks(loaded: LoadedRecipe, cache: Path | None = None) -> bool:
    """Start, in the background, the config check of every ``kind: config`` model that
    :func:`model_config_findings` will not find in the cache: its child process (transformers
    imported, about a second) then runs while the compile does something else (loads its tokenizer),
    and :func:`check` waits for its findings instead of starting it. Whether one was started."""
    started = False
    for stage in loaded.recipe.stages:
        model = stage.model
        if isinstance(model, ConfigModel) and not _non_finite(model.config) and isinstance(
                model.config.get("model_type"), str):
            if cache is None or not _config_check_path(model.config, cache).is_file():
                started = start_config_findings(model.config) or started
    return started


def _non_finite(value, where: tuple = ()) -> list[tuple]:
    """Paths of the NaN and infinite floats inside a free-form mapping (a model config)."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [where]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _non_finite(v, where + (k,))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _non_finite(v, where + (i,))]
    return []


def _chat_template_problems(loaded: LoadedRecipe, path) -> list[Problem]:
    """A chat template file compiled as transformers compiles it (its sandbox, filters and
    `{% generation %}` tag), so a syntax error or an unknown filter is found before any row."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    shown = display_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        return [Problem(f"chat template: not UTF-8 (byte {exc.start})", shown, line)]
    except OSError as exc:
        return [loaded.problem(("tokenizer", "chat_template"), f"cannot read {shown}: {exc.strerror}")]
    try:
        compiled = _compile_jinja_template(text)
    except jinja2.TemplateError as exc:
        return [Problem(f"chat template: {exc.message}", shown, getattr(exc, "lineno", None))]
    source = TemplateSource(path.name, text, shown)
    return unknown_names(compiled.environment, compiled.environment.parse(text), source)
