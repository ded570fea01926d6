"""The default TFLite exports (mobile layout, tools/export.py format=tflite) in the client mobile developers
use: MediaPipe Tasks' ``ObjectDetector`` and ``ImageSegmenter``, loading the files as they are.

MediaPipe stretches an image to the model's input size (no padding) and maps the results back to the
image, so the reference is the checkpoint (PyTorch) on the image stretched the same way: detections
with the same class, IoU > 0.9 and score within 1e-2 (MediaPipe reports integer pixel boxes and
resamples the image itself); category masks equal on >= 99 % of the pixels. Real non-square photos
(scikit-image's) for the TF-trained SSDLite of the test assets; the trained seg fixture
(tests/conftest.py) on its non-square val images and a photo.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mediapipe_client import (SCORE_MARGIN, SCORE_THRESHOLD, assert_same, checkpoint_detections,
                              mediapipe_category_mask, mediapipe_detections)

pytest.importorskip("ai_edge_litert")
pytest.importorskip("litert_torch")
pytestmark = pytest.mark.slow

from backbone.export import prepare  # noqa: E402
from backbone.export.tflite import export  # noqa: E402


def _photo(name: str) -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data")
    img = getattr(skimage_data, name)()
    return np.ascontiguousarray(np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3])


# ----------------------------------------------------------------------------- detection
@pytest.fixture(scope="module")
def det_tflite(tf_ssdlite_export, tmp_path_factory):
    """The TF-trained SSDLite exported as tools/export.py format=tflite writes it (mobile layout)."""
    wrapper, example, meta = prepare(tf_ssdlite_export["ckpt"], nms=True, layout="mobile")
    path = export(wrapper, example, meta, tmp_path_factory.mktemp("mp_det") / "ped.tflite")
    return wrapper, path


PHOTOS = {"astronaut": lambda im: im[:, 40:440], "coffee": lambda im: im, "rocket": lambda im: im}


def test_mediapipe_object_detector_matches_checkpoint(det_tflite, tf_ssdlite_export):
    wrapper, path = det_tflite
    names = tf_ssdlite_export["metadata"]["class_names"]
    strong = 0
    for name, crop in PHOTOS.items():
        image = np.ascontiguousarray(crop(_photo(name)))
        assert image.shape[0] != image.shape[1]
        mp_dets = mediapipe_detections(path, image)
        ref = checkpoint_detections(wrapper, image)
        assert_same(mp_dets, ref, names)
        strong += sum(d[1] >= SCORE_THRESHOLD + SCORE_MARGIN for d in mp_dets)
    assert strong >= 2  # real people found: the check has power


# ----------------------------------------------------------------------------- segmentation
#: the seg export's input size: a real photo's (chelsea at a third), non-square. The images MediaPipe gets
#: have exactly this size, so neither MediaPipe's resampling nor ours enters the comparison (measured:
#: MediaPipe's ImageToTensor and mask resizing differ from cv2's by a fraction of a pixel, which on this
#: tiny fixture model moves 10-20 % of the pixels of a 60 px image; the detection test emulates it)
SEG_HW = (100, 151)


@pytest.fixture(scope="module")
def seg_tflite(trained_seg, tmp_path_factory):
    """The trained seg fixture exported as tools/export.py task=seg format=tflite writes it (mobile layout)."""
    wrapper, example, meta = prepare(trained_seg["ckpt"], argmax=False, layout="mobile", input_size=list(SEG_HW))
    path = export(wrapper, example, meta, tmp_path_factory.mktemp("mp_seg") / "seg.tflite")
    return wrapper, path


def checkpoint_mask(wrapper, image: np.ndarray) -> np.ndarray:
    """The PyTorch model's single-scale mask: logits resized to the input (its align_corners), argmax."""
    model = wrapper.model
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32))[None]
    with torch.no_grad():
        logits = model.head(model.backbone((x - wrapper.mean) / wrapper.std)[model.feature])
        up = F.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=model.align_corners)
    return up.argmax(1)[0].numpy()


def test_mediapipe_image_segmenter_matches_checkpoint(seg_tflite, trained_seg):
    import cv2

    wrapper, path = seg_tflite
    photo = _photo("chelsea")[::3, ::3]
    assert photo.shape[:2] == SEG_HW
    images = [np.ascontiguousarray(photo)]
    images += [cv2.resize(im, SEG_HW[::-1], interpolation=cv2.INTER_LINEAR) for im in trained_seg["val_images"][:3]]
    present = set()
    for image in images:
        ours = mediapipe_category_mask(path, image)
        ref = checkpoint_mask(wrapper, image)
        assert ours.shape == ref.shape == image.shape[:2]
        agree = (ours == ref).mean()
        assert agree >= 0.99, agree
        present |= set(np.unique(ref).tolist())
    assert len(present) >= 3  # several classes: the check has power
