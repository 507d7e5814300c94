"""The ``tunec`` command line: a thin click group over the library functions.

User errors (``TunecError``) exit 1 with one line per problem and no traceback;
usage errors exit 2 (click's convention). Heavy imports happen inside commands.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from . import __version__
from .compiler.errors import TunecError
from .runtime.loggers import PACKAGES as TRACKERS  # no torch: the names and their packages only


class UserError(click.ClickException):
    """Printed as the problems themselves, one per line."""

    def show(self, file=None) -> None:
        click.echo(self.format_message(), err=True)


def _fail(exc: TunecError) -> UserError:
    lines = [f"error: {p}" for p in exc.problems]
    if len(exc.problems) > 1:
        lines.append(f"{len(exc.problems)} problems")
    return UserError("\n".join(lines))


def _need_training_extra(command: str) -> None:
    """`run` and `generate` need torch and peft; the compiler alone does without them (so may an install)."""
    import importlib.util

    missing = []
    for name in ("torch", "peft"):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken or blocked package is as good as none
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise UserError(f"error: `tunec {command}` needs {' and '.join(missing)}, which is not installed; "
                        "install the training extra: pip install 'tunec[train]'")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tunec")
def main() -> None:
    """tunec: compile instruction-tuning and fine-tuning recipes into packed, checksummed shards."""
    from .console import configure

    configure()  # the library logs; the command shows those lines (tunec/console.py)


_SET_HELP = ("Override a recipe value before validation: dotted PATH (list items by index, e.g. "
             "stages.0.lr=1e-4 or tasks.reviews.truncation=drop), VALUE read as YAML. Repeat as needed.")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="PATH=VALUE", help=_SET_HELP)
@click.option("--lint", "with_lint", is_flag=True, help="Also read the data and lint the rendered prompts "
              "(rules and their switches: the recipe's `lint:`, README \"Prompt lint\").")
def validate(recipe: str, overrides: tuple[str, ...], with_lint: bool) -> None:
    """Check RECIPE statically: schema, names, files, templates against columns."""
    from .compiler.check import check
    from .compiler.load import load_recipe

    try:
        checked = check(load_recipe(recipe, overrides))
        if with_lint:
            from .compiler.lint import lint_recipe

            found = lint_recipe(checked)
            for finding in found:
                click.echo(f"lint: {finding}")
            if not found:
                click.echo("lint: no findings")
    except TunecError as exc:
        raise _fail(exc) from None
    r = checked.recipe
    click.echo(f"{checked.loaded.display}: ok ({len(r.tasks)} task(s), {len(r.stages)} stage(s))")
    unused = [t for t in r.tasks if t not in checked.used_tasks()]
    if unused:
        click.echo(f"note: task(s) no stage trains on: {', '.join(unused)}")


@main.command("compile")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Build folder.")
@click.option("--workers", "-j", type=click.IntRange(min=1), default=None,
              help="Worker processes (cores) for rendering, tokenizing and writing shards [default: the cores this "
                   "process may run on].")
@click.option("--force", is_flag=True, help="Replace a build folder that holds another recipe's build.")
@click.option("--shard-rows", type=click.IntRange(min=1), default=None, help="Packed rows per shard file.")
@click.option("--set", "overrides", multiple=True, metavar="PATH=VALUE", help=_SET_HELP + " Recorded in the plan.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), default=None,
              help="Compiled-unit cache folder [default: $TUNEC_CACHE, else ~/.cache/tunec].")
@click.option("--no-cache", is_flag=True, help="Compile every unit; read and store nothing in the cache.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where units compile: worker processes here, or Ray tasks writing into the cache.")
@click.option("--ray-address", default=None, help="With --executor ray: a running cluster [default: a local one].")
def compile_cmd(recipe: str, out: str, workers: int | None, force: bool, shard_rows: int | None,
                overrides: tuple[str, ...], cache_dir: str | None, no_cache: bool, executor: str,
                ray_address: str | None) -> None:
    """Compile RECIPE into tokenized, packed shards and a run plan in OUT.

    Units (a task's train or eval part) whose inputs are unchanged are read from the cache.
    """
    from .compiler.build import DEFAULT_SHARD_ROWS, Options, compile_recipe
    from .compiler.executors import usable_cpus

    if no_cache and (cache_dir or executor == "ray"):
        raise click.UsageError("--no-cache cannot go with --cache or --executor ray (Ray workers hand units "
                               "over through the cache)")

    def said(reused: list[tuple[str, str]], rebuilt: list[tuple[str, str]]) -> None:
        which = ", ".join(f"{t}/{p}" for t, p in rebuilt) if rebuilt and reused else ""  # an incremental build
        click.echo(f"units: {len(reused)} reused, {len(rebuilt)} rebuilt" + (f" ({which})" if which else ""))

    options = Options(
        workers=workers or usable_cpus(),
        force=force,
        shard_rows=shard_rows or DEFAULT_SHARD_ROWS,
        progress=True,
        use_cache=not no_cache,
        cache=Path(cache_dir) if cache_dir else None,
        executor=executor,
        ray_address=ray_address,
        on_units=said,
    )
    try:
        plan = compile_recipe(recipe, out, options, overrides)
    except TunecError as exc:
        raise _fail(exc) from None
    for stage in plan.stages:
        t = stage.train
        click.echo(f"stage {stage.name}: {t.rows} rows x {t.seq_len}, {t.tokens} tokens "
                   f"({t.trained_tokens} trained), fill {t.fill_rate:.1%}, {len(t.shards)} shard(s)")
    click.echo(f"plan: {Path(out) / 'plan.json'}")
    _finished_early[0] = True


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--show", type=click.IntRange(min=0), default=0, help="Decode N packed rows per stage.")
@click.option("--stage", default=None, help="Only this stage.")
@click.option("--color/--no-color", default=None, help="Highlight trained spans in colour [default: on a terminal].")
def inspect(out: str, show: int, stage: str | None, color: bool | None) -> None:
    """Show what the build in OUT holds: a table per stage and task, and decoded rows.

    Decoded rows mark trained tokens (green, or «like this» without colour) and
    separate packed documents with ¦.
    """
    from .compiler import inspection as insp
    from .compiler.plan import read_plan

    try:
        plan = read_plan(Path(out))
        stages = [plan.stage(stage).name] if stage else [s.name for s in plan.stages]
    except TunecError as exc:
        raise _fail(exc) from None
    for line in insp.summary_lines(plan):
        if stage is None or not line.startswith("stage ") or line.startswith(f"stage {stage} "):
            click.echo(line)
    if show:
        from .compiler.tokens import load_local_tokenizer

        use_color = sys.stdout.isatty() if color is None else color
        try:
            tok = load_local_tokenizer(insp.tokenizer_folder(plan, Path(out)))
            decoded = [insp.decode_rows(plan, Path(out), name, show, tok, use_color) for name in stages]
        except TunecError as exc:
            raise _fail(exc) from None
        for lines in decoded:
            click.echo("")
            for line in lines:
                click.echo(line)


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("-o", "--output", "dest", type=click.Path(dir_okay=False), default=None,
              help="The HTML file to write [default: OUT/report.html].")
@click.option("--rows", type=click.IntRange(min=0, max=1000), default=8, show_default=True,
              help="Packed rows shown per stage, tokens and trained spans marked.")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Which rows are drawn [default: the plan's seed].")
def report(out: str, dest: str | None, rows: int, seed: int | None) -> None:
    """Write one self-contained HTML page about the build in OUT (no network, no script).

    Per stage and task: packing and fill rate, requested versus trained mixture,
    token-length histograms, the mask audit, eval sets, sampled packed rows with
    trained tokens highlighted, the plan's lint findings and cost estimates, and
    loss curves, eval loss and accuracy once OUT/runs/ has them.
    """
    from .compiler.report import write_report

    try:
        path = write_report(Path(out), Path(dest) if dest else None, rows, seed)
    except TunecError as exc:
        raise _fail(exc) from None
    click.echo(f"report: {path} ({path.stat().st_size / 1024:,.0f} KiB)")


@main.command("plan")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--gpu", type=click.Choice(["h100", "a100", "l4", "cpu"]), default="h100", show_default=True,
              help="The accelerator to estimate time and memory on (cpu: this machine's measured matmul rate).")
@click.option("--mfu", type=click.FloatRange(min=0, max=1, min_open=True), default=None,
              help="Model FLOP utilisation assumed for the time [default: the plan's, 0.35].")
@click.option("--stage", default=None, help="Only this stage.")
def plan_cmd(out: str, gpu: str, mfu: float | None, stage: str | None) -> None:
    """Print the cost estimates of the build in OUT: steps, tokens, parameters, FLOPs, memory, time."""
    from .compiler import estimate
    from .compiler.plan import read_plan

    try:
        plan = read_plan(Path(out))
        stages = [plan.stage(stage)] if stage else list(plan.stages)
    except TunecError as exc:
        raise _fail(exc) from None
    peak, memory = estimate.device(gpu)
    for line in estimate.summary_lines(stages, gpu, peak, memory, mfu or estimate.DEFAULT_MFU):
        click.echo(line)


@main.command()
def schema() -> None:
    """Print the JSON schema of the recipe language (for editors)."""
    from .compiler.recipe import Recipe

    click.echo(json.dumps(Recipe.model_json_schema(), indent=2))


@main.command("run")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--stage", default=None, help="Train only this stage (stages it starts from must have finished).")
@click.option("--resume", is_flag=True,
              help="Continue interrupted stages from their last checkpoint; skip finished ones.")
@click.option("--force", is_flag=True, help="Train again from scratch, replacing the stages' results and checkpoints.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: CUDA when available, else CPU.")
@click.option("--verify", is_flag=True, help="Also check every shard's sha256 against the plan (sizes and headers "
              "are always checked).")
@click.option("--progress/--no-progress", default=None, help="Progress bar [default: on a terminal].")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="At most N optimizer steps in every stage this command runs (recorded in the result; "
              "--resume needs the same value).")
@click.option("--set", "settings", multiple=True, metavar="[stages.STAGE.]SETTING=VALUE",
              help="Change a training setting of a stage for this run (lr, epochs, max_steps, warmup_steps, "
              "batch_tokens, micro_batch_rows, ...); SETTING alone means the --stage one. Repeat as needed.")
@click.option("--log", "trackers", multiple=True, type=click.Choice(list(TRACKERS)),
              help="Also send the metrics to this tracker; repeat for several (or TUNEC_LOG=a,b). "
              "metrics.jsonl is always written.")
@click.option("--eval-accuracy/--no-eval-accuracy", default=None, help="Score each stage's eval sets with answer "
              "choices after it, and the model the run starts from, as `tunec eval` does (OUT/runs/<stage>/eval.json), "
              "and print the table [default: what each stage's `eval: {accuracy: ...}` says, true unless set].")
@click.option("--dry-run", is_flag=True, help="Check the shards, build each model on the meta device, check that "
              "the estimated memory fits the device, print the estimates; train nothing, write nothing.")
def run_cmd(out: str, stage: str | None, resume: bool, force: bool, device: str, verify: bool,
            progress: bool | None, max_steps: int | None, settings: tuple[str, ...],
            trackers: tuple[str, ...], eval_accuracy: bool | None, dry_run: bool) -> None:
    """Train the stages of the build in OUT; results go to OUT/runs/<stage>/.

    Several processes or GPUs: `torchrun --nproc_per_node N -m tunec run OUT`.
    """
    if resume and force:
        raise click.UsageError("--resume and --force exclude each other")
    _need_training_extra("run")
    if dry_run:
        from .runtime.dryrun import dry_run as check_only

        try:
            check_only(out, stage, settings, max_steps, device, echo=click.echo)
        except TunecError as exc:
            raise _fail(exc) from None
        return
    from .runtime.run import RunOptions, run

    show = sys.stderr.isatty() if progress is None else progress
    options = RunOptions(stage=stage, resume=resume, force=force, device=device, verify=verify, progress=show,
                         max_steps=max_steps, overrides=settings, log=trackers, eval_accuracy=eval_accuracy)
    try:
        results = run(out, options)
    except TunecError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        raise UserError(f"interrupted; `tunec run {out} --resume` continues from the last checkpoint") from None
    if eval_accuracy is not False and os.environ.get("RANK", "0") == "0":  # under torchrun, one table
        from .runtime import accuracy

        for result in results:
            saved = accuracy.read_eval(Path(out), result.stage)
            if saved and saved.get("stage", {}).get("fingerprint") == result.fingerprint:
                click.echo(f"stage {result.stage}: accuracy by rank classification "
                           f"({out}/runs/{result.stage}/eval.json)")
                for line in accuracy.table(saved):
                    click.echo(line)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _leave_worker()


# Set by a command whose work is done and written (compile): the `tunec` program then ends at once.
_finished_early = [False]


def console(args: list[str] | None = None) -> None:
    """The `tunec` program: :func:`main`, then :func:`leave` with its exit status."""
    _finished_early[0] = False
    try:
        main(args, prog_name="tunec")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    leave(code)


def leave(code: int) -> None:
    """Exit with ``code``. After a compile, without the interpreter's teardown.

    Freeing every module and object a compile loaded (transformers, datasets, the
    worker pool's machinery) takes a third of a second and does nothing a user
    needs: every file the compile wrote is closed and synced by then. The
    threads still running are waited for and the exit handlers run (logging
    flushed, the resource tracker told, temporary folders removed), as a normal
    exit would; then the process ends. Not while a thread that the exit would
    wait for still runs, nor under a profiler or tracer (``python -m cProfile``
    writes its output after the program returns), and never for a library caller
    of :func:`main` (a test's ``CliRunner``)."""
    import atexit
    import threading

    others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    if not _finished_early[0] or others or sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _leave_worker() -> None:
    """End a `torchrun` process whose work is done and written, without the interpreter's teardown.

    The process group is destroyed by then, but the communication backend's own threads (gloo's on the
    CPU) can still hold objects that hold tensors; freeing those while the interpreter is torn down
    aborts the process now and then ("terminate called without an active exception", exit -6), and
    torchrun then reports a run that finished as failed. Everything is flushed first."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--stage", default=None, help="Whose trained model [default: the last stage].")
@click.option("--prompt", default=None, help="Raw prompt text (instead of --set).")
@click.option("--task", default=None, help="Render this task's template [default: the stage's first task].")
@click.option("--template", default=None, help="Which of the task's templates [default: its first].")
@click.option("--set", "values", multiple=True, metavar="COLUMN=VALUE", help="A template variable; repeat as needed.")
@click.option("--messages", "messages_file", type=click.Path(dir_okay=False), default=None,
              help="A chat task's conversation: a JSON list of turns (role/content or from/value), "
                   "ending with a user turn.")
@click.option("--message", "message_items", multiple=True, metavar="ROLE=TEXT",
              help="A turn of a chat task's conversation (user, assistant, system); repeat, ending with a user turn.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template, as a user turn "
              "(after the system prompt of --task or the stage's first chat task, as trained).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--raw", is_flag=True, help="Print only the continuation.")
@click.option("--color/--no-color", default=None, help="Highlight the continuation [default: on a terminal].")
def generate(out: str, stage: str | None, prompt: str | None, task: str | None, template: str | None,
             values: tuple[str, ...], messages_file: str | None, message_items: tuple[str, ...], chat: bool,
             max_new_tokens: int, temperature: float, top_p: float, seed: int, device: str, raw: bool,
             color: bool | None) -> None:
    """Continue a prompt with a trained stage's model; the prompt is rendered as the stage's data was.

    The output is the prompt followed by the continuation, marked «like this» (green on a terminal).
    """
    pairs = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"'{item}' is not COLUMN=VALUE", param_hint="--set")
        pairs[name] = value
    conversation = _conversation(messages_file, message_items)
    _need_training_extra("generate")
    from .runtime.generate import generate as run_generate

    try:
        g = run_generate(out, stage=stage, prompt=prompt, task=task, template=template, values=pairs, chat=chat,
                         max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                         device=device, conversation=conversation)
    except TunecError as exc:
        raise _fail(exc) from None
    if raw:
        click.echo(g.completion)
    elif sys.stdout.isatty() if color is None else color:
        click.echo(g.prompt + click.style(g.completion, fg="green", bold=True))
    else:
        click.echo(f"{g.prompt}«{g.completion}»")


def _conversation(path: str | None, items: tuple[str, ...]) -> list[dict] | None:
    """``--messages FILE`` or the ``--message ROLE=TEXT`` turns, as a list of turns (checked by generate)."""
    if path is not None and items:
        raise click.UsageError("give the conversation either with --messages FILE or with --message, not both")
    if items:
        turns = []
        for item in items:
            role, sep, text = item.partition("=")
            if not sep or not role:
                raise click.BadParameter(f"'{item}' is not ROLE=TEXT", param_hint="--message")
            turns.append({"role": role, "content": text})
        return turns
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"error: --messages {path}: cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"error: --messages {path}:{exc.lineno}:{exc.colno}: not JSON: {exc.msg}") from None


@main.command("eval")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--stage", default=None, help="Whose model [default: the last stage that has run].")
@click.option("--base", is_flag=True, help="Evaluate the model the stage starts from (its config freshly "
              "initialised with the plan's seed, its model folder or hub model, or the earlier stage's result).")
@click.option("--tasks", multiple=True, metavar="TASK", help="Only these tasks (repeat) [default: every eval set "
              "of the stage with answer choices].")
@click.option("--model", "model", default=None, metavar="PATH_OR_STAGE", help="Score this model instead: a "
              "finished stage or a `save_pretrained` folder, on the eval sets of --stage [default: the last stage].")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N records per task.")
@click.option("--generate", "generation", is_flag=True, help="Also eval sets without answer choices: greedy "
              "decoding, exact match and token F1.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="With --generate: the longest answer generated.")
@click.option("--shots", type=click.IntRange(min=0, max=1000), default=0, show_default=True,
              help="Exemplars from each task's train rows before every example (the recipe compiled again "
              "with `few_shot: {shots: K}`); results in eval-Kshot.json.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def eval_cmd(out: str, stage: str | None, base: bool, tasks: tuple[str, ...], model: str | None, limit: int | None,
             generation: bool, max_new_tokens: int, shots: int, device: str) -> None:
    """Accuracy on the stage's eval sets with answer choices, by rank classification (log-likelihood of each
    choice after the prompt). Results: OUT/runs/<stage>/eval.json and predictions/<task>.jsonl.
    """
    _need_training_extra("eval")
    from .compiler.plan import read_plan
    from .runtime import accuracy

    if base and model is not None:
        raise click.UsageError("--base and --model exclude each other")
    try:
        plan = read_plan(Path(out))
        if stage:
            name = plan.stage(stage).name
        else:
            name = plan.stages[-1].name if model is not None else accuracy.last_run_stage(Path(out), plan)
        saved = accuracy.run_eval(Path(out), plan, name, base, tasks, limit, device, model, generation,
                                  max_new_tokens, shots)
    except TunecError as exc:
        raise _fail(exc) from None
    from .runtime.eval_shots import eval_name

    click.echo(f"stage {name}: accuracy by rank classification{f', {shots}-shot' if shots else ''} "
               f"({out}/runs/{name}/{eval_name(shots)})")
    for line in accuracy.table(saved):
        click.echo(line)


@main.group("cache")
def cache_group() -> None:
    """The compiled-unit cache: what it holds, and pruning it."""


@cache_group.command("info")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), default=None,
              help="Cache folder [default: $TUNEC_CACHE, else ~/.cache/tunec].")
def cache_info(cache_dir: str | None) -> None:
    """Where the cache is, how many entries and bytes it holds, and their last use."""
    from .compiler.cache import Cache, default_dir, describe

    for line in describe(Cache(Path(cache_dir) if cache_dir else default_dir()).info()):
        click.echo(line)


@cache_group.command("prune")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), default=None,
              help="Cache folder [default: $TUNEC_CACHE, else ~/.cache/tunec].")
@click.option("--older-than", default=None, metavar="AGE",
              help="Only entries no compile used for AGE (e.g. 30m, 12h, 7d, 2w) [default: every entry].")
def cache_prune(cache_dir: str | None, older_than: str | None) -> None:
    """Remove cache entries (all, or those unused for --older-than AGE)."""
    from .compiler.cache import Cache, default_dir, parse_age

    try:
        age = parse_age(older_than) if older_than is not None else None
    except TunecError as exc:
        raise _fail(exc) from None
    removed, size = Cache(Path(cache_dir) if cache_dir else default_dir()).prune(age)
    click.echo(f"removed {removed} entr{'y' if removed == 1 else 'ies'}, {size:,} bytes")


@main.group()
def templates() -> None:
    """Browse the template library (and folders of your own, with --dir)."""


def _template_dirs(dirs: tuple[str, ...]) -> list[Path]:
    from .compiler.templates import LIBRARY_DIR

    for d in dirs:
        if not Path(d).is_dir():
            raise click.BadParameter(f"'{d}' is not a folder", param_hint="--dir")
    return [Path(d) for d in dirs] + [LIBRARY_DIR]


_DIR_OPTION = click.option("--dir", "dirs", multiple=True, metavar="DIR",
                           help="A folder searched before the library (as a recipe's template_dirs); repeat as needed.")


@templates.command("list")
@click.argument("family", required=False)
@_DIR_OPTION
def templates_list(family: str | None, dirs: tuple[str, ...]) -> None:
    """List templates (only FAMILY's, e.g. `sentiment`), with the variables each reads."""
    from .compiler import library

    try:
        found = library.entries(_template_dirs(dirs))
    except TunecError as exc:
        raise _fail(exc) from None
    if family:
        families = sorted({e.name.split("/")[0] for e in found})
        found = [e for e in found if e.name.split("/")[0] == family.strip("/")]
        if not found:
            from .compiler.errors import did_you_mean

            raise UserError(f"error: no template family '{family}'{did_you_mean(family, families)}")
    width = max(len(e.name) for e in found)
    for e in found:
        click.echo(f"{e.name:<{width}}  {', '.join(e.variables)}")
        if e.description:
            click.echo(f"{'':<{width}}  {e.description}")


@templates.command("show")
@click.argument("name")
@_DIR_OPTION
def templates_show(name: str, dirs: tuple[str, ...]) -> None:
    """Print template NAME (e.g. `sentiment/review_short`): where it is, what it reads, its text."""
    from .compiler import library

    try:
        entry = library.find(name, _template_dirs(dirs))
    except TunecError as exc:
        raise _fail(exc) from None
    click.echo(f"# {entry.name}: {entry.path}")
    click.echo(f"# variables: {', '.join(entry.variables)}")
    click.echo(entry.path.read_text(encoding="utf-8"), nl=False)


if __name__ == "__main__":  # pragma: no cover
    console()
