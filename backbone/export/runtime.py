"""Run an exported model whatever its format: ``load_exported(path) -> ExportedModel``.

    model = load_exported("ssdlite.onnx")
    model.metadata["input_size"]            # [H, W]; see backbone.export.metadata for every key
    out = model(images)                     # images: (B, 3, H, W) float32 RGB 0..255 -> {name: np.ndarray}

Dispatch by suffix: ``.onnx`` -> onnxruntime (:mod:`backbone.export.onnx`), ``.tflite`` ->
``backbone.export.tflite.load``, ``.pte`` -> ``backbone.export.executorch.load``.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from backbone.errors import DataError

LOADERS = {".onnx": "onnx", ".tflite": "tflite", ".pte": "executorch"}


class ExportedModel(Protocol):
    metadata: dict[str, Any]

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]: ...


def load_exported(path: str | Path) -> ExportedModel:
    """The exported model at ``path`` (DataError when missing, of an unknown suffix or unreadable)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(path, "exported model not found", "write one with tools/export.py ckpt_path=CKPT format=onnx")
    fmt = LOADERS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(path, f"unknown exported-model suffix {path.suffix!r}", f"use one of {sorted(LOADERS)}")
    try:
        mod = importlib.import_module(f"backbone.export.{fmt}")
    except ImportError as e:
        raise DataError(path, f"cannot run {fmt} models here ({e})", "pip install -e '.[export]'") from None
    try:
        return mod.load(path)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 -- a broken file, not a bug of ours
        raise DataError(path, f"not a readable {fmt} model ({type(e).__name__}: {str(e)[:200]})") from None
