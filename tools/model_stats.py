#!/usr/bin/env python
"""Params and MAdds (torch.utils.flop_counter, MAdds = FLOPs / 2) of configured models.

    python tools/model_stats.py                       # the table of standard variants
    python tools/model_stats.py task=seg model.head=aspp --size 513
    python tools/model_stats.py task=det model.image_size=320
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch import nn

from backbone import build_backbone
from backbone.complexity import count_madds, count_params
from backbone.training.runner import build, resolve_num_classes

CONF = Path(__file__).resolve().parents[1] / "conf"

# (name, overrides, input size); None overrides = the ImageNet classifier
VARIANTS: list[tuple[str, list[str] | None, int]] = [
    ("MobileNetV2 1.0 + ImageNet classifier", None, 224),
    ("SSDLite-MNV2, 80 classes + bg", ["task=det", "model.num_classes=80", "model.image_size=300"], 300),
    ("SSDLite-MNV2, 80 classes + bg", ["task=det", "model.num_classes=80", "model.image_size=320"], 320),
    ("SSDLite-MNV2, 90 classes + bg (TF zoo)", ["task=det", "model.num_classes=90", "model.image_size=300"], 300),
    ("SSDLite-MNV2 0.5, 80 classes + bg", ["task=det", "model.num_classes=80", "model.image_size=300",
                                           "model.backbone.width_mult=0.5"], 300),
    ("DeepLabv3-MNV2* lite, OS16, 21 classes", ["task=seg", "model.num_classes=21", "model.head=lite",
                                                "model.backbone.output_stride=16"], 513),
    ("DeepLabv3-MNV2* ASPP, OS16, 21 classes", ["task=seg", "model.num_classes=21", "model.head=aspp",
                                                "model.backbone.output_stride=16"], 513),
    ("DeepLabv3-MNV2* lite, OS8, 21 classes", ["task=seg", "model.num_classes=21", "model.head=lite",
                                               "model.backbone.output_stride=8"], 513),
    ("DeepLabv3-MNV2* ASPP, OS8, 21 classes", ["task=seg", "model.num_classes=21", "model.head=aspp",
                                               "model.backbone.output_stride=8"], 513),
]


class ImageNetClassifier(nn.Module):
    """MobileNetV2 + torchvision's classifier (pool, dropout, linear), for the paper's 3.4M / 300M check."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = build_backbone(out_features=["layer_19"])
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)["layer_19"]
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(f, 1), 1))


def configured_model(overrides: list[str]) -> nn.Module:
    """The network (no Lightning wrapper) of `task=... model...` with random init."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "model.backbone.pretrained=none"])
    resolve_num_classes(cfg, build(cfg.data, "data"))  # data.num_classes: auto -> the data's count
    module = build(cfg.model, "model")
    return getattr(module, "model", module)


def stats(model: nn.Module, size: int) -> tuple[int, int]:
    model.eval()
    return count_params(model), count_madds(model, (1, 3, size, size))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. task=seg model.head=aspp")
    p.add_argument("--size", type=int, default=None, help="square input size (default: model.image_size, or 513 for seg)")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    rows = []
    if args.overrides:
        model = configured_model(args.overrides)
        size = args.size or int(getattr(model, "image_size", 0) or 513)
        rows.append((" ".join(args.overrides), size, *stats(model, size)))
    else:
        for name, overrides, size in VARIANTS:
            model = ImageNetClassifier() if overrides is None else configured_model(overrides)
            rows.append((name, size, *stats(model, size)))
    width = max(len(r[0]) for r in rows)
    print(f"{'model':<{width}}  {'input':>5}  {'params':>8}  {'MAdds':>8}")
    for name, size, params, madds in rows:
        print(f"{name:<{width}}  {size:>5}  {params / 1e6:>7.3f}M  {madds / 1e9:>7.3f}B")
    print(f"(torch {torch.__version__}; MAdds = FLOPs / 2 from torch.utils.flop_counter, BN not folded)")


if __name__ == "__main__":
    sys.exit(main())
