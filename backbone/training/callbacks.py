"""Lightning callbacks shared by both tasks."""
from __future__ import annotations

import time

import lightning.pytorch as pl


class ElapsedTime(pl.Callback):
    """Logs `time/elapsed_min` (wall-clock minutes since fit start) with every validation epoch,
    so metric-against-minutes curves can be read from any logger (tools/results.py)."""

    def __init__(self) -> None:
        self.start: float | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # only during fit: the evaluation after fit (trainer.validate) is not a point of the curve
        if self.start is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        pl_module.log("time/elapsed_min", (time.perf_counter() - self.start) / 60.0, sync_dist=False, rank_zero_only=True)
