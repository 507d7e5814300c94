"""Token losses without full logits: the output layer applied in chunks of trained tokens.

A causal LM's last step turns hidden states ``[B, T, H]`` into logits
``[B, T, V]``. For Qwen2.5-0.5B (V = 151,936) at 4 x 2,048 tokens those are
~5 GB in float32, and the softmax and its gradient need as much again. The
functions here never build them:

1. only the positions whose next token is trained are kept (an SFT row's
   prompts need no logits at all)::

       labels (unshifted)   -100 -100   17   42 -100   9
       predicts             17?  no     42?  no   9?   -    <- position t scores labels[t + 1]
       kept positions       0, 2, 4 (hidden states gathered: [3, H])

2. the kept hidden states go through the output layer ``chunk`` tokens at a
   time, each chunk inside :func:`torch.utils.checkpoint.checkpoint`: its
   ``[chunk, V]`` logits exist only while its loss is computed, and again
   while its gradient is (they are recomputed in the backward pass, one chunk
   at a time). Peak memory is one chunk's logits, whatever ``B x T``.

The chunk size comes from :func:`chunk_tokens`: ``2**26`` logits (256 MiB in
float32) per chunk, so small vocabularies take a single chunk and lose nothing.

Two entry points share this machinery:

- :func:`loss_sum` -- the summed token cross-entropy of a micro-batch (what
  training minimises; :class:`tunec.runtime.model.PackedLM` calls it);
- :func:`token_logprobs` -- ``log p(labels[t] | tokens < t)`` for every position,
  ``[B, T]`` aligned with the unshifted labels, 0 where nothing is trained. A
  preference objective sums it per document (``(logps * (doc == d)).sum()``)
  to get each side's log-likelihood with gradients, still without full logits::

      hidden = packed_hidden(model, input_ids, position_ids, attn)   # tunec.runtime.model
      logps = token_logprobs(OutputHead.of(model), hidden, labels)   # [B, T], differentiable

Both equal the full-logits computation (``tests/test_runtime_memory.py``
checks losses and every gradient to 1e-5 for llama, qwen2 and gemma2, whose
logits are soft-capped). On CUDA with ``liger-kernel`` installed,
:func:`loss_sum` uses Liger's fused linear cross-entropy instead (the same
sum, in Triton, without even a chunk's logits in memory), when the output
layer is a plain ``nn.Linear``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .data import IGNORE

LOGITS_PER_CHUNK = 1 << 26  # 256 MiB of float32 logits per chunk


def chunk_tokens(vocab: int, budget: int = LOGITS_PER_CHUNK) -> int:
    """Tokens per chunk: ``budget`` logits, at least 64 tokens.

    >>> chunk_tokens(151_936), chunk_tokens(1024)
    (441, 65536)
    """
    return max(64, budget // vocab)


def causal_lm(model):
    """The ``*ForCausalLM`` inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass
class OutputHead:
    """A causal LM's output layer and what its ``forward`` does to the logits after it.

    transformers' ``*ForCausalLM.forward`` applies ``lm_head`` and, for a few
    architectures, a soft cap (gemma2/3: ``cap * tanh(z / cap)``) or a scale
    (cohere: ``z * logit_scale``; granite: ``z / logits_scaling``). The head is
    called as a module, so a LoRA-wrapped ``lm_head`` trains as it would in
    the full forward.
    """

    layer: torch.nn.Module
    softcap: float | None = None
    scale: float = 1.0

    @classmethod
    def of(cls, model) -> OutputHead:
        lm = causal_lm(model)
        config = lm.config
        scale = float(getattr(config, "logit_scale", None) or 1.0)
        if getattr(config, "logits_scaling", None):
            scale /= float(config.logits_scaling)
        return cls(lm.get_output_embeddings(), getattr(config, "final_logit_softcapping", None) or None, scale)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of ``hidden`` (``[..., H]`` -> ``[..., V]``), as the model's own forward gives them."""
        z = self.layer(hidden)
        if self.scale != 1.0:
            z = z * self.scale
        z = z.float()
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    @property
    def vocab(self) -> int:
        layer = self.layer
        if not isinstance(getattr(layer, "weight", None), torch.Tensor):  # peft wraps a head: its Linear inside
            layer = layer.get_base_layer()  # type: ignore[operator]
        weight: torch.Tensor = layer.weight  # type: ignore[assignment]  # a Linear's
        return int(weight.shape[0])


def _trained(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(where, h, y)``: positions ``[N]`` (flat, over ``B x T``) whose next token is trained, their hidden
    states ``[N, H]`` and those next tokens ``[N]``."""
    b, t, h = hidden.shape
    nxt = torch.full_like(labels, IGNORE)
    nxt[:, :-1] = labels[:, 1:]
    flat = nxt.reshape(-1)
    where = (flat != IGNORE).nonzero().squeeze(1)
    return where, hidden.reshape(b * t, h).index_select(0, where), flat.index_select(0, where)


def _zero(head: OutputHead, hidden: torch.Tensor) -> torch.Tensor:
    """0, computed from every parameter a loss uses (one token through the head): with nothing trained in a
    micro-batch, DDP still gets a gradient, of zeros, for each parameter it waits for."""
    return head.logits(hidden.reshape(-1, hidden.shape[-1])[:1]).sum() * 0.0


def _chunked(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], h: torch.Tensor, y: torch.Tensor,
             chunk: int) -> list[torch.Tensor]:
    """``fn`` over chunks of ``(h, y)``, each chunk's intermediates freed after its forward and recomputed in
    the backward pass (nothing is recomputed when no gradient is needed)."""
    grad = torch.is_grad_enabled() and h.requires_grad
    out = []
    for lo in range(0, h.shape[0], chunk):
        hc, yc = h[lo:lo + chunk], y[lo:lo + chunk]
        out.append(checkpoint(fn, hc, yc, use_reentrant=False) if grad else fn(hc, yc))
    return out


def loss_sum(head: OutputHead, hidden: torch.Tensor, labels: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Summed token cross-entropy (float32) of ``hidden`` ``[B, T, H]`` against unshifted ``labels`` ``[B, T]``."""
    _, h, y = _trained(hidden, labels)
    if h.shape[0] == 0:
        return _zero(head, hidden)
    if liger_usable(head, hidden):
        return _liger_loss(head, h, y)

    def piece(hc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head.logits(hc), yc, reduction="sum")

    return torch.stack(_chunked(piece, h, y, chunk or chunk_tokens(head.vocab))).sum()


def token_logprobs(head: OutputHead, hidden: torch.Tensor, labels: torch.Tensor,
                   chunk: int | None = None) -> torch.Tensor:
    """``[B, T]`` float32: at position ``t``, ``log p(labels[t] | tokens before t)``; 0 where ``labels`` is
    ignored (and at ``t = 0``). Differentiable; sum it over a document's positions for its log-likelihood."""
    b, t, _ = hidden.shape
    where, h, y = _trained(hidden, labels)
    out = torch.zeros(b * t, dtype=torch.float32, device=hidden.device)
    if h.shape[0] == 0:
        return (out + _zero(head, hidden)).reshape(b, t)

    def piece(hc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(head.logits(hc), dim=-1).gather(1, yc[:, None]).squeeze(1)

    values = torch.cat(_chunked(piece, h, y, chunk or chunk_tokens(head.vocab)))
    # position t of the result belongs to label t, which position t - 1 predicted
    out = out.index_add(0, where + 1, values)
    return out.reshape(b, t)


# ----------------------------------------------------------------- Liger (optional, CUDA)


def liger_usable(head: OutputHead, hidden: torch.Tensor) -> bool:
    """Liger's fused linear cross-entropy applies: CUDA, the package installed, a plain Linear head
    (not LoRA-wrapped), no logit scale (a soft cap it supports)."""
    return (hidden.is_cuda and type(head.layer) is torch.nn.Linear and head.scale == 1.0
            and importlib.util.find_spec("liger_kernel") is not None)


def _liger_loss(head: OutputHead, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    fn = LigerFusedLinearCrossEntropyLoss(reduction="sum", softcap=head.softcap)
    layer = head.layer
    assert isinstance(layer, torch.nn.Linear)  # liger_usable checked it
    weight = layer.weight
    if torch.is_autocast_enabled("cuda"):  # Liger calls its own matmuls outside autocast's reach
        dtype = torch.get_autocast_dtype("cuda")
        h, weight = h.to(dtype), weight.to(dtype)
    bias = layer.bias.to(weight.dtype) if layer.bias is not None else None
    return fn(weight, h, y, bias).float()
