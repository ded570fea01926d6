"""Optimizers and learning-rate schedules shared by detection and segmentation.

Schedules are step-based (called every optimizer step) so that warmup and decay do not depend
on the epoch length.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from backbone.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw", "rmsprop")
SCHEDULERS = ("cosine", "poly", "exponential", "constant")


def param_groups(model: nn.Module, weight_decay: float, norm_decay: bool = False) -> list[dict[str, Any]]:
    """Split parameters so that biases and norm weights get no weight decay (unless norm_decay)."""
    decay, no_decay = [], []
    for module in model.modules():
        is_norm = isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm))
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if name == "bias" or (is_norm and not norm_decay):
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(params: Iterable, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """cfg: {name: sgd|adamw|rmsprop, lr, weight_decay, momentum, ...}; params: param groups."""
    cfg = dict(cfg)
    name = str(cfg.pop("name", "sgd")).lower()
    lr = float(cfg.pop("lr"))
    if lr <= 0:
        raise ConfigError("model.optimizer.lr", f"must be > 0, got {lr}", "e.g. model.optimizer.lr=0.01")
    cfg.pop("norm_decay", None)
    cfg.pop("weight_decay", None)  # applied per group by param_groups
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.get("momentum", 0.9), nesterov=cfg.get("nesterov", False))
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.get("betas", (0.9, 0.999))))
    if name == "rmsprop":
        # TF's RMSProp: decay 0.9, momentum 0.9, epsilon 1.0 (TF adds eps inside the sqrt; close enough at eps=1)
        return torch.optim.RMSprop(params, lr=lr, alpha=cfg.get("alpha", 0.9), momentum=cfg.get("momentum", 0.9), eps=cfg.get("eps", 1.0))
    raise ConfigError("model.optimizer.name", f"unknown optimizer '{name}'", f"use one of {', '.join(OPTIMIZERS)}")


def lr_factor(step: int, total_steps: int, cfg: dict[str, Any]) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based) of `total_steps`.

    cfg: {name: cosine|poly|exponential|constant, warmup_steps | warmup_fraction, warmup_factor,
          power (poly), min_factor (cosine), decay_rate + decay_steps (exponential)}
    """
    name = str(cfg.get("name", "cosine")).lower()
    total = max(1, int(total_steps))
    warmup = int(cfg.get("warmup_steps", 0) or round(float(cfg.get("warmup_fraction", 0.0)) * total))
    if warmup > 0 and step < warmup:
        start = float(cfg.get("warmup_factor", 0.001))
        return start + (1.0 - start) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if name == "cosine":
        floor = float(cfg.get("min_factor", 0.0))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "poly":
        return (1.0 - progress) ** float(cfg.get("power", 0.9))
    if name == "exponential":
        return float(cfg.get("decay_rate", 0.95)) ** ((step - warmup) // max(1, int(cfg.get("decay_steps", 1000))))
    if name == "constant":
        return 1.0
    raise ConfigError("model.scheduler.name", f"unknown schedule '{name}'", f"use one of {', '.join(SCHEDULERS)}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: dict[str, Any], total_steps: int) -> dict[str, Any]:
    """A Lightning `lr_scheduler` dict stepping every optimizer step."""
    lr_factor(0, total_steps, cfg)  # validate the name now, not at the first step
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))
    return {"scheduler": sched, "interval": "step", "frequency": 1}
