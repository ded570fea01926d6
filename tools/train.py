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
from pathlib import Path

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from backbone.errors import DataError
from backbone.training.checkpoint import RunInfoCallback
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
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise DataError(cfg.ckpt_path, "checkpoint to resume from not found", "fix ckpt_path= or drop it")
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

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    if not cfg.get("evaluate_after_fit", True):
        return {}
    ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    log.info("evaluating %s on the whole val set", ckpt or "the final weights")
    trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt or None, verbose=False)
    return report(module, trainer, out_dir)


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_cli(train, cfg)


if __name__ == "__main__":
    main()
