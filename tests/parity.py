"""Shared assertions of the export parity tests (ONNX, TFLite, ExecuTorch)."""
from __future__ import annotations

import numpy as np


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def assert_same_detections(out: dict, i: int, ref: dict) -> None:
    n = int(out["num_detections"][i])
    assert n == len(ref["scores"]), (i, n, len(ref["scores"]))
    boxes, scores, labels = out["boxes"][i, :n], out["scores"][i, :n], out["labels"][i, :n]
    rb, rs, rl = ref["boxes"].numpy(), ref["scores"].numpy(), ref["labels"].numpy()
    for j in range(n):
        same = np.flatnonzero(labels == rl[j])
        ious = iou(np.repeat(rb[j:j + 1], len(same), 0), boxes[same])
        k = same[int(np.argmax(ious))]
        assert ious.max() > 0.99 and abs(scores[k] - rs[j]) < 1e-3, (i, j, ious.max(), scores[k], rs[j])
    assert np.array_equal(np.sort(labels), np.sort(rl))
    assert np.all(out["labels"][i, n:] == 0) and np.all(out["scores"][i, n:] == 0)  # padding
