"""`kind: config` models, checked at validate by building their transformers config (no weights).

An unknown ``model_type`` gets a one-line "did you mean"; a value of the wrong
type, a misspelt key, or a config that contradicts itself (``hidden_size`` not
a multiple of ``num_attention_heads``...) is a located problem, so it fails
here and not at the first training step.

transformers' config modules import torch whenever it is installed, and
``tunec validate`` must not pay for that: unless torch is already loaded,
the config is built in a child process that hides torch from transformers.
That child also returns the config as the cost estimates read it
(:func:`config_here`), so that a compile starts one such child, not two.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
from functools import lru_cache
from typing import Any

from .errors import did_you_mean

# (key in `config`, or None for the config as a whole; message; "error" or "warning")
Finding = tuple[str | None, str, str]

_COUNTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "max_position_embeddings")

# The last lines of a child process that answers on stdout and leaves nothing behind: it ends without
# tearing down the modules it imported (transformers: ~0.1 s, which the compile waits out).
CHILD_EXIT = """
import os
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""

_CHILD = f"""
import json, sys
sys.path.pop(0)  # not the working folder: it may hold a `tunec` folder that is not the installed package
import transformers.utils, transformers.utils.import_utils
transformers.utils.is_torch_available = transformers.utils.import_utils.is_torch_available = lambda: False
from {__name__} import check_here, config_here
config = json.load(sys.stdin)
findings = check_here(config)
print(json.dumps({{"findings": findings, "built": config_here({{"kind": "config", "config": config}})}}, default=str))
{CHILD_EXIT}"""

# What each config check's child also built: request JSON (as :func:`config_request` writes it) ->
# :func:`config_here`'s answer, for the cost estimates (compiler/estimate.py).
_built: dict[str, dict[str, Any]] = {}
_built_lock = threading.Lock()


def config_request(config: dict[str, Any]) -> str:
    """The cost estimates' request (compiler/estimate.py) for a `kind: config` model's config."""
    return json.dumps({"kind": "config", "config": config}, sort_keys=True)


def built_config(request_json: str) -> dict[str, Any] | None:
    """:func:`config_here`'s answer to ``request_json``, when a config check of this process built it."""
    with _built_lock:
        return _built.get(request_json)


def config_findings(config: dict[str, Any]) -> list[Finding]:
    """Problems of a `kind: config` model's ``config`` (which holds a string ``model_type``); waited
    for when :func:`start_config_findings` started finding them."""
    config_json = json.dumps(config, sort_keys=True)
    with _built_lock:
        started = _started.pop(config_json, None)
    if started is not None:
        started.join()  # its answer is then in _findings' cache
    return [tuple(f) for f in _findings(config_json)]


_started: dict[str, threading.Thread] = {}


def start_config_findings(config: dict[str, Any]) -> bool:
    """Find :func:`config_findings` of ``config`` in a background thread (its child process runs beside
    the caller); whether it is running. Nothing to start when torch is loaded already (the config is
    then built here)."""
    config_json = json.dumps(config, sort_keys=True)
    if "torch" in sys.modules:
        return False
    with _built_lock:
        if config_json in _started:
            return True
        thread = _started[config_json] = threading.Thread(target=_findings, args=(config_json,),
                                                          name="tunec-config-check", daemon=True)
    thread.start()
    return True


def checks_running() -> bool:
    """Whether a config check started by :func:`start_config_findings` is still running (its caller will
    wait for it)."""
    with _built_lock:
        return any(thread.is_alive() for thread in _started.values())


@lru_cache(maxsize=64)
def _findings(config_json: str) -> tuple:
    config = json.loads(config_json)
    if "torch" in sys.modules:  # nothing left to save: build it here
        return tuple(check_here(config))
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD], input=config_json, capture_output=True, text=True,
                              timeout=300)
        answer = json.loads(done.stdout.strip().splitlines()[-1])
        if isinstance(answer.get("built"), dict):
            with _built_lock:
                _built[config_request(config)] = answer["built"]
        return tuple(tuple(f) for f in answer["findings"])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError, AttributeError, KeyError,
            TypeError) as exc:
        detail = (getattr(exc, "stderr", None) or "").strip().splitlines()[-1:] or [str(exc)]
        return ((None, f"could not check the model config with transformers ({detail[0]})", "warning"),)


def check_here(config: dict[str, Any]) -> list[Finding]:
    """Build the config in this process; what transformers logs while doing so becomes warnings."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    args = dict(config)
    model_type = args.pop("model_type")
    if model_type not in CONFIG_MAPPING:
        return [("model_type", f"unknown model_type '{model_type}'{did_you_mean(model_type, CONFIG_MAPPING.keys())}",
                 "error")]
    cls = CONFIG_MAPPING[model_type]
    logged: list[str] = []
    with _captured_transformers_log(logged):
        findings = _check_class(cls, args)
    findings += [(None, line, "warning") for line in dict.fromkeys(logged)]
    return findings


def config_here(request: dict[str, Any]) -> dict[str, Any]:
    """``{"config": to_dict()}`` or ``{"error": message}`` for a cost estimate's config request
    (``{"kind": "config", "config": ...}`` or ``{"kind": "pretrained", "target": ..., "revision": ...}``),
    built in this process."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # validate has said what transformers thinks of the config
    try:
        if request["kind"] == "config":
            args = dict(request["config"])
            config = AutoConfig.for_model(args.pop("model_type"), **args)
        else:
            config = AutoConfig.from_pretrained(request["target"], revision=request.get("revision"),
                                                local_files_only=True)
        return {"config": json.loads(json.dumps(config.to_dict(), default=str))}
    except Exception as exc:  # noqa: BLE001 - any failure only means no estimate
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    finally:
        hf_logging.set_verbosity(before)


def _check_class(cls, args: dict[str, Any]) -> list[Finding]:
    attribute_map = dict(getattr(cls, "attribute_map", {}) or {})
    known = set(cls().to_dict()) | set(attribute_map)
    out: list[Finding] = []
    for key in args:
        if key not in known:
            hint = did_you_mean(key, known)
            out.append((key, f"`{key}` is not a setting of {cls.__name__}{hint}", "error") if hint else
                       (key, f"`{key}` is not a setting of {cls.__name__}; transformers keeps it as a plain "
                             "attribute", "warning"))
    for name in _COUNTS:
        written = _written(name, args, attribute_map)
        value = args.get(written) if written else None
        if written and isinstance(value, int) and not isinstance(value, bool) and value <= 0:
            out.append((written, f"`{written}` must be positive (got {value})", "error"))
    if any(f[2] == "error" for f in out):
        return out
    try:
        built = cls(**args)
    except Exception as exc:  # noqa: BLE001 - transformers raises ValueError, TypeError or its own kinds
        return out + [_from_exception(exc, args)]
    hidden, heads, kv = (getattr(built, n, None) for n in ("hidden_size", "num_attention_heads", "num_key_value_heads"))
    if not (isinstance(hidden, int) and isinstance(heads, int)):
        return out
    # a model with a `head_dim` of its own (Gemma, Qwen3) needs no such multiple
    if heads > 0 and hidden % heads and getattr(built, "head_dim", None) in (None, hidden // heads):
        out.append((_written("hidden_size", args, attribute_map),
                    f"`hidden_size` ({hidden}) must be a multiple of `num_attention_heads` ({heads})", "error"))
    if isinstance(kv, int) and kv > 0 and heads % kv:
        out.append((_written("num_key_value_heads", args, attribute_map),
                    f"`num_key_value_heads` ({kv}) must divide `num_attention_heads` ({heads}): each key/value "
                    "head serves a whole group of query heads", "error"))
    return out


def _ints(*values) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _written(name: str, args: dict, attribute_map: dict) -> str | None:
    """The key the recipe used for the setting ``name`` (its own name or an alias), if any."""
    if name in args:
        return name
    return next((alias for alias, target in attribute_map.items() if target == name and alias in args),
                next((target for alias, target in attribute_map.items() if alias == name and target in args), None))


def _from_exception(exc: Exception, args: dict) -> Finding:
    text = str(exc).strip() or type(exc).__name__
    field = re.search(r"field '(\w+)'", text)
    last = text.splitlines()[-1].strip()
    last = re.sub(r"^\w+(Error|Exception): ", "", last)
    key = field.group(1) if field and field.group(1) in args else None
    return key, last, "error"


class _Collect(logging.Handler):
    def __init__(self, into: list[str]):
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage().strip().splitlines()[0])


class _captured_transformers_log:
    """transformers' warnings, collected instead of printed, for the duration of a block."""

    def __init__(self, into: list[str]):
        self.logger = logging.getLogger("transformers")
        self.handler = _Collect(into)

    def __enter__(self):
        self.saved = (self.logger.handlers[:], self.logger.propagate)
        self.logger.handlers = [self.handler]
        self.logger.propagate = False

    def __exit__(self, *exc):
        self.logger.handlers, self.logger.propagate = self.saved
