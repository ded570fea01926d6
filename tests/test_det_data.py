"""Detection data: COCO dataset reader, SSD transforms, collate, datamodule config checks."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backbone.errors import ConfigError, DataError
from backbone.training.synthetic import CATEGORY_IDS, CLASS_NAMES, EMPTY_EVERY, ensure_synthetic
from mnv2det.datamodule import DetDataModule, collate_detections
from mnv2det.dataset import COCODetection
from mnv2det.transforms import (DetectionTransform, MinIoURandomCrop, ZoomOut, build_eval_transform,
                                build_train_transform)

SYN_ARGS = dict(num_train=6, num_val=4, size=64, seed=3, progress=False)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("syn")
    ensure_synthetic(out, **SYN_ARGS)
    return out


def _write_jpeg(path: Path, w: int, h: int, value: int = 128) -> None:
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


@pytest.fixture
def tiny_coco(tmp_path: Path) -> Path:
    """Hand-written COCO: non-contiguous unsorted category ids, a degenerate box, a box sticking out of
    the image, a crowd box, an image without objects, a missing file and an unreadable file."""
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images = [
        {"id": 10, "file_name": "a.jpg", "width": 40, "height": 30},
        {"id": 11, "file_name": "b.jpg", "width": 50, "height": 20},   # no objects
        {"id": 12, "file_name": "missing.jpg", "width": 32, "height": 32},
        {"id": 13, "file_name": "broken.jpg", "width": 32, "height": 32},
        {"id": 14, "file_name": "c.jpg", "width": 32, "height": 32},
    ]
    anns = [
        {"id": 1, "image_id": 10, "category_id": 90, "bbox": [2, 3, 10, 5], "area": 50, "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 2, "bbox": [30, 20, 20, 20], "area": 400, "iscrowd": 0},  # clipped
        {"id": 3, "image_id": 10, "category_id": 5, "bbox": [5, 5, 0.5, 8], "area": 4, "iscrowd": 0},  # degenerate
        {"id": 4, "image_id": 10, "category_id": 5, "bbox": [39.5, 1, 6, 6], "area": 36, "iscrowd": 0},  # 0.5 px left
        {"id": 5, "image_id": 14, "category_id": 5, "bbox": [0, 0, 16, 16], "area": 256, "iscrowd": 1},  # crowd
        {"id": 6, "image_id": 13, "category_id": 2, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},
        {"id": 7, "image_id": 12, "category_id": 2, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},
    ]
    cats = [{"id": 90, "name": "zebra"}, {"id": 2, "name": "bike"}, {"id": 5, "name": "cat"}]
    (root / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    _write_jpeg(root / "val2017" / "a.jpg", 40, 30)
    _write_jpeg(root / "val2017" / "b.jpg", 50, 20)
    _write_jpeg(root / "val2017" / "c.jpg", 32, 32)
    (root / "val2017" / "broken.jpg").write_bytes(b"not a jpeg at all")
    return root


# ------------------------------------------------------------------------------------ dataset
def test_hand_written_coco(tiny_coco: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="mnv2det.dataset"):
        ds = COCODetection(tiny_coco, "val2017")
    # sorted category ids -> contiguous labels 1..K; names follow the same order
    assert ds.category_ids == [2, 5, 90]
    assert ds.class_names == ["bike", "cat", "zebra"]
    assert ds.label_to_cat_id == {1: 2, 2: 5, 3: 90}
    for label, cid in ds.label_to_cat_id.items():
        assert ds.cat_id_to_label[cid] == label
    # the missing file is filtered (and named in a warning); the unreadable one is only found on read
    assert ds.ids == [10, 11, 13, 14] and ds.missing_ids == [12]
    assert "missing.jpg" in caplog.text and "id 12" in caplog.text
    # degenerate box dropped and counted once; the 0.5 px sliver after clipping too
    assert ds.num_degenerate == 2
    assert sum("dropped 2 of 7 boxes" in r.getMessage() for r in caplog.records) == 1

    img, t = ds[0]
    assert img.shape == (30, 40, 3) and img.dtype == np.uint8
    assert t["image_id"] == 10 and t["orig_size"] == (30, 40)
    order = np.argsort(t["boxes"][:, 0])
    np.testing.assert_allclose(t["boxes"][order], [[2, 3, 12, 8], [30, 20, 40, 30]])  # xyxy, clipped
    assert t["labels"][order].tolist() == [3, 1] and not t["crowd"].any()

    img, t = ds[1]  # an image without objects is kept
    assert t["image_id"] == 11 and t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mnv2det.dataset"):
        img, t = ds[2]  # broken.jpg (id 13): skipped, the next sample comes instead
    assert t["image_id"] == 14 and ds.skipped == 1
    assert "broken.jpg" in caplog.text and "image id 13" in caplog.text
    assert t["crowd"].tolist() == [True] and t["labels"].tolist() == [2]
    np.testing.assert_allclose(t["boxes"], [[0, 0, 16, 16]])


def test_missing_root_and_annotations(tmp_path: Path, tiny_coco: Path) -> None:
    with pytest.raises(DataError, match="data.root="):
        COCODetection(tmp_path / "nope", "val2017")
    with pytest.raises(DataError, match="instances_train2017.json.*data.root="):
        COCODetection(tiny_coco, "train2017")
    (tiny_coco / "annotations" / "instances_val2017.json").write_text("{broken")
    with pytest.raises(DataError, match="not a valid COCO"):
        COCODetection(tiny_coco, "val2017")


def test_synthetic_dataset_matches_annotation_file(synthetic_root: Path) -> None:
    ds = COCODetection(synthetic_root / "coco", "train2017")
    assert ds.category_ids == sorted(CATEGORY_IDS)
    assert ds.class_names == [CLASS_NAMES[CATEGORY_IDS.index(c)] for c in sorted(CATEGORY_IDS)]
    assert len(ds) == SYN_ARGS["num_train"]
    raw = json.loads((synthetic_root / "coco" / "annotations" / "instances_train2017.json").read_text())
    by_image: dict[int, list] = {}
    for a in raw["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for i in range(len(ds)):
        img, t = ds[i]
        anns = by_image.get(t["image_id"], [])
        assert img.shape[:2] == t["orig_size"]
        assert len(t["boxes"]) == len(anns)
        if i % EMPTY_EVERY == 0:
            assert len(anns) == 0  # empty scenes are kept
        for a, box, label in zip(anns, t["boxes"], t["labels"]):
            x, y, w, h = a["bbox"]
            np.testing.assert_allclose(box, [x, y, x + w, y + h], atol=1e-4)
            assert ds.label_to_cat_id[int(label)] == a["category_id"]


# ---------------------------------------------------------------------------------- transforms
def test_train_transform_outputs(synthetic_root: Path) -> None:
    tf = build_train_transform(64, "imagenet", seed=0)
    ds = COCODetection(synthetic_root / "coco", "train2017", tf)
    seen = 0
    for _ in range(3):
        for i in range(len(ds)):
            x, t = ds[i]
            assert isinstance(x, torch.Tensor) and x.shape == (3, 64, 64) and x.dtype == torch.float32
            b = t["boxes"]
            assert b.dtype == np.float32 and len(b) == len(t["labels"]) == len(t["crowd"])
            assert (b >= 0).all() and (b <= 64).all() and ((b[:, 2:] - b[:, :2]) >= 1 - 1e-4).all()
            assert set(t["labels"].tolist()) <= set(range(1, 7))
            seen += len(b)
    assert seen > 0


def test_transform_seed_reproducible(synthetic_root: Path) -> None:
    ds = COCODetection(synthetic_root / "coco", "train2017")
    img, t = ds[1]
    tf = build_train_transform(48, "tf")
    runs = []
    for seed in (5, 5, 6):
        tf.set_seed(seed)
        runs.append([tf(img, t) for _ in range(4)])
    for (xa, ta), (xb, tb) in zip(runs[0], runs[1]):
        assert torch.equal(xa, xb) and np.array_equal(ta["boxes"], tb["boxes"])
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(runs[0], runs[2]))


def test_eval_transform_scales_boxes() -> None:
    img = np.zeros((50, 100, 3), np.uint8)
    t = {"boxes": np.array([[10, 5, 60, 45]], np.float32), "labels": np.array([2]), "crowd": np.array([False]),
         "image_id": 1, "orig_size": (50, 100)}
    x, out = build_eval_transform(80, "tf")(img, t)
    assert x.shape == (3, 80, 80)
    torch.testing.assert_close(x, torch.full_like(x, -1.0))  # tf normalisation: 0 -> -1
    np.testing.assert_allclose(out["boxes"], [[8, 8, 48, 72]], rtol=1e-5)
    assert out["image_id"] == 1 and out["orig_size"] == (50, 100)


def test_zoom_out_moves_boxes_with_pixels() -> None:
    import albumentations as A

    img = np.zeros((40, 60, 3), np.uint8)
    img[10:30, 20:50] = 255  # a white block exactly under the box
    compose = A.Compose([ZoomOut(max_ratio=3.0, fill=(7, 7, 7), p=1.0)],
                        bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels", "crowd"]), seed=1)
    tf = DetectionTransform(compose)
    t = {"boxes": np.array([[20, 10, 50, 30]], np.float32), "labels": np.array([1]), "crowd": np.array([False])}
    for _ in range(5):
        out, o = tf(img, t)
        assert out.shape[0] >= 40 and out.shape[1] >= 60
        x0, y0, x1, y1 = np.round(o["boxes"][0]).astype(int)
        assert (x1 - x0, y1 - y0) == (30, 20)
        assert (out[y0:y1, x0:x1] == 255).all()
        assert (out == 255).all(-1).sum() == 600 and (out == 7).all(-1).sum() == out.shape[0] * out.shape[1] - 2400  # canvas minus the image


def test_min_iou_crop_constraint() -> None:
    rng = np.random.default_rng(0)
    crop = MinIoURandomCrop(min_ious=[0.7], min_scale=0.3)
    crop.set_random_seed(0)
    h, w = 100, 120
    cropped = 0
    for _ in range(200):
        xy = rng.uniform(0, 50, (3, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(30, 70, (3, 2))], 1).clip(0, [w, h, w, h])
        x0, y0, x1, y1 = crop._sample(h, w, boxes)
        if (x0, y0, x1, y1) == (0, 0, w, h):
            continue  # the "no crop" option
        cropped += 1
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        inside = (cx > x0) & (cx < x1) & (cy > y0) & (cy < y1)
        lt = np.maximum(boxes[:, :2], [x0, y0])
        rb = np.minimum(boxes[:, 2:], [x1, y1])
        inter = np.clip(rb - lt, 0, None).prod(1)
        iou = inter / ((x1 - x0) * (y1 - y0) + (boxes[:, 2:] - boxes[:, :2]).prod(1) - inter)
        assert (inside & (iou >= 0.7 - 1e-9)).any()
        scale_w, scale_h = (x1 - x0) / w, (y1 - y0) / h
        assert 0.29 <= scale_w <= 1 and 0.29 <= scale_h <= 1 and 0.45 <= (x1 - x0) / (y1 - y0) <= 2.1
        # apply_to_bboxes keeps exactly the boxes centred inside, clipped to the crop
        norm = np.concatenate([boxes / [w, h, w, h], np.arange(3)[:, None]], 1)
        kept = crop.apply_to_bboxes(norm, (x0, y0, x1, y1), shape=(h, w, 3))
        assert kept[:, 4].astype(int).tolist() == np.flatnonzero(inside).tolist()
        assert (kept[:, :4] >= 0).all() and (kept[:, :4] <= 1).all()
    assert cropped > 50


# -------------------------------------------------------------------------------------- collate
def test_collate_pads_and_normalises() -> None:
    def sample(n: int, img_id: int) -> tuple[torch.Tensor, dict]:
        boxes = np.array([[0, 0, 10, 20], [5, 5, 40, 30], [1, 2, 3, 4]], np.float32)[:n]
        return torch.zeros(3, 20, 40), {"boxes": boxes, "labels": np.arange(1, n + 1), "crowd": np.arange(n) == 1,
                                        "image_id": img_id, "orig_size": (200, 400)}

    batch = collate_detections([sample(0, 7), sample(2, 8), sample(3, 9)])
    t = batch["targets"]
    assert batch["images"].shape == (3, 3, 20, 40)
    assert t["boxes"].shape == (3, 3, 4) and t["labels"].shape == t["valid"].shape == t["crowd"].shape == (3, 3)
    assert t["valid"].tolist() == [[False] * 3, [True, True, False], [True] * 3]
    torch.testing.assert_close(t["boxes"][1, 1], torch.tensor([5 / 40, 5 / 20, 1.0, 1.5]))
    assert t["labels"].tolist() == [[0, 0, 0], [1, 2, 0], [1, 2, 3]]
    assert t["crowd"].tolist() == [[False] * 3, [False, True, False], [False, True, False]]
    assert (t["boxes"][~t["valid"]] == 0).all()
    assert batch["image_ids"].tolist() == [7, 8, 9] and batch["orig_sizes"].tolist() == [[200, 400]] * 3
    empty = collate_detections([sample(0, 1)])
    assert empty["targets"]["boxes"].shape == (1, 1, 4) and not empty["targets"]["valid"].any()


# ----------------------------------------------------------------------------------- datamodule
def test_datamodule_config_errors(tmp_path: Path, tiny_coco: Path) -> None:
    with pytest.raises(ConfigError, match="data.root"):
        DetDataModule(root="???")
    with pytest.raises(ConfigError, match="data.normalize"):
        DetDataModule(root=str(tmp_path), normalize="caffe")
    with pytest.raises(ConfigError, match="data.augment.zoom"):
        DetDataModule(root=str(tmp_path), augment={"zoom": 2})
    with pytest.raises(ConfigError, match="data.augment.hflip_p"):
        DetDataModule(root=str(tmp_path), augment={"hflip_p": 2})
    with pytest.raises(ConfigError, match="data.batch_size"):
        DetDataModule(root=str(tmp_path), batch_size=0)
    with pytest.raises(ConfigError, match="data.synthetic.bogus"):
        DetDataModule(root=str(tmp_path), synthetic={"root": str(tmp_path), "bogus": 1})
    dm = DetDataModule(root=str(tiny_coco), val_split="val2017", num_classes=80)
    with pytest.raises(ConfigError, match="data.num_classes=3"):
        dm.setup("validate")
    with pytest.raises(DataError, match="data.root="):
        DetDataModule(root=str(tmp_path / "absent")).setup("validate")


def test_datamodule_synthetic_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    dm = DetDataModule(root=str(out / "coco"), image_size=64, batch_size=4, num_workers=0, num_classes=6,
                       synthetic={"root": str(out), **SYN_ARGS})
    dm.prepare_data()
    dm.setup("fit")
    assert dm.meta["category_ids"] == sorted(CATEGORY_IDS) and len(dm.meta["class_names"]) == 6
    assert dm.meta["num_classes"] == 6 and dm.meta["dataset"] == "synthetic/coco/val2017"
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (4, 3, 64, 64)
    t = batch["targets"]
    assert t["boxes"].shape[:2] == t["valid"].shape and t["boxes"].dtype == torch.float32
    assert (t["boxes"] >= 0).all() and (t["boxes"] <= 1).all()
    assert ((t["labels"] >= 1) == t["valid"]).all()
    val = list(dm.val_dataloader())
    ids = torch.cat([b["image_ids"] for b in val]).tolist()
    assert sorted(ids) == sorted(dm.val_dataset.ids)  # every val image exactly once, no drop_last
