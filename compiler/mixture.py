"""Mixing tasks in a stage: rates, caps, budgets; deterministic from the seed.

- ``proportional`` (FLAN's examples-proportional mixing): rate_t ∝ min(n_t, cap).
- ``temperature`` (T5 / seqio): rate_t ∝ min(n_t, cap) ** (1 / T); T=1 is
  proportional, large T tends to uniform.
- ``weights``: rate_t ∝ the given weight.

Without a budget, the mixture has ``Σ min(n_t, cap)`` examples; with an
``examples`` budget B, task t gets ``round(rate_t * B)``; with a ``tokens``
budget, task t gets documents until it holds ``rate_t * B`` tokens. A task asked
for more than it has is repeated (whole passes, then a seeded sample); fewer,
a seeded sample without replacement. Selected documents keep their compile
order, so a mixture is a pure function of (recipe, seed).

>>> rates_for(ProportionalMixture(kind="proportional", cap=100), {"a": 1000, "b": 50})
{'a': 0.666667, 'b': 0.333333}
>>> rates_for(TemperatureMixture(kind="temperature", temperature=2.0), {"a": 900, "b": 100})
{'a': 0.75, 'b': 0.25}
"""

from __future__ import annotations

import zlib

import numpy as np

from .recipe import Budget, ExamplesBudget, Mixture, ProportionalMixture, TemperatureMixture, WeightsMixture


def rates_for(mixture: Mixture, sizes: dict[str, int]) -> dict[str, float]:
    """The share of the mixture each task asks for (sums to 1)."""
    if isinstance(mixture, WeightsMixture):
        raw = {t: float(mixture.weights.get(t, 0.0)) for t in sizes}
    else:
        cap = mixture.cap
        capped = {t: float(min(n, cap) if cap else n) for t, n in sizes.items()}
        power = 1.0 / mixture.temperature if isinstance(mixture, TemperatureMixture) else 1.0
        raw = {t: v**power for t, v in capped.items()}
    total = sum(raw.values())
    return {t: round(v / total, 6) if total else 0.0 for t, v in raw.items()}


def natural_size(mixture: Mixture, sizes: dict[str, int]) -> int:
    """Examples in the mixture when no budget is given."""
    cap = getattr(mixture, "cap", None)
    return sum(min(n, cap) if cap else n for n in sizes.values())


def select(mixture: Mixture, budget: Budget | None, sizes: dict[str, int], lengths: dict[str, np.ndarray],
           seed: int, stage: str) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Document indices per task (sorted, repeats allowed) and the requested rates."""
    rates = rates_for(mixture, sizes)
    if budget is None and isinstance(mixture, ProportionalMixture):
        cap = mixture.cap
        targets = {t: (min(n, cap) if cap else n) for t, n in sizes.items()}
        return {t: _take(n, targets[t], _rng(seed, stage, t)) for t, n in sizes.items()}, rates
    if budget is None or isinstance(budget, ExamplesBudget):
        total = budget.count if budget is not None else natural_size(mixture, sizes)
        return {t: _take(n, round(rates[t] * total), _rng(seed, stage, t)) for t, n in sizes.items()}, rates
    out = {}
    for t, n in sizes.items():
        want = rates[t] * budget.count
        rng = _rng(seed, stage, t)
        order = (np.concatenate([rng.permutation(n) for _ in range(_passes(lengths[t], want))]) if n
                 else np.zeros(0, np.int64))
        cum = np.cumsum(lengths[t][order]) if n else np.zeros(0)
        k = int(np.searchsorted(cum, want, side="left") + 1) if want > 0 else 0
        out[t] = np.sort(order[: min(k, len(order))])
    return out, rates


def _passes(lengths: np.ndarray, want: float) -> int:
    total = float(lengths.sum())
    return max(1, int(np.ceil(want / total)) + 1) if total else 1


def _rng(seed: int, stage: str, task: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(stage.encode()), zlib.crc32(task.encode())])


def _take(n: int, target: int, rng: np.random.Generator) -> np.ndarray:
    """``target`` indices out of ``n``: whole passes, then a seeded sample; sorted."""
    if n == 0 or target <= 0:
        return np.zeros(0, dtype=np.int64)
    full, rest = divmod(target, n)
    parts = [np.arange(n)] * full
    if rest:
        parts.append(np.sort(rng.choice(n, size=rest, replace=False)))
    return np.sort(np.concatenate(parts)).astype(np.int64)
