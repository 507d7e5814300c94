"""The recipe language: typed, strict, with tagged unions for every polymorphic node.

A recipe is YAML validated into :class:`Recipe`. Defaults live here and only
here; the validated model flows unchanged to the planner and the runtime.
Every model forbids unknown keys, so a misspelt key is an error, not a silently
ignored setting.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, model_validator

# The recipe format this tunec reads; a recipe may say `version: N` (see load.py for migrations).
RECIPE_VERSION = 1

# Bounds far beyond any real run: they catch `1e24` and `.inf` typed by mistake,
# and keep every count inside 64-bit integers downstream.
MAX_ROWS = 10**12
MAX_STEPS = 10**9

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=100)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _kind_shorthand(value: Any) -> Any:
    """Let ``objective: sft`` stand for ``objective: {kind: sft}``."""
    return {"kind": value} if isinstance(value, str) else value


class _OrString:
    """JSON-schema marker: the annotated value may also be a string.

    The schema then accepts what a shorthand's BeforeValidator accepts (pydantic
    derives the schema from the type after the validator, which never sees the
    string). Given the union, the string is one of the tags of the members whose
    fields all have defaults: those alone can be named by their tag.
    """

    def __init__(self, union: Any = None):
        members = typing.get_args(union)
        self.enum = None if union is None else [
            typing.get_args(m.model_fields["kind"].annotation)[0]
            for m in members
            if all(not f.is_required() for n, f in m.model_fields.items() if n != "kind")
        ]

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict[str, Any]:
        string: dict[str, Any] = {"type": "string"}
        if self.enum is not None:
            string["enum"] = self.enum
        return {"anyOf": [string, handler(core_schema)]}


# --------------------------------------------------------------------------- tokenizer


class LocalTokenizer(Strict):
    """A folder holding tokenizer files (``tokenizer.json`` and friends)."""

    kind: Literal["local"]
    path: str = Field(description="Folder, relative to the recipe file.")
    chat_template: str | None = Field(
        default=None, description="Optional Jinja file that replaces the tokenizer's chat template."
    )


class HubTokenizer(Strict):
    """A tokenizer on the Hugging Face hub (needs network, or a warm local cache)."""

    kind: Literal["hub"]
    id: str
    revision: str | None = None
    chat_template: str | None = None


TokenizerSpec = Annotated[Union[LocalTokenizer, HubTokenizer], Field(discriminator="kind")]


# --------------------------------------------------------------------------- sources


class _FileSource(Strict):
    path: str | dict[Name, str] = Field(
        description="A file, or a mapping from split name to file; relative to the recipe. "
        "A single file is the split `train`."
    )

    def files(self) -> dict[str, str]:
        return {"train": self.path} if isinstance(self.path, str) else dict(self.path)


class JsonlSource(_FileSource):
    kind: Literal["jsonl"]


class JsonSource(_FileSource):
    """A JSON file holding a list of objects."""

    kind: Literal["json"]


class CsvSource(_FileSource):
    kind: Literal["csv"]


class ParquetSource(_FileSource):
    kind: Literal["parquet"]


class HubSource(Strict):
    """A dataset on the Hugging Face hub, loaded with ``datasets.load_dataset``."""

    kind: Literal["hub"]
    id: str
    name: str | None = Field(default=None, description="The dataset's configuration name.")
    revision: str | None = None
    columns: list[str] | None = Field(
        default=None,
        description="The dataset's columns, so that `tunec validate` can check templates offline.",
    )


Source = Annotated[
    Union[JsonlSource, JsonSource, CsvSource, ParquetSource, HubSource], Field(discriminator="kind")
]
FILE_KINDS = ("jsonl", "json", "csv", "parquet")


# --------------------------------------------------------------------------- templates


class LibraryTemplate(Strict):
    """A template from the library, e.g. ``sentiment/review_short`` (``templates/sentiment/review_short.j2``)."""

    kind: Literal["library"]
    name: str


class FileTemplate(Strict):
    """A ``.j2`` file with ``prompt`` and ``completion`` blocks, relative to the recipe."""

    kind: Literal["file"]
    path: str


class InlineTemplate(Strict):
    """Two Jinja strings written in the recipe."""

    kind: Literal["inline"]
    name: Name = "inline"
    prompt: str
    completion: str


def _template_shorthand(value: Any) -> Any:
    """A bare string names a library template."""
    return {"kind": "library", "name": value} if isinstance(value, str) else value




# --------------------------------------------------------------------------- tasks


class Selection(Strict):
    """Which rows of a source form a part (train or eval) of a task."""

    split: Name = "train"
    start: int = Field(default=0, ge=0, le=MAX_ROWS, description="First row (0-based) of the split.")
    stop: int | None = Field(default=None, ge=0, le=MAX_ROWS, description="One past the last row; none = to the end.")

    @model_validator(mode="after")
    def _ordered(self) -> "Selection":
        if self.stop is not None and self.stop <= self.start:
            raise ValueError(f"`stop` ({self.stop}) must be greater than `start` ({self.start})")
        return self


class FractionEval(Strict):
    """A seeded fraction of the train selection, held out for eval (train then excludes it)."""

    fraction: float = Field(gt=0, lt=1)


class FileEval(Strict):
    """Eval rows from their own file, read like the task's source (same `kind`)."""

    file: str = Field(description="Relative to the recipe.")


def _eval_kind(value: Any) -> str:
    if isinstance(value, (FractionEval, FileEval)):  # serialising a validated model
        return "fraction" if isinstance(value, FractionEval) else "file"
    if isinstance(value, dict):
        if "fraction" in value:
            return "fraction"
        if "file" in value:
            return "file"
    return "split"


EvalSelection = Annotated[
    Union[
        Annotated[Selection, Tag("split")],
        Annotated[FractionEval, Tag("fraction")],
        Annotated[FileEval, Tag("file")],
    ],
    Discriminator(_eval_kind),
]


class FewShot(Strict):
    """Prefix each example with exemplars drawn from the task's own training rows."""

    shots: int = Field(gt=0, le=1000, description="Exemplars per example (the most, when `min_shots` is given).")
    min_shots: int | None = Field(default=None, ge=0, le=1000,
                                  description="Draw the count uniformly in [min_shots, shots].")
    share: float = Field(default=1.0, gt=0, le=1,
                         description="Fraction of examples made few-shot; the rest stay zero-shot.")
    separator: str = Field(default="\n\n", description="Text between exemplars and before the example.")

    @model_validator(mode="after")
    def _range(self) -> "FewShot":
        if self.min_shots is not None and self.min_shots > self.shots:
            raise ValueError(f"`min_shots` ({self.min_shots}) must not exceed `shots` ({self.shots})")
        return self


class ColumnChoices(Strict):
    """Answer choices read from a column holding a list of strings."""

    kind: Literal["column"]
    column: str


class JinjaChoices(Strict):
    """Answer choices rendered from the row: a Jinja string with choices separated by `|||`."""

    kind: Literal["jinja"]
    template: str


AnswerChoices = Union[list[str], Annotated[Union[ColumnChoices, JinjaChoices], Field(discriminator="kind")]]


class FieldMap(Strict):
    """A column read through a value map: ``{column: label, map: {entailment: 0, not_entailment: 1}}``."""

    column: str
    map: dict[Union[str, int], Union[str, int, float, bool]] = Field(
        min_length=1,
        description="Each value of the column -> what the task sees (e.g. a string label -> the index "
        "`answer_choices[label]` needs); a value that is not in the map is an error naming the row.",
    )


def field_column(spec: "str | FieldMap") -> str:
    """The source column a `fields:` entry reads."""
    return spec if isinstance(spec, str) else spec.column


class TaskLeakage(Strict):
    """Which fields identify an example for the leakage check, and which are shared context."""

    key: list[str] | None = Field(
        default=None, min_length=1,
        description="Fields that together identify an example (default: every field not in `context`).",
    )
    context: list[str] = Field(
        default_factory=list,
        description="Fields shared by several examples (a story several questions ask about): "
        "never compared, alone or as part of an example.",
    )

    @model_validator(mode="after")
    def _disjoint(self) -> "TaskLeakage":
        both = sorted(set(self.key or ()) & set(self.context))
        if both:
            raise ValueError(f"field(s) {', '.join(both)} cannot be both `key` and `context`")
        return self


class CompletionFormat(Strict):
    """Plain text: prompt + completion + EOS."""

    kind: Literal["completion"]


Role = Literal["system", "user", "assistant"]
DEFAULT_ROLES: dict[str, Role] = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                                  "system": "system", "bot": "assistant", "model": "assistant"}


class ChatFormat(Strict):
    """Rendered through the tokenizer's chat template; loss on assistant turns only."""

    kind: Literal["chat"]
    messages: str | None = Field(
        default=None,
        description="Column holding a conversation (a list of turns). Without it, each template's prompt "
        "and completion become one user turn and one assistant turn.",
    )
    roles: dict[str, Role] = Field(
        default_factory=lambda: dict(DEFAULT_ROLES),
        description="Maps the data's speaker names (ShareGPT `from`, OpenAI `role`) onto chat roles.",
    )
    system: str | None = Field(default=None, description="System prompt (Jinja over the row's columns).")
    train_on: Literal["all", "last"] = Field(default="all",
                                             description="Train on every assistant turn, or the last only.")


class DialogueMarkers(Strict):
    """Raw-text dialogues (``"\\n\\nHuman: …\\n\\nAssistant: …"``): the text that opens each speaker's turn."""

    user: str = Field(default="\n\nHuman:", min_length=1)
    assistant: str = Field(default="\n\nAssistant:", min_length=1)


class PreferenceFormat(Strict):
    """Rows of (prompt, chosen, rejected): two documents per row, loss on each response (see
    docs/preference.md). `prompt`, `chosen` and `rejected` each name a column, or are Jinja over the
    row when they hold `{{` or `{%`."""

    kind: Literal["preference"]
    prompt: str | None = Field(default=None, description="Templates shape: the prompt, shared by both sides.")
    chosen: str = Field(description="The preferred response (a column or Jinja); a whole conversation or "
                        "dialogue in the other shapes.")
    rejected: str = Field(description="The other response, like `chosen`.")
    messages: str | None = Field(default=None, description="Chat shape: a column holding the conversation "
                                 "both replies answer.")
    dialogue: DialogueMarkers | None = Field(default=None, description="`chosen` and `rejected` are raw-text "
                                             "dialogues sharing every turn but the last reply.")
    chat: bool = Field(default=False, strict=True, description="Render through the tokenizer's chat template "
                       "(always so for `messages` and for columns holding conversations).")
    roles: dict[str, Role] = Field(default_factory=lambda: dict(DEFAULT_ROLES),
                                   description="Speaker names of conversations -> chat roles.")
    system: str | None = Field(default=None, description="System prompt of chat renderings (Jinja over the row).")
    checks: Literal["error", "warn"] = Field(
        default="error", description="Pairs whose chosen equals rejected, differs only in whitespace, or has "
        "an empty side: stop (`error`), or drop them, counted, with a warning (`warn`).")

    @model_validator(mode="after")
    def _one_shape(self) -> "PreferenceFormat":
        given = [k for k in ("prompt", "messages", "dialogue") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of `prompt`, `messages` and `dialogue`, not {' and '.join(given)}")
        return self


class UnpairedFormat(Strict):
    """KTO rows: a prompt, one completion and a label saying whether the completion is desirable."""

    kind: Literal["unpaired"]
    prompt: str = Field(description="A column or Jinja, as in `kind: preference`.")
    completion: str = Field(description="A column or Jinja.")
    label: str = Field(description="Column holding true (desirable) or false (undesirable).")
    chat: bool = Field(default=False, strict=True)
    system: str | None = None


_Formats = Union[CompletionFormat, ChatFormat, PreferenceFormat, UnpairedFormat]
PAIRED_FORMATS = (PreferenceFormat, UnpairedFormat)
Format = Annotated[_Formats, Field(discriminator="kind"), BeforeValidator(_kind_shorthand), _OrString(_Formats)]


class PromptsourceTemplates(Strict):
    """Templates from a promptsource `templates.yaml` (`!Template` entries)."""

    kind: Literal["promptsource"]
    path: str = Field(description="The templates.yaml file, relative to the recipe.")
    names: list[str] | None = Field(default=None, description="Templates to use, by name; all when omitted.")
    separator: str = Field(default=" ", description="Text placed between the rendered input and target.")


_TemplateUnion = Annotated[
    Union[LibraryTemplate, FileTemplate, InlineTemplate, PromptsourceTemplates], Field(discriminator="kind")
]
TemplateRef = Annotated[_TemplateUnion, BeforeValidator(_template_shorthand), _OrString()]


class Task(Strict):
    source: Source
    fields: dict[Name, Union[str, FieldMap]] | None = Field(
        default=None,
        description="Column map `new_name: source_column` (or `new_name: {column: c, map: {value: new}}`). "
        "When given, the task sees exactly these columns (rename and select).",
    )
    format: Format = CompletionFormat(kind="completion")
    templates: list[TemplateRef] = Field(default_factory=list)
    template_policy: Literal["all", "sample", "round_robin"] = Field(
        default="all",
        description="`all`: every example under every template; `sample`: one seeded template per example; "
        "`round_robin`: templates in turn.",
    )
    few_shot: FewShot | None = None
    answer_choices: AnswerChoices | None = Field(
        default=None, description="Shown to templates as `answer_choices`; recorded for eval tasks."
    )
    train: Selection = Selection()
    eval: EvalSelection | None = None
    leakage: TaskLeakage = Field(
        default_factory=TaskLeakage,
        description="How the leakage check reads this task's examples: `key` fields identify one, "
        "`context` fields are shared and never compared.",
    )
    truncation: Literal["drop", "truncate", "error"] = Field(
        default="drop",
        description="What to do with an example longer than `seq_len`: drop it (counted), keep its "
        "first `seq_len` tokens (counted), or stop with an error.",
    )

    @model_validator(mode="after")
    def _templates_or_messages(self) -> "Task":
        if isinstance(self.format, PAIRED_FORMATS):
            if self.templates or self.few_shot is not None:
                raise ValueError(f"a `format: {self.format.kind}` task reads its text through `format` "
                                 "(prompt, chosen, rejected), not `templates` or `few_shot`")
            return self
        chat_messages = isinstance(self.format, ChatFormat) and self.format.messages is not None
        if not self.templates and not chat_messages:
            raise ValueError("a task needs `templates` (or `format: {kind: chat, messages: COLUMN}`)")
        if chat_messages and self.templates:
            raise ValueError("a chat task reads either a `messages` column or `templates`, not both")
        if chat_messages and self.few_shot is not None:
            raise ValueError("`few_shot` needs templates; a `messages` column already holds whole conversations")
        return self


# --------------------------------------------------------------------------- stages


class SftObjective(Strict):
    """Loss on completion tokens only."""

    kind: Literal["sft"]


class LmObjective(Strict):
    """Loss on every token (continued pre-training on the rendered text)."""

    kind: Literal["lm"]


Reference = Annotated[str, Field(pattern=NAME_PATTERN, max_length=100, description=(
    "The reference model's weights: `initial` (the stage's starting weights; with LoRA, the base with the "
    "adapter disabled) or the name of an earlier stage."))]


class DpoObjective(Strict):
    """Direct preference optimisation (Rafailov et al. 2023) and its variants, over `format: preference` tasks."""

    kind: Literal["dpo"]
    beta: float = Field(default=0.1, gt=0, le=1000, description="Strength of the KL penalty (TRL's default).")
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5, description="Assumed label noise (cDPO, robust).")
    sft_weight: float = Field(default=0.0, ge=0, le=1000, description="Adds the chosen responses' NLL (RPO).")
    reference: Reference = "initial"


class SimpoObjective(Strict):
    """SimPO (Meng et al. 2024): length-normalised log-likelihood margin, no reference model."""

    kind: Literal["simpo"]
    beta: float = Field(default=2.0, gt=0, le=1000)
    gamma: float = Field(default=1.0, ge=0, le=1000, description="Target reward margin.")
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)
    sft_weight: float = Field(default=0.0, ge=0, le=1000)


class OrpoObjective(Strict):
    """ORPO (Hong et al. 2024): NLL of the chosen response plus an odds-ratio term, no reference model."""

    kind: Literal["orpo"]
    beta: float = Field(default=0.1, gt=0, le=1000, description="Weight of the odds-ratio term (λ in the paper, "
                        "`beta` in TRL).")


class KtoObjective(Strict):
    """KTO (Ethayarajh et al. 2024) over `format: unpaired` tasks."""

    kind: Literal["kto"]
    beta: float = Field(default=0.1, gt=0, le=1000)
    desirable_weight: float = Field(default=1.0, gt=0, le=1000)
    undesirable_weight: float = Field(default=1.0, gt=0, le=1000)
    reference: Reference = "initial"


PREFERENCE_OBJECTIVES = ("dpo", "simpo", "orpo", "kto")
_Objectives = Union[SftObjective, LmObjective, DpoObjective, SimpoObjective, OrpoObjective, KtoObjective]
Objective = Annotated[
    _Objectives, Field(discriminator="kind"), BeforeValidator(_kind_shorthand), _OrString(_Objectives)
]


class LocalModel(Strict):
    kind: Literal["local"]
    path: str = Field(description="A `save_pretrained` folder, relative to the recipe.")


class HubModel(Strict):
    kind: Literal["hub"]
    id: str
    revision: str | None = None


class ConfigModel(Strict):
    """A model built from scratch (random weights) from a transformers config."""

    kind: Literal["config"]
    config: dict[str, Any] = Field(
        description="Arguments of `transformers.AutoConfig.for_model`, including `model_type`."
    )

    @model_validator(mode="after")
    def _has_type(self) -> "ConfigModel":
        if not isinstance(self.config.get("model_type"), str):
            raise ValueError("`config` needs a `model_type` (for example `llama` or `qwen2`)")
        return self


class StageModel(Strict):
    """Start from the model an earlier stage produced."""

    kind: Literal["stage"]
    stage: Name
    adapter: Literal["merge", "continue"] = Field(
        default="merge",
        description="When the earlier stage trained a LoRA adapter: merge it into the weights and start "
        "afresh (`merge`), or keep training the same adapter (`continue`).",
    )


ModelSpec = Annotated[
    Union[LocalModel, HubModel, ConfigModel, StageModel], Field(discriminator="kind")
]


class NoPeft(Strict):
    kind: Literal["none"]


class LoraPeft(Strict):
    kind: Literal["lora"]
    r: int = Field(default=16, gt=0, le=65536)
    alpha: float = Field(default=32.0, gt=0, le=1e6)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    # strict: YAML 1.2 has two booleans, and the schema says so; `yes` is a string
    save_merged: bool = Field(default=False, strict=True, description="Also save the model with the adapter merged in.")
    use_dora: bool = Field(default=False, strict=True, description="DoRA: the adapter also learns each weight "
                           "column's magnitude (peft's `use_dora`).")


class QLoraPeft(LoraPeft):
    """LoRA on a base quantized to 4-bit NF4 by bitsandbytes (CUDA only); the adapter trains in float32."""

    kind: Literal["qlora"]  # type: ignore[assignment]  # the tag of this member of the union
    double_quant: bool = Field(default=True, strict=True, description="Quantize the quantization constants too.")

    @model_validator(mode="after")
    def _no_merge(self) -> "QLoraPeft":
        if self.save_merged:
            raise ValueError("`save_merged` is not available with qlora (the base is 4-bit); load the adapter on "
                             "the full-precision base and merge there")
        return self


_Pefts = Union[NoPeft, LoraPeft, QLoraPeft]
Peft = Annotated[_Pefts, Field(discriminator="kind"), BeforeValidator(_kind_shorthand), _OrString(_Pefts)]


class ProportionalMixture(Strict):
    """Examples-proportional mixing (FLAN): each task contributes its examples, at most `cap`."""

    kind: Literal["proportional"]
    cap: int | None = Field(default=None, gt=0, le=MAX_ROWS, description="Most examples any one task contributes.")


class TemperatureMixture(Strict):
    """Temperature mixing (T5/seqio): rates proportional to min(size, cap) ** (1 / temperature)."""

    kind: Literal["temperature"]
    temperature: float = Field(gt=0, le=1000)
    cap: int | None = Field(default=None, gt=0, le=MAX_ROWS)


class WeightsMixture(Strict):
    """Explicit rates per task (normalised to sum to 1)."""

    kind: Literal["weights"]
    weights: dict[Name, Annotated[float, Field(ge=0, le=1e12)]]


_Mixtures = Union[ProportionalMixture, TemperatureMixture, WeightsMixture]
Mixture = Annotated[_Mixtures, Field(discriminator="kind"), BeforeValidator(_kind_shorthand), _OrString(_Mixtures)]


class ExamplesBudget(Strict):
    kind: Literal["examples"]
    count: int = Field(gt=0, le=MAX_ROWS)


class TokensBudget(Strict):
    """A budget in tokens of packed documents (prompt and completion)."""

    kind: Literal["tokens"]
    count: int = Field(gt=0, le=10**15)


Budget = Annotated[Union[ExamplesBudget, TokensBudget], Field(discriminator="kind")]


class StageEval(Strict):
    """What `tunec run` measures once a stage is trained (and once on the model the run starts from)."""

    accuracy: bool = Field(default=True, strict=True, description="Score the stage's eval sets that have answer "
                           "choices by rank classification (`tunec eval`); nothing happens when none has choices.")
    limit: int | None = Field(default=None, gt=0, le=MAX_ROWS, description="At most this many records per task.")


class DdpParallelism(Strict):
    """Each process holds the whole model; gradients are averaged (the default)."""

    kind: Literal["ddp"]


class FsdpParallelism(Strict):
    """FSDP2: weights, gradients and optimizer state sharded across processes (runtime/fsdp.py)."""

    kind: Literal["fsdp"]
    reshard_after_forward: bool = Field(default=True, strict=True, description="Free each layer's gathered "
                                        "weights after its forward pass (less memory, one more all-gather).")


_Parallelisms = Union[DdpParallelism, FsdpParallelism]
Parallelism = Annotated[_Parallelisms, Field(discriminator="kind"), BeforeValidator(_kind_shorthand),
                        _OrString(_Parallelisms)]


class Stage(Strict):
    name: Name
    objective: Objective
    tasks: list[Name] = Field(min_length=1)
    held_out: list[Name] = Field(
        default_factory=list, description="Tasks compiled to eval data only: never trained in this stage."
    )
    mixture: Mixture = ProportionalMixture(kind="proportional")
    budget: Budget | None = Field(
        default=None, description="Total size of the mixture; without it each task gives its (capped) examples."
    )
    model: ModelSpec
    lr: float = Field(default=2e-5, gt=0, le=1)
    batch_tokens: int = Field(default=65536, gt=0, le=1 << 40, description="Tokens per optimizer step (all ranks).")
    epochs: float = Field(default=1.0, gt=0, le=10_000, description="Passes over the stage's training rows.")
    max_steps: int | None = Field(
        default=None, gt=0, le=MAX_STEPS, description="When given, training stops after this many optimizer steps, "
        "whatever `epochs` says."
    )
    warmup_steps: int = Field(default=0, ge=0, le=MAX_STEPS)
    weight_decay: float = Field(default=0.0, ge=0, le=100)
    max_grad_norm: float = Field(default=1.0, gt=0, le=1e6)
    micro_batch_rows: Annotated[int, Field(gt=0, le=1 << 20)] | Literal["auto"] = Field(
        default=4, description="Packed rows per forward pass; gradients accumulate up to `batch_tokens`. `auto`: "
        "the most that fit on the GPU, found by trying (4 on a CPU)."
    )
    peft: Peft = NoPeft(kind="none")
    eval_every_steps: int | None = Field(default=None, gt=0, le=MAX_STEPS,
                                         description="Also evaluate every N steps (always at the end).")
    eval: StageEval = Field(default_factory=StageEval, description="Accuracy at the end of the stage.")
    checkpoint_every_steps: int | None = Field(default=None, gt=0, le=MAX_STEPS,
                                               description="Checkpoint every N steps (always at the end).")
    log_every_steps: int = Field(default=1, gt=0, le=MAX_STEPS)
    # memory (runtime/loss.py, runtime/memory.py): how a stage trains, never what it computes
    chunked_loss: bool = Field(default=True, strict=True, description="The loss without full logits: the output "
                               "layer over trained tokens in chunks (false: through [rows, tokens, vocab] logits).")
    activation_checkpointing: Annotated[bool, Field(strict=True)] | Literal["auto"] = Field(
        default="auto", description="Recompute each layer's activations in the backward pass; `auto`: on a GPU "
        "when one micro-batch's activations would take over a quarter of its memory.")
    compile: bool = Field(default=False, strict=True, description="Compile each decoder layer with torch.compile: "
                          "faster steps and less memory after a first step that compiles (tens of seconds).")
    parallelism: Parallelism = Field(default=DdpParallelism(kind="ddp"), description="How processes under "
                                     "`torchrun` share the work: `ddp` (whole model on each) or `fsdp` (sharded).")

    @model_validator(mode="after")
    def _runtime_combinations(self) -> "Stage":
        found = []
        if isinstance(self.parallelism, FsdpParallelism) and self.micro_batch_rows == "auto":
            found.append("`micro_batch_rows: auto` tries sizes on one process, which FSDP's collective passes "
                         "do not allow; give a number with `parallelism: fsdp`")
        if isinstance(self.parallelism, FsdpParallelism) and not isinstance(self.peft, NoPeft):
            found.append(f"`parallelism: fsdp` trains full models only for now; use `peft: none` or "
                         f"`parallelism: ddp` with `peft: {self.peft.kind}`")
        if self.compile and isinstance(self.peft, QLoraPeft):
            found.append("`compile: true` is not combined with `peft: qlora` (4-bit layers) yet; use one of them")
        if isinstance(self.peft, QLoraPeft) and not isinstance(self.model, (LocalModel, HubModel)):
            found.append("`peft: qlora` quantizes a pretrained base: give `model: {kind: hub, ...}` or "
                         "`{kind: local, ...}`")
        if found:
            raise ValueError("; ".join(found))
        return self


# --------------------------------------------------------------------------- lint

LintRule = Literal["label-in-prompt", "constant-prompt", "choices-not-in-prompt", "separator", "whitespace-variant",
                   "short-instruction", "label-imbalance", "duplicate-examples"]


class LintConfig(Strict):
    """Prompt lint (compiler/lint.py): which rules run, and their thresholds."""

    disable: list[LintRule] = Field(default_factory=list, description="Rule ids that do not run.")
    leak_share: float = Field(default=0.5, gt=0, le=1,
                              description="`label-in-prompt`: the share of rows whose prompt gives the answer away.")
    min_instruction_words: int = Field(default=2, ge=0, le=1000,
                                       description="`short-instruction`: fewer words of the template's own fire.")
    label_ratio: float = Field(default=10.0, ge=1, le=1e9,
                               description="`label-imbalance`: most / least frequent label above this fires.")
    duplicate_share: float = Field(default=0.0, ge=0, lt=1,
                                   description="`duplicate-examples`: a share of repeated rows above this fires.")


# --------------------------------------------------------------------------- recipe


class Recipe(Strict):
    """A tunec recipe: a tokenizer, tasks, and the stages that train on them."""

    version: int = Field(
        default=RECIPE_VERSION, ge=1, le=RECIPE_VERSION,
        description="The recipe format's version; a recipe written for an older format is migrated on load.",
    )
    tokenizer: TokenizerSpec
    seq_len: int = Field(gt=8, le=1 << 20, description="Length of every packed row, in tokens.")
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    template_dirs: list[str] = Field(
        default_factory=list,
        description="Extra template libraries (folders, relative to the recipe), searched before "
        "the built-in library.",
    )
    tasks: dict[Name, Task] = Field(min_length=1)
    stages: list[Stage] = Field(min_length=1)
    leakage: Literal["error", "warn", "ignore"] = Field(
        default="error",
        description="An eval or held-out example whose text also appears in a training mixture: stop "
        "(`error`), report it in the plan and on the console (`warn`), or only record it (`ignore`).",
    )
    lint: LintConfig = Field(default_factory=LintConfig, description="Prompt lint: rules to disable, thresholds.")
    audit: Literal["error", "warn"] = Field(
        default="error",
        description="A document whose trained tokens are not its completion (or assistant turns) and EOS: "
        "stop the compile (`error`), or warn and count it in the plan (`warn`).",
    )
