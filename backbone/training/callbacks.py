"""Lightning callbacks shared by both tasks."""
from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger("mnv2")


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


class GracefulStop(pl.Callback):
    """SIGTERM (SLURM, spot instances, ``kill``) or SIGINT (Ctrl-C): finish the current batch, write
    ``checkpoints/last.ckpt`` (mid-epoch, exactly resumable) and stop; ``tools/train.py`` then logs how
    to resume and exits with 128 + the signal number (143 / 130), without a traceback.

    Lightning's own SIGTERM handler (its ``_SignalConnector``) is kept: it only sets
    ``trainer.received_sigterm``, which this callback acts on, and SLURM auto-requeue (SIGUSR1: an HPC
    checkpoint and ``scontrol requeue``) works as before. SIGINT is routed to the same handler for the
    duration of ``fit`` instead of Lightning's KeyboardInterrupt, which stops without a checkpoint.

    Args:
        stop_at_step: behave as if a SIGTERM arrived after this global step (preemption drills, tests);
            None: only on a signal.
    """

    LAST = "last.ckpt"

    def __init__(self, stop_at_step: int | None = None) -> None:
        self.stop_at_step = None if stop_at_step is None else int(stop_at_step)
        self.reason: str | None = None  # what stopped the run: SIGTERM | SIGINT | stop_at_step=N
        self.saved_path: Path | None = None
        self.saved_step: int | None = None
        self._old_sigint: Any = None

    @property
    def exit_code(self) -> int:
        """What the process should exit with after the stop: 128 + signal (shell convention), 0 for a drill."""
        return {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}.get(self.reason or "", 0)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.reason, self.saved_path, self.saved_step = None, None, None
        if threading.current_thread() is threading.main_thread():
            self._old_sigint = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._on_sigint)
        if trainer.is_global_zero:
            log.info("training: SIGTERM or Ctrl-C stops after the current batch with a resumable checkpoint")

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.reason = self.reason or "SIGINT"
        handler = signal.getsignal(signal.SIGTERM)  # Lightning's: marks the trainer, forwards to DDP workers
        if callable(handler):
            handler(signum, frame)

    def _restore_sigint(self) -> None:
        if self._old_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._old_sigint)
        self._old_sigint = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.stop_at_step is not None and trainer.global_step >= self.stop_at_step and not trainer.received_sigterm:
            self.reason = f"stop_at_step={self.stop_at_step}"
            trainer._signal_connector.received_sigterm = True  # Lightning stops after this batch (all ranks alike)
        if not trainer.received_sigterm or self.saved_path is not None:
            return
        if trainer.world_size > 1 and not (self.reason or "").startswith("stop_at_step"):
            # a real signal under DDP reaches the ranks at different steps: Lightning broadcasts rank 0's flag
            # at the next step and stops every rank there; the checkpoint is written then (on_exception)
            return
        self._save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking
        if isinstance(exception, SIGTERMException) and self.saved_path is None and fitting:
            self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint()

    def _save(self, trainer: pl.Trainer) -> None:
        self.reason = self.reason or "SIGTERM"
        ckpt_cb = trainer.checkpoint_callback
        dirpath = getattr(ckpt_cb, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        path = Path(dirpath) / self.LAST
        trainer.save_checkpoint(path)  # every rank takes part; rank 0 writes (atomically: AtomicCheckpointIO)
        if ckpt_cb is not None and hasattr(ckpt_cb, "last_model_path"):
            ckpt_cb.last_model_path = str(path)
        self.saved_path, self.saved_step = path, trainer.global_step
        loop = trainer.fit_loop.epoch_loop
        if trainer.is_global_zero:
            log.info(f"stopped by {self.reason} at global step {trainer.global_step} (epoch {trainer.current_epoch}, "
                     f"batch {loop.batch_idx + 1} of {trainer.num_training_batches}): saved {path}")
