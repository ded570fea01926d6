"""What an OpenCV user writes to run our ONNX files with ``cv2.dnn`` (README "OpenCV"), run by
tests/test_export_opencv.py in a subprocess whose PYTHONPATH puts OpenCV 4 first:

    python tests/opencv_client.py REQUEST.npz RESULT.npz

REQUEST holds ``model`` (the .onnx path), ``images`` (B, 3, H, W) float32 RGB 0..255 and, for a
detector exported with ``nms=false`` (decoded boxes + scores), the post-processing settings
``score_threshold``, ``nms_iou``, ``pre_nms_top_k`` (0: all), ``max_detections``. RESULT holds the net's
outputs by name, the OpenCV version and, for a detector, ``det_<i>_boxes`` / ``_scores`` / ``_labels``
(1..K) of image i after :func:`detections`.
"""
from __future__ import annotations

import sys

import cv2
import numpy as np


def detections(boxes: np.ndarray, scores: np.ndarray, width: int, height: int, score_threshold: float,
               nms_iou: float, pre_nms_top_k: int, max_detections: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's boxes (A, 4) xyxy px and scores (A, K) -> boxes (N, 4), scores (N,), labels (N,) 1..K: the
    PostProcessor's steps, NMS by OpenCV (class-wise: every (anchor, class) pair is a candidate)."""
    flat = scores.reshape(-1)  # anchor-major, as the PostProcessor ranks
    order = np.argsort(-flat, kind="stable")
    if pre_nms_top_k:
        order = order[:pre_nms_top_k]
    order = order[flat[order] >= score_threshold]
    anchor, cls = np.divmod(order, scores.shape[1])
    cand = boxes[anchor]
    rects = np.concatenate([cand[:, :2], cand[:, 2:] - cand[:, :2]], axis=1)  # x, y, w, h
    keep = np.asarray(cv2.dnn.NMSBoxesBatched(rects.tolist(), flat[order].tolist(), cls.tolist(), -1.0, nms_iou),
                      dtype=np.int64).reshape(-1)
    keep = keep[np.argsort(-flat[order][keep], kind="stable")]
    clipped = np.clip(cand[keep], 0, [width, height, width, height])
    nonempty = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    keep, clipped = keep[nonempty][:max_detections], clipped[nonempty][:max_detections]
    return clipped.astype(np.float32), flat[order][keep].astype(np.float32), cls[keep] + 1


def main(request: str, result: str) -> None:
    req = np.load(request)
    net = cv2.dnn.readNetFromONNX(str(req["model"]))
    names = net.getUnconnectedOutLayersNames()
    out: dict[str, np.ndarray] = {"opencv_version": np.array(cv2.__version__)}
    per_image = []
    for image in req["images"]:
        net.setInput(image[None])
        per_image.append(dict(zip(names, net.forward(names))))
    for name in names:
        out[name] = np.concatenate([r[name] for r in per_image])
    if "score_threshold" in req:
        H, W = req["images"].shape[-2:]
        boxes, scores = out["boxes"], out["scores"]
        for i in range(len(boxes)):
            b, s, lab = detections(boxes[i], scores[i], W, H, float(req["score_threshold"]), float(req["nms_iou"]),
                                   int(req["pre_nms_top_k"]), int(req["max_detections"]))
            out[f"det_{i}_boxes"], out[f"det_{i}_scores"], out[f"det_{i}_labels"] = b, s, lab
    np.savez(result, **out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
