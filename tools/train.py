#!/usr/bin/env python
"""Train a model: `python tools/train.py [task=det|seg] [experiment=NAME] [key=value ...]`.

The default trains SSDLite on the synthetic set (generated on first use), evaluates the best
checkpoint on the whole val set and prints the COCO table; `task=seg` does the same for Mobile
DeepLabv3 with mIoU. Everything is built from `conf/` with `hydra.utils.instantiate`.

`data.num_classes: auto` (the default) takes the class count from the data before the model is
built (:func:`resolve_num_classes`), so any COCO-format set trains without setting it.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from backbone.errors import DataError
from backbone.training.callbacks import GracefulStop
from backbone.training.checkpoint import RunInfoCallback, find_last_checkpoint
from backbone.training.config_checks import check_config
from backbone.training.runner import (
    build,
    build_group,
    build_trainer,
    check_trainer,
    output_dir,
    report,
    resolve_num_classes,
    run_cli,
)

log = logging.getLogger("mnv2")


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured model on the configured data, then evaluate the best checkpoint."""
    out_dir = output_dir()
    check_trainer(cfg.trainer)
    resolve_ckpt_path(cfg, out_dir)
    check_config(cfg)  # bad values fail here, before any model, weights or data
    pl.seed_everything(int(cfg.seed), workers=True)
    log.info("seed %d, run dir %s", int(cfg.seed), out_dir)

    # The data's classes (no image read), then the model: it validates its own config and loads its
    # weights before any image is read or a synthetic set generated.
    datamodule = build(cfg.data, "data")
    resolve_num_classes(cfg, datamodule)
    module = build(cfg.model, "model")
    config = OmegaConf.to_container(cfg, resolve=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))

    callbacks = build_group(cfg.get("callbacks"), "callbacks")
    callbacks.append(RunInfoCallback(cfg.task_name, {"model": config["model"], "data": config["data"]}))
    loggers = build_group(cfg.get("logger"), "logger")
    if not loggers:  # logger=none: the LR monitor needs a logger
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    trainer = build_trainer(cfg, callbacks, loggers)

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except SIGTERMException:
        stop = next((c for c in trainer.callbacks if isinstance(c, GracefulStop)), None)
        if trainer.is_global_zero:
            saved = stop.saved_path if stop is not None else None
            log.info("training stopped (%s)%s; resume with: %s", getattr(stop, "reason", None) or "SIGTERM",
                     f", checkpoint {saved}" if saved else ", no checkpoint written",
                     resume_command(saved) if saved else "(nothing to resume from)")
        sys.exit(stop.exit_code if stop is not None else 128 + 15)
    if not cfg.get("evaluate_after_fit", True):
        return {}
    ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    log.info("evaluating %s on the whole val set", ckpt or "the final weights")
    trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt or None, verbose=False)
    return report(module, trainer, out_dir)


def resolve_ckpt_path(cfg: DictConfig, out_dir: Path) -> None:
    """``ckpt_path=last`` -> the newest last.ckpt of this task's earlier runs (logged); a path must exist."""
    ckpt = cfg.get("ckpt_path")
    if not ckpt:
        return
    if str(ckpt) == "last":
        found = find_last_checkpoint(cfg.paths.log_dir, cfg.task_name, exclude=out_dir)
        log.info("ckpt_path=last: resuming from %s", found)
        with open_dict(cfg):
            cfg.ckpt_path = str(found)
    elif not Path(ckpt).is_file():
        raise DataError(ckpt, "checkpoint to resume from not found", "fix ckpt_path= (a path, or last) or drop it")


def resume_command(saved: Path) -> str:
    """The command line that resumes this run from ``saved`` (this run's overrides, ckpt_path replaced)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [o for o in HydraConfig.get().overrides.task if not o.split("=")[0].lstrip("+~") == "ckpt_path"
                     and "stop_at_step" not in o.split("=")[0]]
    except ValueError:  # not under @hydra.main
        overrides = []
    return " ".join(["python tools/train.py", *overrides, f"ckpt_path={saved}"]) + "  (or ckpt_path=last)"


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_cli(train, cfg)


if __name__ == "__main__":
    main()
