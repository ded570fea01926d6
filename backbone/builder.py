"""The backbone builder: architecture (mobilenet_v2.py) + pretrained weights (weights.py), kept
apart as timm keeps them."""
from __future__ import annotations

from typing import Sequence

from backbone.errors import ArgumentError
from backbone.mobilenet_v2 import MobileNetV2
from backbone.weights import load_pretrained

BACKBONE_KEYS = ("width_mult", "output_stride", "padding", "bn_eps", "bn_momentum", "out_features", "pretrained",
                 "frozen_stages", "norm_eval")


def build_backbone(width_mult: float = 1.0, output_stride: int = 32, padding: str = "torch",
                   bn_eps: float = 1e-5, bn_momentum: float = 0.1,
                   out_features: str | Sequence[str] = ("layer_19",), pretrained: str = "none",
                   frozen_stages: int = 0, norm_eval: bool = False, **unknown: object) -> MobileNetV2:
    """MobileNetV2 with the taps ``out_features``, then ``pretrained`` loaded into it:
    "none" | "imagenet" (torchvision IMAGENET1K_V1, width 1.0) | path to a torchvision state dict.

    Invalid values raise :class:`~backbone.errors.ArgumentError` naming the argument. ImageNet
    weights were trained with BatchNorm eps 1e-5: loading them into another eps is refused.
    """
    if unknown:
        raise ArgumentError(sorted(unknown)[0], "is not a backbone setting", f"valid keys: {', '.join(BACKBONE_KEYS)}")
    if isinstance(pretrained, str) and pretrained.strip().lower() == "imagenet" and float(bn_eps) != 1e-5:
        raise ArgumentError("bn_eps", f"is {bn_eps}, but torchvision's ImageNet weights were trained with BatchNorm "
                            "eps 1e-5 (at 1e-3 about a third of their channels are squashed and the features are "
                            "wrecked)", "set bn_eps: 1.0e-5 with pretrained: imagenet (TF-trained graphs keep 1e-3)")
    model = MobileNetV2(width_mult=width_mult, output_stride=output_stride, padding=padding, bn_eps=bn_eps,
                        bn_momentum=bn_momentum, out_features=out_features, frozen_stages=frozen_stages,
                        norm_eval=norm_eval)
    load_pretrained(model, pretrained)
    return model
