"""The recipe's tokenizer, kept in the compile cache so that a recompile does not load it again.

Loading a tokenizer with transformers costs a second or two (most of it importing
transformers), more than the rest of a compile whose units all come from the
cache. What a compile needs of it is its :class:`.tokens.TokenizerInfo` (the
workers' JSON, special ids, chat template) and the folder ``save_pretrained``
writes into the build. Both are stored as one cache entry (``tokenizers/``,
written atomically and verified by hash like a unit's) under a key over:

- every file of the tokenizer folder, by content, except model weights
  (:data:`WEIGHTS`: a tokenizer never reads them, and a folder holding a whole
  model would be hashed for nothing);
- the content of the recipe's ``tokenizer.chat_template`` file, and the rest of
  its ``tokenizer`` settings;
- the versions of transformers, tokenizers and tunec.

A hub tokenizer is loaded as before (what its id resolves to in the hub's
cache is not hashed here). An entry that is missing or damaged is a miss: the
tokenizer is loaded, checked and stored again.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .cache import Cache, code_versions, remember_tokenizer_hash, tokenizer_hash
from .fileio import canonical_json, sha256_text
from .load import LoadedRecipe
from .recipe import LocalTokenizer
from .sources import file_hash
from .tokens import TokenizerInfo, load_tokenizer, tokenizer_info
from .versions import dist_version

FORMAT = 2  # bump when what an entry holds changes
INFO_JSON = ".info.json"  # the entry's array holding TokenizerInfo.json (megabytes: not in the JSON metadata)
KIND = "tokenizers"
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")


class StoredTokenizer:
    """A tokenizer read back from the cache: the files its ``save_pretrained`` wrote."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files

    def save_pretrained(self, folder: str) -> None:
        for name, data in sorted(self.files.items()):
            path = Path(folder) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def _version(dist: str) -> str:
    return dist_version(dist)


def tokenizer_key(loaded: LoadedRecipe) -> str | None:
    """The cache key of the recipe's tokenizer; None when it is not a local folder with everything in
    place (it is then loaded, and its errors reported, as without a cache)."""
    spec = loaded.recipe.tokenizer
    if not isinstance(spec, LocalTokenizer):
        return None
    folder = loaded.resolve(spec.path)
    if not folder.is_dir():
        return None
    files = {p.relative_to(folder).as_posix(): file_hash(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and not p.name.endswith(WEIGHTS)}
    chat = None
    if spec.chat_template:
        template = loaded.resolve(spec.chat_template)
        if not template.is_file():
            return None
        chat = file_hash(template)
    settings = spec.model_dump(mode="json")
    settings.pop("path", None)  # their content stands in for the paths
    settings.pop("chat_template", None)
    return sha256_text(canonical_json({
        "format": FORMAT, "settings": settings, "files": files, "chat_template": chat,
        "versions": {"tunec": __version__, "code": code_versions(),
                     "transformers": _version("transformers"),
                     "tokenizers": _version("tokenizers")},
    }))


def load(loaded: LoadedRecipe, cache_dir: Path | None) -> tuple[Any, TokenizerInfo]:
    """``(tokenizer, info)``: the tokenizer as :func:`.tokens.load_tokenizer` loads it, or one read back
    from the cache; either one's ``save_pretrained`` writes the same files."""
    key = tokenizer_key(loaded) if cache_dir is not None else None
    if cache_dir is None or key is None:
        tok = load_tokenizer(loaded)
        return tok, tokenizer_info(tok)
    cache = Cache(cache_dir)
    entry = cache.get_arrays(KIND, key)
    if entry is not None:
        stored = _from_entry(*entry)
        if stored is not None:
            return stored
    tok = load_tokenizer(loaded)
    info = tokenizer_info(tok)
    with tempfile.TemporaryDirectory(prefix=".tunec-tok-", dir=cache_dir if cache_dir.is_dir() else None) as tmp:
        tok.save_pretrained(tmp)
        files = {p.relative_to(tmp).as_posix(): p.read_bytes() for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
    arrays = {name: np.frombuffer(data, dtype=np.uint8) for name, data in files.items()}
    arrays[INFO_JSON] = np.frombuffer(info.json.encode("utf-8"), dtype=np.uint8)
    fields = {k: v for k, v in dataclasses.asdict(info).items() if k != "json"}
    digest = tokenizer_hash(info)
    remember_tokenizer_hash(info, digest)
    cache.put_arrays(KIND, key, arrays, {"format": FORMAT, "info": fields, "tokenizer_hash": digest})
    return tok, info


def _from_entry(arrays: dict[str, np.ndarray], meta: dict) -> tuple[StoredTokenizer, TokenizerInfo] | None:
    """The tokenizer an entry holds; None for an entry of another format or fields (a miss)."""
    values = meta.get("info")
    names = {f.name for f in dataclasses.fields(TokenizerInfo)} - {"json"}
    if meta.get("format") != FORMAT or not isinstance(values, dict) or set(values) != names \
            or INFO_JSON not in arrays or len(arrays) < 2:
        return None
    values = dict(values, special_tokens=tuple(tuple(pair) for pair in values["special_tokens"]),
                  json=np.asarray(arrays[INFO_JSON], dtype=np.uint8).tobytes().decode("utf-8"))
    files = {name: np.asarray(a, dtype=np.uint8).tobytes() for name, a in arrays.items() if name != INFO_JSON}
    info = TokenizerInfo(**values)
    if isinstance(meta.get("tokenizer_hash"), str):
        remember_tokenizer_hash(info, meta["tokenizer_hash"])
    return StoredTokenizer(files), info
