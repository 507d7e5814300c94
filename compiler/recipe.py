"""The recipe language: typed, strict, with tagged unions for every polymorphic node.

A recipe is YAML validated into :class:`Recipe`. Defaults live here and only
here; the validated model flows unchanged to the planner and the runtime.
Every model forbids unknown keys, so a misspelt key is an error, not a silently
ignored setting.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=100)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _kind_shorthand(value: Any) -> Any:
    """Let ``objective: sft`` stand for ``objective: {kind: sft}``."""
    return {"kind": value} if isinstance(value, str) else value


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


TemplateRef = Annotated[
    Union[LibraryTemplate, FileTemplate, InlineTemplate],
    Field(discriminator="kind"),
    BeforeValidator(_template_shorthand),
]


# --------------------------------------------------------------------------- tasks


class Selection(Strict):
    """Which rows of a source form a part (train or eval) of a task."""

    split: Name = "train"
    start: int = Field(default=0, ge=0, description="First row (0-based) of the split.")
    stop: int | None = Field(default=None, ge=0, description="One past the last row; none = to the end.")

    @model_validator(mode="after")
    def _ordered(self) -> "Selection":
        if self.stop is not None and self.stop <= self.start:
            raise ValueError(f"`stop` ({self.stop}) must be greater than `start` ({self.start})")
        return self


class Task(Strict):
    source: Source
    fields: dict[Name, str] | None = Field(
        default=None,
        description="Column map `new_name: source_column`. When given, the task sees exactly these "
        "columns (rename and select).",
    )
    templates: list[TemplateRef] = Field(min_length=1)
    train: Selection = Selection()
    eval: Selection | None = None
    truncation: Literal["drop", "truncate", "error"] = Field(
        default="drop",
        description="What to do with an example longer than `seq_len`: drop it (counted), keep its "
        "first `seq_len` tokens (counted), or stop with an error.",
    )


# --------------------------------------------------------------------------- stages


class SftObjective(Strict):
    """Loss on completion tokens only."""

    kind: Literal["sft"]


class LmObjective(Strict):
    """Loss on every token (continued pre-training on the rendered text)."""

    kind: Literal["lm"]


Objective = Annotated[
    Union[SftObjective, LmObjective], Field(discriminator="kind"), BeforeValidator(_kind_shorthand)
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
    r: int = Field(default=16, gt=0)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    save_merged: bool = Field(default=False, description="Also save the model with the adapter merged in.")


Peft = Annotated[Union[NoPeft, LoraPeft], Field(discriminator="kind"), BeforeValidator(_kind_shorthand)]


class Stage(Strict):
    name: Name
    objective: Objective
    tasks: list[Name] = Field(min_length=1)
    model: ModelSpec
    lr: float = Field(default=2e-5, gt=0)
    batch_tokens: int = Field(default=65536, gt=0, description="Tokens per optimizer step (all ranks).")
    epochs: float = Field(default=1.0, gt=0, description="Passes over the stage's training rows.")
    max_steps: int | None = Field(
        default=None, gt=0, description="When given, training stops after this many optimizer steps, "
        "whatever `epochs` says."
    )
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    micro_batch_rows: int = Field(
        default=4, gt=0, description="Packed rows per forward pass; gradients accumulate up to `batch_tokens`."
    )
    peft: Peft = NoPeft(kind="none")
    eval_every_steps: int | None = Field(default=None, gt=0, description="Also evaluate every N steps (always at the end).")
    checkpoint_every_steps: int | None = Field(default=None, gt=0, description="Checkpoint every N steps (always at the end).")
    log_every_steps: int = Field(default=1, gt=0)


# --------------------------------------------------------------------------- recipe


class Recipe(Strict):
    """A tunec recipe: a tokenizer, tasks, and the stages that train on them."""

    tokenizer: TokenizerSpec
    seq_len: int = Field(gt=8, le=1 << 20, description="Length of every packed row, in tokens.")
    seed: int = Field(default=0, ge=0)
    template_dirs: list[str] = Field(
        default_factory=list,
        description="Extra template libraries (folders, relative to the recipe), searched before "
        "the built-in library.",
    )
    tasks: dict[Name, Task] = Field(min_length=1)
    stages: list[Stage] = Field(min_length=1)
