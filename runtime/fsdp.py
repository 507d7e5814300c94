"""FSDP2: parameters, gradients and optimizer state sharded across processes (``parallelism: {kind: fsdp}``).

Every decoder layer is its own ``fully_shard`` unit (its parameters are
all-gathered just before it runs and freed after), and the
:class:`~tunec.runtime.model.PackedLM` around the model is the root unit
(embeddings, final norm, output layer). Each rank holds ``1 / world_size`` of
every parameter, of its gradient and of AdamW's two moments, so a model too big
for one GPU under DDP trains on several. On CUDA the mixed-precision policy
computes in bf16 (fp16 where bf16 is unsupported) and reduces gradients in
float32; the sharded master weights stay float32.

The loss normalisation is DDP's: gradients are averaged over ranks (the
reduce-scatter), and the loop multiplies by ``world_size`` before dividing
by the global number of trained tokens, so 1 rank and N ranks take the same
steps. Gradient accumulation skips the reduce-scatter on all but the last
micro-batch of a step (:func:`gradient_sync`).

Checkpoints go through ``torch.distributed.checkpoint`` (:mod:`tunec.runtime.checkpoint`):
each rank writes its shards, and a run saved on N processes resumes on M.
The final model is gathered to rank 0 and saved as one ``save_pretrained``
folder (:func:`gathered`).

A plain ``tunec run`` (one process) with ``kind: fsdp`` shards over a
one-process group, so that its checkpoints are the same kind as under
``torchrun`` and either can resume the other.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as td

from .dist import Dist
from .loss import causal_lm
from .memory import Precision

_ours = False  # a one-process group this module started (and ends in release())


def is_sharded(module: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule  # public since torch 2.6, which FSDP stages need
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def _group(device: torch.device) -> None:
    """A process group to shard over: torchrun's, or one of a single process."""
    global _ours
    if td.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    td.init_process_group(backend, store=td.HashStore(), rank=0, world_size=1)
    _ours = True


def release() -> None:
    """End the one-process group :func:`shard` started, if it did (torchrun's group is ``dist``'s to end)."""
    global _ours
    if _ours and td.is_initialized():
        td.destroy_process_group()
    _ours = False


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks transformers itself never splits across devices (``_no_split_modules``)."""
    lm = causal_lm(model)
    names = set(getattr(lm, "_no_split_modules", None) or ())
    return [m for m in lm.modules() if type(m).__name__ in names]


def shard(root: torch.nn.Module, model, precision: Precision, device: torch.device,
          reshard_after_forward: bool = True) -> None:
    """Turn ``root`` (the PackedLM around ``model``, on ``device``) into FSDP2 units, in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    _group(device)
    mesh = init_device_mesh(device.type, (td.get_world_size(),))
    if precision.compute == torch.float32:
        policy = MixedPrecisionPolicy()
    else:
        policy = MixedPrecisionPolicy(param_dtype=precision.compute, reduce_dtype=torch.float32)
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(causal_lm(model)).__name__} names no decoder layer class "
                         "(`_no_split_modules`); FSDP needs one")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(root, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)


def gradient_sync(module: torch.nn.Module, last: bool):
    """Reduce-scatter gradients only after the last micro-batch of a step (a context, as DDP's ``no_sync``)."""
    module.set_requires_gradient_sync(last)  # type: ignore[operator]  # an FSDPModule method
    return nullcontext()


def gathered(root: torch.nn.Module, model, dist: Dist):
    """The trained model as one ordinary module on rank 0's CPU (``None`` elsewhere); every rank calls it.

    The full state dict is gathered shard by shard to rank 0 and assigned to a
    copy of the model built on the ``meta`` device (no second random
    initialisation); buffers, which FSDP does not shard, come from the trained
    model.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_main:
        return None
    lm = causal_lm(model)
    prefix = next(name for name, m in root.named_modules() if m is lm) + "."
    with torch.device("meta"):
        copy = AutoModelForCausalLM.from_config(lm.config, dtype=torch.float32,
                                                attn_implementation=lm.config._attn_implementation)
    params = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    copy.load_state_dict(params, strict=False, assign=True)
    for name, buf in lm.named_buffers():
        owner, _, leaf = name.rpartition(".")
        module = copy.get_submodule(owner)
        persistent = leaf not in module._non_persistent_buffers_set
        module.register_buffer(leaf, buf.detach().cpu().clone(), persistent=persistent)
    if getattr(lm.config, "tie_word_embeddings", False):
        copy.get_output_embeddings().weight = copy.get_input_embeddings().weight
    left = [n for n, p in copy.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"FSDP gather: parameters missing from the gathered state: {left[:3]}")
    copy.generation_config = lm.generation_config
    return copy
