"""The run plan: ``OUT/plan.json``, written last, the commit marker of a build.

The plan is what the runtime reads: every stage with its settings (the
recipe's own typed :class:`~compiler.recipe.Stage`), its shards with sha256,
row and token counts, per-task counts, the fill rate, the recipe's hash and
the versions that produced it. Paths inside the plan are relative to the
build folder, so a build folder can be moved as a whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import FORMAT_VERSION
from .errors import TunecError
from .recipe import AnswerChoices, Stage

PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.json"
MARKER_FILE = ".tunec-build"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShardEntry(Strict):
    path: str  # relative to the build folder
    sha256: str
    bytes: int
    rows: int
    tokens: int  # non-padding tokens
    trained_tokens: int  # tokens with a label


class PackedSet(Strict):
    """A set of packed shards (a stage's training data, or one task's eval data)."""

    rows: int
    seq_len: int
    tokens: int
    trained_tokens: int
    fill_rate: float = Field(description="Non-padding tokens / (rows * seq_len).")
    shards: list[ShardEntry]


class Lengths(Strict):
    """Histograms of the kept documents' token counts (as packed, after truncation), in ``LENGTH_BINS``
    bins of ``bin_width`` tokens from 0: bin ``k`` counts lengths in ``[k * bin_width, (k + 1) * bin_width)``,
    the last bin also holds longer ones (up to ``seq_len``). ``completion``: the tokens the `sft`
    objective labels (completion or assistant turns, and the EOS); ``prompt``: the rest."""

    bin_width: int
    document: list[int]
    prompt: list[int]
    completion: list[int]


LENGTH_BINS = 64


class TaskCounts(Strict):
    examples: int = Field(description="Documents kept (one per row and template).")
    tokens: int
    trained_tokens: int
    truncated: int = Field(description="Kept documents cut to seq_len.")
    dropped: int = Field(description="Documents left out: too long under `truncation: drop`, or nothing left to train.")
    boundary_merges: int = Field(
        description="Documents whose first trained token also holds prompt characters (a BPE merge across "
        "the prompt/completion boundary): end prompts without a trailing space to avoid them."
    )
    templates: dict[str, int] = Field(description="Documents kept per template.")
    skipped: dict[str, int] = Field(
        default_factory=dict, description="Rows a promptsource template did not apply to (empty target), per template."
    )
    fewshot: int = Field(default=0, description="Documents with at least one few-shot exemplar.")
    requested_share: float | None = Field(default=None, description="The mixture's rate for the task (training only).")
    trained_share: float | None = Field(
        default=None, description="The task's share of the stage's trained tokens, after packing (training only)."
    )
    lengths: Lengths | None = Field(default=None, description="Token-count histograms of the documents kept.")
    audit_failures: int = Field(default=0, description="Documents that failed the mask audit and were kept "
                                "(`audit: warn`; under `audit: error` the compile stops instead).")
    pairs: int | None = Field(default=None, description="Preference tasks: pairs (unpaired: examples) kept; "
                              "`examples` counts their documents.")
    checks: dict[str, int] = Field(default_factory=dict, description="Preference tasks: pairs dropped by "
                                   "`format.checks: warn`, per check (identical, whitespace_only, empty).")


class ChoicesFile(Strict):
    """Per eval document: prompt, target, answer choices and the right one (JSON lines)."""

    path: str
    sha256: str
    count: int


class EvalSet(Strict):
    counts: TaskCounts
    data: PackedSet
    held_out: bool = False
    choices: ChoicesFile | None = None


class LeakReport(Strict):
    examples: int
    leaked: int
    by_task: dict[str, int] = Field(description="Training task -> leaked examples found in it.")
    by_kind: dict[str, int] = Field(
        default_factory=dict,
        description="`example` (the whole example is a training example) or `text` (one long text is "
        "a training text) -> leaked examples.")


class Estimate(Strict):
    """A stage's cost before training (compiler/estimate.py; keys documented in docs/build-format.md,
    "Estimates"). None where the model's architecture or config is not known to the compiler."""

    steps: int
    rows_per_step: int
    micro_batch_rows: int
    positions: int = Field(description="Row positions the model runs over (steps x rows_per_step x seq_len).")
    tokens_seen: int
    tokens_trained: int
    params_total: int | None
    params_trainable: int | None
    params_lora: int | None
    flops: float | None
    flops_linear: float | None
    flops_attention: float | None
    flops_attention_dense: float | None
    memory_weights: int | None
    memory_gradients: int | None
    memory_optimizer: int | None
    memory_activations: int | None
    memory_activations_checkpointed: int | None
    memory_peak: int | None
    memory_peak_checkpointed: int | None
    mfu: float
    seconds_h100: float | None
    seconds_a100: float | None
    seconds_l4: float | None


class LintFinding(Strict):
    """A prompt lint finding (compiler/lint.py)."""

    id: str
    message: str
    location: str | None = Field(description="FILE:LINE:COL in the recipe (or a template file), when known.")
    task: str
    template: str | None = None


class StagePlan(Strict):
    name: str
    settings: Stage  # the recipe's stage, local paths made absolute
    train: PackedSet
    tasks: dict[str, TaskCounts]
    eval: dict[str, EvalSet]
    leakage: dict[str, LeakReport] = Field(default_factory=dict, description="Per eval task, when any leaked.")
    estimate: Estimate | None = Field(default=None, description="Cost before training (docs/build-format.md).")


class TokenizerPlan(Strict):
    path: str  # relative to the build folder: the tokenizer as compiled, chat template included
    sha256: str
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int


class RecipeInfo(Strict):
    file: str
    sha256: str = Field(description="sha256 of the recipe file's bytes.")
    hash: str = Field(description="sha256 of the validated recipe (canonical JSON) and of every input's content.")
    overrides: list[str] = Field(default_factory=list, description="`--set PATH=VALUE` applied to the file, in order.")


class TemplatePlan(Strict):
    name: str
    sha256: str
    source: str  # the Jinja text, so the runtime renders prompts exactly as the compiler did
    kind: str = "blocks"  # "blocks" | "promptsource"
    answer_choices: str | None = None
    separator: str = " "


class TaskPlan(Strict):
    """How a task's text was made: what `tunec generate` needs to render a prompt the same way."""

    columns: list[str] | None
    templates: list[TemplatePlan]
    format: str = "completion"  # "completion" | "chat"
    system: str | None = None  # chat: the system prompt's Jinja text
    answer_choices: AnswerChoices | None = None  # as the recipe gives them: `tunec generate` renders with them


class Plan(Strict):
    format: Literal["tunec.plan"] = "tunec.plan"
    format_version: int = FORMAT_VERSION
    versions: dict[str, str]
    recipe: RecipeInfo
    seq_len: int
    seed: int
    tokenizer: TokenizerPlan
    inputs: dict[str, dict[str, str]] = Field(description="Content hashes of sources and templates.")
    tasks: dict[str, TaskPlan]
    stages: list[StagePlan]
    lint: list[LintFinding] = Field(default_factory=list, description="Prompt lint findings (compiler/lint.py).")

    def stage(self, name: str) -> StagePlan:
        for s in self.stages:
            if s.name == name:
                return s
        from .errors import did_you_mean

        raise TunecError(f"no stage '{name}' in the plan{did_you_mean(name, [s.name for s in self.stages])}")



def read_plan(out: Path) -> Plan:
    """Read ``OUT/plan.json``; a folder without one is not a finished build."""
    out = Path(out)
    path = out / PLAN_FILE
    if not path.is_file():
        if (out / MARKER_FILE).exists():
            raise TunecError(f"{out}: the build did not finish (no {PLAN_FILE}); run `tunec compile` again")
        raise TunecError(f"{out}: not a tunec build folder (no {PLAN_FILE})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TunecError(f"{path}:{exc.lineno}: corrupted plan: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise TunecError(f"{path}: corrupted plan: not UTF-8 (byte {exc.start})") from None
    except (OSError, RecursionError) as exc:
        raise TunecError(f"{path}: cannot read the plan ({type(exc).__name__})") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if data.get("format") != "tunec.plan" if isinstance(data, dict) else True:
        raise TunecError(f"{path}: not a tunec plan")
    if version != FORMAT_VERSION:
        raise TunecError(
            f"{path}: plan format version {version}, this tunec reads version {FORMAT_VERSION}; "
            "compile the recipe again with this tunec"
        )
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise TunecError(f"{path}: not a valid plan ({exc.error_count()} problem(s), first at `{where}`: "
                         f"{first['msg']}); written by an incompatible tunec? compile the recipe again") from None
