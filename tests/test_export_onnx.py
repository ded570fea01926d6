"""ONNX export: parity of the exported graph (run by onnxruntime) with PyTorch.

Detection on the real TF-trained SSDLite (the `tf_ssdlite_graph` asset) and the scikit-image photos
test_tf_import uses: raw outputs within 1e-3 (max abs), detections with post-processing inside equal
to mnv2det.postprocess.PostProcessor's (same count, labels, IoU > 0.99 after matching, scores within
1e-3), batch 1 == batch 3 (dynamic batch). Segmentation on a small Mobile DeepLabv3 trained to
predict several classes on the synthetic VOC set (a random-weight one predicts one class everywhere,
so a mask check on it cannot fail): logits within 1e-3 and the argmax mask equal on >= 99.9 % of
pixels, with either align_corners. Plus the metadata contract and tools/export.py's errors. The
exports and the trained model are the session's (tests/conftest.py), shared with test_predict/test_int8.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# each ONNX export takes 10-60 s on a shared 2-core CPU
pytestmark = pytest.mark.slow

from parity import assert_same_detections  # noqa: E402

from backbone.export import prepare  # noqa: E402
from backbone.export.metadata import prepare_image  # noqa: E402
from backbone.export.onnx import export  # noqa: E402
from backbone.export.runtime import load_exported  # noqa: E402

PHOTOS = ("astronaut", "camera", "coffee")


def _photo(name: str) -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data")
    img = getattr(skimage_data, name)()
    return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]


@pytest.fixture(scope="module")
def tf_ckpt(tf_ssdlite_export) -> dict:
    return tf_ssdlite_export["ckpt"]


@pytest.fixture(scope="module")
def det_export(tf_ssdlite_export):
    """(wrapper, ONNX model) with post-processing inside (the session's export, tests/conftest.py), and the
    photos as model input (3, 3, 300, 300)."""
    model = load_exported(tf_ssdlite_export["onnx"])
    images = np.stack([prepare_image(_photo(p), model.metadata) for p in PHOTOS])
    return tf_ssdlite_export["wrapper"], model, images


def _torch_detections(ssd, images: np.ndarray) -> list[dict]:
    """PyTorch's own path: normalise, forward, PostProcessor at input pixels."""
    mean = torch.tensor(ssd.normalize_mean).view(1, 3, 1, 1)
    std = torch.tensor(ssd.normalize_std).view(1, 3, 1, 1)
    x = (torch.from_numpy(images) / 255 - mean) / std
    h, w = images.shape[-2:]
    with torch.no_grad():
        return ssd.postprocess(ssd(x), torch.tensor([[h, w]] * len(images)))


def test_det_metadata_contract(det_export):
    _, model, _ = det_export
    meta = model.metadata
    assert meta["task"] == "det" and meta["format"] == "onnx" and meta["nms"] and not meta["int8"]
    assert meta["input_size"] == [300, 300] and meta["resize"] == "tf_bilinear"
    assert meta["normalize"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert meta["class_names"] == ["pedestrian"] and meta["category_ids"] == [1]
    assert meta["outputs"] == ["boxes", "scores", "labels", "num_detections"]
    assert meta["postprocess"]["max_detections"] == 100 and meta["opset"] >= 17
    import onnx

    proto = onnx.load(str(model.path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert any(n.op_type == "NonMaxSuppression" for n in proto.graph.node)


def test_det_detections_match_postprocessor(det_export):
    wrapper, model, images = det_export
    out = model(images)
    assert out["boxes"].shape == (3, 100, 4) and out["labels"].dtype == np.int64
    assert out["num_detections"].dtype == np.int64
    refs = _torch_detections(wrapper.model, images)
    assert sum(int((r["scores"] > 0.3).sum()) for r in refs) >= 2  # real people found, not only noise
    for i, ref in enumerate(refs):
        assert_same_detections(out, i, ref)
    # the custom op's eager kernel (what other formats lower) gives the same
    with torch.no_grad():
        eager = dict(zip(model.metadata["outputs"], (t.numpy() for t in wrapper(torch.from_numpy(images)))))
    for i, ref in enumerate(refs):
        assert_same_detections(eager, i, ref)


def test_det_dynamic_batch(det_export):
    _, model, images = det_export
    batched = model(images)
    for i in range(len(images)):
        single = model(images[i:i + 1])
        n = int(single["num_detections"][0])
        assert n == int(batched["num_detections"][i])
        assert np.abs(single["boxes"][0] - batched["boxes"][i]).max() < 1e-3
        assert np.abs(single["scores"][0] - batched["scores"][i]).max() < 1e-5
        assert np.array_equal(single["labels"][0], batched["labels"][i])


def test_det_raw_outputs_match(tf_ckpt, det_export, tmp_path):
    wrapper, nms_model, images = det_export
    raw_wrapper, example, meta = prepare(tf_ckpt, nms=False, decoded=False)
    model = load_exported(export(raw_wrapper, example, meta, tmp_path / "raw.onnx"))
    assert model.metadata["outputs"] == ["cls_logits", "bbox_regression", "anchors"] and not model.metadata["nms"]
    out = model(images)
    ssd = wrapper.model
    mean = torch.tensor(ssd.normalize_mean).view(1, 3, 1, 1)
    std = torch.tensor(ssd.normalize_std).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = ssd((torch.from_numpy(images) / 255 - mean) / std)
    for name in ("cls_logits", "bbox_regression", "anchors"):
        diff = np.abs(out[name] - ref[name].numpy()).max()
        assert diff < 1e-3, (name, diff)


def test_prepare_image_is_the_eval_pipeline(det_export):
    """The exported model's input, normalised, is the data pipeline's eval input."""
    from mnv2det.transforms import build_eval_transform

    _, model, images = det_export
    target = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64), "crowd": np.zeros(0, bool)}
    ours, _ = build_eval_transform(300, "tf", "tf_bilinear")(_photo("astronaut"), target)
    assert np.abs((images[0] / 127.5 - 1) - ours.numpy()).max() < 1e-5


# ----------------------------------------------------------------------------- segmentation
def _seg_ckpt(align_corners: bool = True) -> dict:
    """A small random-weight seg checkpoint (for the tool's plumbing only: it predicts one class everywhere)."""
    from backbone.training.checkpoint import run_info
    from mnv2seg.lightning_module import DeepLabModule

    torch.manual_seed(0)
    cfg = {"_target_": "mnv2seg.lightning_module.DeepLabModule", "num_classes": 7,
           "backbone": {"width_mult": 0.35, "pretrained": "none", "output_stride": 16}, "align_corners": align_corners}
    module = DeepLabModule(**{k: v for k, v in cfg.items() if k != "_target_"}).eval()
    info = run_info("seg", {"model": cfg, "data": {"eval_size": 97}}, {"class_names": [f"c{i}" for i in range(7)]})
    return {"state_dict": module.state_dict(), "mnv2": info}


def _with_align_corners(ckpt: dict, align_corners: bool) -> dict:
    """The same weights with the model's align_corners set (the weights do not depend on it)."""
    model_cfg = {**ckpt["mnv2"]["config"]["model"], "align_corners": align_corners}
    config = {**ckpt["mnv2"]["config"], "model": model_cfg}
    return {**ckpt, "mnv2": {**ckpt["mnv2"], "config": config}}


@pytest.mark.parametrize("align_corners", [True, False])
def test_seg_logits_and_mask_match(trained_seg, trained_seg_onnx, tmp_path, align_corners):
    """On a model trained to predict several classes (tests/conftest.py ``trained_seg``) and the synthetic
    val images padded as the eval pipeline pads them: logits within 1e-3, masks on >= 99.9 % of pixels."""
    import torch.nn.functional as F

    from mnv2seg.inference import predict

    ckpt = _with_align_corners(trained_seg["ckpt"], align_corners)
    wrapper, example, meta = prepare(ckpt, argmax=True)
    assert wrapper.model.align_corners is align_corners
    logits_model = load_exported(trained_seg_onnx["logits"])  # the logits do not depend on align_corners
    if align_corners:  # the session's export (align_corners=True, as trained)
        mask_model = load_exported(trained_seg_onnx["mask"])
    else:
        mask_model = load_exported(export(wrapper, example, meta, tmp_path / "seg_mask.onnx"))
    assert mask_model.metadata["input_size"] == [97, 97] and mask_model.metadata["resize"] == "pad"
    assert mask_model.metadata["align_corners"] is align_corners
    assert mask_model.metadata["outputs"] == ["mask"] and logits_model.metadata["outputs"] == ["logits"]

    images = np.stack([prepare_image(im, mask_model.metadata) for im in trained_seg["val_images"]])
    model = wrapper.model
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (meta["normalize"]["mean"], meta["normalize"]["std"]))
    x = (torch.from_numpy(images) / 255 - mean) / std
    with torch.no_grad():
        ref_logits = model.head(model.backbone(x)[model.feature]).numpy()
    ref_mask = predict(model, x).argmax(1).numpy()  # the eval path (single scale)
    # the check has power: several classes predicted, and the other align_corners moves > 0.1 % of the pixels
    counts = np.bincount(ref_mask.ravel(), minlength=7)
    assert (counts >= 0.02 * ref_mask.size).sum() >= 3, counts
    flipped = F.interpolate(torch.from_numpy(ref_logits), size=x.shape[-2:], mode="bilinear",
                            align_corners=not align_corners).argmax(1).numpy()
    assert (flipped == ref_mask).mean() < 0.999

    out = logits_model(images)["logits"]
    assert out.shape == ref_logits.shape == (len(images), 7, 7, 7)
    assert np.abs(out - ref_logits).max() < 1e-3
    mask = mask_model(images)["mask"]
    assert mask.shape == (len(images), 97, 97) and mask.dtype == np.int64
    assert (mask == ref_mask).mean() >= 0.999, (mask == ref_mask).mean()
    for i in range(len(images)):  # dynamic batch
        assert (mask_model(images[i:i + 1])["mask"][0] == mask[i]).mean() >= 0.999


# ----------------------------------------------------------------------------- runtime / tool errors
def test_load_exported_errors(tmp_path):
    from backbone.errors import DataError

    with pytest.raises(DataError, match="not found"):
        load_exported(tmp_path / "missing.onnx")
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(DataError, match="suffix"):
        load_exported(tmp_path / "x.bin")
    (tmp_path / "broken.onnx").write_bytes(b"not onnx")
    with pytest.raises(DataError, match="not a readable onnx model"):
        load_exported(tmp_path / "broken.onnx")


def test_tool_exports_and_reports_errors(run_tool, tmp_path):
    ckpt = tmp_path / "seg.ckpt"
    torch.save(_seg_ckpt(), ckpt)
    out = tmp_path / "m.onnx"
    r = run_tool("export.py", [f"ckpt_path={ckpt}", "format=onnx", "argmax=true", f"output={out}"],
                 tmp_path / "cache", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    assert load_exported(out).metadata["argmax"] is True
    r = run_tool("export.py", [f"ckpt_path={ckpt}", "format=coreml"], tmp_path / "cache", tmp_path / "run2")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "format" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_tool("export.py", [f"ckpt_path={ckpt}", "int8=true"], tmp_path / "cache", tmp_path / "run3")
    assert r.returncode == 2 and "task=seg" in r.stderr, r.stderr[-2000:]
    r = run_tool("export.py", [f"ckpt_path={ckpt}", "layout=mobile"], tmp_path / "cache", tmp_path / "run4")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "layout" in r.stderr, r.stderr[-2000:]
    r = run_tool("export.py", [f"ckpt_path={ckpt}", "format=tflite", "input_dtype=int4"], tmp_path / "cache",
                 tmp_path / "run5")
    assert r.returncode == 2 and "input_dtype" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
