"""TFLite (LiteRT) and ExecuTorch export: parity in the real runtimes (ai-edge-litert's interpreter;
executorch.runtime with XNNPACK) with PyTorch, each test run for both formats.

Small random-weight detectors (conversion dominates: ~40-120 s on a busy 2-core machine, hence ``slow``):
detection with NMS inside (TFLite: the native TFLite_Detection_PostProcess op; ExecuTorch: the static-shape
NMS) gives the detections of mnv2det.postprocess.PostProcessor
(same count, labels; IoU > 0.99; scores within 1e-3) on several images, raw detection outputs within
1e-3 (also for a batch larger than one runtime call); on the session's trained seg model
(tests/conftest.py), segmentation logits within 1e-3 and the argmax mask equal on >= 99.9 % of pixels;
the contract travels in the file. A format whose converter or runtime is not installed is skipped
(tests/conftest.py makes that a failure in CI).
"""
from __future__ import annotations

import importlib
from typing import Callable

import numpy as np
import pytest
import torch
from fixture_models import random_det_ckpt
from mediapipe_client import file_facts
from parity import assert_same_detections

from backbone.export import prepare
from backbone.export.runtime import load_exported

pytestmark = pytest.mark.slow
#: format -> (suffix, modules its converter and runtime need)
FORMATS = {"tflite": (".tflite", ("ai_edge_litert", "litert_torch")),
           "executorch": (".pte", ("executorch.runtime", "executorch.exir"))}


@pytest.fixture(scope="module", params=sorted(FORMATS))
def fmt(request: pytest.FixtureRequest) -> tuple[str, str, Callable]:
    """(format, suffix, its export function); skipped when its converter / runtime is not installed."""
    name = request.param
    suffix, needs = FORMATS[name]
    for module in needs:
        pytest.importorskip(module, reason=f"{name} converter/runtime not installed (pip install -e '.[export]')")
    return name, suffix, importlib.import_module(f"backbone.export.{name}").export


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Whole 0..255 values: what a uint8 input (the mobile TFLite detector's) carries exactly."""
    return np.random.default_rng(0).integers(0, 256, (4, 3, 96, 96)).astype(np.float32)


def _check_mobile_file(path, wrapper, meta) -> None:
    """A mobile-layout uint8 detector: one subgraph, no StableHLO op (TFLite <= 2.14 and the Task Library
    know none), both metadata entries, and in MediaPipe the checkpoint's detections."""
    from mediapipe_client import SCORE_MARGIN, SCORE_THRESHOLD, assert_same, checkpoint_detections, mediapipe_detections

    assert meta["outputs"] == ["locations", "classes", "scores", "count"]
    assert meta["input"] == {"name": "images", "layout": "NHWC", "dtype": "uint8", "range": [0, 255], "color": "RGB"}
    facts = file_facts(path)
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


def test_det_nms_matches_postprocessor(tmp_path, images, fmt):
    """TFLite: the file tools/export.py format=tflite input_dtype=uint8 writes (mobile layout), which the
    loader reads back to the nchw contract and MediaPipe's ObjectDetector takes as it is."""
    FMT, SUFFIX, export = fmt
    mobile = {"layout": "mobile", "input_dtype": "uint8"} if FMT == "tflite" else {}
    wrapper, example, meta = prepare(random_det_ckpt(balanced=True), nms=True, **mobile)
    path = export(wrapper, example, meta, tmp_path / f"det{SUFFIX}")
    model = load_exported(path)
    assert model.metadata["format"] == FMT and model.metadata["nms"] and model.metadata["task"] == "det"
    if FMT == "tflite":
        _check_mobile_file(path, wrapper, meta)
    else:
        assert model.metadata["outputs"] == ["boxes", "scores", "labels", "num_detections"]
    assert model.metadata["class_names"] == ["c0", "c1", "c2"] and model.metadata["input_size"] == [96, 96]
    if FMT == "tflite":  # decode + NMS in TFLite's native op, the cap before it (TOPK_V2)
        assert model.metadata["nms_op"]["op"] == "TFLite_Detection_PostProcess" and "static_nms" not in model.metadata
        assert {"CUSTOM", "TOPK_V2"} <= file_facts(path)["ops"]
    else:
        assert model.metadata["static_nms"]["top_k"] == 60
    out = model(images)
    assert out["boxes"].shape == (4, 12, 4) and out["labels"].dtype == np.int64
    ssd = wrapper.model
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (ssd.normalize_mean, ssd.normalize_std))
    with torch.no_grad():
        refs = ssd.postprocess(ssd((torch.from_numpy(images) / 255 - mean) / std), torch.tensor([[96, 96]] * 4))
    assert sum(len(r["scores"]) for r in refs) >= 8  # enough detections that NMS matters
    # every class detected: LiteRT's multi-threaded regular NMS skips class `num_threads` (the per-class
    # ops avoid it), so each thread count must find all three
    assert set(torch.cat([r["labels"] for r in refs]).tolist()) == {1, 2, 3}
    for i, ref in enumerate(refs):
        assert_same_detections(out, i, ref)
    if FMT == "tflite":
        from backbone.export.tflite import TFLiteModel

        for threads in (1, 3):
            again = TFLiteModel(path, threads=threads)(images)
            for i, ref in enumerate(refs):
                assert_same_detections(again, i, ref)


def test_det_raw_outputs_match(tmp_path, images, fmt):
    FMT, SUFFIX, export = fmt
    wrapper, example, meta = prepare(random_det_ckpt(), nms=False, decoded=False)
    model = load_exported(export(wrapper, example, meta, tmp_path / f"raw{SUFFIX}"))
    assert model.metadata["outputs"] == ["cls_logits", "bbox_regression", "anchors"]
    out = model(images)
    ssd = wrapper.model
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (ssd.normalize_mean, ssd.normalize_std))
    with torch.no_grad():
        ref = ssd((torch.from_numpy(images) / 255 - mean) / std)
    for name in ("cls_logits", "bbox_regression", "anchors"):
        assert out[name].shape == tuple(ref[name].shape), name
        assert np.abs(out[name] - ref[name].numpy()).max() < 1e-3, name
    # a batch larger than one runtime call (the evaluation's val batches): same per-image outputs
    many = model(np.concatenate([images] * 5 + [images[:1]]))
    for name in ("cls_logits", "bbox_regression"):
        assert np.abs(many[name][: len(images)] - out[name]).max() < 1e-5, name
        assert np.abs(many[name][-1] - out[name][0]).max() < 1e-5, name


def test_seg_logits_and_mask_match(tmp_path, fmt, trained_seg):
    """On the session's seg model trained to predict several classes (tests/conftest.py) and the synthetic
    val images padded as the eval pipeline pads them (a random model answers nearly the same whatever its
    input, so a swapped channel or a flipped align_corners would pass on it)."""
    FMT, SUFFIX, export = fmt
    from backbone.export.metadata import prepare_image
    from mnv2seg.inference import predict

    ckpt = trained_seg["ckpt"]
    wrapper, example, meta = prepare(ckpt, argmax=False)
    logits_model = load_exported(export(wrapper, example, meta, tmp_path / f"seg{SUFFIX}"))
    mask_wrapper, example, meta = prepare(ckpt, argmax=True)
    mask_model = load_exported(export(mask_wrapper, example, meta, tmp_path / f"mask{SUFFIX}"))
    assert mask_model.metadata["format"] == FMT and mask_model.metadata["resize"] == "pad"
    images = np.stack([prepare_image(im, mask_model.metadata) for im in trained_seg["val_images"]])
    model = wrapper.model
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (meta["normalize"]["mean"], meta["normalize"]["std"]))
    x = (torch.from_numpy(images) / 255 - mean) / std
    with torch.no_grad():
        ref_logits = model.head(model.backbone(x)[model.feature]).numpy()
    ref_mask = predict(model, x).argmax(1).numpy()
    assert (np.bincount(ref_mask.ravel(), minlength=7) >= 0.02 * ref_mask.size).sum() >= 3  # the check has power
    out = logits_model(images)["logits"]
    assert out.shape == ref_logits.shape
    assert np.abs(out - ref_logits).max() < 1e-3
    size = trained_seg["eval_size"]
    mask = mask_model(images)["mask"]
    assert mask.shape == (len(images), size, size) and mask.dtype == np.int64
    assert (mask == ref_mask).mean() >= 0.999


def test_tflite_static_nms_matches_postprocessor(tmp_path, images):
    """TFLite with the static NMS instead of the native op (layout=nchw, or options.nms_op=static)."""
    for module in FORMATS["tflite"][1]:
        pytest.importorskip(module, reason="tflite converter/runtime not installed (pip install -e '.[export]')")
    from backbone.export.tflite import export

    wrapper, example, meta = prepare(random_det_ckpt(balanced=True), nms=True)
    model = load_exported(export(wrapper, example, meta, tmp_path / "det.tflite", nms_op="static"))
    assert model.metadata["static_nms"]["top_k"] == 60 and "nms_op" not in model.metadata
    out = model(images)
    ssd = wrapper.model
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (ssd.normalize_mean, ssd.normalize_std))
    with torch.no_grad():
        refs = ssd.postprocess(ssd((torch.from_numpy(images) / 255 - mean) / std), torch.tensor([[96, 96]] * 4))
    assert set(torch.cat([r["labels"] for r in refs]).tolist()) == {1, 2, 3}
    for i, ref in enumerate(refs):
        assert_same_detections(out, i, ref)
