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
from parity import iou

pytest.importorskip("ai_edge_litert")
pytest.importorskip("litert_torch")
pytestmark = pytest.mark.slow

from backbone.export import prepare  # noqa: E402
from backbone.export.tflite import export  # noqa: E402

SCORE_THRESHOLD = 0.3
#: detections this close to the threshold may fall either side of it in one of the two runtimes
SCORE_MARGIN = 0.02


def _photo(name: str) -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data")
    img = getattr(skimage_data, name)()
    return np.ascontiguousarray(np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3])


def _mediapipe():
    from backbone.export import tflite_support

    if not tflite_support.available():
        pytest.skip("mediapipe not installed (pip install -e '.[export]')")
    import mediapipe as mp
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.core.base_options import BaseOptions

    return mp, vision, BaseOptions


def _stretch(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
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


# ----------------------------------------------------------------------------- detection
@pytest.fixture(scope="module")
def det_tflite(tf_ssdlite_export, tmp_path_factory):
    """The TF-trained SSDLite exported as tools/export.py format=tflite writes it (mobile layout)."""
    wrapper, example, meta = prepare(tf_ssdlite_export["ckpt"], nms=True, layout="mobile")
    path = export(wrapper, example, meta, tmp_path_factory.mktemp("mp_det") / "ped.tflite")
    return wrapper, path


def mediapipe_detections(path, image: np.ndarray) -> list[tuple[str, float, np.ndarray]]:
    """[(class name, score, xyxy box in image pixels)] of MediaPipe's ObjectDetector."""
    mp, vision, BaseOptions = _mediapipe()
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
    x = (torch.from_numpy(_stretch(image, (H, W)))[None] / 255 - mean) / std
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


def mediapipe_category_mask(path, image: np.ndarray) -> np.ndarray:
    mp, vision, BaseOptions = _mediapipe()
    options = vision.ImageSegmenterOptions(base_options=BaseOptions(model_asset_path=str(path)),
                                           output_category_mask=True, output_confidence_masks=False)
    with vision.ImageSegmenter.create_from_options(options) as segmenter:
        result = segmenter.segment(mp.Image(image_format=mp.ImageFormat.SRGB, data=image))
    return result.category_mask.numpy_view().reshape(image.shape[:2]).copy()


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


# ----------------------------------------------------------------------------- the file itself
def _file_facts(path) -> dict:
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    m = schema.Model.GetRootAs(path.read_bytes(), 0)
    codes = [m.OperatorCodes(i) for i in range(m.OperatorCodesLength())]
    meta = {m.Metadata(i).Name().decode(): m.Metadata(i).Buffer() for i in range(m.MetadataLength())}
    runtime = m.Buffers(meta["min_runtime_version"]).DataAsNumpy().tobytes().rstrip(b"\0").decode()
    return {"subgraphs": m.SubgraphsLength(), "metadata": set(meta), "min_runtime_version": runtime,
            "ops": {names[max(c.BuiltinCode(), c.DeprecatedBuiltinCode())] for c in codes}}


def test_uint8_mobile_detector_in_mediapipe_and_old_runtimes(tmp_path):
    """The uint8-input variant: one subgraph, no StableHLO op (TFLite <= 2.14 and the Task Library know
    none), both metadata entries; MediaPipe gives the checkpoint's detections; our loader too."""
    from fixture_models import random_det_ckpt
    from parity import assert_same_detections

    from backbone.export.runtime import load_exported

    wrapper, example, meta = prepare(random_det_ckpt(), nms=True, layout="mobile", input_dtype="uint8")
    assert example.dtype == torch.uint8 and example.shape == (1, 96, 96, 3)
    path = export(wrapper, example, meta, tmp_path / "det_u8.tflite")
    facts = _file_facts(path)
    assert facts["subgraphs"] == 1, facts
    assert not any(op.startswith("STABLEHLO") for op in facts["ops"]), facts["ops"]
    assert tuple(int(v) for v in facts["min_runtime_version"].split(".")) <= (2, 14, 0), facts
    assert {"mnv2", "TFLITE_METADATA"} <= facts["metadata"], facts
    image = np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    # 4x blown up: MediaPipe's corner-mapped sampling then reads exactly the 96 px image's pixels, and its
    # integer pixel boxes are 4x finer
    big = np.ascontiguousarray(np.repeat(np.repeat(image, 4, axis=0), 4, axis=1))
    ref = checkpoint_detections(wrapper, big)
    assert sum(d[1] >= SCORE_THRESHOLD + SCORE_MARGIN for d in ref) >= 4  # the check has power
    assert_same(mediapipe_detections(path, big), ref, meta["class_names"])
    model = load_exported(path)
    assert model.metadata["input"] == {"name": "images", "layout": "NHWC", "dtype": "uint8", "range": [0, 255],
                                       "color": "RGB"}
    out = model(image.transpose(2, 0, 1)[None].astype(np.float32))
    ssd = wrapper.model
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (ssd.normalize_mean, ssd.normalize_std))
    with torch.no_grad():
        x = (torch.from_numpy(image.transpose(2, 0, 1)[None].astype(np.float32)) / 255 - mean) / std
        assert_same_detections(out, 0, ssd.postprocess(ssd(x), torch.tensor([[96, 96]]))[0])
