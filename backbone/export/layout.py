"""Input and output layouts of an exported file: ``nchw`` (the contract of :mod:`backbone.export`) or
``mobile``, the layout phone clients read (MediaPipe Tasks, the TFLite Task Library, TF Object
Detection API models):

- input ``images (1, H, W, 3)`` NHWC RGB 0..255, float32 or uint8 (``input_dtype``), normalised inside;
- detection with NMS inside: ``locations (1, D, 4)`` ymin, xmin, ymax, xmax normalised to 0..1,
  ``classes (1, D)`` float 0-based, ``scores (1, D)``, ``count (1,)`` float (the order and form of
  TF's ``TFLite_Detection_PostProcess``; padding rows 0);
- segmentation: ``logits_nhwc (1, H, W, K)`` at the input size (what ``ImageSegmenter`` turns into
  confidence and category masks), or with ``argmax`` the mask ``(1, H, W)``.

The wrappers (the tasks' ``export`` modules) read the layout's input with :func:`images_to_nchw`;
:func:`from_mobile` brings a mobile file's outputs back to the contract's names and forms, so the
loaders, evaluation and ``tools/predict.py`` see one contract whatever the layout.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from backbone.errors import ArgumentError

LAYOUTS = ("nchw", "mobile")
INPUT_DTYPES = ("float32", "uint8")
#: mobile detection outputs, in the order the TFLite Support metadata assigns their roles
MOBILE_DET_OUTPUTS = ("locations", "classes", "scores", "count")
MOBILE_SEG_OUTPUT = "logits_nhwc"


def check_layout(layout: str, input_dtype: str) -> tuple[str, str]:
    """(layout, input_dtype), ArgumentError naming the argument when one is unknown or they do not fit."""
    if layout not in LAYOUTS:
        raise ArgumentError("layout", f"must be one of {list(LAYOUTS)}, got {layout!r}", "layout=mobile or layout=nchw")
    if input_dtype not in INPUT_DTYPES:
        raise ArgumentError("input_dtype", f"must be one of {list(INPUT_DTYPES)}, got {input_dtype!r}",
                            "input_dtype=float32 or input_dtype=uint8")
    if input_dtype != "float32" and layout != "mobile":
        raise ArgumentError("input_dtype", "uint8 input is a variant of the mobile layout", "add layout=mobile")
    return layout, input_dtype


def images_to_nchw(images: torch.Tensor, layout: str) -> torch.Tensor:
    """The file's input -> (B, 3, H, W) float32 0..255."""
    if layout == "mobile":
        images = images.permute(0, 3, 1, 2)
    return images.to(torch.float32)


def example_input(batch: int, size: tuple[int, int], layout: str, input_dtype: str) -> torch.Tensor:
    """A random example of the file's input (0..255)."""
    x = torch.rand(batch, 3, *size) * 255
    if layout == "mobile":
        x = x.permute(0, 2, 3, 1).contiguous()
    return x.round().to(torch.uint8) if input_dtype == "uint8" else x


def input_spec(layout: str, input_dtype: str) -> dict[str, Any]:
    """The metadata's ``input`` entry."""
    return {"name": "images", "layout": "NHWC" if layout == "mobile" else "NCHW", "dtype": input_dtype,
            "range": [0, 255], "color": "RGB"}


def to_file_input(images: np.ndarray, metadata: dict[str, Any]) -> np.ndarray:
    """Contract input (B, 3, H, W) float32 0..255 -> what the file takes."""
    if metadata.get("layout", "nchw") != "mobile":
        return np.ascontiguousarray(images, dtype=np.float32)
    x = np.ascontiguousarray(np.asarray(images).transpose(0, 2, 3, 1))
    if metadata["input"]["dtype"] == "uint8":
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return x.astype(np.float32)


def from_mobile(outputs: dict[str, np.ndarray], metadata: dict[str, Any]) -> dict[str, np.ndarray]:
    """A mobile file's outputs -> the contract's (boxes xyxy input px, labels 1..K int64 with 0 padding,
    num_detections int64; logits (B, K, H, W)); other outputs unchanged."""
    out = dict(outputs)
    if "locations" in out:
        H, W = metadata["input_size"]
        loc = out.pop("locations")
        count = out.pop("count").reshape(-1).astype(np.int64)
        classes = out.pop("classes")
        kept = np.arange(classes.shape[1])[None, :] < count[:, None]
        out["boxes"] = (loc[..., [1, 0, 3, 2]] * np.array([W, H, W, H], np.float32)).astype(np.float32)
        out["labels"] = np.where(kept, np.rint(classes).astype(np.int64) + 1, 0)
        out["num_detections"] = count
    if MOBILE_SEG_OUTPUT in out:
        out["logits"] = np.ascontiguousarray(out.pop(MOBILE_SEG_OUTPUT).transpose(0, 3, 1, 2))
    return out
