"""Experiment trackers: TensorBoard, Weights & Biases and MLflow, behind one small interface.

``metrics.jsonl`` is always written (:mod:`tunec.runtime.log`); a tracker is
used only when asked for, by ``tunec run --log NAME`` (repeatable) or the
environment variable ``TUNEC_LOG`` (names separated by commas or spaces),
and only when its package is installed. One that is asked for but missing
stops the run before anything is trained, with one line saying what to
install. Each tracker receives every record of ``metrics.jsonl`` as scalars
named the same way in all three::

    {"step": 4, "loss": 2.1, "lr": 0.003, ...}        ->  train/loss, train/lr, ...      at step 4
    {"step": 4, "eval_loss": {"all": 2.4, "sums": 2.2}} ->  eval_loss/all, eval_loss/sums  at step 4

Where they write:

- ``tensorboard``: event files in ``runs/<stage>/tensorboard/``; a resumed run
  drops the events after the checkpoint's step, as ``metrics.jsonl`` does.
- ``wandb``: a W&B run per stage and invocation, named after the stage, in the
  project ``WANDB_PROJECT`` (default ``tunec``), local files under
  ``runs/<stage>/wandb/``; ``WANDB_MODE=offline`` works as usual.
- ``mlflow``: an MLflow run per stage and invocation, named after the stage, in
  the experiment ``MLFLOW_EXPERIMENT_NAME`` (default ``tunec``) of the
  tracking server ``MLFLOW_TRACKING_URI`` (MLflow's own default without it);
  the stage's scalar settings are its parameters.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import time
from pathlib import Path
from typing import Protocol

from tunec.compiler.errors import TunecError, did_you_mean

ENV = "TUNEC_LOG"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # name -> module to import
INSTALL = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}  # name -> pip package


def requested(flags: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The trackers asked for (``--log`` flags, then ``TUNEC_LOG``), each once, all installed.

    A name that is not a tracker, or one whose package is missing, is a user
    error: all of them are reported together, before any training.
    """
    from_env = [n for n in re.split(r"[,\s]+", os.environ.get(ENV, "")) if n]
    names = list(dict.fromkeys([*flags, *from_env]))
    problems = []
    for name in names:
        if name not in PACKAGES:
            problems.append(f"--log/{ENV}: unknown logger '{name}'{did_you_mean(name, PACKAGES)}; "
                            f"choose from {', '.join(PACKAGES)}")
        elif importlib.util.find_spec(PACKAGES[name]) is None:
            problems.append(f"--log {name}: the `{PACKAGES[name]}` package is not installed; "
                            f"`pip install {INSTALL[name]}`, or do not ask for it")
    if problems:
        raise TunecError(problems)
    return names


def scalars(record: dict) -> dict[str, float]:
    """A ``metrics.jsonl`` record as named scalars (``step`` excluded).

    >>> scalars({"step": 3, "loss": 1.5, "eval_loss": {"all": 2.0}})
    {'train/loss': 1.5, 'eval_loss/all': 2.0}
    """
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update({f"{key}/{sub}": float(v) for sub, v in value.items()})
        elif key != "step":
            out[f"train/{key}"] = float(value)
    return out


class Tracker(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self, failed: bool) -> None: ...


class TensorBoard:
    def __init__(self, run_dir: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events the interrupted run wrote after its checkpoint.
        self.writer = SummaryWriter(str(run_dir / "tensorboard"),
                                    purge_step=resume_step + 1 if resume_step is not None else None)

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, stage: str, config: dict):
        import wandb

        # console="off": W&B would otherwise wrap stdout/stderr, under the progress bar and our log lines.
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "tunec", name=stage, dir=str(run_dir),
                              config=config, settings=wandb.Settings(console="off"), reinit="create_new")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MLflow:
    def __init__(self, stage: str, config: dict):
        from mlflow.tracking import MlflowClient

        # The client, not mlflow's module-level "active run": a caller's own MLflow run stays untouched.
        self.client = MlflowClient()
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "tunec"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=stage).info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in config.items() if isinstance(v, (int, float, str, bool))]
        if params:
            self.client.log_batch(self.run_id, params=params)

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def open_trackers(names: list[str], run_dir: Path, stage: str, config: dict,
                  resume_step: int | None) -> list[Tracker]:
    """The trackers ``names`` (from :func:`requested`) for one stage, opened (rank 0 only)."""
    made: list[Tracker] = []
    try:
        for name in names:
            try:
                if name == "tensorboard":
                    made.append(TensorBoard(run_dir, resume_step))
                elif name == "wandb":
                    made.append(WandB(run_dir, stage, config))
                elif name == "mlflow":
                    made.append(MLflow(stage, config))
            except Exception as exc:  # not logged in, no tracking server...: the user's setup, said in one line
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise TunecError(f"--log {name}: cannot start it: {first}") from None
    except BaseException:
        for tracker in made:
            tracker.close(failed=True)
        raise
    return made


def close_all(trackers: list[Tracker]) -> None:
    # Called from a `finally`: an exception on its way out means the run failed.
    failed = sys.exc_info()[0] is not None
    for tracker in trackers:
        tracker.close(failed)
