"""ONNX files in OpenCV 4's ``cv2.dnn`` (the release most OpenCV users, C++ and Python, run), as they are.

The detector exported with ``nms=false`` (decoded boxes + scores, no TopK / NMS op) and the segmenter
(logits, and the mask with ``argmax=true``) load and run in OpenCV 4 and equal ONNX Runtime; the
detector's NMS done by ``cv2.dnn.NMSBoxesBatched`` as README "OpenCV" shows (tests/opencv_client.py)
gives PyTorch's PostProcessor's detections (same count and labels, IoU > 0.99, scores within 1e-3) on
real photos (the TF-trained SSDLite) and a random-weight model. OpenCV 4 is installed beside the venv
by ``python tools/download.py test-assets`` (the venv's own cv2 is 5.x) and runs in a subprocess.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fixture_models import random_det_ckpt
from parity import assert_same_detections

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from backbone.export import prepare  # noqa: E402
from backbone.export.metadata import prepare_image  # noqa: E402
from backbone.export.onnx import export  # noqa: E402
from backbone.export.runtime import load_exported  # noqa: E402
from backbone.training import downloads  # noqa: E402

CLIENT = Path(__file__).with_name("opencv_client.py")


@pytest.fixture(scope="module")
def opencv4() -> Path:
    path = downloads.opencv4_dir()
    if not (path / "cv2" / "__init__.py").is_file():
        msg = f"OpenCV 4 not installed at {path}; install it with `{downloads.FETCH_TEST_ASSETS}`"
        if os.environ.get("MNV2_REQUIRE_ASSETS", "") == "1":
            pytest.fail(msg + " (MNV2_REQUIRE_ASSETS=1)", pytrace=False)
        pytest.skip(msg)
    return path


def run_opencv(opencv4: Path, tmp_path: Path, model: Path, images: np.ndarray, **post) -> dict[str, np.ndarray]:
    request, result = tmp_path / f"{model.stem}_req.npz", tmp_path / f"{model.stem}_res.npz"
    np.savez(request, model=str(model), images=images.astype(np.float32), **post)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(opencv4), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(CLIENT), str(request), str(result)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = dict(np.load(result))
    assert str(out["opencv_version"]).startswith("4."), out["opencv_version"]
    return out


def _photo(name: str) -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data")
    img = getattr(skimage_data, name)()
    return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]


def _check_detector(ckpt: dict, images_hwc: list[np.ndarray] | None, opencv4: Path, tmp_path: Path) -> int:
    wrapper, example, meta = prepare(ckpt, nms=False)
    assert meta["outputs"] == ["boxes", "scores"] and meta["decoded"]
    path = export(wrapper, example, meta, tmp_path / "det_decoded.onnx")
    ort = load_exported(path)
    H, W = meta["input_size"]
    if images_hwc is None:
        images = np.random.default_rng(0).uniform(0, 255, (3, 3, H, W)).astype(np.float32)
    else:
        images = np.stack([prepare_image(im, meta) for im in images_hwc])
    pp = wrapper.model.postprocessor
    post = {"score_threshold": max(pp.score_threshold, 0.0), "nms_iou": pp.nms_iou,
            "pre_nms_top_k": pp.pre_nms_top_k or 0, "max_detections": pp.max_detections}
    cv = run_opencv(opencv4, tmp_path, path, images, **post)
    ref_out = ort(images)
    for name in ("boxes", "scores"):  # boxes: decoded, unclipped (exp of a code: far outside for some anchors)
        diff = np.abs(cv[name] - ref_out[name]) / np.maximum(np.abs(ref_out[name]), 1.0)
        assert diff.max() < 1e-4, (name, diff.max(), np.abs(ref_out[name]).max())
    ssd = wrapper.model
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (ssd.normalize_mean, ssd.normalize_std))
    with torch.no_grad():
        refs = ssd.postprocess(ssd((torch.from_numpy(images) / 255 - mean) / std), torch.tensor([[H, W]] * len(images)))
    found = 0
    for i, ref in enumerate(refs):
        n = len(cv[f"det_{i}_scores"])
        D = pp.max_detections
        out = {"num_detections": np.array([n]), "boxes": np.zeros((1, D, 4), np.float32),
               "scores": np.zeros((1, D), np.float32), "labels": np.zeros((1, D), np.int64)}
        out["boxes"][0, :n], out["scores"][0, :n], out["labels"][0, :n] = (
            cv[f"det_{i}_boxes"], cv[f"det_{i}_scores"], cv[f"det_{i}_labels"])
        assert_same_detections(out, 0, ref)
        found += int((ref["scores"] > 0.3).sum())
    return found


def test_opencv4_detector_tf_ssdlite_photos(tf_ssdlite_export, opencv4, tmp_path):
    photos = [_photo("astronaut")[:, 40:440], _photo("coffee"), _photo("chelsea")]
    assert _check_detector(tf_ssdlite_export["ckpt"], photos, opencv4, tmp_path) >= 1  # a person: power


def test_opencv4_detector_random_model(opencv4, tmp_path):
    assert _check_detector(random_det_ckpt(), None, opencv4, tmp_path) >= 0


def test_opencv4_segmenter(trained_seg, trained_seg_onnx, opencv4, tmp_path):
    logits_model = load_exported(trained_seg_onnx["logits"])
    images = np.stack([prepare_image(im, logits_model.metadata) for im in trained_seg["val_images"]])
    cv = run_opencv(opencv4, tmp_path, trained_seg_onnx["logits"], images)
    assert np.abs(cv["logits"] - logits_model(images)["logits"]).max() < 1e-3
    cv = run_opencv(opencv4, tmp_path, trained_seg_onnx["mask"], images)
    ref = load_exported(trained_seg_onnx["mask"])(images)["mask"]
    assert (cv["mask"].astype(np.int64) == ref).mean() >= 0.999
    assert len(np.unique(ref)) >= 3  # several classes: the check has power
