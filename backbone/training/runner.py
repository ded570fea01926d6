"""What the entry points share: build objects from the Hydra config, the Trainer, the report, the
one-line error convention.

Everything is built with ``hydra.utils.instantiate`` through :func:`build`, the one place that
turns a component's :class:`~backbone.errors.ArgumentError` into a
:class:`~backbone.errors.ConfigError` naming the full config key. The flows themselves live in
``tools/train.py`` (``train(cfg)``) and ``tools/evaluate.py`` (``evaluate(cfg)``).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from backbone.errors import ArgumentError, ConfigError, Mnv2Error
from backbone.runtime import apply_runtime
from backbone.training.datamodule import TaskDataModule

log = logging.getLogger("mnv2")


def build(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """`instantiate(node)`, turning failures into one line that names the config key."""
    if node is None or "_target_" not in node:
        raise ConfigError(key, "is missing or has no _target_", f"choose one with {key.split('.')[0]}=NAME")
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, (Mnv2Error, ArgumentError)) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, ArgumentError):
            raise cause.to_config_error(key) from None
        if isinstance(cause, Mnv2Error):
            raise cause from None
        detail = str(cause or e).splitlines()[0] if (cause or e) else ""
        raise ConfigError(key, f"could not build {node.get('_target_')}: {detail}",
                          "check the keys under this config group (python tools/train.py --cfg job shows them)") from None


def resolve_precision(trainer_cfg: DictConfig) -> None:
    """`precision: auto` -> bf16-mixed on a GPU that has it, else 32-bit."""
    if str(trainer_cfg.get("precision", "auto")) != "auto":
        return
    on_gpu = str(trainer_cfg.get("accelerator", "auto")) in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    precision = "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else ("16-mixed" if on_gpu else "32-true")
    with open_dict(trainer_cfg):
        trainer_cfg.precision = precision


def build_group(group: DictConfig | None, key: str) -> list[Any]:
    out = []
    for name, node in (group or {}).items():
        if node is not None and "_target_" in node:
            out.append(build(node, f"{key}.{name}"))
    return out


def resolve_num_classes(cfg: DictConfig, datamodule: TaskDataModule) -> int:
    """The one place ``data.num_classes`` is settled: ``auto`` -> the data's class count (det: the val
    annotation file's categories, read as json; seg: data.class_names or VOC's 21), an explicit number
    checked against it. Writes it into ``cfg.data.num_classes`` (``model.num_classes`` reads it) and
    returns it; reads no image."""
    names, source = datamodule.resolve_classes()
    num_classes = len(names)
    with open_dict(cfg):
        cfg.data.num_classes = num_classes
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    log.info("%d classes from %s: %s", num_classes, source, shown)
    return num_classes


def check_trainer(trainer_cfg: DictConfig) -> None:
    """Refuse trainer settings that would only fail after the data is loaded (on every rank)."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if trainer_cfg.get("sync_batchnorm") and on_cpu:
        raise ConfigError("trainer.sync_batchnorm", "SyncBatchNorm runs only on GPUs, and this run is on the CPU",
                          "add trainer.sync_batchnorm=false (DDP on CPU: trainer=ddp trainer.accelerator=cpu "
                          "trainer.devices=2 trainer.precision=32 trainer.sync_batchnorm=false)")


def build_trainer(cfg: DictConfig, callbacks: list[pl.Callback], loggers: list[Any]) -> pl.Trainer:
    resolve_precision(cfg.trainer)
    return build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)


def output_dir() -> Path:
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not under @hydra.main (e.g. called from a test)
        return Path.cwd()


def report(module: pl.LightningModule, trainer: pl.Trainer, out_dir: Path) -> dict[str, float]:
    if not trainer.is_global_zero:
        return {}
    metrics = module.evaluation_metrics()
    print("\n" + module.evaluation_report(), flush=True)
    module.save_evaluation(out_dir)
    log.info("evaluation written to %s", out_dir)
    return metrics


def run_cli(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a tool's flow; known user errors become one ``error:`` line on stderr and exit code 2
    (no traceback). The convention of every tool in ``tools/``."""
    try:
        if args and isinstance(args[0], DictConfig):
            apply_runtime(args[0].get("runtime"))
        return fn(*args)
    except Mnv2Error as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
