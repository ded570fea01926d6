#!/usr/bin/env python
"""Evaluate a checkpoint: `python tools/evaluate.py task=det|seg ckpt_path=CKPT [data=...]`.

Prints the task's table and writes metrics.json (det: also detections.json) into the run dir. With
save_predictions=true also RUN_DIR/predictions/: det, each val image with its detections drawn
(score >= 0.3, ground truth in white); seg, the predicted masks as VOC palette PNGs.
"""
import hydra
from omegaconf import DictConfig

from mnv2.pipeline import evaluate, run_cli


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_cli(evaluate, cfg)


if __name__ == "__main__":
    main()
