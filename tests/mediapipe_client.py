"""Phone-client helpers of the tests: MediaPipe Tasks run on our TFLite files, the checkpoint's answer
to the same image, and the facts of a .tflite file (tests/test_mediapipe.py, tests/test_export_mobile.py).

MediaPipe stretches an image to the model's input size (no padding) and maps the results back to the
image, so the reference is the checkpoint (PyTorch) on the image stretched the same way: detections
with the same class, IoU > 0.9 and score within 1e-2 (MediaPipe reports integer pixel boxes).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from parity import iou

SCORE_THRESHOLD = 0.3
#: detections this close to the threshold may fall either side of it in one of the two runtimes
SCORE_MARGIN = 0.02


def require_mediapipe():
    from backbone.export import tflite_support

    if not tflite_support.available():
        pytest.skip("mediapipe not installed (pip install -e '.[export]')")
    import mediapipe as mp
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.core.base_options import BaseOptions

    return mp, vision, BaseOptions


def stretch(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(3, H, W) float32 0..255: the image resized to the input size ignoring its aspect, sampled as
    MediaPipe's CPU ImageToTensor does (measured: an affine warp mapping the image's corners onto the
    tensor's, so output pixel x samples x * W_image / W_input with no half-pixel offset, bilinear,
    replicated border). cv2.resize's half-pixel-centred sampling differs by a fraction of a pixel, enough
    to move a fragile detection's score from 0.05 to 0.36 (the astronaut photo)."""
    import cv2

    h, w = image.shape[:2]
    warp = np.array([[hw[1] / w, 0, 0], [0, hw[0] / h, 0]], np.float64)
    out = cv2.warpAffine(image, warp, (hw[1], hw[0]), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return np.ascontiguousarray(out.transpose(2, 0, 1).astype(np.float32))


def mediapipe_detections(path, image: np.ndarray) -> list[tuple[str, float, np.ndarray]]:
    """[(class name, score, xyxy box in image pixels)] of MediaPipe's ObjectDetector."""
    mp, vision, BaseOptions = require_mediapipe()
    options = vision.ObjectDetectorOptions(base_options=BaseOptions(model_asset_path=str(path)),
                                           score_threshold=SCORE_THRESHOLD - SCORE_MARGIN, max_results=-1)
    with vision.ObjectDetector.create_from_options(options) as detector:
        result = detector.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=image))
    out = []
    for d in result.detections:
        b = d.bounding_box
        box = np.array([b.origin_x, b.origin_y, b.origin_x + b.width, b.origin_y + b.height], np.float32)
        out.append((d.categories[0].category_name, float(d.categories[0].score), box))
    return out


def checkpoint_detections(wrapper, image: np.ndarray) -> list[tuple[int, float, np.ndarray]]:
    """[(label 1..K, score, xyxy box in image pixels)] of the PyTorch model and its PostProcessor, on the
    image stretched to the input size."""
    ssd = wrapper.model
    H, W = wrapper.input_size
    mean = torch.tensor(ssd.normalize_mean).view(1, 3, 1, 1)
    std = torch.tensor(ssd.normalize_std).view(1, 3, 1, 1)
    x = (torch.from_numpy(stretch(image, (H, W)))[None] / 255 - mean) / std
    with torch.no_grad():
        ref = ssd.postprocess(ssd(x), torch.tensor([[H, W]]))[0]
    scale = np.array([image.shape[1] / W, image.shape[0] / H] * 2, np.float32)
    return [(int(label), float(s), b.numpy() * scale) for b, s, label in zip(ref["boxes"], ref["scores"], ref["labels"])]


def assert_same(mp_dets: list, ref_dets: list, names: list[str]) -> None:
    """Every reference detection over the threshold (+ margin) is in MediaPipe's, and the other way round."""
    def strong(dets):
        return [d for d in dets if d[1] >= SCORE_THRESHOLD + SCORE_MARGIN]

    ref_dets = [(names[label - 1], score, box) for label, score, box in ref_dets]
    for a_list, b_list, what in ((strong(ref_dets), mp_dets, "missing in MediaPipe"),
                                 (strong(mp_dets), ref_dets, "not in the checkpoint's")):
        for name, score, box in a_list:
            same = [d for d in b_list if d[0] == name]
            assert same, (what, name, score, box)
            ious = iou(np.repeat(box[None], len(same), 0), np.stack([d[2] for d in same]))
            k = int(np.argmax(ious))
            assert ious[k] > 0.9 and abs(same[k][1] - score) < 1e-2, (what, name, score, box, same[k], ious[k])


def mediapipe_category_mask(path, image: np.ndarray) -> np.ndarray:
    mp, vision, BaseOptions = require_mediapipe()
    options = vision.ImageSegmenterOptions(base_options=BaseOptions(model_asset_path=str(path)),
                                           output_category_mask=True, output_confidence_masks=False)
    with vision.ImageSegmenter.create_from_options(options) as segmenter:
        result = segmenter.segment(mp.Image(image_format=mp.ImageFormat.SRGB, data=image))
    return result.category_mask.numpy_view().reshape(image.shape[:2]).copy()


def file_facts(path) -> dict:
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    m = schema.Model.GetRootAs(path.read_bytes(), 0)
    codes = [m.OperatorCodes(i) for i in range(m.OperatorCodesLength())]
    meta = {m.Metadata(i).Name().decode(): m.Metadata(i).Buffer() for i in range(m.MetadataLength())}
    runtime = m.Buffers(meta["min_runtime_version"]).DataAsNumpy().tobytes().rstrip(b"\0").decode()
    return {"subgraphs": m.SubgraphsLength(), "metadata": set(meta), "min_runtime_version": runtime,
            "ops": {names[max(c.BuiltinCode(), c.DeprecatedBuiltinCode())] for c in codes}}
