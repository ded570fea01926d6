"""Mobile DeepLabv3 heads (MobileNetV2 paper, Sec. 6.3 / Table 7).

`lite`: image-level pooling branch + 1x1 conv branch (the paper's "no ASPP" row, 2.11M params with
the 320-ch `layer_18` feature). `aspp`: the same plus three 3x3 atrous branches (DeepLabv3 ASPP,
rates 6/12/18 at output stride 16), 4.52M params. The branch outputs are concatenated, projected to
256 channels by a 1x1 conv and classified by a 1x1 conv with bias. Plain (not separable) 3x3 convs
in the ASPP are what reproduce the paper's 4.52M (separable ones would give ~2.4M).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from backbone.layers import ConvBNAct

HEADS = ("lite", "aspp")


def conv_bn_relu(in_ch: int, out_ch: int, kernel_size: int = 1, dilation: int = 1,
                 bn_eps: float = 1e-5, bn_momentum: float = 0.1) -> ConvBNAct:
    """Conv (no bias, 'same' padding) + BN + ReLU: DeepLab's heads use ReLU, not ReLU6."""
    return ConvBNAct(in_ch, out_ch, kernel_size, dilation=dilation, bn_eps=bn_eps, bn_momentum=bn_momentum,
                     activation="relu")


class ImagePooling(nn.Module):
    """Image-level features: global average pool -> 1x1 conv + BN + ReLU -> back to the feature size.

    The average is over the whole feature map, padding included, as TF DeepLab's (model.py
    ``extract_features``: ``avg_pool2d`` over the full ``scale_dimension(crop_size, 1 / output_stride)``
    map of the padded eval crop); hence the fixed eval size (``data.eval_size``), which makes it the
    same for an image whatever its batch. TF then resizes the 1x1 map back with align_corners=True;
    upsampling a 1x1 map bilinearly is a broadcast (align_corners or not), so `expand` gives the same
    values for free.
    """

    def __init__(self, in_ch: int, out_ch: int, bn_eps: float = 1e-5, bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.conv = conv_bn_relu(in_ch, out_ch, 1, bn_eps=bn_eps, bn_momentum=bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, h, w) -> (B, out_ch, h, w)."""
        y = self.conv(x.mean(dim=(2, 3), keepdim=True))
        return y.expand(-1, -1, x.shape[2], x.shape[3])


class DeepLabHead(nn.Module):
    """DeepLabv3 head on one backbone feature map.

    Args:
        in_channels: channels of the backbone feature (320 for `layer_18`, 1280 for `layer_19`).
        num_classes: K, including background.
        kind: "lite" (pooling + 1x1) or "aspp" (pooling + 1x1 + three 3x3 atrous convs).
        atrous_rates: dilation rates of the atrous branches, already scaled to the output stride.
        channels: width of every branch and of the projection (256).
        dropout: dropout probability before the classifier (0 disables it).
    """

    def __init__(self, in_channels: int, num_classes: int, kind: str = "lite",
                 atrous_rates: Sequence[int] = (6, 12, 18), channels: int = 256, dropout: float = 0.0,
                 bn_eps: float = 1e-5, bn_momentum: float = 0.1) -> None:
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {kind!r}")
        bn = dict(bn_eps=bn_eps, bn_momentum=bn_momentum)
        branches: list[nn.Module] = [ImagePooling(in_channels, channels, **bn),
                                     conv_bn_relu(in_channels, channels, 1, **bn)]
        if kind == "aspp":
            branches += [conv_bn_relu(in_channels, channels, 3, dilation=int(r), **bn) for r in atrous_rates]
        self.kind = kind
        self.branches = nn.ModuleList(branches)
        self.project = conv_bn_relu(len(branches) * channels, channels, 1, **bn)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1, bias=True)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # the classifier starts small so that initial logits are near-uniform
        nn.init.normal_(self.classifier.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, h, w) backbone feature -> logits (B, K, h, w) at the feature resolution."""
        y = torch.cat([b(x) for b in self.branches], dim=1)
        return self.classifier(self.dropout(self.project(y)))
