#!/usr/bin/env python
"""Speed of our models vs torchvision's mobile peers, in one process (logic: backbone/benchmark/).

    python tools/benchmark.py task=det                       # SSDLite-MNV2 320 vs ssdlite320_mobilenet_v3_large
    python tools/benchmark.py task=seg threads=4             # Mobile DeepLabv3 vs deeplabv3 / lraspp MobileNetV3
    python tools/benchmark.py task=det model.memory_format=contiguous precision=bf16-mixed
    python tools/benchmark.py task=seg variants=true         # README table of width / head / OS variants

Prints the table and the ratios ours / peer; writes benchmark.json into the run dir.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from backbone.benchmark import benchmark
from backbone.training.runner import output_dir, run_cli


@hydra.main(config_path="../conf", config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_cli(benchmark, cfg, output_dir())


if __name__ == "__main__":
    main()
