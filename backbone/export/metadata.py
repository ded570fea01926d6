"""The preprocessing contract an exported model carries (ONNX ``metadata_props``, key ``mnv2``, JSON).

    {
      "mnv2_export": 1,
      "task": "det" | "seg",
      "format": "onnx" | "tflite" | "executorch",
      "layout": "nchw" | "mobile",    # backbone.export.layout: mobile = NHWC input, phone clients' outputs
      "input": {"name": "images", "layout": "NCHW" | "NHWC", "dtype": "float32" | "uint8", "range": [0, 255],
                "color": "RGB"},
      "input_size": [H, W],           # the exported graph's spatial size (batch is dynamic)
      "resize": "cv2_linear" | "tf_bilinear" | "pad",   # how the eval pipeline brings an image to input_size
                                      # ("pad": seg, bottom/right to input_size with pad_value)
      "pad_value": [r, g, b] | null,  # seg: the mean pixel (what normalises to 0)
      "normalize": {"mean": [3], "std": [3]},   # applied inside: (x / 255 - mean) / std
      "class_names": [...],           # det: labels 1..K; seg: class index 0..K-1
      "category_ids": [...] | null,   # det: dataset category id of label k at index k - 1
      "palette": [[r, g, b], ...] | null,       # seg
      "nms": bool, "argmax": bool, "int8": bool,
      "outputs": [...],               # the file's output names in order (the loaders return the nchw
                                      # contract's: boxes/scores/labels/num_detections, logits, mask, ...)
      "postprocess": {...} | null,    # det: score_threshold, nms_iou, pre_nms_top_k, max_detections, ...
      "decoded": bool,                # det nms=false: boxes (B, A, 4) xyxy input px + scores (B, A, K)
      "anchors_output": bool,         # det nms=false decoded=false: anchors (A, 4) normalised xyxy are an output
      "output_stride", "align_corners", "num_classes", "inference": "single",   # seg: logits stride, the
                                      # bilinear resize of logits to the input, K, always single-scale
      "versions": {...},
    }
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

METADATA_KEY = "mnv2"
VERSION = 1


def make_metadata(task: str, input_size: Sequence[int], resize: str, mean: Sequence[float], std: Sequence[float],
                  class_names: Sequence[str], outputs: Sequence[str], *, nms: bool = False, argmax: bool = False,
                  category_ids: Sequence[int] | None = None, palette: Any = None, pad_value: Any = None,
                  postprocess: dict[str, Any] | None = None, layout: str = "nchw", input_dtype: str = "float32",
                  **extra: Any) -> dict[str, Any]:
    """The contract dict (``format`` and ``int8`` are set by the exporter)."""
    from backbone.export.layout import input_spec
    from backbone.training.checkpoint import versions

    return {
        "mnv2_export": VERSION, "task": task, "format": None,
        "layout": layout, "input": input_spec(layout, input_dtype), "input_size": [int(s) for s in input_size], "resize": resize,
        "pad_value": None if pad_value is None else [float(v) for v in pad_value],
        "normalize": {"mean": [float(m) for m in mean], "std": [float(s) for s in std]},
        "class_names": [str(n) for n in class_names],
        "category_ids": None if category_ids is None else [int(c) for c in category_ids],
        "palette": None if palette is None else np.asarray(palette).astype(int).tolist(),
        "nms": bool(nms), "argmax": bool(argmax), "int8": False, "outputs": list(outputs),
        "postprocess": postprocess, "versions": versions(), **extra,
    }


def encode(metadata: dict[str, Any]) -> str:
    return json.dumps(metadata, sort_keys=True)


def decode(text: str) -> dict[str, Any]:
    return json.loads(text)


def prepare_image(image: np.ndarray, metadata: dict[str, Any]) -> np.ndarray:
    """One HWC uint8 RGB image -> (3, H, W) float32 0..255 as the exported model expects it, with the
    eval pipeline's own resize (det: :func:`mnv2det.transforms.build_eval_transform`; seg: pad
    bottom/right with ``pad_value``, a larger image is cropped)."""
    h, w = metadata["input_size"]
    if metadata["resize"] == "pad":
        out = np.empty((h, w, 3), np.float32)
        out[:] = np.asarray(metadata["pad_value"], np.float32)
        ih, iw = min(h, image.shape[0]), min(w, image.shape[1])
        out[:ih, :iw] = image[:ih, :iw]
        return np.ascontiguousarray(out.transpose(2, 0, 1))
    from mnv2det.transforms import build_eval_transform

    if h != w:
        raise ValueError(f"detection input must be square, got {h}x{w}")
    identity = {"mean": [0.0, 0.0, 0.0], "std": [1 / 255] * 3}  # the transform's normalise becomes x * 1
    target = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64), "crowd": np.zeros(0, bool)}
    x, _ = build_eval_transform(h, identity, metadata["resize"])(image, target)
    return x.numpy().astype(np.float32)
