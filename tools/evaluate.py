#!/usr/bin/env python
"""Evaluate a checkpoint: `python tools/evaluate.py task=det|seg ckpt_path=CKPT [data=...]`.

Prints the task's table and writes metrics.json (det: also detections.json) into the run dir. With
save_predictions=true also RUN_DIR/predictions/: det, each val image with its detections drawn
(score >= 0.3, ground truth in white); seg, the predicted masks as VOC palette PNGs.

The model (architecture, classes, input normalisation and resize) comes from the checkpoint; `model.*`
overrides on the command line (`model.inference=mf`, `~model.x`, `+model.y=1`) are applied on top of it.
No `data.num_classes` is needed: the data's labels follow the checkpoint's classes (det: matched by
category id, so a TF model with 90 label-map ids evaluates on COCO's 80 categories; a dataset category
the model does not know is scored as missed, and both kinds of mismatch are logged once).
"""
from __future__ import annotations

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig, open_dict

from backbone.errors import DataError
from backbone.training.checkpoint import command_line_overrides, load_checkpoint, model_config_from_checkpoint
from backbone.training.config_checks import check_checkpoint_classes, check_checkpoint_task, check_config
from backbone.training.data_health import DataHealth
from backbone.training.runner import build, build_trainer, check_trainer, output_dir, report, run_cli


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate a checkpoint on the whole val set of the configured data."""
    out_dir = output_dir()
    check_trainer(cfg.trainer)
    ckpt = load_checkpoint(cfg.ckpt_path)  # the model config lives in it: the one file read before the checks
    info = ckpt["mnv2"]
    check_checkpoint_task(cfg, info)
    with open_dict(cfg):
        cfg.model = model_config_from_checkpoint(info, command_line_overrides())  # data may read ${model.*}
    check_config(cfg, training=False, checkpoint=ckpt)
    pl.seed_everything(int(cfg.seed), workers=True)
    # the data first (its classes come from the config or an annotation file, no image is read), then the model
    datamodule = build(cfg.data, "data")
    if cfg.task_name == "seg":  # seg labels are mask values: they must be the model's classes (det matches ids)
        names, source = datamodule.read_classes()
        check_checkpoint_classes(cfg, info, len(names), source)
    datamodule.use_model_classes(info.get("meta") or {})
    module = build(cfg.model, "model")
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise DataError(cfg.ckpt_path, f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}",
                        "evaluate with the checkpoint's own model config (drop model.* overrides that change the architecture)")
    if cfg.get("save_predictions"):
        module.predictions_dir = out_dir / "predictions"
    # what bad data the evaluation met: one summary + out_dir/data_health.json, as in training
    trainer = build_trainer(cfg, callbacks=[DataHealth(output_dir=out_dir)], loggers=[])
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return report(module, trainer, out_dir)


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_cli(evaluate, cfg)


if __name__ == "__main__":
    main()
