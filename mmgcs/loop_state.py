"""What the training loop carries from epoch to epoch (``LoopState``): its epoch records, the best epoch and early
stopping's count, saved in every checkpoint as ``trainer_state.json`` (checked by ``mmgcs.runs.checkpoints``
before a resume reads it back here)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mmgcs.runs.checkpoints import STATE_FILE

logger = logging.getLogger("mmgcs.runs")  # the name these lines had before LoopState left mmgcs.runs


@dataclass
class LoopState:
    """What the training loop carries from epoch to epoch; each checkpoint saves it as trainer_state.json."""

    history: list = field(default_factory=list)  # one record per epoch run
    best_metric: Optional[float] = None
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best one (early stopping)
    global_step: int = 0

    def track_best(self, value: Optional[float], epoch: int, higher: bool) -> bool:
        """Early stopping's bookkeeping after ``epoch``: True when ``value`` is the best so far (a missing or NaN
        value is the worst)."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            value = -math.inf if higher else math.inf
        better = self.best_metric is None or (value > self.best_metric if higher else value < self.best_metric)
        if better:
            self.best_metric, self.best_epoch, self.bad_epochs = float(value), epoch, 0
        else:
            self.bad_epochs += 1
        return better

    def should_stop(self, max_steps: int, patience: int, metric: str) -> bool:
        """After an epoch: the step budget (``train.max_steps``) is spent, or ``patience`` epochs brought no
        improvement of ``metric`` (early stopping)."""
        stop = False
        if max_steps and self.global_step >= max_steps:
            logger.info("Reached train.max_steps=%d", max_steps)
            stop = True
        if patience and self.bad_epochs >= patience:
            logger.info("Early stopping: no %s improvement for %d epochs", metric, self.bad_epochs)
            stop = True
        return stop

    def to_json(self, epoch: int, epochs: int, metric_for_best: str) -> dict:
        return {
            "epoch": epoch,
            "epochs": epochs,  # the run's plan: a checkpoint past it is refused on resume
            "global_step": self.global_step,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "metric_for_best": metric_for_best,
            "history": self.history,
        }

    @classmethod
    def from_checkpoint(cls, folder: Path) -> tuple["LoopState", int]:
        """The state saved in a checkpoint verified by ``pick_checkpoint``, and the epochs it had done."""
        state = json.loads((Path(folder) / STATE_FILE).read_text(encoding="utf-8"))
        loop = cls(list(state["history"]), state["best_metric"], int(state["best_epoch"]), int(state["bad_epochs"]),
                   int(state["global_step"]))
        return loop, int(state["epoch"])

    def resumed_at(self, done: int, epochs: int, patience: int, folder: Path) -> int:
        """The epoch a run resumed from ``folder`` after ``done`` epochs continues with: past its plan when it had
        stopped early (``patience`` epochs without improvement)."""
        logger.info("Resumed from %s (epoch %d done, best %s at epoch %d)", folder, done, self.best_metric,
                    self.best_epoch)
        if done >= epochs:
            logger.info("The checkpointed run already finished its %d epochs; re-evaluating the best model", epochs)
        return epochs if patience and self.bad_epochs >= patience else done
