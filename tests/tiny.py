"""What the training tests share: the demo assets, a tiny llama built from a config, quiet run options.

A plain module (not a fixture) because recipes are f-strings written at import time.
"""

from __future__ import annotations

from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo"
QUIET = dict(progress=False, device="cpu")


def tiny_llama(layers: int = 1, positions: int = 128) -> str:
    """A recipe `model:` value: a 32-wide llama over the demo tokenizer's 1,024 ids (trains in seconds on a CPU)."""
    return ("{kind: config, config: {model_type: llama, hidden_size: 32, intermediate_size: 64, "
            f"num_hidden_layers: {layers}, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 1024, "
            f"max_position_embeddings: {positions}}}}}")


class Interrupt(Exception):
    """Raised by :func:`interrupt_after`: a run stopped at an exact step, as Ctrl-C would stop it."""


def interrupt_after(step: int):
    """A ``RunOptions.on_step`` hook that stops the run after optimizer step ``step``."""
    def hook(s: int) -> None:
        if s == step:
            raise Interrupt(s)
    return hook
