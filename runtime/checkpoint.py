"""Atomic checkpoints and exact resume.

A checkpoint is a folder ``runs/<stage>/checkpoints/step-NNNNNNNN/``::

    trainable.safetensors   the parameters being trained (all of them, or the LoRA adapter's)
    optimizer.pt            AdamW and LR-scheduler state, fp16's loss scaler (torch.save of plain state dicts)
    rng-<rank>.pt           each rank's torch RNG states (CPU and CUDA): dropout continues identically
    dcp/, schedule.pt       (FSDP, instead of the first two) every rank's shards of the weights and AdamW
                            state through torch.distributed.checkpoint, which a run on any number of
                            processes reloads (resharded); the LR scheduler (and loss scaler) beside them
    state.json              step, token counts, the stage's fingerprint and run-time options, world size,
                            the loss logged so far (written last)

It is written under a temporary name (``.tmp-step-...``), every file flushed
to disk, and renamed when complete, so a checkpoint folder that exists is
whole; old ones are renamed away (``.del-step-...``) before they are deleted,
so a kill never leaves half of one under a ``step-`` name. The data position
is the step number itself (see :mod:`tunec.runtime.data`), so resuming from step ``s``
replays exactly the rows an uninterrupted run would have seen. The two most
recent checkpoints are kept.

Loading checks a checkpoint first (:func:`problem`): every file present, the
safetensors header readable and covering the file, the optimizer and RNG
archives whole with every entry matching its CRC, ``state.json`` parsed and
naming the folder's step. :func:`usable` skips a
damaged one, with a warning, for the one before it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from tunec.compiler.errors import TunecError
from tunec.compiler.fileio import atomic_write_json

from .dist import Dist

logger = logging.getLogger(__name__)

KEEP = 2
_NAME = re.compile(r"^step-(\d{8})$")


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    state: dict[str, object] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(folder: Path, step: int, model, optimizer, scheduler, state: dict, dist: Dist, scaler=None) -> Path:
    """Write checkpoint ``step`` under ``folder`` (every rank calls this)."""
    final = folder / f"step-{step:08d}"
    tmp = folder / f".tmp-step-{step:08d}"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    torch.save(_rng_state(), tmp / f"rng-{dist.rank}.pt")
    _fsync(tmp / f"rng-{dist.rank}.pt")
    saved = {"scheduler": scheduler.state_dict()}
    if scaler is not None:  # fp16's loss scale, so a resumed run skips and scales exactly as before
        saved["scaler"] = scaler.state_dict()
    if sharded(model):
        _save_sharded(tmp, model, optimizer)  # every rank writes its shards
        if dist.is_main:
            torch.save(saved, tmp / "schedule.pt")
            _fsync(tmp / "schedule.pt")
    elif dist.is_main:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(dict(saved, optimizer=optimizer.state_dict()), tmp / "optimizer.pt")
        for name in ("trainable.safetensors", "optimizer.pt"):
            _fsync(tmp / name)  # the rename below must not outrun the data on a power cut
    if dist.is_main:  # last: dcp.save returns once every rank's shards and the metadata are written
        atomic_write_json(tmp / "state.json", dict(state, step=step))
    dist.barrier()  # every rank's RNG file is in place
    if dist.is_main:
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        for old in all_checkpoints(folder)[:-KEEP]:
            _remove(old)
    dist.barrier()
    return final


def _remove(path: Path) -> None:
    """Delete a checkpoint folder so that it is never seen half-deleted under its own name."""
    gone = path.with_name(f".del-{path.name}")
    shutil.rmtree(gone, ignore_errors=True)
    os.replace(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


def clean(folder: Path) -> None:
    """Remove what an interrupted save left: ``.tmp-step-*`` and ``.del-step-*`` folders (rank 0, at resume)."""
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith((".tmp-step-", ".del-step-")):
                shutil.rmtree(p, ignore_errors=True)


def all_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint folders (``step-NNNNNNNN``), oldest first; see :func:`usable` for the ones that load."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name) and p.is_dir()), key=lambda p: p.name)


def read_state(path: Path) -> dict:
    return json.loads((path / "state.json").read_text())


def problem(path: Path) -> str | None:
    """Why checkpoint ``path`` cannot be loaded, or None when it is whole."""
    fsdp = (path / "dcp").is_dir()
    for name in ("state.json", "dcp/.metadata", "schedule.pt") if fsdp else ("state.json", "trainable.safetensors",
                                                                             "optimizer.pt"):
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        state = read_state(path)
    except (ValueError, UnicodeDecodeError) as exc:
        return f"state.json does not parse ({exc})"
    named = _NAME.match(path.name)
    assert named is not None, f"{path} is not a checkpoint folder"  # callers pass folders from all_checkpoints()
    step = int(named.group(1))
    if not isinstance(state, dict) or state.get("step") != step:
        return f"state.json names step {state.get('step') if isinstance(state, dict) else None}, not {step}"
    if not any(path.glob("rng-*.pt")):
        return "no rng-<rank>.pt file"
    if not fsdp:
        try:
            with safe_open(str(path / "trainable.safetensors"), "pt") as fh:  # parses the header, checks the length
                fh.keys()
        except (SafetensorError, OSError) as exc:
            return f"trainable.safetensors is unreadable ({exc})"
    for name in ["schedule.pt" if fsdp else "optimizer.pt", *sorted(p.name for p in path.glob("rng-*.pt"))]:
        try:
            with zipfile.ZipFile(path / name) as zf:  # torch.save's format; a cut file has no directory
                bad = zf.testzip()  # reads every entry against its CRC, which torch.load does not check
        except (zipfile.BadZipFile, OSError) as exc:
            return f"{name} is unreadable ({exc})"
        if bad is not None:
            return f"{name} is corrupted ({bad} fails its checksum)"
    return None


def usable(folder: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint under ``folder`` that is whole, and one warning per damaged newer one."""
    warnings: list[str] = []
    for path in reversed(all_checkpoints(folder)):
        why = problem(path)
        if why is None:
            return path, warnings
        warnings.append(f"{path} is damaged ({why}); falling back to the checkpoint before it")
    return None, warnings


def load(path: Path, model, optimizer, scheduler, dist: Dist, scaler=None) -> dict:
    """Restore weights, optimizer, scheduler and this rank's RNG from checkpoint ``path``."""
    state = read_state(path)
    if (path / "dcp").is_dir() != sharded(model):
        raise TunecError(f"{path}: saved {'with' if (path / 'dcp').is_dir() else 'without'} FSDP, and this run "
                         f"{'uses' if sharded(model) else 'does not use'} it; start the stage again with --force")
    if sharded(model):
        _load_sharded(path, model, optimizer)
        saved = torch.load(path / "schedule.pt", map_location="cpu", weights_only=True)
        _restore(path, saved, scheduler, scaler, dist, state)
        return state
    weights = load_file(str(path / "trainable.safetensors"))
    wanted = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != wanted:
        missing = sorted(wanted - set(weights))[:3]
        raise TunecError(f"{path}: the checkpoint's parameters do not match the model (e.g. {missing}); "
                         "start the stage again with --force")
    model.load_state_dict(weights, strict=False)
    saved = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    _restore(path, saved, scheduler, scaler, dist, state)
    return state


def _restore(path: Path, saved: dict, scheduler, scaler, dist: Dist, state: dict) -> None:
    """The scheduler, the loss scaler and this rank's RNG, as checkpoint ``path`` saved them."""
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and "scaler" in saved:
        scaler.load_state_dict(saved["scaler"])
    rng = path / f"rng-{dist.rank}.pt"
    if rng.is_file():
        rng_state = torch.load(rng, weights_only=True)
        torch.set_rng_state(rng_state["cpu"])
        if "cuda" in rng_state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng_state["cuda"])
    elif dist.is_main:
        logger.warning(f"{path} has no RNG state for rank {dist.rank} (it was saved by {state.get('world_size')} "
                       "rank(s)); dropout will differ from the interrupted run, the data order will not")


# ----------------------------------------------------------------- FSDP (torch.distributed.checkpoint)


def sharded(model) -> bool:
    """Whether ``model``'s parameters are FSDP shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _save_sharded(tmp: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer)
    dcp.save({"model": weights, "optim": optim}, checkpoint_id=str(tmp / "dcp"))


def _load_sharded(path: Path, model, optimizer) -> None:
    """Weights and AdamW state from a checkpoint saved on any number of processes, resharded for this run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    weights, optim = get_state_dict(model, optimizer)  # this run's layout, AdamW state initialised
    dcp.load({"model": weights, "optim": optim}, checkpoint_id=str(path / "dcp"))  # fills them in place
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim)
