"""The conv -> BatchNorm -> activation block every network here is made of (backbone, SSDLite
extras and predictors, DeepLab heads).

An ``nn.Sequential`` laid out like torchvision's ``Conv2dNormActivation``: ``0`` conv (no bias),
``1`` BatchNorm, ``2`` activation, so torchvision MobileNetV2 state dicts load as they are.
"""
from __future__ import annotations

from torch import nn

from backbone.padding import make_conv2d

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu6": nn.ReLU6, "relu": nn.ReLU}


class ConvBNAct(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> ReLU6 (or ReLU).

    x: (B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride)).

    Args:
        padding: "torch" (symmetric) or "tf" (TensorFlow 'SAME', backbone.padding).
        bn_eps, bn_momentum: BatchNorm settings (PyTorch momentum = 1 - TF decay).
        activation: "relu6" (MobileNetV2, SSDLite) or "relu" (DeepLab heads).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 dilation: int = 1, groups: int = 1, padding: str = "torch", bn_eps: float = 1e-5,
                 bn_momentum: float = 0.1, activation: str = "relu6") -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        super().__init__(
            make_conv2d(in_channels, out_channels, kernel_size, stride, dilation, groups, bias=False, padding=padding),
            nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum),
            ACTIVATIONS[activation](inplace=True),
        )
        self.out_channels = out_channels
