"""`TaskModule`: what the detection and segmentation LightningModules share.

The Lightning contract between a task and the entry points ``tools/train.py`` and ``tools/evaluate.py``
(which know no task; :mod:`backbone.training.runner` builds every object):

- ``cfg.model`` has ``_target_`` = the task's LightningModule (``mnv2det.lightning_module.SSDLiteModule``,
  ``mnv2seg.lightning_module.DeepLabModule``), a subclass of :class:`TaskModule`. It is built with
  ``hydra.utils.instantiate(cfg.model, _convert_="all")`` (recursive): the architecture settings arrive
  as plain values, lists and dicts (``backbone: {...}``, ...), while ``optimizer`` and ``scheduler``
  are ``_target_`` nodes with ``_partial_: true`` (groups ``conf/model/optimizer``,
  ``conf/model/scheduler``) and arrive as ``functools.partial`` objects:
  ``optimizer(params)`` -> a ``torch.optim.Optimizer``, ``scheduler(optimizer, total_steps=N)`` -> a
  step-based schedule of :mod:`backbone.training.optim`. Either may be None (a module built only to
  evaluate, e.g. an imported TF model); training one without an optimizer fails with a ConfigError.
- The module calls ``save_hyperparameters`` without the two partials, so ``checkpoint["hyper_parameters"]``
  stays plain data; the whole run config (optimizer and scheduler nodes included) travels in
  ``checkpoint["mnv2"]`` (:mod:`backbone.training.checkpoint`), from which ``tools/evaluate.py``
  rebuilds the model.
- ``cfg.model.backbone.pretrained`` exists (evaluate sets it to ``none`` before loading the weights).
- ``cfg.data`` has ``_target_`` = the task's LightningDataModule
  (:class:`backbone.training.datamodule.TaskDataModule`). After ``setup()`` it exposes ``meta: dict``
  with at least ``class_names: list[str]`` and ``num_classes: int`` (det: also ``category_ids``, the
  dataset's ids of contiguous labels 1..K; seg: also ``palette``). The module reads it as
  :attr:`TaskModule.meta` (``self.trainer.datamodule.meta``) when it needs names or ids, and its
  ``setup()`` refuses a ``model.num_classes`` different from ``meta["num_classes"]``.
- After a validation epoch the module has ``evaluation_metrics() -> dict[str, float]``,
  ``evaluation_report() -> str`` (the table the tools print) and ``save_evaluation(out_dir)`` (writes
  ``metrics.json`` and the task's extra files); before one, each raises RuntimeError. Setting
  ``predictions_dir`` (``tools/evaluate.py save_predictions=true``) makes the task write its pictures
  there.
- Metric keys are logged as ``val/<name>`` (det: ``val/map``, ``val/map_50``, ...; seg: ``val/miou``,
  ...); ``cfg.monitor.metric`` names the one checkpoints are chosen by.
- Under DDP, val loaders use :func:`backbone.training.dataloader.eval_sampler` (every image on exactly
  one rank); the module gathers (det: detections, ``all_gather_object``) or sums (seg: confusion
  matrix) across ranks, so every rank holds the whole val set's metrics. ``tests/test_ddp.py`` checks a
  real 2-process CPU run against a single-process evaluation of the same checkpoint.
"""
from __future__ import annotations

import abc
import random
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist

from backbone.errors import ArgumentError, ConfigError, Mnv2Error
from backbone.fuse import InferenceCopy
from backbone.training.dataloader import restore_loader_states
from backbone.training.optim import param_groups

NO_EVALUATION = "no validation epoch has finished yet: run trainer.validate(...) first"
#: checkpoint entry with every rank's RNG states (python, numpy, torch, cuda) at save time
RNG_KEY = "mnv2_rng"


class NonFiniteLossError(Mnv2Error):
    """The training loss became NaN or Inf (printed as one ``error:`` line by the tools)."""


def rng_states() -> dict[str, Any]:
    """This process's RNG states as plain data (loadable with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state(),
                              "numpy": (str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                                        int(has_gauss), float(gauss))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in states["python"]))
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def batch_ids(batch: Any) -> list[Any]:
    """The images of a training batch, as the data names them (det: ``image_ids``; seg: ``names``)."""
    if not isinstance(batch, Mapping):
        return []
    for key in ("image_ids", "names"):
        ids = batch.get(key)
        if ids is not None:
            return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return []


def _factory(arg: str, value: Any) -> Callable[..., Any] | None:
    """The partial itself; None for None or an old-style ``{name: ...}`` dict (checkpoints written
    before optimizers became ``_target_`` nodes: still fine to evaluate, not to train)."""
    if value is None or isinstance(value, Mapping):
        return None
    if not callable(value):
        raise ArgumentError(arg, f"must be a partial (a config node with _target_ and _partial_: true), got {value!r}",
                            f"e.g. model/{arg}={'adamw' if arg == 'optimizer' else 'cosine'}")
    return value


def _call(arg: str, factory: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``factory(*args, **kwargs)``; its errors become ArgumentErrors of the argument ``arg``."""
    try:
        return factory(*args, **kwargs)
    except ArgumentError as e:
        raise e.under(arg) from None
    except (TypeError, ValueError) as e:
        target = getattr(factory, "func", factory)
        raise ArgumentError(arg, f"cannot build {getattr(target, '__qualname__', target)}: {e}",
                            f"check the keys under model.{arg} (python tools/train.py --cfg job shows them)") from None


class TaskModule(pl.LightningModule, abc.ABC):
    """Base of the tasks' LightningModules: optimizer + schedule, class-count check, evaluation contract.

    A subclass calls ``super().__init__(optimizer, scheduler)`` first (its own ``__init__`` arguments
    become the hyper-parameters), builds ``self.model`` and sets ``self.num_classes``, stores the last
    validation epoch's results in ``self._metrics`` and implements the three evaluation hooks.

    Args:
        optimizer: ``partial(torch.optim.X, lr=..., weight_decay=..., ...)``; called with
            :func:`~backbone.training.optim.param_groups` (``weight_decay`` on weights, 0 on biases
            and norm weights). None: the module cannot be trained.
        scheduler: ``partial(ScheduleClass, ...)`` of :mod:`backbone.training.optim`, called with
            ``total_steps=trainer.estimated_stepping_batches`` and stepped every optimizer step.
            None: constant LR.
    """

    #: what ``num_classes`` counts, for the mismatch message
    num_classes_meaning: str = "classes"
    #: the model's class count, set by the subclass
    num_classes: int

    def __init__(self, optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None) -> None:
        super().__init__()
        # collects the subclass's __init__ arguments too (Lightning walks the constructor frames)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer_factory = _factory("optimizer", optimizer)
        self.scheduler_factory = _factory("scheduler", scheduler)
        self._check_factories()
        self._metrics: dict[str, Any] | None = None  # the last validation epoch's results
        #: set by ``tools/evaluate.py save_predictions=true``: the task writes its pictures there
        self.predictions_dir: Path | None = None
        #: non-finite loss check: "step" (a host check before every backward; the default on CPU, where
        #: it is free), "deferred" (a device-side flag read every ``trainer.log_every_n_steps`` steps and
        #: before every checkpoint save: no host sync per step; the default on GPUs), or None (auto)
        self.nonfinite_check: str | None = None
        self._bad_step: torch.Tensor | None = None  # deferred: first global step with a non-finite loss, or -1
        self._recent_ids: deque[tuple[int, int, list[Any]]] = deque(maxlen=64)  # (step, batch_idx, ids)
        self._rng_to_restore: Mapping[str, Any] | None = None
        self._inference_copy = InferenceCopy()

    def inference_model(self) -> torch.nn.Module:
        """``self.model`` for evaluation and prediction: eval mode, BatchNorm folded into the convs
        (:mod:`backbone.fuse`), rebuilt when the weights change. Training uses ``self.model``."""
        return self._inference_copy.get(self.model)

    # ------------------------------------------------------------------------------ optimiser
    @property
    def weight_decay(self) -> float:
        """The optimizer node's ``weight_decay`` (0 if absent), applied per parameter group."""
        return float(getattr(self.optimizer_factory, "keywords", {}).get("weight_decay", 0.0))

    def _check_factories(self) -> None:
        """Build the optimizer and schedule once on a dummy parameter: bad settings fail at start-up."""
        if self.optimizer_factory is None:
            return
        if "lr" not in getattr(self.optimizer_factory, "keywords", {}):  # Hydra drops `lr: ???` from partials
            raise ArgumentError("optimizer.lr", "is not set", "e.g. model.optimizer.lr=0.01 (it depends on the "
                                "task and the total batch)")
        optimizer = _call("optimizer", self.optimizer_factory, [torch.nn.Parameter(torch.zeros(1))])
        if self.scheduler_factory is not None:
            _call("scheduler", self.scheduler_factory, optimizer, total_steps=1)

    def configure_optimizers(self) -> dict[str, Any]:
        if self.optimizer_factory is None:
            raise ConfigError("model.optimizer", "is not set: this module was built for evaluation only",
                              "train with an optimizer node, e.g. model/optimizer=adamw")
        optimizer = self.optimizer_factory(param_groups(self.model, self.weight_decay))
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------- non-finite loss guard
    def _check_mode(self, loss: torch.Tensor) -> str:
        return self.nonfinite_check or ("step" if loss.device.type == "cpu" else "deferred")

    def _nonfinite_error(self, step: int, value: str) -> NonFiniteLossError:
        found = [(b, ids) for s, b, ids in self._recent_ids if s == step]
        batch, ids = found[-1] if found else (None, [])
        ids = batch_ids(ids)
        shown = ", ".join(str(i) for i in ids[:16]) + (", ..." if len(ids) > 16 else "")
        where = f"global step {step}" + (f" (epoch {self.current_epoch}, batch {batch})" if batch is not None else "")
        ckpt = getattr(self.trainer.checkpoint_callback, "dirpath", None) if self._trainer is not None else None
        keep = f"; the last good checkpoint is kept in {ckpt} (resume with ckpt_path=last)" if ckpt else ""
        return NonFiniteLossError(f"training loss is {value} at {where}, batch images: [{shown}]; training stopped, "
                                  f"these weights were not saved{keep} -- fix: lower model.optimizer.lr, set "
                                  "trainer.gradient_clip_val (e.g. 1.0), or check those images and their labels")

    def on_before_backward(self, loss: torch.Tensor) -> None:
        step = self.trainer.global_step
        if self._check_mode(loss) == "step":
            # before backward: the optimizer never sees it, the weights stay those of the last good step
            if not bool(torch.isfinite(loss.detach()).all()):
                raise self._nonfinite_error(step, str(loss.detach().float().sum().item()))
            return
        bad = ~torch.isfinite(loss.detach()).all()
        if self._bad_step is None or self._bad_step.device != loss.device:
            self._bad_step = torch.full((), -1, dtype=torch.int64, device=loss.device)
        # the first bad step stays recorded; no .item(): no host sync
        self._bad_step = torch.where(bad & (self._bad_step < 0), torch.full_like(self._bad_step, step), self._bad_step)

    def check_finite_loss(self) -> None:
        """Raise :class:`NonFiniteLossError` if the deferred flag recorded a non-finite loss (one sync)."""
        if self._bad_step is not None:
            step = int(self._bad_step.item())
            if step >= 0:
                raise self._nonfinite_error(step, "non-finite (NaN or Inf)")

    def on_train_start(self) -> None:
        restore_loader_states(self.trainer)  # a resumed run continues at the checkpoint's batch
        # deferred checks look back up to log_every_n_steps steps (x accumulation) for the bad batch's ids
        span = max(1, self.trainer.log_every_n_steps) * max(1, self.trainer.accumulate_grad_batches)
        self._recent_ids = deque(maxlen=2 * span + 2)
        self._bad_step = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # the ids object as is (a device tensor stays unread: no sync); read only for an error message
        ids = {k: batch[k] for k in ("image_ids", "names") if isinstance(batch, Mapping) and k in batch}
        self._recent_ids.append((self.trainer.global_step, batch_idx, ids))
        if self._rng_to_restore is not None:  # a resumed run: the RNG exactly where the saved run was
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._bad_step is not None and self.trainer.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.check_finite_loss()

    def on_train_epoch_end(self) -> None:
        self.check_finite_loss()

    # ---------------------------------------------------------------------- resume state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite_loss()  # never write weights a non-finite loss has touched
        states = rng_states()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)  # every rank runs the save (Lightning's dump_checkpoint)
            checkpoint[RNG_KEY] = {str(rank): s for rank, s in enumerate(gathered)}
        else:
            checkpoint[RNG_KEY] = {"0": states}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rank = str(dist.get_rank() if dist.is_available() and dist.is_initialized() else 0)
        # applied at the first training batch: validation and loader set-up before it draw nothing
        self._rng_to_restore = (checkpoint.get(RNG_KEY) or {}).get(rank)

    # --------------------------------------------------------------------------------- data
    def _datamodule(self) -> Any:
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    @property
    def meta(self) -> dict[str, Any]:
        """The datamodule's ``meta`` ({} without a trainer or datamodule)."""
        return getattr(self._datamodule(), "meta", None) or {}

    def check_num_classes(self, found: int | None) -> None:
        """Refuse a model whose class count differs from the data's (``found``; None: unknown)."""
        if found is None or found == self.num_classes:
            return
        names = list(self.meta.get("class_names") or [])
        shown = f" ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})" if names else ""
        raise ConfigError("model.num_classes", f"is {self.num_classes} but the data has {found} "
                          f"{self.num_classes_meaning}{shown}", f"set model.num_classes={found}")

    def setup(self, stage: str) -> None:
        self.check_num_classes(self.meta.get("num_classes"))

    # -------------------------------------------------------------------- evaluation contract
    def _evaluated(self) -> dict[str, Any]:
        if self._metrics is None:
            raise RuntimeError(NO_EVALUATION)
        return self._metrics

    def evaluation_metrics(self) -> dict[str, float]:
        """The headline metrics of the last validation epoch (what metrics.json starts with)."""
        return self._metrics_of(self._evaluated())

    def evaluation_report(self) -> str:
        """The table of the last validation epoch, as the tools print it."""
        return self._format_report(self._evaluated())

    def save_evaluation(self, out_dir: str | Path) -> Any:
        """Write ``out_dir/metrics.json`` and the task's extra files."""
        results = self._evaluated()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        return self._write_evaluation(results, out_dir)

    @abc.abstractmethod
    def _metrics_of(self, results: dict[str, Any]) -> dict[str, float]:
        """``evaluation_metrics()`` from the stored results."""

    @abc.abstractmethod
    def _format_report(self, results: dict[str, Any]) -> str:
        """``evaluation_report()`` from the stored results."""

    @abc.abstractmethod
    def _write_evaluation(self, results: dict[str, Any], out_dir: Path) -> Any:
        """``save_evaluation()`` into the existing ``out_dir``."""
