"""Faster decoder layers: ``torch.compile`` per layer (``compile: true``), or Liger's fused kernels.

Small models spend much of a step outside the matrix products: RMSNorm, the
SwiGLU product, casts, each a separate pass over the activations. Two ways
to fuse them, one per stage:

- ``compile: true`` compiles each decoder layer with ``torch.compile``
  (the layers share one compiled graph; the first step pays the compile, tens
  of seconds). Measured on an H200 with Qwen2.5-0.5B's architecture, 8 rows of
  2,048 tokens, bf16 autocast: 240 to 174 ms a step, 28.5 to 19.7 GiB
  (``bench/README.md``).
- otherwise, on CUDA with ``liger-kernel`` installed, the RMSNorm and SwiGLU
  modules of the architectures listed in :data:`LIGER_NORMS` /
  :data:`LIGER_MLPS` run Liger's Triton kernels (the same arithmetic: float32
  normalisation cast back before the weight, ``silu(gate) * up``): 240 to
  214 ms a step, 28.5 to 22.3 GiB on the same shapes. Not combined with
  ``compile``: the compiled layers were slower with them.

Both change how a step runs, not what it computes (float rounding aside), so
neither enters a stage's fingerprint (``runtime/memory.py``'s
``MEMORY_SETTINGS``). Only the instances are changed: the classes, other
models in the process and saved weights are untouched.
"""

from __future__ import annotations

import importlib.util
import types

import torch

from tunec.compiler.errors import TunecError

from .fsdp import decoder_layers
from .loss import causal_lm

# Modules whose arithmetic is exactly Liger's "llama" RMSNorm: x * rsqrt(mean(x^2) + eps) in float32, cast back
# to the input's dtype, then times the weight (no offset). Matched by class name, so a new architecture is only
# patched once it has been checked and added here.
LIGER_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
# MLPs computing down_proj(act(gate_proj(x)) * up_proj(x)); patched only where act is SiLU.
LIGER_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})


def compile_layers(model) -> str:
    """Compile each decoder layer in place (``nn.Module.compile``); returns a note for the stage's start line."""
    layers = decoder_layers(model)  # the blocks FSDP shards, found the same way
    if not layers:
        raise TunecError(f"`compile: true`: {type(causal_lm(model)).__name__} names no decoder layers "
                         "(`_no_split_modules`) to compile; set `compile: false`")
    for layer in layers:
        layer.compile()
    return f"{len(layers)} decoder layers compiled (torch.compile)"


def liger_usable(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def _rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_rms_norm

    return liger_rms_norm(hidden_states, self.weight, self.variance_epsilon, 0.0, "llama", True)


def _swiglu(self, x: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_swiglu

    return self.down_proj(liger_swiglu(self.gate_proj(x), self.up_proj(x)))


def liger_targets(model) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """The RMSNorm and MLP modules whose forward Liger's kernels can replace exactly."""
    norms, mlps = [], []
    for module in causal_lm(model).modules():
        name = type(module).__name__
        if name in LIGER_NORMS and hasattr(module, "variance_epsilon") and getattr(module, "weight", None) is not None:
            norms.append(module)
        elif name in LIGER_MLPS and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
            act = getattr(getattr(module, "config", None), "hidden_act", None)
            if act in ("silu", "swish"):
                mlps.append(module)
    return norms, mlps


def use_liger(model, device: torch.device) -> str:
    """On CUDA with ``liger-kernel`` installed, route the known RMSNorm and SwiGLU modules through Liger's
    kernels (instance by instance); returns a note for the stage's start line ("" when nothing changed)."""
    if not liger_usable(device):
        return ""
    norms, mlps = liger_targets(model)
    for module in norms:
        module.forward = types.MethodType(_rms_norm, module)
    for module in mlps:
        module.forward = types.MethodType(_swiglu, module)
    return f"Liger kernels for {len(norms)} RMSNorm and {len(mlps)} SwiGLU modules" if norms or mlps else ""
