"""MobileNetV2 (Sandler et al. 2018, Table 2) as a feature extractor with named taps.

Module names equal torchvision's `mobilenet_v2().features` (`features.0 .. features.18`), so a
torchvision state dict (minus `classifier.*`) loads with strict=True. Tap names follow TF slim:
`layer_N` is the output of `features[N-1]` and `layer_N/expansion_output` the output of the 1x1
expansion (conv+BN+ReLU6) inside bottleneck N (N = 3..18; `layer_2` has expansion factor 1).

output_stride 16/8 follows TF slim's `mobilenet_base`: walking the layers, once the running
stride equals output_stride every further stride-2 layer runs at stride 1 with the current
atrous rate, and the rate is then multiplied by its stride for the layers after it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from backbone.errors import ArgumentError
from backbone.layers import ConvBNAct
from backbone.padding import PADDINGS

# Table 2 of the paper: expansion t, output channels c, repeats n, first stride s.
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
FIRST_CHANNELS = 32
LAST_CHANNELS = 1280
NUM_LAYERS = 19  # layer_1 (first conv) + 17 bottlenecks + layer_19 (last 1x1 conv)
OUTPUT_STRIDES = (8, 16, 32)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round to the nearest multiple of divisor, never below min_value (default divisor) and
    never more than 10% below value (the TF/torchvision channel rule)."""
    min_value = divisor if min_value is None else min_value
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


@dataclass(frozen=True)
class LayerSpec:
    """One of the 19 layers. index: position in `features` (tap `layer_{index + 1}`)."""

    index: int
    kind: str  # "conv" (layer_1 / layer_19) or "bottleneck"
    in_channels: int
    out_channels: int
    expand_ratio: int  # 1 for plain convs and the first bottleneck
    hidden_channels: int  # expansion width (== in_channels when expand_ratio == 1)
    kernel_size: int
    stride: int  # after the output_stride conversion
    dilation: int
    in_stride: int  # stride of this layer's input w.r.t. the image
    out_stride: int  # stride of its output

    @property
    def name(self) -> str:
        return f"layer_{self.index + 1}"


def layer_specs(width_mult: float = 1.0, output_stride: int = 32) -> list[LayerSpec]:
    """Channels, strides and dilations of all 19 layers (no modules built)."""
    # (kind, out_channels, nominal stride, expand_ratio, kernel)
    plan: list[tuple[str, int, int, int, int]] = [("conv", make_divisible(FIRST_CHANNELS * width_mult), 2, 1, 3)]
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
        for i in range(n):
            plan.append(("bottleneck", make_divisible(c * width_mult), s if i == 0 else 1, t, 3))
    # The paper keeps 1280 for multipliers < 1 (the last layer matters most for accuracy).
    plan.append(("conv", make_divisible(LAST_CHANNELS * max(1.0, width_mult)), 1, 1, 1))

    specs = []
    in_ch, current_stride, rate = 3, 1, 1
    for index, (kind, out_ch, stride, t, k) in enumerate(plan):
        in_stride = current_stride
        if current_stride == output_stride:
            # Target reached: keep resolution, dilate instead (this layer uses the old rate).
            layer_stride, layer_rate = 1, rate
            rate *= stride
        else:
            layer_stride, layer_rate = stride, 1
            current_stride *= stride
        dilation = layer_rate if k > 1 else 1
        hidden = int(round(in_ch * t)) if kind == "bottleneck" else out_ch
        specs.append(LayerSpec(index, kind, in_ch, out_ch, t, hidden, k, layer_stride, dilation,
                               in_stride, current_stride))
        in_ch = out_ch
    return specs


def valid_tap_names() -> list[str]:
    """All tap names: layer_1..layer_19, then layer_3/expansion_output..layer_18/expansion_output."""
    names = [f"layer_{n}" for n in range(1, NUM_LAYERS + 1)]
    names += [f"layer_{n}/expansion_output" for n in range(3, NUM_LAYERS)]
    return names


class InvertedResidual(nn.Module):
    """Bottleneck: [1x1 expand + ReLU6] -> 3x3 depthwise + ReLU6 -> 1x1 linear projection (+ x).

    `conv` is laid out like torchvision's: with expansion
    conv.0 = expand ConvBNAct, conv.1 = depthwise ConvBNAct, conv.2 = project conv, conv.3 = BN;
    without (t == 1) conv.0 = depthwise, conv.1 = project conv, conv.2 = BN.
    The residual is used only when stride == 1 and in == out channels.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int,
                 dilation: int = 1, padding: str = "torch", bn_eps: float = 1e-5, bn_momentum: float = 0.1) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ArgumentError("stride", f"must be 1 or 2, got {stride}")
        hidden = int(round(in_channels * expand_ratio))
        self.stride, self.dilation = stride, dilation
        self.use_res_connect = stride == 1 and in_channels == out_channels
        self.has_expansion = expand_ratio != 1
        self.out_channels = out_channels
        bn = dict(bn_eps=bn_eps, bn_momentum=bn_momentum)
        layers: list[nn.Module] = []
        if self.has_expansion:
            layers.append(ConvBNAct(in_channels, hidden, kernel_size=1, padding=padding, **bn))
        layers += [
            ConvBNAct(hidden, hidden, 3, stride, dilation, groups=hidden, padding=padding, **bn),
            nn.Conv2d(hidden, out_channels, 1, bias=False),  # linear bottleneck: no activation
            nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H / stride, W / stride)."""
        out = self.conv(x)
        return x + out if self.use_res_connect else out

    def forward_from_expansion(self, x: torch.Tensor, expanded: torch.Tensor) -> torch.Tensor:
        """Finish the block given its input x and `expanded = self.conv[0](x)` (reuses the tap)."""
        out = expanded
        for module in list(self.conv)[1:]:
            out = module(out)
        return x + out if self.use_res_connect else out


def _check_number(name: str, value: object, low: float, high: float | None, low_inclusive: bool, hint: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = (value >= low if low_inclusive else value > low) and (high is None or value <= high)
    if not ok:
        rng = f"{'[' if low_inclusive else '('}{low}, {high if high is not None else 'inf'}]"
        raise ArgumentError(name, f"must be a number in {rng}, got {value!r}", hint)
    return float(value)


def check_architecture(width_mult: object, output_stride: object) -> tuple[float, int]:
    """``(width_mult, output_stride)`` checked (> 0; one of 8/16/32), else ArgumentError naming the argument.

    The architecture rules a config can be checked against before anything is built
    (:mod:`backbone.training.config_checks`); :class:`MobileNetV2` applies them again itself.
    """
    width = _check_number("width_mult", width_mult, 0.0, None, False, "use e.g. 1.0 (supported range 0.35..1.4)")
    if isinstance(output_stride, bool) or output_stride not in OUTPUT_STRIDES:
        raise ArgumentError("output_stride", f"must be one of {list(OUTPUT_STRIDES)}, got {output_stride!r}",
                            "use 32 (classification/detection), 16 or 8 (segmentation)")
    return width, int(output_stride)


def _normalize_out_features(out_features: str | Iterable[str]) -> tuple[str, ...]:
    key = "out_features"
    if isinstance(out_features, str):
        out_features = [out_features]
    try:
        names = list(out_features)
    except TypeError:
        raise ArgumentError(key, f"must be a list of tap names, got {out_features!r}", "e.g. [layer_19]") from None
    if not names:
        raise ArgumentError(key, "is empty", "request at least one tap, e.g. [layer_19]")
    valid = valid_tap_names()
    for name in names:
        if name not in valid:
            raise ArgumentError(key, f"unknown tap {name!r}", f"use names from: {', '.join(valid)}")
    return tuple(dict.fromkeys(names))  # drop duplicates, keep order


def _tap_layer(name: str) -> int:
    """1-based layer number of a tap name."""
    return int(name.split("/")[0].split("_")[1])


class MobileNetV2(nn.Module):
    """MobileNetV2 feature extractor.

    forward(x: (B, 3, H, W)) -> {tap: (B, out_channels[tap], ceil(H / out_strides[tap]), ...)}
    with one entry per requested tap, in the order of `out_features`. Computation stops at the
    deepest tap; layers after it are not built (nn.Identity placeholders keep the indices), so
    they hold no parameters and cost nothing (e.g. DeepLab requesting layer_18 drops the 1280 conv).

    frozen_stages=N: features[0..N-1] get requires_grad=False and stay in eval mode.
    norm_eval=True: every BatchNorm stays in eval mode (running stats frozen) during train().
    """

    def __init__(self, width_mult: float = 1.0, output_stride: int = 32, padding: str = "torch",
                 bn_eps: float = 1e-5, bn_momentum: float = 0.1,
                 out_features: str | Sequence[str] = ("layer_19",), frozen_stages: int = 0,
                 norm_eval: bool = False) -> None:
        super().__init__()
        width_mult, output_stride = check_architecture(width_mult, output_stride)
        if padding not in PADDINGS:
            raise ArgumentError("padding", f"must be one of {list(PADDINGS)}, got {padding!r}",
                              "use 'torch' (symmetric) or 'tf' (TensorFlow SAME, for TF-trained weights)")
        bn_eps = _check_number("bn_eps", bn_eps, 0.0, None, False, "use 1e-5 (PyTorch) or 1e-3 (TF)")
        bn_momentum = _check_number("bn_momentum", bn_momentum, 0.0, 1.0, False,
                                    "PyTorch convention (1 - TF decay): use 0.1, or 0.003 for TF's decay 0.997")
        if isinstance(frozen_stages, bool) or not isinstance(frozen_stages, int) or not 0 <= frozen_stages <= NUM_LAYERS:
            raise ArgumentError("frozen_stages", f"must be an integer in [0, {NUM_LAYERS}], got {frozen_stages!r}",
                              "0 trains everything, N freezes features[0..N-1]")
        if not isinstance(norm_eval, bool):
            raise ArgumentError("norm_eval", f"must be true or false, got {norm_eval!r}")

        self.width_mult, self.output_stride, self.padding = width_mult, int(output_stride), padding
        self.frozen_stages, self.norm_eval = frozen_stages, norm_eval
        self.out_features = _normalize_out_features(out_features)
        self.specs = layer_specs(width_mult, self.output_stride)

        self._layer_taps = {_tap_layer(n) for n in self.out_features if "/" not in n}
        self._expansion_taps = {_tap_layer(n) for n in self.out_features if "/" in n}
        self.num_layers = max(_tap_layer(n) for n in self.out_features)  # layers actually built

        bn = dict(bn_eps=bn_eps, bn_momentum=bn_momentum)
        layers: list[nn.Module] = []
        for spec in self.specs:
            if spec.index >= self.num_layers:
                layers.append(nn.Identity())  # placeholder: keeps `features.N` names of later layers
            elif spec.kind == "conv":
                layers.append(ConvBNAct(spec.in_channels, spec.out_channels, spec.kernel_size, spec.stride,
                                         spec.dilation, padding=padding, **bn))
            else:
                layers.append(InvertedResidual(spec.in_channels, spec.out_channels, spec.stride, spec.expand_ratio,
                                               spec.dilation, padding=padding, **bn))
        self.features = nn.Sequential(*layers)

        self.out_channels: dict[str, int] = {}
        self.out_strides: dict[str, int] = {}
        for name in self.out_features:
            spec = self.specs[_tap_layer(name) - 1]
            if name.endswith("/expansion_output"):
                self.out_channels[name], self.out_strides[name] = spec.hidden_channels, spec.in_stride
            else:
                self.out_channels[name], self.out_strides[name] = spec.out_channels, spec.out_stride

        self._init_weights()
        for layer in list(self.features)[:frozen_stages]:
            for p in layer.parameters():
                p.requires_grad_(False)
        self.train()

    def _init_weights(self) -> None:
        # Same scheme as torchvision / TF slim (truncated-normal-ish fan-out init, BN identity).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def train(self, mode: bool = True) -> "MobileNetV2":
        """Like nn.Module.train, but frozen stages (and, with norm_eval, all BatchNorms) stay in eval."""
        super().train(mode)
        if mode:
            for layer in list(self.features)[: self.frozen_stages]:
                layer.eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 3, H, W) -> {tap: (B, C_tap, ceil(H / s_tap), ceil(W / s_tap))}."""
        if x.dim() != 4:
            raise ValueError(f"MobileNetV2 expects (B, 3, H, W) images, got shape {tuple(x.shape)}")
        feats: dict[str, torch.Tensor] = {}
        for n in range(1, self.num_layers + 1):
            layer = self.features[n - 1]
            if n in self._expansion_taps:
                expanded = layer.conv[0](x)
                feats[f"layer_{n}/expansion_output"] = expanded
                if n == self.num_layers and n not in self._layer_taps:
                    break  # nothing deeper requested
                x = layer.forward_from_expansion(x, expanded)
            else:
                x = layer(x)
            if n in self._layer_taps:
                feats[f"layer_{n}"] = x
        return {name: feats[name] for name in self.out_features}

    def extra_repr(self) -> str:
        return (f"width_mult={self.width_mult}, output_stride={self.output_stride}, padding={self.padding!r}, "
                f"out_features={list(self.out_features)}, frozen_stages={self.frozen_stages}, norm_eval={self.norm_eval}")
