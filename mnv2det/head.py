"""SSDLite prediction layers (TF `convolutional_box_predictor` with `use_depthwise: true`).

Per feature map i, two predictors, each a 3x3 depthwise conv (BN, ReLU6) then a 1x1 conv with bias:

    TF name                                              module here
    BoxPredictor_{i}/BoxEncodingPredictor_depthwise/...  box_head[i].depthwise.{0 conv,1 bn}
    BoxPredictor_{i}/BoxEncodingPredictor/{weights,biases}  box_head[i].pointwise.{weight,bias}
    BoxPredictor_{i}/ClassPredictor_depthwise/...        cls_head[i].depthwise.{0 conv,1 bn}
    BoxPredictor_{i}/ClassPredictor/{weights,biases}     cls_head[i].pointwise.{weight,bias}

Outputs are flattened like TF: channels of a location are (anchor, code), so
(B, n*C, H, W) -> (B, H, W, n*C) -> (B, H*W*n, C): order (y, x, anchor), maps concatenated.
Init (TF ssdlite config): truncated normal std 0.03 (cut at 2 std) for every conv, zero biases,
BN gamma 1 / beta 0; `init="xavier"` uses Xavier-uniform instead.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from backbone.errors import ArgumentError
from backbone.layers import ConvBNAct

INITS = ("tf", "xavier")


class SeparablePredictor(nn.Module):
    """3x3 depthwise (BN, ReLU6) -> 1x1 conv with bias to num_anchors * code_size channels."""

    def __init__(self, in_channels: int, num_anchors: int, code_size: int, padding: str = "torch",
                 bn_eps: float = 1e-3, bn_momentum: float = 0.03) -> None:
        super().__init__()
        self.num_anchors, self.code_size = num_anchors, code_size
        self.depthwise = ConvBNAct(in_channels, in_channels, 3, groups=in_channels, padding=padding,
                                   bn_eps=bn_eps, bn_momentum=bn_momentum)
        self.pointwise = nn.Conv2d(in_channels, num_anchors * code_size, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, H*W*num_anchors, code_size) in (y, x, anchor) order."""
        y = self.pointwise(self.depthwise(x))
        B = y.shape[0]
        return y.permute(0, 2, 3, 1).reshape(B, -1, self.code_size)


class SSDLiteHead(nn.Module):
    """Class and box predictors for every feature map.

    Args:
        in_channels: channels of each feature map.
        num_anchors: anchors per location of each map.
        num_classes: object classes K; the class predictor outputs K+1 (slot 0 background).
        padding, bn_eps, bn_momentum: as the backbone's.
        init: "tf" (truncated normal std 0.03) | "xavier".
        cls_bias_prior: if set (e.g. 0.01 for focal loss), class biases start at logit(prior) for
            the object columns and logit(1 - prior) for the background column.
    """

    def __init__(self, in_channels: Sequence[int], num_anchors: Sequence[int], num_classes: int,
                 padding: str = "torch", bn_eps: float = 1e-3, bn_momentum: float = 0.03, init: str = "tf",
                 cls_bias_prior: float | None = None) -> None:
        super().__init__()
        if len(in_channels) != len(num_anchors):
            raise ArgumentError("num_anchors", f"{len(in_channels)} feature maps but anchors for {len(num_anchors)}",
                              "make the anchor generator's num_layers equal to the number of feature maps")
        if init not in INITS:
            raise ArgumentError("init", f"must be one of {list(INITS)}, got {init!r}")
        if cls_bias_prior is not None and not 0 < cls_bias_prior < 1:
            raise ArgumentError("cls_bias_prior", f"must be in (0, 1) or null, got {cls_bias_prior}",
                              "use 0.01 or null")
        self.num_classes = int(num_classes)
        bn = dict(padding=padding, bn_eps=bn_eps, bn_momentum=bn_momentum)
        self.box_head = nn.ModuleList(SeparablePredictor(c, n, 4, **bn) for c, n in zip(in_channels, num_anchors))
        self.cls_head = nn.ModuleList(SeparablePredictor(c, n, self.num_classes + 1, **bn)
                                      for c, n in zip(in_channels, num_anchors))
        self.reset_parameters(init, cls_bias_prior)

    def reset_parameters(self, init: str = "tf", cls_bias_prior: float | None = None) -> None:
        """(Re)initialise every conv/BN of the head (see module docstring)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if init == "tf":
                    nn.init.trunc_normal_(m.weight, std=0.03, a=-0.06, b=0.06)
                else:
                    nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if cls_bias_prior is not None:
            logit = math.log(cls_bias_prior / (1 - cls_bias_prior))
            for pred in self.cls_head:
                bias = pred.pointwise.bias.detach().view(pred.num_anchors, pred.code_size)
                bias[:, 0] = -logit  # background likely
                bias[:, 1:] = logit

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """features: list of (B, C_i, H_i, W_i) -> cls_logits (B, A, K+1), bbox_regression (B, A, 4)."""
        if len(features) != len(self.box_head):
            raise ValueError(f"head built for {len(self.box_head)} feature maps, got {len(features)}")
        cls = torch.cat([p(f) for p, f in zip(self.cls_head, features)], dim=1)
        box = torch.cat([p(f) for p, f in zip(self.box_head, features)], dim=1)
        return cls, box
