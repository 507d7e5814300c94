"""Generation metrics for eval sets without answer choices: greedy decoding, exact match and token F1.

The documents are read back from the task's compiled eval shards, so the
prompt the model continues is exactly the compiled one (template, chat
template, BOS as compiled). A document of an ``sft`` stage is its prompt
(unlabelled tokens) followed by what it trains (labelled tokens); the last run
of labelled tokens is the reference answer, and everything before it the
prompt (for a conversation: every turn up to the final reply)::

    ids     [BOS] What  is  3  plus  4 ?  Answer :  7  EOS
    labels   -    -     -   -  -     - -  -      -  7  EOS
             '------------- prompt ------------'  '-ref-'

The model continues the prompt greedily up to ``max_new_tokens``, stopping
where `tunec generate` stops (the EOS, and for a chat task the chat template's
end-of-turn token); the answer and the reference are decoded without special
tokens and compared by :mod:`tunec.runtime.genmetrics`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunec.compiler.pack import IGNORE
from tunec.compiler.plan import Plan, StagePlan
from tunec.compiler.shards import open_shard

from . import genmetrics

GEN_METRICS = ("exact_match", "f1")


def split_documents(input_ids: np.ndarray, labels: np.ndarray, position_ids: np.ndarray) -> list[dict[str, Any]]:
    """The documents of one packed row with a labelled answer: ``{"prompt": ids, "reference": ids}``.
    Padding (a pseudo-document with no label) is left out."""
    starts = [int(i) for i in np.flatnonzero(position_ids == 0)] + [len(input_ids)]
    docs = []
    for a, b in zip(starts, starts[1:]):
        labelled = np.flatnonzero(labels[a:b] != IGNORE)
        if not len(labelled):
            continue
        end = int(labelled[-1]) + 1
        first = end - 1
        while first > 0 and labels[a + first - 1] != IGNORE:  # back to the start of the last labelled run
            first -= 1
        docs.append({"prompt": input_ids[a:a + first].tolist(), "reference": input_ids[a + first:a + end].tolist()})
    return docs


def documents(out: Path, plan: Plan, sp: StagePlan, task: str, eos_id: int) -> list[dict[str, Any]]:
    """Every document of ``task``'s eval shards, in shard order, with its place (``shard``, ``row``)."""
    found = []
    for shard in sp.eval[task].data.shards:
        arrays = open_shard(Path(out) / shard.path, shard.bytes, plan.seq_len)
        for row in range(arrays["input_ids"].shape[0]):
            for doc in split_documents(arrays["input_ids"][row], arrays["labels"][row], arrays["position_ids"][row]):
                found.append({"shard": shard.path, "row": row, **doc})
    return found


def stop_ids(plan: Plan, task: str, tokenizer) -> list[int]:
    """Where `tunec generate` stops: the EOS, and a chat task's end-of-turn token."""
    from .generate import end_of_turn_ids

    chat = plan.tasks[task].format == "chat"
    return [plan.tokenizer.eos_id] + (end_of_turn_ids(tokenizer) if chat else [])


@torch.no_grad()
def predict(model, tokenizer, docs: list[dict[str, Any]], stop: list[int], max_new_tokens: int, pad_id: int,
            device: torch.device) -> list[dict[str, Any]]:
    """Greedy continuation of each document's prompt, with its scores against the reference."""
    predictions = []
    for doc in docs:
        ids = torch.tensor([doc["prompt"]], device=device)
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             eos_token_id=stop, pad_token_id=pad_id, do_sample=False)[0, ids.shape[1]:].tolist()
        generated = tokenizer.decode(new, skip_special_tokens=True)
        reference = tokenizer.decode(doc["reference"], skip_special_tokens=True)
        predictions.append({"shard": doc["shard"], "row": doc["row"],
                            "prompt": tokenizer.decode(doc["prompt"], skip_special_tokens=False),
                            "reference": reference, "generated": generated,
                            "stopped": bool(new) and new[-1] in stop,
                            "exact_match": genmetrics.exact_match(generated, reference),
                            "f1": genmetrics.f1(generated, reference)})
    return predictions


def summarise(predictions: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(predictions)
    return {"n": n, **{m: sum(p[m] for p in predictions) / n if n else None for m in GEN_METRICS},
            "unstopped": sum(not p["stopped"] for p in predictions)}

