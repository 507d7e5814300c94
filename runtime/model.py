"""Models: device choice, building or loading a causal LM, LoRA through peft, packed attention.

Packed rows hold several documents; ``position_ids`` restart at 0 at each of
them. Attention must stay inside a document. transformers (>= 4.56) sees that
by itself: given ``position_ids`` and no ``attention_mask``, it starts a new
document wherever a position does not follow the one before it, and builds
the block-diagonal causal mask for SDPA, eager and flex attention, or the
variable-length boundaries (``cu_seqlens``) for flash attention::

    position_ids  0 1 2 0 1 0        allowed (query row, key column)
    document      1 1 1 2 2 3        1 . . . . .
                                     1 1 . . . .
                                     1 1 1 . . .
                                     . . . 1 . .
                                     . . . 1 1 .
                                     . . . . . 1

So the model gets ``input_ids`` and ``position_ids`` only, and every attention
back end works. (Flash attention still gets the micro-batch flattened into one
sequence, its variable-length path.) :func:`packed_causal_mask` draws the
same mask by hand: ``tests/test_runtime_units.py`` holds transformers'
detection to it, and to each document run alone, for llama, qwen2, gemma3
and phi3.

The loss needs no logits: :func:`packed_hidden` stops at the last hidden
states, and :mod:`tunec.runtime.loss` applies the output layer in chunks.

Weights train in float32 (they are the optimizer's master weights); on CUDA
the forward pass runs under bf16 autocast (:func:`compute_dtype`), and the
saved model is in that dtype (:func:`save_dtype`).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from tunec.compiler.errors import TunecError
from tunec.compiler.recipe import ConfigModel, HubModel, LocalModel, LoraPeft, QLoraPeft

from .data import IGNORE
from .loss import OutputHead, causal_lm
from .loss import loss_sum as chunked_loss_sum
from .memory import precision_for


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if choice == "cuda":
        raise TunecError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False); "
                         "use --device cpu or auto")
    return torch.device("cpu")


def attention_for(device: torch.device) -> str:
    """flash attention 2 when it is installed and we are on CUDA, else PyTorch's SDPA."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype the forward pass computes in: bf16 autocast on CUDA (fp16 on GPUs without bf16), float32
    elsewhere (:func:`tunec.runtime.memory.precision_for`)."""
    return precision_for(device).compute


def save_dtype(device: torch.device) -> torch.dtype:
    """The dtype a trained model is saved in for inference: the one its forward pass ran in.

    The float32 master weights only matter to the optimizer; a model trained
    under bf16 autocast was tuned to bf16 matmuls, and serving it in float32
    would double its size for nothing. (The float32 weights stay in the
    stage's last checkpoint.)
    """
    return compute_dtype(device)


# ----------------------------------------------------------------- building and loading


def _with_attention(make, attn: str):
    """``make(attn_implementation=...)``, falling back to SDPA, then eager, for architectures without ``attn``."""
    choices = list(dict.fromkeys([attn, "sdpa", "eager"]))
    for i, choice in enumerate(choices):
        try:
            return make(attn_implementation=choice), choice
        except ValueError as exc:  # transformers: "... does not support ... attention ..."
            if i == len(choices) - 1 or "attention" not in str(exc).lower():
                raise


def build_from_config(spec: ConfigModel, seed: int, attn: str):
    """Random weights from a config, seeded so every run (and every rank) starts the same."""
    from transformers import AutoConfig, AutoModelForCausalLM

    args = dict(spec.config)
    model_type = args.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **args)
    except (ValueError, TypeError) as exc:
        raise TunecError(f"model config: {exc}") from None
    torch.manual_seed(seed)
    return _with_attention(lambda **kw: AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kw), attn)


def quiet_transformers() -> None:
    """No per-file progress bars while loading and saving small models."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def load_pretrained(target: str, attn: str, revision: str | None = None, what: str = "model", quantized=None):
    """A ``save_pretrained`` folder or a hub id, in float32 (the optimizer's master weights), or with
    ``quantized`` (:func:`quantization`) its linear layers in 4-bit on that config's GPU."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()

    is_path = Path(target).is_absolute() or Path(target).exists()
    if is_path and not (Path(target) / "config.json").is_file():
        raise TunecError(f"{what} {target}: not found (no config.json there); give a `save_pretrained` folder")
    kwargs: dict = {"local_files_only": True} if is_path else {"revision": revision}
    dtype = torch.float32
    if quantized is not None:
        config, device = quantized
        kwargs.update(quantization_config=config, device_map={"": device})
        dtype = config.bnb_4bit_compute_dtype  # of the layers left unquantized (embeddings, norms)
    try:
        return _with_attention(
            lambda **kw: AutoModelForCausalLM.from_pretrained(target, dtype=dtype, **kwargs, **kw), attn)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TunecError(f"cannot load {what} '{target}': {first}") from None


def load_spec(spec, seed: int, attn: str, quantized=None):
    """A stage's ``model:`` when it is not an earlier stage (see :mod:`tunec.runtime.outputs` for those)."""
    if isinstance(spec, ConfigModel):
        return build_from_config(spec, seed, attn)
    if isinstance(spec, LocalModel):
        return load_pretrained(spec.path, attn, what="model path", quantized=quantized)
    if isinstance(spec, HubModel):
        return load_pretrained(spec.id, attn, revision=spec.revision, what="hub model", quantized=quantized)
    raise TypeError(spec)


def check_vocab(model, vocab_size: int) -> None:
    rows = model.get_input_embeddings().num_embeddings
    if rows < vocab_size:
        raise TunecError(f"the model has {rows} token embeddings but the tokenizer has {vocab_size} tokens; "
                         "use a model made for this tokenizer (for `kind: config`, set `vocab_size`)")


def stop_ids(eos_id: int, own: int | list[int] | None, end_of_turn: list[int]) -> list[int]:
    """The end-of-sequence ids a saved model's ``generation_config`` lists.

    The tokenizer's EOS first, then the ids the model already stopped at (a chat
    model's hub config often lists two), then the chat template's end-of-turn
    token, each once: ``generate()`` in transformers (and vLLM, which reads the
    same file) then stops wherever ``tunec generate`` stops.

    >>> stop_ids(2, [7, 2], [9])
    [2, 7, 9]
    """
    own = [] if own is None else [own] if isinstance(own, int) else list(own)
    return list(dict.fromkeys([eos_id, *own, *end_of_turn]))


def set_special_tokens(model, bos_id: int | None, eos_id: int, pad_id: int, end_of_turn: Sequence[int] = (),
                       keep_own: bool = True) -> None:
    """Record the tokenizer's special ids in the model's config, so saved models generate correctly.

    ``config.eos_token_id`` is the tokenizer's EOS; ``generation_config.eos_token_id``
    is :func:`stop_ids`. ``keep_own=False`` drops the model's own stop ids: a model
    built from a config has only its config class's defaults, which name arbitrary
    tokens of this tokenizer (unless the recipe's config sets ``eos_token_id`` itself).
    """
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = bos_id, eos_id, pad_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        own = gen.eos_token_id if keep_own else None
        gen.bos_token_id, gen.pad_token_id = bos_id, pad_id
        gen.eos_token_id = stop_ids(eos_id, own, list(end_of_turn))


def quantization(peft: QLoraPeft, device: torch.device, stage: str):
    """``(BitsAndBytesConfig, device)`` for a QLoRA base: 4-bit NF4 weights computing in the device's half
    precision; a user error without CUDA or without bitsandbytes."""
    if device.type != "cuda":
        raise TunecError(f"stage `{stage}`: `peft: qlora` needs a CUDA GPU (bitsandbytes' 4-bit kernels) and this "
                         f"run is on {device}; use `peft: {{kind: lora}}` here, or run on a GPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TunecError(f"stage `{stage}`: `peft: qlora` needs bitsandbytes: pip install 'tunec[qlora]'")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=peft.double_quant,
                                bnb_4bit_compute_dtype=compute_dtype(device))
    return config, device


def add_lora(model, peft: LoraPeft, seed: int):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=peft.r,
        lora_alpha=peft.alpha,  # type: ignore[arg-type,unused-ignore]  # older peft annotates int; a float scales as well
        lora_dropout=peft.dropout,
        target_modules=peft.target_modules,
        use_dora=peft.use_dora,
        task_type="CAUSAL_LM",
    )
    if isinstance(peft, QLoraPeft):
        from peft import prepare_model_for_kbit_training

        # float32 norms and embeddings output; checkpointing is runtime/memory.py's decision, not peft's
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(seed)
    try:
        with _peft_quiet():
            return get_peft_model(model, config)
    except ValueError as exc:
        raise TunecError(f"peft: {exc}") from None


def load_adapter(model, folder: Path, trainable: bool):
    from peft import PeftModel

    with _peft_quiet():
        return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)


@contextmanager
def _peft_quiet():
    """peft asks transformers a deprecated question (``is_gradient_checkpointing``); not the user's business."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


# ----------------------------------------------------------------- packed forward


def packed_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """``[B, 1, T, T]`` booleans: query ``i`` may attend key ``j`` iff ``j <= i`` in the same document.

    Training does not pass it (transformers derives the same mask from ``position_ids``); it is the
    drawing above as code, the reference the tests hold transformers' packed-sequence detection to.
    """
    doc = torch.cumsum(position_ids == 0, dim=1)
    same = doc[:, :, None] == doc[:, None, :]
    t = position_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    return (same & causal)[:, None]


def packed_hidden(model, input_ids: torch.Tensor, position_ids: torch.Tensor, attn: str) -> torch.Tensor:
    """The last hidden states ``[B, T, H]`` of packed rows (before the output layer), attention kept inside
    each document by transformers' own packed-sequence detection (see the module's docstring)."""
    b, t = input_ids.shape
    body = causal_lm(model).base_model  # the decoder stack: LoRA layers inside it train as usual
    if attn.startswith("flash"):
        out = body(input_ids=input_ids.reshape(1, -1), position_ids=position_ids.reshape(1, -1), use_cache=False)
        return out.last_hidden_state.reshape(b, t, -1)
    return body(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state


def packed_logits(model, input_ids: torch.Tensor, position_ids: torch.Tensor, attn: str) -> torch.Tensor:
    """Full logits ``[B, T, V]`` (float32) of packed rows; training never builds them unless
    ``chunked_loss: false``."""
    return OutputHead.of(model).logits(packed_hidden(model, input_ids, position_ids, attn))


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy (float32) from full logits; labels are unshifted, as in the shards."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


class PackedLM(torch.nn.Module):
    """The model plus its packed forward and summed loss, in one module so DDP and FSDP can wrap it.

    ``chunked`` (the default) computes the loss without full logits (:func:`tunec.runtime.loss.loss_sum`);
    ``False`` is the reference path through ``[B, T, V]`` logits.
    """

    def __init__(self, model, attn: str, chunked: bool = True):
        super().__init__()
        self.model = model
        self.attn = attn
        self.chunked = chunked

    def forward(self, input_ids, position_ids, labels):
        hidden = packed_hidden(self.model, input_ids, position_ids, self.attn)
        head = OutputHead.of(self.model)
        if self.chunked:
            return chunked_loss_sum(head, hidden, labels)
        return loss_sum(head.logits(hidden), labels)
