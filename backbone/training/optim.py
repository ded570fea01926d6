"""Learning-rate schedules and weight-decay parameter groups shared by detection and segmentation.

Optimizers are plain ``torch.optim`` classes chosen in the config (``conf/model/optimizer/*.yaml``,
``_partial_: true``); schedules are the classes below (``conf/model/scheduler/*.yaml``), built by
:class:`backbone.training.task_module.TaskModule` as ``scheduler(optimizer, total_steps=...)``.

Schedules are step-based (stepped every optimizer step, ``total_steps`` =
``trainer.estimated_stepping_batches``) so that warmup and decay do not depend on the epoch length.
Each is a multiplier of the base LR: a linear warmup from ``warmup_factor`` to 1 over the first
``warmup_steps`` (or ``round(warmup_fraction * total_steps)``) steps, then the decay of the class.
They subclass :class:`torch.optim.lr_scheduler.LRScheduler` with a ``get_lr`` of plain arithmetic,
so ``state_dict()`` holds numbers only and a checkpoint resumes the schedule where it stopped.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from backbone.errors import ArgumentError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split parameters so that biases and norm weights get no weight decay."""
    decay, no_decay = [], []
    for module in model.modules():
        is_norm = isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm))
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if name == "bias" or is_norm:
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _number(arg: str, value: Any, lo: float, hi: float = math.inf, integer: bool = False,
            lo_open: bool = False, example: str = "") -> float:
    """`value` checked to lie in [lo, hi] (or (lo, hi] with lo_open); ArgumentError naming `arg` otherwise."""
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if not (ok and (value > lo if lo_open else value >= lo) and value <= hi):  # NaN fails both comparisons
        bounds = f"{'>' if lo_open else '>='} {lo:g}" + (f" and <= {hi:g}" if hi != math.inf else "")
        raise ArgumentError(arg, f"must be {'an integer' if integer else 'a number'} {bounds}, got {value!r}",
                            example)
    return value


class _WarmupSchedule(LRScheduler):
    """Linear warmup then :meth:`decay`; ``warmup_steps`` > 0 wins over ``warmup_fraction``."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 warmup_fraction: float = 0.0, warmup_factor: float = 0.001, last_epoch: int = -1) -> None:
        self.total_steps = int(_number("total_steps", total_steps, 1, integer=True,
                                       example="the number of optimizer steps of the run"))
        _number("warmup_steps", warmup_steps, 0, integer=True, example="e.g. 1000, or 0 for none")
        _number("warmup_fraction", warmup_fraction, 0, 1, example="e.g. 0.05 (5% of the steps), or 0 for none")
        self.warmup_factor = float(_number("warmup_factor", warmup_factor, 0, 1,
                                           example="the LR multiplier at step 0, e.g. 0.001"))
        self.warmup_steps = int(warmup_steps) or round(float(warmup_fraction) * self.total_steps)
        super().__init__(optimizer, last_epoch)

    def decay(self, step: int, progress: float) -> float:
        """The LR multiplier after warmup; progress: 0 at the end of warmup .. 1 at total_steps."""
        raise NotImplementedError

    def factor(self, step: int) -> float:
        """Multiplier of the base LR at optimizer step `step` (0-based)."""
        warmup = self.warmup_steps
        if warmup > 0 and step < warmup:
            return self.warmup_factor + (1.0 - self.warmup_factor) * step / warmup
        progress = min(1.0, (step - warmup) / max(1, self.total_steps - warmup))
        return self.decay(step, progress)

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        return [base_lr * f for base_lr in self.base_lrs]


class WarmupCosineLR(_WarmupSchedule):
    """Warmup, then cosine decay from 1 to ``min_factor`` at ``total_steps``."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 warmup_fraction: float = 0.0, warmup_factor: float = 0.001, min_factor: float = 0.0,
                 last_epoch: int = -1) -> None:
        self.min_factor = float(_number("min_factor", min_factor, 0, 1, example="e.g. 0 (decay to zero)"))
        super().__init__(optimizer, total_steps, warmup_steps, warmup_fraction, warmup_factor, last_epoch)

    def decay(self, step: int, progress: float) -> float:
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupPolyLR(_WarmupSchedule):
    """Warmup, then ``(1 - progress) ** power`` (TF DeepLab's poly schedule, power 0.9)."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 warmup_fraction: float = 0.0, warmup_factor: float = 0.001, power: float = 0.9,
                 last_epoch: int = -1) -> None:
        self.power = float(_number("power", power, 0, lo_open=True, example="e.g. 0.9"))
        super().__init__(optimizer, total_steps, warmup_steps, warmup_fraction, warmup_factor, last_epoch)

    def decay(self, step: int, progress: float) -> float:
        return (1.0 - progress) ** self.power


class WarmupExponentialLR(_WarmupSchedule):
    """Warmup, then TF's staircase exponential decay: ``decay_rate ** ((step - warmup) // decay_steps)``."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 warmup_fraction: float = 0.0, warmup_factor: float = 0.001, decay_rate: float = 0.95,
                 decay_steps: int = 1000, last_epoch: int = -1) -> None:
        self.decay_rate = float(_number("decay_rate", decay_rate, 0, 1, lo_open=True, example="e.g. 0.95"))
        self.decay_steps = int(_number("decay_steps", decay_steps, 1, integer=True, example="e.g. 1000"))
        super().__init__(optimizer, total_steps, warmup_steps, warmup_fraction, warmup_factor, last_epoch)

    def decay(self, step: int, progress: float) -> float:
        return self.decay_rate ** ((step - self.warmup_steps) // self.decay_steps)


class WarmupConstantLR(_WarmupSchedule):
    """Warmup, then the base LR unchanged."""

    def decay(self, step: int, progress: float) -> float:
        return 1.0
