"""Weight mapping: TF variable names and layouts -> our SSDLite state dict (name tables in the package docstring)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from backbone.errors import DataError
from mnv2det.tf_import.graph import FE, TFGraph

BN_SUFFIX = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}


def _conv(w: np.ndarray) -> np.ndarray:
    """HWIO -> OIHW."""
    return w.transpose(3, 2, 0, 1)


def _depthwise(w: np.ndarray) -> np.ndarray:
    """(kh, kw, C, m) -> (C*m, 1, kh, kw); TF output channel c*m + j is torch's group c, filter j."""
    kh, kw, c, m = w.shape
    return w.reshape(kh, kw, c * m).transpose(2, 0, 1)[:, None]


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _bn(prefix: str, ours: str, table: dict[str, tuple[str, Callable]]) -> None:
    for p, t in BN_SUFFIX.items():
        table[f"{ours}.{p}"] = (f"{prefix}/BatchNorm/{t}", _same)


def tf_name_table(model: torch.nn.Module) -> dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """{our state-dict key: (TF tensor name, layout conversion)} for an SSDLite model."""
    table: dict[str, tuple[str, Callable]] = {}
    features = model.backbone.features
    for idx, layer in enumerate(features):
        ours = f"backbone.features.{idx}"
        if isinstance(layer, torch.nn.Identity):
            continue
        if idx in (0, len(features) - 1):
            tf = f"{FE}/Conv" if idx == 0 else f"{FE}/Conv_1"
            table[f"{ours}.0.weight"] = (f"{tf}/weights", _conv)
            _bn(tf, f"{ours}.1", table)
            continue
        tf = f"{FE}/expanded_conv" if idx == 1 else f"{FE}/expanded_conv_{idx - 1}"
        k = 0
        if layer.has_expansion:
            table[f"{ours}.conv.0.0.weight"] = (f"{tf}/expand/weights", _conv)
            _bn(f"{tf}/expand", f"{ours}.conv.0.1", table)
            k = 1
        table[f"{ours}.conv.{k}.0.weight"] = (f"{tf}/depthwise/depthwise_weights", _depthwise)
        _bn(f"{tf}/depthwise", f"{ours}.conv.{k}.1", table)
        table[f"{ours}.conv.{k + 1}.weight"] = (f"{tf}/project/weights", _conv)
        _bn(f"{tf}/project", f"{ours}.conv.{k + 2}", table)

    for j, block in enumerate(model.extras):
        ours, n = f"extras.{j}", j + 2
        mid, out = block.reduce.out_channels, block.out_channels
        for part, tf, fn in (("reduce", f"{FE}/layer_19_1_Conv2d_{n}_1x1_{mid}", _conv),
                             ("depthwise", f"{FE}/layer_19_2_Conv2d_{n}_3x3_s2_{out}_depthwise", _depthwise),
                             ("pointwise", f"{FE}/layer_19_2_Conv2d_{n}_3x3_s2_{out}", _conv)):
            wname = "depthwise_weights" if fn is _depthwise else "weights"
            table[f"{ours}.{part}.0.weight"] = (f"{tf}/{wname}", fn)
            _bn(tf, f"{ours}.{part}.1", table)

    for head, tf_head in (("box_head", "BoxEncodingPredictor"), ("cls_head", "ClassPredictor")):
        for i, _ in enumerate(getattr(model.head, head)):
            ours, tf = f"head.{head}.{i}", f"BoxPredictor_{i}/{tf_head}"
            table[f"{ours}.depthwise.0.weight"] = (f"{tf}_depthwise/depthwise_weights", _depthwise)
            _bn(f"{tf}_depthwise", f"{ours}.depthwise.1", table)
            table[f"{ours}.pointwise.weight"] = (f"{tf}/weights", _conv)
            table[f"{ours}.pointwise.bias"] = (f"{tf}/biases", _same)
    return table


def map_weights(model: torch.nn.Module, graph: TFGraph, logit_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Our state dict filled from the graph's variables.

    Raises DataError listing TF tensors nothing maps to, parameters nothing fills and shape
    mismatches. A missing BatchNorm gamma (TF `scale: false`) is filled with ones. A logit scale
    s != 1 is folded into the class predictors (logits / s).
    """
    variables = graph.variables()
    table = tf_name_table(model)
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    unfilled, shapes = [], []
    for key, target in state.items():
        if key.endswith("num_batches_tracked"):
            out[key] = target.clone()
            continue
        if key not in table:
            unfilled.append(key)
            continue
        tf_name, convert = table[key]
        if tf_name not in variables:
            if tf_name.endswith("/BatchNorm/gamma") and tf_name.replace("/gamma", "/beta") in variables:
                out[key] = torch.ones_like(target)  # slim batch_norm(scale=False): gamma is 1
                continue
            unfilled.append(f"{key} (TF {tf_name})")
            continue
        value = convert(variables[tf_name])
        used.add(tf_name)
        if tuple(value.shape) != tuple(target.shape):
            shapes.append(f"{key} {tuple(target.shape)} vs TF {tf_name} {tuple(value.shape)}")
            continue
        out[key] = torch.from_numpy(np.ascontiguousarray(value)).to(target.dtype)
    unmapped = sorted(set(variables) - used)
    if unmapped or unfilled or shapes:
        parts = []
        if unmapped:
            parts.append(f"{len(unmapped)} unmapped TF tensors: {', '.join(unmapped[:8])}"
                         + (" ..." if len(unmapped) > 8 else ""))
        if unfilled:
            parts.append(f"{len(unfilled)} unfilled parameters: {', '.join(unfilled[:8])}"
                         + (" ..." if len(unfilled) > 8 else ""))
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches: {'; '.join(shapes[:4])}")
        raise DataError(graph.source, "graph does not match SSDLite-MobileNetV2: " + " | ".join(parts),
                        "only TF OD API ssdlite_mobilenet_v2 frozen graphs can be imported")
    if logit_scale != 1.0:
        for i, _ in enumerate(model.head.cls_head):
            for p in ("weight", "bias"):
                out[f"head.cls_head.{i}.pointwise.{p}"] = out[f"head.cls_head.{i}.pointwise.{p}"] / logit_scale
    return out
