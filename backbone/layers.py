"""The conv -> BatchNorm -> activation block every network here is made of (backbone, SSDLite
extras and predictors, DeepLab heads).

An ``nn.Sequential`` laid out like torchvision's ``Conv2dNormActivation``: ``0`` conv (no bias),
``1`` BatchNorm, ``2`` activation, so torchvision MobileNetV2 state dicts load as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backbone.padding import make_conv2d


class _ReLU6Inplace(torch.autograd.Function):
    """In-place ReLU6 whose backward reads the output. ``F.relu6(x, inplace=True)`` makes autograd
    save a clone of its input (torch.profiler shows ``aten::clone`` under every ``hardtanh_``: one
    full copy of each activation per train step); the output gives the same mask, since
    0 < clamp(x, 0, 6) < 6 exactly where 0 < x < 6."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        y = x.clamp_(0.0, 6.0)
        ctx.mark_dirty(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, y, 0.0, 6.0)


class ReLU6(nn.ReLU6):
    """``nn.ReLU6(inplace=True)`` without the saved copy when autograd records (same values and
    gradients, tests/test_inference_paths.py); plain ``F.relu6`` otherwise (inference, export, compile)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.inplace and torch.is_grad_enabled() and x.requires_grad and not x.is_leaf
                and not torch.compiler.is_compiling() and not torch.jit.is_scripting()):
            return _ReLU6Inplace.apply(x)
        return F.relu6(x, inplace=self.inplace)


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu6": ReLU6, "relu": nn.ReLU}


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
