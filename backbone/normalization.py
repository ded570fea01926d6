"""Input normalisation the backbone's weights expect: ``(x / 255 - mean) / std`` per channel.

The one definition both tasks (model configs, data transforms, exported models) read. A spec is
a preset name, ``{mode: NAME}`` or ``{mean: [3], std: [3]}`` in [0, 1] units.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from backbone.errors import ArgumentError

Normalization = tuple[tuple[float, float, float], tuple[float, float, float]]

PRESETS: dict[str, Normalization] = {
    # torchvision's ImageNet weights
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # TF slim / OD API / DeepLab: x / 127.5 - 1 on 0..255 pixels
    "tf": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

NormalizeSpec = str | Mapping[str, Any] | None


def resolve_normalization(spec: NormalizeSpec, arg: str = "normalize") -> Normalization:
    """(mean, std) of a spec: ``"imagenet"`` | ``"tf"`` | ``{mode}`` | ``{mean, std}`` (None: imagenet).

    Raises :class:`ArgumentError` naming ``arg`` (and its key) for anything else.
    """
    if spec is None:
        spec = "imagenet"
    if isinstance(spec, str):
        spec = {"mode": spec}
    if not isinstance(spec, Mapping):
        raise ArgumentError(arg, f"must be a preset name or {{mean, std}}, got {spec!r}",
                            f"use one of {list(PRESETS)} or {{mean: [3], std: [3]}}")
    spec = dict(spec)
    if "mean" in spec or "std" in spec:
        mean, std = spec.get("mean"), spec.get("std")
        if not _triple(mean) or not _triple(std) or min(std) <= 0:
            raise ArgumentError(arg, f"needs 3 means and 3 positive stds, got mean={mean} std={std}",
                                "e.g. {mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]} or tf")
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)  # type: ignore[return-value]
    mode = spec.get("mode", "imagenet")
    if mode not in PRESETS:
        raise ArgumentError(arg, f"must be one of {list(PRESETS)}, got {mode!r}",
                            "imagenet for torchvision weights, tf for TF-trained weights")
    return PRESETS[mode]


def _triple(v: Any) -> bool:
    return isinstance(v, Sequence) and not isinstance(v, str) and len(v) == 3 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
