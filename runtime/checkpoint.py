"""Atomic checkpoints and exact resume.

A checkpoint is a folder ``runs/<stage>/checkpoints/step-NNNNNNNN/``::

    trainable.safetensors   the parameters being trained (all of them, or the LoRA adapter's)
    optimizer.pt            AdamW and LR-scheduler state (torch.save of plain state dicts)
    rng-<rank>.pt           each rank's torch RNG states (CPU and CUDA): dropout continues identically
    state.json              step, token counts, the stage's fingerprint, world size (written last)

It is written under a temporary name (``.tmp-step-...``) and renamed when
complete, so a checkpoint folder that exists is whole. The data position is
the step number itself (see :mod:`tunec.runtime.data`), so resuming from step ``s``
replays exactly the rows an uninterrupted run would have seen. The two most
recent checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunec.compiler.errors import TunecError

from .dist import Dist

KEEP = 2
_NAME = re.compile(r"^step-(\d{8})$")


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save(folder: Path, step: int, model, optimizer, scheduler, state: dict, dist: Dist) -> Path:
    """Write checkpoint ``step`` under ``folder`` (every rank calls this)."""
    final = folder / f"step-{step:08d}"
    tmp = folder / f".tmp-step-{step:08d}"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    torch.save(_rng_state(), tmp / f"rng-{dist.rank}.pt")
    if dist.is_main:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(dict(state, step=step), indent=2, sort_keys=True) + "\n")
    dist.barrier()  # every rank's RNG file is in place
    if dist.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in all_checkpoints(folder)[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def all_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest(folder: Path) -> Path | None:
    found = all_checkpoints(folder)
    return found[-1] if found else None


def read_state(path: Path) -> dict:
    return json.loads((path / "state.json").read_text())


def load(path: Path, model, optimizer, scheduler, dist: Dist) -> dict:
    """Restore weights, optimizer, scheduler and this rank's RNG from checkpoint ``path``."""
    state = read_state(path)
    weights = load_file(str(path / "trainable.safetensors"))
    wanted = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != wanted:
        missing = sorted(wanted - set(weights))[:3]
        raise TunecError(f"{path}: the checkpoint's parameters do not match the model (e.g. {missing}); "
                         "start the stage again with --force")
    model.load_state_dict(weights, strict=False)
    saved = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rng = path / f"rng-{dist.rank}.pt"
    if rng.is_file():
        rng_state = torch.load(rng, weights_only=True)
        torch.set_rng_state(rng_state["cpu"])
        if "cuda" in rng_state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng_state["cuda"])
    elif dist.is_main:
        print(f"note: {path} has no RNG state for rank {dist.rank} (it was saved by {state.get('world_size')} "
              "rank(s)); dropout will differ from the interrupted run, the data order will not")
    return state
