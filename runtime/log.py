"""What a run reports: ``metrics.jsonl``, the trackers asked for, a progress bar, log lines.

Only rank 0 writes. ``metrics.jsonl`` holds one JSON object per line
(:func:`tunec.compiler.fileio.compact_json`: keys sorted, no spaces); a
training record and an evaluation record look like::

    {"elapsed_s":3.1,"epoch":0.12,"grad_norm":1.9,"loss":6.2,"lr":0.0003,"step":2,"tokens":8080,
     "tokens_per_s":2615.0,"trained_tokens":988}
    {"eval_loss":{"all":4.9,"arithmetic":5.1,"reviews":4.4},"eval_tokens":{...},"step":34}

``tokens`` and ``trained_tokens`` count from the start of the stage (padding
excluded); ``tokens_per_s`` is non-padding tokens per second since the
previous record. Every record also goes to the trackers asked for
(TensorBoard, W&B, MLflow: :mod:`tunec.runtime.loggers`). Besides the bar,
about ten lines per stage report the loss (every tenth of the steps); they go
to the ``logging`` logger ``tunec.runtime.log`` at level INFO, which the
``tunec`` command prints on stdout. On resume, records after the checkpoint's
step are dropped, so the file reads as if the run had never stopped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from tunec.compiler.fileio import atomic_write_text, compact_json

from . import loggers

METRICS = "metrics.jsonl"

logger = logging.getLogger(__name__)


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None, total_steps: int,
                 start_step: int, desc: str, progress: bool, trackers: Sequence[str] = (), config: dict | None = None):
        """``trackers``: names from :func:`tunec.runtime.loggers.requested`; ``config``: the
        stage's settings, recorded by the trackers that keep parameters (W&B, MLflow)."""
        self.enabled = enabled
        self.total_steps = total_steps
        self.first_loss: tuple[int, float] | None = None  # (step, loss) of the first record of this run
        self.last_loss: float | None = None
        self.path = run_dir / METRICS
        self._trackers: list[loggers.Tracker] = []
        self._bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip() and json.loads(line).get("step", 0) <= resume_step:
                    kept.append(line)
        # atomic: a kill while this rewrites the records kept on resume must not lose them
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self._trackers = loggers.open_trackers(list(trackers), run_dir, desc, config or {}, resume_step)
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True)

    def write(self, record: dict) -> None:
        if "loss" in record:
            self.first_loss = self.first_loss or (record["step"], record["loss"])
            self.last_loss = record["loss"]
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(compact_json(record) + "\n")
        if self._trackers:
            values = loggers.scalars(record)
            for tracker in self._trackers:
                tracker.log(values, record["step"])
        if "loss" in record:
            if self._bar is not None:
                self._bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                      refresh=False)
            step = record["step"]
            if step == 1 or step * 10 // self.total_steps > (step - 1) * 10 // self.total_steps:
                # preference stages (runtime/preference.py) also show how often chosen beats rejected
                reward = (f", rewards/accuracies {record['rewards/accuracies']:.2f}, rewards/margins "
                          f"{record['rewards/margins']:.3f}" if "rewards/accuracies" in record else "")
                self.note(f"step {step}/{self.total_steps}: loss {record['loss']:.4f}{reward}, lr {record['lr']:.2e}, "
                          f"{record['tokens_per_s']:,.0f} tokens/s")

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def note(self, text: str) -> None:
        """A line for the user (rank 0 only); the ``tunec`` command prints it above the progress bar."""
        if self.enabled:
            logger.info(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        loggers.close_all(self._trackers)
        self._trackers = []
