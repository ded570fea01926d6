#!/usr/bin/env python
"""Predict on images or a video: `python tools/predict.py ckpt_path=CKPT input=PATH [output=DIR] [batch_size=8]`.

The task comes from the model file (a checkpoint, or an exported .onnx / .tflite / .pte). Input: an image,
a folder, a quoted glob or a video file. Det writes `predictions.jsonl` (boxes in original pixels) and
one picture per image; seg writes palette PNG masks at the original size and overlays with a legend.
Unreadable files are reported by name and skipped; a summary ends the run. The flow: backbone/predict.py.
"""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from backbone.predict import predict
from backbone.training.checkpoint import command_line_overrides
from backbone.training.runner import output_dir, run_cli

log = logging.getLogger("mnv2")


def run(cfg: DictConfig) -> None:
    out = Path(cfg.output) if cfg.get("output") else output_dir()
    summary = predict(cfg.ckpt_path, cfg.input, out, batch_size=cfg.batch_size, score_threshold=cfg.score_threshold,
                      device=str(cfg.device), progress=bool(cfg.progress), model_overrides=command_line_overrides())
    print(f"predict: {summary}", flush=True)


@hydra.main(config_path="../conf", config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_cli(run, cfg)


if __name__ == "__main__":
    main()
