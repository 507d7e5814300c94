"""Memory on one device: mixed precision, activation checkpointing, a frozen base in half precision.

- **Precision** (:func:`precision_for`): on CUDA the forward and backward
  passes run under autocast in bf16 when the GPU supports it (Ampere and
  later), else in fp16 with a gradient scaler (fp16's range is too narrow for
  small gradients without one). Trained parameters stay float32 (the
  optimizer's master weights); on the CPU everything is float32.
- **A frozen base in half precision** (:func:`freeze_in`): a LoRA stage never
  updates its base, so its weights need no float32 copy; they are cast to the
  compute dtype, halving the model's memory. Adapters stay float32.
- **Activation checkpointing** (:func:`checkpointing`): each decoder layer
  keeps only its input and recomputes the rest in the backward pass (about a
  third more compute). ``activation_checkpointing: auto`` turns it on when the
  estimated activations of one micro-batch (:func:`activation_bytes`) exceed a
  quarter of the GPU's memory; never on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .loss import causal_lm


@dataclass(frozen=True)
class Precision:
    """How a device computes: the autocast dtype (float32: no autocast) and whether losses are scaled."""

    compute: torch.dtype = torch.float32
    scaled: bool = False

    def autocast(self, device: torch.device):
        if self.compute == torch.float32:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.compute)

    def scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(device.type) if self.scaled else None

    @property
    def name(self) -> str:
        return {torch.float32: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.compute] + (
            " + loss scaling" if self.scaled else "")


def precision_for(device: torch.device) -> Precision:
    """bf16 autocast on a CUDA device that supports it, fp16 with loss scaling on an older one, else float32."""
    if device.type != "cuda":
        return Precision()
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False):
        return Precision(torch.float16, scaled=True)
    return Precision(torch.bfloat16)


def freeze_in(model, dtype: torch.dtype) -> int:
    """Cast every frozen parameter to ``dtype`` (trained ones stay as they are); returns how many were cast."""
    cast = 0
    for p in model.parameters():
        if not p.requires_grad and p.dtype != dtype and p.is_floating_point():
            p.data = p.data.to(dtype)
            cast += 1
    return cast


# ----------------------------------------------------------------- activation checkpointing

AUTO_SHARE = 0.25  # `auto` checkpoints when one micro-batch's activations would take more of the GPU than this


def activation_bytes(config, tokens: int, bytes_per_value: int = 2) -> int:
    """Estimated activation memory of a forward pass over ``tokens`` tokens, kept for the backward pass.

    Per token and layer a decoder keeps about ten hidden-sized tensors (norm
    inputs, q/k/v, attention output, residuals) and four MLP-sized ones (gate,
    up, activation, their product); attention scores are not kept by SDPA or
    flash attention. An estimate for the ``auto`` decision, not a measurement.

    >>> from types import SimpleNamespace
    >>> qwen05 = SimpleNamespace(hidden_size=896, intermediate_size=4864, num_hidden_layers=24)
    >>> round(activation_bytes(qwen05, 4 * 2048) / 2**30, 1)  # GiB, 4 rows of 2,048 tokens in bf16
    10.4
    """
    h = int(config.hidden_size)
    i = int(getattr(config, "intermediate_size", None) or 4 * h)
    return int(config.num_hidden_layers) * tokens * (10 * h + 4 * i) * bytes_per_value


def wants_checkpointing(setting: bool | Literal["auto"], model, device: torch.device,
                        tokens: int) -> tuple[bool, str]:
    """Whether to checkpoint activations, and why (for the stage's start line)."""
    if setting is not True and setting is not False:
        if device.type != "cuda":
            return False, "auto: off on the CPU"
        need = activation_bytes(causal_lm(model).config, tokens)
        total = torch.cuda.get_device_properties(device).total_memory
        on = need > AUTO_SHARE * total
        return on, (f"auto: ~{need / 2**30:.1f} GiB of activations per micro-batch "
                    f"{'>' if on else '<='} {AUTO_SHARE:.0%} of {total / 2**30:.0f} GiB")
    return setting, "as the stage asks"


def checkpointing(model, on: bool) -> None:
    """Turn activation checkpointing of the decoder layers on or off (non-reentrant: frozen inputs are fine)."""
    lm = causal_lm(model)
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # the newer name; where both exist the older one warns
        if on:
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif lm.is_activation_checkpointing:
            lm.activation_checkpointing_disable()
    elif on:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif lm.is_gradient_checkpointing:
        lm.gradient_checkpointing_disable()


def prepare(model, activation_checkpointing: bool | Literal["auto"], lora: bool, device: torch.device,
            tokens: int) -> tuple[Precision, str]:
    """Set a stage's model up for its device: the precision to train in, a LoRA base frozen in it, and
    activation checkpointing; returns the precision and a note for the stage's start line."""
    precision = precision_for(device)
    if lora and precision.compute != torch.float32:
        freeze_in(model, precision.compute)
    on, why = wants_checkpointing(activation_checkpointing, model, device, tokens)
    checkpointing(model, on)
    base = f", frozen base in {precision.name.split()[0]}" if lora and precision.compute != torch.float32 else ""
    return precision, f"{precision.name}{base}, activation checkpointing {'on' if on else 'off'} ({why})"


# Stage settings that change how much memory a step needs, not what it computes (the loss of a step is normalised
# over the whole step, however it is split): left out of a stage's fingerprint, so `--resume` may change them
MEMORY_SETTINGS = ("chunked_loss", "activation_checkpointing", "micro_batch_rows", "compile")


def to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """A step's arrays on ``device``: on CUDA through pinned host memory, so the copy runs asynchronously
    (the training loop issues it for the next step while the GPU computes this one)."""
    if device.type != "cuda":
        return {k: torch.from_numpy(v) for k, v in batch.items()}
    return {k: torch.from_numpy(v).pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


# ----------------------------------------------------------------- micro_batch_rows: auto


def search_rows(most: int, fits: Callable[[int], bool]) -> int:
    """The largest ``n <= most`` with ``fits(n)``, trying ``most`` then halving (0 when not even 1 fits).

    >>> search_rows(16, lambda n: n <= 5)
    4
    >>> search_rows(6, lambda n: n <= 5), search_rows(6, lambda n: n <= 6), search_rows(3, lambda n: False)
    (3, 6, 0)
    """
    n = most
    while n >= 1:
        if fits(n):
            return n
        n //= 2
    return 0


def auto_micro_batch_rows(module, trainable: list[torch.nn.Parameter], data, most: int, device: torch.device,
                          precision: Precision) -> tuple[int, str]:
    """``micro_batch_rows: auto``: the most rows of one forward and backward pass that fit on the GPU, found
    by trying (``most``, then half as many, ...) with room held for AdamW's state; returns ``(rows, note)``.

    On the CPU there is no out-of-memory error to search by (the system kills the process), so ``auto``
    means 4 rows there. The RNG is restored after the tries, so they change nothing a run computes.
    """
    if device.type != "cuda":
        return min(4, most), f"micro_batch_rows auto: {min(4, most)} on the CPU"
    rng = torch.get_rng_state(), torch.cuda.get_rng_state(device)
    # AdamW's two float32 moments appear at the first step; hold their room now
    held = [torch.empty(2 * p.numel(), dtype=torch.float32, device=device) for p in trainable]
    # every packed row has the same length: any rows are the worst case (repeated when the set is smaller)
    tensors = to_device(data.gather(np.arange(most) % len(data)), device)
    peaks: dict[int, int] = {}

    def fits(n: int) -> bool:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            with precision.autocast(device):
                loss = module(tensors["input_ids"][:n], tensors["position_ids"][:n], tensors["labels"][:n])
            loss.backward()
            torch.cuda.synchronize(device)
            peaks[n] = torch.cuda.max_memory_allocated(device)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            loss = None
            for p in trainable:
                p.grad = None

    try:
        rows = search_rows(most, fits)
    finally:
        del held
        torch.cuda.empty_cache()
        torch.set_rng_state(rng[0])
        torch.cuda.set_rng_state(rng[1], device)
    if rows == 0:
        return 0, "micro_batch_rows auto: not even one row fits"
    total = torch.cuda.get_device_properties(device).total_memory
    return rows, (f"micro_batch_rows auto: {rows} (of at most {most}; peak {peaks[rows] / 2**30:.1f} of "
                  f"{total / 2**30:.0f} GiB with AdamW's state held)")
