"""tools/predict.py: odd input files (corrupt, CMYK, 16-bit, EXIF-rotated), outputs of both tasks, a video,
and predictions equal to the evaluation path's on the same images (so preprocessing cannot drift)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backbone.training.checkpoint import run_info

SYN = {"num_train": 2, "num_val": 4, "size": 64, "seed": 3, "progress": False}


def _checkpoint(path: Path, task: str, module, data_cfg: dict, meta: dict) -> Path:
    """A checkpoint file as tools/train.py writes it (state_dict + the self-describing mnv2 entry)."""
    model_cfg = {"_target_": f"{type(module).__module__}.{type(module).__name__}", **dict(module.hparams)}
    torch.save({"state_dict": module.state_dict(), "mnv2": run_info(task, {"model": model_cfg, "data": data_cfg}, meta)},
               path)
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from backbone.training.synthetic import CATEGORY_IDS, CLASS_NAMES, ensure_synthetic
    from mnv2det.lightning_module import SSDLiteModule
    from mnv2seg.lightning_module import DeepLabModule

    tmp = tmp_path_factory.mktemp("predict")
    root = ensure_synthetic(tmp / "syn", **SYN)
    torch.manual_seed(0)
    det = SSDLiteModule(num_classes=6, image_size=64, backbone={"pretrained": "none", "width_mult": 0.35}).eval()
    seg = DeepLabModule(num_classes=7, backbone={"pretrained": "none", "width_mult": 0.35, "output_stride": 16}).eval()
    det_ckpt = _checkpoint(tmp / "det.ckpt", "det", det, {"root": str(root / "coco")},
                           {"class_names": list(CLASS_NAMES), "category_ids": list(CATEGORY_IDS), "num_classes": 6})
    seg_ckpt = _checkpoint(tmp / "seg.ckpt", "seg", seg, {"eval_size": 97},
                           {"class_names": ["background", *CLASS_NAMES], "num_classes": 7})

    odd = tmp / "odd"
    odd.mkdir()
    rng = np.random.default_rng(0)
    (odd / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.new("CMYK", (50, 40), (0, 120, 200, 10)).save(odd / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (30, 45), dtype=np.uint16)).save(odd / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: stored 64 x 40 (w x h), displayed 40 x 64
    Image.fromarray(rng.integers(0, 255, (40, 64, 3), dtype=np.uint8)).save(odd / "exif.jpg", exif=exif)
    Image.fromarray(rng.integers(0, 255, (48, 56, 3), dtype=np.uint8)).save(odd / "normal.png")
    return {"root": root, "det": det, "seg": seg, "det_ckpt": det_ckpt, "seg_ckpt": seg_ckpt, "odd": odd}


@pytest.mark.slow  # a tools/predict.py subprocess: ~35 s on the shared 2-core CPU
def test_det_cli_on_odd_files(run_tool, assets, tmp_path: Path) -> None:
    """The corrupt file is reported and skipped, the others predicted (EXIF photo as displayed), outputs written."""
    out = tmp_path / "out"
    r = run_tool("predict.py", [f"ckpt_path={assets['det_ckpt']}", f"input={assets['odd']}", f"output={out}",
                                "batch_size=3", "score_threshold=0.01", "device=cpu", "progress=false"],
                 tmp_path / "cache", tmp_path / "run")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "4 written" in r.stdout and "1 skipped" in r.stdout and "corrupt.jpg" in r.stdout
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    by_name = {Path(x["file"]).name: x for x in lines}
    assert sorted(by_name) == ["cmyk.jpg", "deep16.png", "exif.jpg", "normal.png"]
    assert (by_name["exif.jpg"]["width"], by_name["exif.jpg"]["height"]) == (40, 64)  # displayed orientation
    for name, line in by_name.items():
        n = len(line["scores"])
        assert n > 0 and len(line["boxes"]) == len(line["labels"]) == len(line["class_names"]) == n
        boxes = np.array(line["boxes"])
        assert (boxes[:, [0, 2]] <= line["width"]).all() and (boxes[:, [1, 3]] <= line["height"]).all()
        assert set(line["category_ids"]) <= {1, 3, 4, 7, 9, 11} | set(range(1, 100))
        picture = Image.open(out / f"{Path(name).stem}.jpg")
        assert picture.size == (line["width"], line["height"])


def test_cli_error_is_one_line(run_tool, assets, tmp_path: Path) -> None:
    r = run_tool("predict.py", [f"ckpt_path={assets['det_ckpt']}", f"input={tmp_path / 'nothing_here'}"],
                 tmp_path / "cache", tmp_path / "run")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "input not found" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_seg_outputs_on_odd_files_and_a_video(assets, tmp_path: Path) -> None:
    import cv2

    from backbone.predict import predict

    video = assets["odd"].parent / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (48, 32))
    for i in range(3):
        writer.write(np.full((32, 48, 3), 60 * i, np.uint8))
    writer.release()
    summary = predict(assets["seg_ckpt"], assets["odd"], tmp_path / "seg", batch_size=2, device="cpu", progress=False)
    assert summary.written == 4 and [Path(s[0]).name for s in summary.skipped] == ["corrupt.jpg"]
    mask = Image.open(tmp_path / "seg" / "masks" / "exif.png")
    assert mask.mode == "P" and mask.size == (40, 64)  # palette PNG at the displayed size
    assert np.asarray(mask).max() < 7
    overlay = Image.open(tmp_path / "seg" / "overlays" / "exif.jpg")
    assert overlay.size[0] == 40 and overlay.size[1] > 64  # the legend strip below

    summary = predict(assets["seg_ckpt"], video, tmp_path / "vid", batch_size=2, device="cpu", progress=False)
    assert summary.written == 3 and not summary.skipped
    assert sorted(p.name for p in (tmp_path / "vid" / "masks" / "clip").iterdir()) == [
        "000000.png", "000001.png", "000002.png"]


def test_det_predictions_equal_the_evaluation(assets, tmp_path: Path) -> None:
    """Same model, same val images: predict's detections are evaluate's (COCO results, rounded as written)."""
    import lightning.pytorch as pl

    from backbone.image_io import decode_image
    from backbone.predict import load_predictor
    from mnv2det.datamodule import DetDataModule

    data = DetDataModule(str(assets["root"] / "coco"), image_size=64, batch_size=2, val_batch_size=2, num_workers=0,
                         num_classes=6)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    module = assets["det"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.validate(module, datamodule=data, verbose=False)
    evaluated = module.evaluator.results
    assert evaluated, "the evaluation found no detections: nothing to compare"

    predictor = load_predictor(assets["det_ckpt"], score_threshold=0.0, device="cpu")
    ds = data.val_dataset
    files = [ds.img_dir / ds.coco.imgs[i]["file_name"] for i in ds.ids]
    images = [decode_image(f).pixels for f in files]
    results = predictor.predict_batch(images[:2]) + predictor.predict_batch(images[2:])  # the val batches
    cat = np.array(predictor.category_ids)
    for img_id, res in zip(ds.ids, results):
        ev = [d for d in evaluated if d["image_id"] == img_id]
        assert len(ev) == len(res["scores"])
        xywh = np.concatenate([res["boxes"][:, :2], res["boxes"][:, 2:] - res["boxes"][:, :2]], 1)
        np.testing.assert_allclose(np.array([d["bbox"] for d in ev]).reshape(-1, 4), xywh, atol=0.006)
        np.testing.assert_allclose([d["score"] for d in ev], res["scores"], atol=6e-6)
        assert [d["category_id"] for d in ev] == cat[res["labels"] - 1].tolist()


def test_seg_predictions_equal_the_evaluation(assets, tmp_path: Path) -> None:
    """Same model, same val images: predict's masks are exactly evaluate's (save_predictions) masks."""
    import lightning.pytorch as pl

    from backbone.image_io import decode_image
    from backbone.predict import load_predictor
    from mnv2seg.datamodule import SegDataModule

    root = assets["root"] / "VOCdevkit" / "VOC2012"
    data = SegDataModule(str(root), num_classes=7, crop_size=64, batch_size=2, val_batch_size=3, num_workers=0,
                         eval_size=97)
    module = assets["seg"]
    module.predictions_dir = tmp_path / "eval"
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.validate(module, datamodule=data, verbose=False)
    module.predictions_dir = None
    predictor = load_predictor(assets["seg_ckpt"], device="cpu")
    names = data.val_dataset.ids
    images = [decode_image(root / "JPEGImages" / f"{n}.jpg").pixels for n in names]
    results = predictor.predict_batch(images)  # one batch of 4: eval_size padding makes batching irrelevant
    for name, res in zip(names, results):
        expected = np.asarray(Image.open(tmp_path / "eval" / f"{name}.png"))
        assert res["mask"].shape == expected.shape
        np.testing.assert_array_equal(res["mask"], expected)


# ----------------------------------------------------------------------------- exported models
# predict on an exported ONNX model == predict on the checkpoint it came from (tests/conftest.py exports
# each model once per session; the ONNX tests share them).
# (scikit-image photo, crop rows, crop cols): none at the model's 300 x 300, non-square ones with people in them
# (so a mix-up of the x / y scales back to original pixels shows), a gray one, one without a person
PHOTOS = {
    "astronaut_tall": ("astronaut", slice(0, 512), slice(60, 400)),  # 512 x 340
    "camera_wide": ("camera", slice(0, 400), slice(0, 512)),  # 400 x 512, gray
    "coffee": ("coffee", slice(None), slice(None)),  # 400 x 600
    "astronaut": ("astronaut", slice(None), slice(None)),  # 512 x 512
}


def _photo_folder(folder: Path) -> Path:
    skimage_data = pytest.importorskip("skimage.data")
    folder.mkdir()
    for name, (photo, rows, cols) in PHOTOS.items():  # PNG, lossless: both predictors read the same pixels
        Image.fromarray(np.ascontiguousarray(getattr(skimage_data, photo)()[rows, cols])).save(folder / f"{name}.png")
    return folder


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a: (4,), b: (N, 4) xyxy -> (N,)"""
    lt, rb = np.maximum(a[:2], b[:, :2]), np.minimum(a[2:], b[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    return inter / (np.prod(a[2:] - a[:2]) + np.prod(b[:, 2:] - b[:, :2], axis=1) - inter)


def _jsonl(path: Path) -> dict[str, dict]:
    return {Path(x["file"]).name: x for x in map(json.loads, path.read_text().splitlines())}


@pytest.mark.slow  # the session's ONNX export of the TF-trained SSDLite (~30 s; shared with the export tests)
def test_det_exported_predictions_equal_the_checkpoint(tf_ssdlite_export, tmp_path: Path) -> None:
    """Same photos (not at the input size: the resize and the boxes' way back to original pixels are
    exercised) through predict on the .ckpt and on its .onnx (NMS inside): the same detections -- count,
    labels, class names and category ids equal, boxes IoU > 0.99 after matching, scores within 1e-3."""
    from backbone.predict import predict

    photos = _photo_folder(tmp_path / "photos")
    kw = {"batch_size": 3, "score_threshold": 0.02, "device": "cpu", "progress": False}
    for name, model in (("ckpt", tf_ssdlite_export["ckpt_path"]), ("onnx", tf_ssdlite_export["onnx"])):
        summary = predict(model, photos, tmp_path / name, **kw)
        assert summary.written == len(PHOTOS) and not summary.skipped
    ref, out = _jsonl(tmp_path / "ckpt" / "predictions.jsonl"), _jsonl(tmp_path / "onnx" / "predictions.jsonl")
    assert sorted(ref) == sorted(out) == sorted(f"{p}.png" for p in PHOTOS)
    confident, right, non_square = 0, 0.0, 0
    for file, r in ref.items():
        o = out[file]
        assert (o["width"], o["height"]) == (r["width"], r["height"])
        assert len(o["scores"]) == len(r["scores"]), file
        assert sorted(o["category_ids"]) == sorted(r["category_ids"]) and sorted(o["class_names"]) == sorted(
            r["class_names"])
        rb, ob, ol = np.array(r["boxes"]).reshape(-1, 4), np.array(o["boxes"]).reshape(-1, 4), np.array(o["labels"])
        for j, (label, score) in enumerate(zip(r["labels"], r["scores"])):
            same = np.flatnonzero(ol == label)
            ious = _iou(rb[j], ob[same])
            k = same[int(np.argmax(ious))]
            assert ious.max() > 0.99 and abs(o["scores"][k] - score) < 1e-3, (file, j, ious.max(), o["scores"][k],
                                                                               score)
            assert o["category_ids"][k] == r["category_ids"][j] and o["class_names"][k] == r["class_names"][j]
            confident += score >= 0.3
            non_square += score >= 0.3 and r["width"] != r["height"]
        right = max(right, float(ob[:, 2].max(initial=0)))
    assert right > 300  # boxes are in original pixels, not the model's 300 x 300 input
    assert confident >= 2 and non_square >= 1  # real people found, not only noise, also in non-square photos


@pytest.mark.slow  # the session's seg training and ONNX exports (shared with the export and int8 tests)
@pytest.mark.parametrize("output", ["mask", "logits"])
def test_seg_exported_predictions_equal_the_checkpoint(trained_seg, trained_seg_onnx, output: str,
                                                       tmp_path: Path) -> None:
    """The synthetic val images through predict on the .ckpt and on its .onnx (argmax inside, or logits
    resized by the adapter): the masks written agree on >= 99.9 % of the pixels of every image, on a
    model that predicts several classes."""
    import shutil

    from backbone.predict import predict

    images = tmp_path / "images"
    images.mkdir()
    for name in trained_seg["val_names"]:
        shutil.copy(trained_seg["voc"] / "JPEGImages" / f"{name}.jpg", images)
    kw = {"batch_size": 3, "device": "cpu", "progress": False}
    for name, model in (("ckpt", trained_seg["ckpt_path"]), ("onnx", trained_seg_onnx[output])):
        summary = predict(model, images, tmp_path / name, **kw)
        assert summary.written == len(trained_seg["val_names"]) and not summary.skipped
    classes = set()
    for name in trained_seg["val_names"]:
        ref = np.asarray(Image.open(tmp_path / "ckpt" / "masks" / f"{name}.png"))
        got = np.asarray(Image.open(tmp_path / "onnx" / "masks" / f"{name}.png"))
        assert got.shape == ref.shape
        agree = (got == ref).mean()
        assert agree >= 0.999, (name, agree)
        counts = np.bincount(ref.ravel(), minlength=7)
        classes |= set(np.flatnonzero(counts >= 0.02 * ref.size).tolist())
    assert len(classes) >= 3, classes  # a model predicting one class everywhere would make this test vacuous


class _FakeExported:
    """An ExportedModel stand-in: records its input, answers a fixed mask / fixed detections."""

    def __init__(self, metadata: dict, outputs) -> None:
        self.metadata, self.outputs, self.inputs = metadata, outputs, []

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.inputs.append(images)
        return self.outputs(images)


def test_exported_seg_adapter_pads_with_the_contract_value_and_scales_large_images(caplog) -> None:
    """Images that fit are padded bottom/right with metadata pad_value (what the checkpoint path's 0 after
    normalisation is); a larger one is scaled down to fit, with one warning, and its mask comes back at its size."""
    from mnv2seg.predictor import ExportedSegPredictor

    meta = {"task": "seg", "input_size": [17, 17], "resize": "pad", "pad_value": [10.0, 20.0, 30.0],
            "class_names": ["a", "b"], "palette": [[0, 0, 0], [128, 0, 0]], "align_corners": True}
    model = _FakeExported(meta, lambda x: {"mask": (x[:, 0] > 100).astype(np.int64)})
    predictor = ExportedSegPredictor(model)
    small = np.full((9, 13, 3), 200, np.uint8)
    with caplog.at_level("WARNING", logger="mnv2"):
        res = predictor.predict_batch([small])
    x = model.inputs[-1]
    assert x.shape == (1, 3, 17, 17) and (x[0, :, :9, :13] == 200).all()
    padded = np.concatenate([x[0, :, 9:, :].reshape(3, -1), x[0, :, :, 13:].reshape(3, -1)], 1)  # below, right
    assert (padded.T == [10, 20, 30]).all()
    assert res[0]["mask"].shape == (9, 13) and (res[0]["mask"] == 1).all() and not caplog.records
    with caplog.at_level("WARNING", logger="mnv2"):
        res = predictor.predict_batch([np.full((40, 20, 3), 200, np.uint8), small])
    assert res[0]["mask"].shape == (40, 20) and (res[0]["mask"] == 1).all() and res[1]["mask"].shape == (9, 13)
    assert (model.inputs[-1][0, 0, :17, :8] == 200).all()  # 40 x 20 scaled by 17 / 40 -> 17 x 8
    assert len([r for r in caplog.records if "larger than the exported model's input" in r.getMessage()]) == 1


def test_exported_adapters_refuse_what_they_cannot_honour() -> None:
    from backbone.errors import DataError
    from mnv2det.predictor import ExportedDetPredictor
    from mnv2seg.predictor import ExportedSegPredictor

    raw = {"task": "det", "input_size": [64, 64], "resize": "cv2_linear", "nms": False, "class_names": ["x"],
           "outputs": ["cls_logits", "bbox_regression", "anchors"]}
    with pytest.raises(DataError, match="nms=false"):
        ExportedDetPredictor(_FakeExported(raw, None))
    with pytest.raises(DataError, match="resize='cv2_linear'"):
        ExportedSegPredictor(_FakeExported({"task": "seg", "input_size": [17, 17], "resize": "cv2_linear"}, None))
