"""Cost estimates per stage, before any training: steps, tokens, parameters, FLOPs, memory, time.

Computed here, without torch, from the model's transformers config (built in
a child process that hides torch, as ``modelconfig.py`` does) and from the
packed shards themselves: attention FLOPs come from each packed document's
length, not from ``seq_len``. The keys are documented in docs/build-format.md
("Estimates"); ``tests/test_estimate.py`` checks parameters exactly against a
model built on torch's meta device, and FLOPs against
``torch.utils.flop_counter.FlopCounterMode``.

FLOPs count multiply-adds as two, over every row position the model runs
(padding included), with the conventions of ``FlopCounterMode``::

    linear, full fine-tuning   6 * N_mm * positions         (forward 2, input and weight gradients 2 + 2)
    linear, LoRA               frozen weights 4 * N_mm * positions (forward, input gradient; no weight
                               gradient; none at all for the first layer's projections, which read the
                               frozen embeddings), adapters 6 * r * (in + out) * positions
    attention                  12 * heads * head_dim * sum(L^2) per layer (QK^T and AV, forward and backward,
                               full squares), L each packed document's length

``N_mm`` holds every matrix the forward pass multiplies by (the output head
too, tied or not). Memory assumes what ``tunec run`` does on a GPU: float32
master weights, gradients and AdamW state, activations under bf16 autocast.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .load import LoadedRecipe
from .modelconfig import CHILD_EXIT, built_config, config_here
from .plan import Estimate, PackedSet, StagePlan
from .recipe import ConfigModel, HubModel, LocalModel, LoraPeft, QLoraPeft, Stage, StageModel

logger = logging.getLogger(__name__)

# Published dense bf16 peaks (FLOP/s, tensor cores, no sparsity) and memory (bytes) per device.
GPUS: dict[str, tuple[float, int]] = {
    "h100": (989e12, 80 * 10**9),  # H100 SXM
    "a100": (312e12, 80 * 10**9),  # A100 SXM 80 GB
    "l4": (121e12, 24 * 10**9),
}
# The share of the peak a training step reaches: an assumption, settable with `tunec plan --mfu`.
DEFAULT_MFU = 0.35
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED = (*LLAMA_LIKE, "gpt2")


@dataclass(frozen=True)
class Linear:
    name: str  # the module's own name (what `target_modules` matches)
    fan_in: int
    fan_out: int
    bias: bool
    first: bool = False  # reads the (frozen) embeddings directly: no input gradient under LoRA


@dataclass(frozen=True)
class Shape:
    """What the estimates need of an architecture: its matrices and its other parameters."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    q_width: int  # heads * head_dim
    kv_width: int  # key/value heads * head_dim
    linears: tuple[Linear, ...]  # one layer's
    other_params: int  # embeddings, positions, norms, biases outside the linears, an untied head
    head: int  # the output head's matrix (hidden * vocab), multiplied by whether tied or not

    @property
    def params(self) -> int:
        per_layer = sum(x.fan_in * x.fan_out + (x.fan_out if x.bias else 0) for x in self.linears)
        return self.layers * per_layer + self.other_params

    @property
    def matmul(self) -> int:
        return self.layers * sum(x.fan_in * x.fan_out for x in self.linears) + self.head


def shape_of(config: dict[str, Any]) -> Shape | None:
    """The shape of a transformers config (``to_dict()``), or None for an architecture not modelled here."""
    kind = config.get("model_type")
    if kind in LLAMA_LIKE:
        h, i, v, n = (int(config[k]) for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers"))
        heads = int(config["num_attention_heads"])
        kv = int(config.get("num_key_value_heads") or heads)
        hd = int(config.get("head_dim") or h // heads)
        qkv_bias = kind == "qwen2" or bool(config.get("attention_bias"))
        o_bias = kind != "qwen2" and bool(config.get("attention_bias"))
        mlp_bias = bool(config.get("mlp_bias"))
        linears: tuple[Linear, ...] = (
            Linear("q_proj", h, heads * hd, qkv_bias, True), Linear("k_proj", h, kv * hd, qkv_bias, True),
            Linear("v_proj", h, kv * hd, qkv_bias, True), Linear("o_proj", heads * hd, h, o_bias),
            Linear("gate_proj", h, i, mlp_bias), Linear("up_proj", h, i, mlp_bias), Linear("down_proj", i, h, mlp_bias))
        norms = n * (2 * h + (2 * hd if kind == "qwen3" else 0)) + h
        tied = bool(config.get("tie_word_embeddings"))
        return Shape(n, h, i, v, heads * hd, kv * hd, linears, v * h + norms + (0 if tied else v * h), v * h)
    if kind == "gpt2":
        h, v, n, p = (int(config[k]) for k in ("n_embd", "vocab_size", "n_layer", "n_positions"))
        i = int(config.get("n_inner") or 4 * h)
        gpt2: tuple[Linear, ...] = (Linear("c_attn", h, 3 * h, True, True), Linear("c_proj", h, h, True),
                   Linear("c_fc", h, i, True), Linear("c_proj", i, h, True))
        tied = config.get("tie_word_embeddings", True) is not False
        other = v * h + p * h + n * 4 * h + 2 * h + (0 if tied else v * h)
        return Shape(n, h, i, v, h, h, gpt2, other, v * h)
    return None


def lora_linears(shape: Shape, peft: LoraPeft) -> list[Linear]:
    """The matrices of one layer that LoRA adapts (``all-linear``: every one; the output head never)."""
    if peft.target_modules == "all-linear":
        return list(shape.linears)
    return [x for x in shape.linears if x.name in peft.target_modules]


def params(shape: Shape, peft: LoraPeft | None) -> tuple[int, int, int]:
    """``(total, trainable, lora)``: as the model's ``parameters()`` count them, adapters included."""
    if peft is None:
        return shape.params, shape.params, 0
    lora = shape.layers * sum(peft.r * (x.fan_in + x.fan_out) for x in lora_linears(shape, peft))
    return shape.params + lora, lora, lora


def flops(shape: Shape, peft: LoraPeft | None, positions: int, sum_sq: float) -> tuple[float, float]:
    """``(linear, attention)`` FLOPs of training over ``positions`` row positions whose documents'
    squared lengths sum to ``sum_sq``."""
    attention = 12.0 * shape.layers * shape.q_width * sum_sq
    if peft is None:
        return 6.0 * shape.matmul * positions, attention
    first = sum(x.fan_in * x.fan_out for x in shape.linears if x.first)
    frozen = 4.0 * shape.matmul - 2.0 * first
    adapters = 0.0
    for x in lora_linears(shape, peft):
        adapters += shape.layers * 6.0 * peft.r * (x.fan_in + x.fan_out)
        if x.first:
            adapters -= 2.0 * peft.r * x.fan_in  # no input gradient below the first layer
    return (frozen + adapters) * positions, attention


LOGITS_PER_CHUNK = 1 << 26  # the runtime's chunked loss: float32 logits per chunk (runtime/loss.py)


def activation_bytes(shape: Shape, rows: int, seq_len: int, checkpointed: bool, chunked: bool = True) -> int:
    """Activations a micro-batch of ``rows`` packed rows keeps for the backward pass (bf16 autocast).

    Per token and layer: the two norms' float32 inputs and statistics (16·hidden), their bf16
    outputs (4·hidden), queries, keys, values, rotated copies and the attention output
    (2·(4·q + 4·kv)), and the MLP's five intermediate tensors (10·intermediate). The logits:
    bf16, their float32 copy and log-softmax (10·vocab per token), or under the chunked loss one
    chunk's float32 logits and their gradient (8·vocab for at most ``2**26 / vocab`` tokens). With
    activation checkpointing each layer keeps only its float32 input and one layer at a time is
    recomputed.
    """
    tokens = rows * seq_len
    attention = 2 * (4 * shape.q_width + 4 * shape.kv_width)
    layer = 16 * shape.hidden + 4 * shape.hidden + attention + 10 * shape.intermediate
    embeddings = 4 * shape.hidden
    if chunked:
        logits = min(tokens, max(64, LOGITS_PER_CHUNK // shape.vocab)) * 8 * shape.vocab
    else:
        logits = tokens * 10 * shape.vocab
    if checkpointed:
        return tokens * (shape.layers * 4 * shape.hidden + layer + embeddings) + logits
    return tokens * (shape.layers * layer + embeddings) + logits


def document_squares(out: Path, packed: PackedSet, pad_id: int) -> tuple[float, int]:
    """``(sum of squared document lengths, documents)`` over the packed rows; the padding that closes a
    row is no document."""
    from .shards import open_shard

    total, docs = 0.0, 0
    for shard in packed.shards:
        arrays = open_shard(out / shard.path)
        pos = np.asarray(arrays["position_ids"])
        ids = np.asarray(arrays["input_ids"])
        rows, width = pos.shape
        # every row starts a document (position 0), so the starts cut the flat rows into documents
        starts = np.flatnonzero(pos.reshape(-1) == 0)
        ends = np.append(starts[1:], rows * width)
        lengths = ends - starts
        nonpad = np.add.reduceat((ids.reshape(-1) != pad_id).astype(np.int64), starts) if len(starts) else starts
        real = ~((nonpad == 0) & (ends % width == 0))  # the padding that closes a row: its last, all pad ids
        total += float((lengths[real].astype(np.float64) ** 2).sum())
        docs += int(real.sum())
    return total, docs


def estimate(stage: Stage, packed: PackedSet, shape: Shape | None, sum_sq: float, docs_rows: int,
             mfu: float = DEFAULT_MFU) -> Estimate:
    """A stage's estimate; ``shape`` None leaves the model's numbers out."""
    seq_len = packed.seq_len
    rows_per_step = max(1, round(stage.batch_tokens / seq_len))  # one process (runtime/data.py, plan_batching)
    rows = max(packed.rows, 1)
    steps = stage.max_steps if stage.max_steps is not None else max(1, math.ceil(stage.epochs * rows / rows_per_step))
    seen_rows = steps * rows_per_step
    passes = seen_rows / rows
    # `micro_batch_rows: auto` is found by trying at run time (runtime/memory.py); estimate its least, one row
    micro = min(stage.micro_batch_rows if isinstance(stage.micro_batch_rows, int) else 1, rows_per_step)
    numbers: dict[str, Any] = dict(
        steps=steps, rows_per_step=rows_per_step, micro_batch_rows=micro, positions=seen_rows * seq_len,
        tokens_seen=round(packed.tokens * passes), tokens_trained=round(packed.trained_tokens * passes), mfu=mfu,
    )
    empty = dict.fromkeys(("params_total", "params_trainable", "params_lora", "flops", "flops_linear",
                           "flops_attention", "flops_attention_dense", "memory_weights", "memory_gradients",
                           "memory_optimizer", "memory_activations", "memory_activations_checkpointed",
                           "memory_peak", "memory_peak_checkpointed", "seconds_h100", "seconds_a100", "seconds_l4"))
    if shape is None:
        return Estimate.model_validate({**numbers, **empty})
    peft = stage.peft if isinstance(stage.peft, LoraPeft) else None
    total, trainable, lora = params(shape, peft)
    linear, attention = flops(shape, peft, seen_rows * seq_len, sum_sq * passes)
    _, dense = flops(shape, peft, 0, float(seen_rows) * seq_len * seq_len)
    if getattr(stage.objective, "reference", None) is not None:  # DPO, KTO: reference log-probs, one forward pass
        linear += 2.0 * shape.matmul * packed.rows * seq_len
        attention += 4.0 * shape.layers * shape.q_width * sum_sq
        dense += 4.0 * shape.layers * shape.q_width * packed.rows * seq_len * seq_len
    weights = total * 4
    if isinstance(stage.peft, QLoraPeft):  # the base's matrices in 4-bit NF4 (half a byte each)
        weights -= (shape.matmul - shape.head) * 4 - (shape.matmul - shape.head) // 2
    state = weights + trainable * 4 + trainable * 8
    chunked = getattr(stage, "chunked_loss", True)
    act = activation_bytes(shape, micro, seq_len, False, chunked)
    act_ckpt = activation_bytes(shape, micro, seq_len, True, chunked)
    seconds = {f"seconds_{g}": (linear + attention) / (peak * mfu) for g, (peak, _) in GPUS.items()}
    return Estimate.model_validate({
        **numbers, "params_total": total, "params_trainable": trainable, "params_lora": lora,
        "flops": linear + attention, "flops_linear": linear, "flops_attention": attention,
        "flops_attention_dense": dense, "memory_weights": weights, "memory_gradients": trainable * 4,
        "memory_optimizer": trainable * 8, "memory_activations": act, "memory_activations_checkpointed": act_ckpt,
        "memory_peak": state + act, "memory_peak_checkpointed": state + act_ckpt, **seconds})


# ----------------------------------------------------------------- configs, without torch


_CHILD = """
import json, sys
sys.path.pop(0)  # not the working folder
import transformers.utils, transformers.utils.import_utils
transformers.utils.is_torch_available = transformers.utils.import_utils.is_torch_available = lambda: False
from tunec.compiler.modelconfig import config_here
print(json.dumps(config_here(json.load(sys.stdin)), default=str))
""" + CHILD_EXIT


CONFIG_FORMAT = 1  # bump when what a cached config entry holds changes


def config_key(request: dict[str, Any]) -> str | None:
    """The cache key of a config request: sha256 of the request, the content of the ``config.json``
    it reads (a local model folder's, or the hub cache's copy for a hub model), and the transformers
    version that builds the config; None when that file is not there to hash (nothing is cached)."""
    from importlib import metadata

    from .fileio import canonical_json, sha256_text
    from .sources import file_hash

    content = None
    if request["kind"] == "pretrained":
        path = _config_file(request)
        if path is None:
            return None
        content = file_hash(path)
    try:
        transformers = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        transformers = "absent"
    return sha256_text(canonical_json({"format": CONFIG_FORMAT, "request": request, "config_json": content,
                                       "transformers": transformers}))


def _config_file(request: dict[str, Any]) -> Path | None:
    """The ``config.json`` a pretrained request reads, without any download."""
    target = Path(request["target"])
    if target.is_dir():
        return target / "config.json" if (target / "config.json").is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(request["target"], "config.json", revision=request.get("revision"))
    except Exception:  # noqa: BLE001 - an id the hub cache cannot resolve: nothing to hash
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def _cached_config(request_json: str, cache: Path | None) -> tuple[dict[str, Any] | None, str | None]:
    """:func:`_config`, read from and kept in the compile cache folder (``config/``) when one is given:
    a recompile then builds no config and starts no child process. Only configs are kept, never
    errors (a hub model may be downloaded before the next compile)."""
    from .cache import touch
    from .fileio import atomic_write_text, canonical_json

    key = config_key(json.loads(request_json)) if cache is not None else None
    if cache is None or key is None:
        return _config(request_json)
    path = cache / "config" / key[:2] / f"{key}.json"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(stored, dict) and isinstance(stored.get("config"), dict):
            touch(path)
            return stored["config"], None
    except (OSError, ValueError):
        pass  # absent or damaged: build it again
    config, why = _config(request_json)
    if config is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, canonical_json({"config": config}))
        except OSError:
            pass  # a cache that cannot be written only costs time
    return config, why


@lru_cache(maxsize=32)
def _config(request_json: str) -> tuple[dict[str, Any] | None, str | None]:
    request = json.loads(request_json)
    got = built_config(request_json)  # built by the config check's child process (compiler/modelconfig.py)
    if got is not None:
        pass
    elif "torch" in sys.modules:
        got = config_here(request)
    else:
        try:
            done = subprocess.run([sys.executable, "-c", _CHILD], input=request_json, capture_output=True, text=True,
                                  timeout=300)
            got = json.loads(done.stdout.strip().splitlines()[-1])
        except (subprocess.SubprocessError, OSError, ValueError, IndexError) as exc:
            got = {"error": str(exc)}
    return got.get("config"), got.get("error")


def _request(stage: Stage, stages: dict[str, Stage]) -> tuple[str | None, str | None]:
    """``(request as JSON, None)`` for the config a stage's model has, or ``(None, why)``."""
    model = stage.model
    seen = {stage.name}
    while isinstance(model, StageModel):
        if model.stage in seen or model.stage not in stages:
            return None, f"stage '{model.stage}' is not an earlier stage"
        seen.add(model.stage)
        model = stages[model.stage].model
    if isinstance(model, ConfigModel):
        request: dict[str, Any] = {"kind": "config", "config": model.config}
    elif isinstance(model, LocalModel):
        request = {"kind": "pretrained", "target": model.path}
    elif isinstance(model, HubModel):
        request = {"kind": "pretrained", "target": model.id, "revision": model.revision}
    else:
        return None, "unknown model kind"
    return json.dumps(request, sort_keys=True), None


def model_config(stage: Stage, stages: dict[str, Stage],
                 cache: Path | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """The transformers config (``to_dict()``) a stage's model has, or ``(None, why)``; a stage that
    starts from an earlier one has that one's architecture. ``cache``: the compile cache folder,
    where configs are kept by content (:func:`config_key`). A config :func:`prefetch` started is
    waited for, not built again."""
    request, why = _request(stage, stages)
    if request is None:
        return None, why
    with _lock:
        started = _started.pop((request, cache), None)
    if started is not None:
        started.join()
        return started.result
    return _cached_config(request, cache)


class _Prefetch(threading.Thread):
    """One config built in the background: its child process runs while the compile does."""

    def __init__(self, request: str, cache: Path | None):
        super().__init__(name="tunec-config-prefetch", daemon=True)
        self.request, self.cache = request, cache
        self.result: tuple[dict[str, Any] | None, str | None] = (None, "not built")

    def run(self) -> None:
        try:
            self.result = _cached_config(self.request, self.cache)
        except Exception as exc:  # noqa: BLE001 - any failure only means no estimate, as in _config
            self.result = (None, f"{type(exc).__name__}: {exc}")


_lock = threading.Lock()
_started: dict[tuple[str, Path | None], _Prefetch] = {}


def prefetch(stages: list[Stage], cache: Path | None = None) -> None:
    """Start building the model configs of ``stages`` in the background, so that :func:`estimated`
    at the end of a compile finds them built: each needs a child process that imports
    transformers (~1 s), which then runs beside the compile instead of after it."""
    by_name = {s.name: s for s in stages}
    for stage in stages:
        request, _ = _request(stage, by_name)
        with _lock:
            if request is None or (request, cache) in _started:
                continue
            thread = _started[(request, cache)] = _Prefetch(request, cache)
        thread.start()


def estimated(loaded: LoadedRecipe, out: Path, stages: list[StagePlan], pad_id: int,
              cache: Path | None = None) -> list[StagePlan]:
    """The compile's hook: each stage plan with its ``estimate`` (shards already written under ``out``);
    ``cache``: the compile cache folder, where model configs are kept."""
    by_name = {s.name: s.settings for s in stages}
    done = []
    for sp in stages:
        config, why = model_config(sp.settings, by_name, cache)
        shape = shape_of(config) if config is not None else None
        if shape is None:
            what = why or f"architecture '{(config or {}).get('model_type')}' is not modelled ({', '.join(SUPPORTED)})"
            logger.info(f"stage '{sp.name}': no model estimates: {what}")
        sum_sq, docs = document_squares(out, sp.train, pad_id)
        done.append(sp.model_copy(update={"estimate": estimate(sp.settings, sp.train, shape, sum_sq, docs)}))
    return done


# ----------------------------------------------------------------- `tunec plan`


def cpu_peak(seconds: float = 0.5) -> float:
    """This machine's float32 matrix-multiply rate (FLOP/s), measured with numpy: the CPU's "peak"."""
    import time

    n = 512
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.T.copy()
    a @ b  # warm up
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        runs += 1
    return 2.0 * n**3 * runs / elapsed


def device(gpu: str) -> tuple[float, int | None]:
    """``(peak FLOP/s, memory bytes or None)`` of ``--gpu`` (``cpu``: measured, memory not checked)."""
    if gpu == "cpu":
        return cpu_peak(), None
    return GPUS[gpu]


def _size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _time(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def summary_lines(stages: list[StagePlan], gpu: str, peak: float, memory: int | None, mfu: float) -> list[str]:
    """The estimates of ``stages`` as ``tunec plan`` prints them, with the time on ``gpu``."""
    lines = []
    for sp in stages:
        e = sp.estimate
        if e is None:
            lines.append(f"stage {sp.name}: no estimates in the plan (compiled by an older tunec: compile again)")
            continue
        lines.append(f"stage {sp.name}:")
        lines.append(f"  steps                {e.steps:,} ({e.rows_per_step} rows of {sp.train.seq_len} a step, "
                     f"micro-batches of {e.micro_batch_rows})")
        lines.append(f"  tokens               {e.tokens_seen:,} seen, {e.tokens_trained:,} trained "
                     f"({e.positions:,} positions with padding)")
        if e.params_total is None:
            lines.append("  model                no parameter, FLOP, memory or time estimates: its config was not "
                         "readable offline (a hub model not in the cache) or its architecture is not modelled "
                         f"({', '.join(SUPPORTED)})")
            continue
        lora = f", LoRA {e.params_lora:,}" if e.params_lora else ""
        lines.append(f"  parameters           {e.params_total:,} total, {e.params_trainable:,} trainable{lora}")
        lines.append(f"  FLOPs                {_size(e.flops)} (linear {_size(e.flops_linear)}, attention "
                     f"{_size(e.flops_attention)} by document; {_size(e.flops_attention_dense)} with a dense mask)")
        lines.append(f"  memory per GPU       {human_bytes(e.memory_peak)} peak: weights "
                     f"{human_bytes(e.memory_weights)}, "
                     f"gradients {human_bytes(e.memory_gradients)}, optimizer {human_bytes(e.memory_optimizer)}, "
                     f"activations {human_bytes(e.memory_activations)}")
        lines.append(f"  with checkpointing   {human_bytes(e.memory_peak_checkpointed)} peak (activations "
                     f"{human_bytes(e.memory_activations_checkpointed)})")
        assert e.flops is not None
        lines.append(f"  time on {gpu:<12} {_time(e.flops / (peak * mfu))} at {_size(peak)}FLOP/s peak, "
                     f"MFU {mfu:g}")
        if memory is not None and e.memory_peak is not None and e.memory_peak > memory:
            fits = e.memory_peak_checkpointed is not None and e.memory_peak_checkpointed <= memory
            lines.append(f"  warning: the estimated peak memory ({human_bytes(e.memory_peak)}) exceeds the {gpu}'s "
                         f"{human_bytes(memory)}; " + ("activation checkpointing would fit" if fits else
                                                  "lower micro_batch_rows or seq_len, or use LoRA"))
    return lines

