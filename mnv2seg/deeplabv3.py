"""Mobile DeepLabv3: MobileNetV2 backbone + DeepLabv3 head (MobileNetV2 paper, Table 7).

"MNet V2*" in the paper is the backbone cut at `layer_18` (the 320-ch output of the last
bottleneck, no 1280 conv): 2.11M params with the lite head, 4.52M with ASPP.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from backbone import build_backbone
from backbone.errors import ArgumentError, argument_scope
from backbone.memory_format import resolve_memory_format
from mnv2seg.head import HEADS, DeepLabHead

FEATURES = ("layer_18", "layer_19")


class DeepLabV3(nn.Module):
    """DeepLabv3 (lite or ASPP head) on MobileNetV2.

    Args:
        num_classes: K, background included (21 for VOC).
        backbone: kwargs of `backbone.build_backbone` (output_stride 8/16/32, pretrained, ...);
            `out_features` is set here from `feature`.
        head: "lite" (image pooling + 1x1) or "aspp" (+ three 3x3 atrous convs).
        feature: backbone tap feeding the head: "layer_18" (320 ch, the paper's MNet V2*) or
            "layer_19" (1280 ch).
        atrous_rates: ASPP rates at output stride 16; scaled by 16 / output_stride (12/24/36 at OS8).
        head_channels: branch / projection width (256).
        dropout: dropout before the classifier.
        align_corners: of the bilinear upsampling of the logits to the input size. True is TF
            DeepLab's (research/deeplab/model.py: ``predict_labels`` resizes the logits with
            ``tf.image.resize_bilinear(..., align_corners=True)``, as do ``multi_scale_logits`` and
            the image-pooling branch of ``extract_features``); it maps feature j to pixel
            ``output_stride * j``, exactly where this backbone computes it on ``16k+1`` inputs (513,
            161), hence TF's 16k+1 crop sizes. The head's only other resize, the image-pooling
            branch's, is from 1x1 and the same either way; MF inference reads this attribute for its
            own resizes (:mod:`mnv2seg.inference`).
        memory_format: "channels_last" | "contiguous": layout of the weights and of the input inside
            forward (backbone/memory_format.py); the logits come back in the default layout.
    """

    def __init__(self, num_classes: int, backbone: dict[str, Any] | None = None, head: str = "lite",
                 feature: str = "layer_18", atrous_rates: Sequence[int] = (6, 12, 18), head_channels: int = 256,
                 dropout: float = 0.0, align_corners: bool = False, memory_format: str = "channels_last") -> None:
        super().__init__()
        self.memory_format = resolve_memory_format(memory_format)
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ArgumentError("num_classes", f"must be an integer >= 2 (background + classes), got {num_classes!r}",
                              "21 for PASCAL VOC")
        if head not in HEADS:
            raise ArgumentError("head", f"must be one of {list(HEADS)}, got {head!r}",
                              "lite (pooling + 1x1, 2.11M params) or aspp (4.52M)")
        if feature not in FEATURES:
            raise ArgumentError("feature", f"must be one of {list(FEATURES)}, got {feature!r}",
                              "layer_18 is the paper's MNet V2* (320 ch)")
        if len(tuple(atrous_rates)) != 3 or any(int(r) < 1 for r in atrous_rates):
            raise ArgumentError("atrous_rates", f"must be three positive ints, got {atrous_rates!r}", "e.g. [6, 12, 18]")
        if not 0.0 <= float(dropout) < 1.0:
            raise ArgumentError("dropout", f"must be in [0, 1), got {dropout!r}", "e.g. 0.1, or 0 to disable")
        bb_cfg = dict(backbone or {})
        bb_cfg.setdefault("output_stride", 16)  # DeepLabv3 default (the backbone alone defaults to 32)
        bb_cfg["out_features"] = [feature]
        with argument_scope("backbone"):
            self.backbone = build_backbone(**bb_cfg)
        self.feature = feature
        self.num_classes = num_classes
        self.output_stride = int(self.backbone.out_strides[feature])
        # rates are defined at OS16 (DeepLabv3): doubled at OS8, halved at OS32
        self.atrous_rates = tuple(max(1, int(round(int(r) * 16 / self.output_stride))) for r in atrous_rates)
        self.align_corners = bool(align_corners)
        bn_kw = {k: bb_cfg[k] for k in ("bn_eps", "bn_momentum") if k in bb_cfg}
        self.head = DeepLabHead(self.backbone.out_channels[feature], num_classes, head, self.atrous_rates,
                                head_channels, float(dropout), **bn_kw)
        self.to(memory_format=self.memory_format)  # load_state_dict copies into these, keeping the layout

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) normalised -> logits (B, K, H, W) (bilinear upsampling of the head output).

        The logits are NCHW-contiguous in training (cross-entropy over classes reads NCHW faster)
        and in the model's memory format in eval (argmax over classes reads NHWC faster: README
        "Speed", from the seg profile); either way the layout is set on the small head output,
        before upsampling.
        """
        feat = self.backbone(images.contiguous(memory_format=self.memory_format))[self.feature]
        logits = self.head(feat)
        if self.training:
            logits = logits.contiguous()
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=self.align_corners)
