"""Detection data: COCO dataset reader, SSD transforms, collate, datamodule config checks."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from backbone.errors import ConfigError, DataError
from backbone.training.synthetic import CATEGORY_IDS, CLASS_NAMES, EMPTY_EVERY, ensure_synthetic
from mnv2det.datamodule import DetDataModule, collate_detections
from mnv2det.dataset import COCODetection
from mnv2det.transforms import (
    RECIPES,
    DetectionTransform,
    MinIoURandomCrop,
    SSDRandomCrop,
    ZoomOut,
    build_eval_transform,
    build_train_transform,
    check_augment,
)

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


@pytest.mark.parametrize("normalize,per_channel", [
    ("tf", lambda v: [v / 127.5 - 1] * 3),  # TF: x / 127.5 - 1
    ("imagenet", lambda v: [(v / 255 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]),
])
def test_eval_transform_normalisation_values(normalize: str, per_channel) -> None:
    empty = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64), "crowd": np.zeros(0, bool)}
    for value, tf_expected in [(0, -1.0), (51, -0.6), (255, 1.0)]:
        x, _ = build_eval_transform(16, normalize)(np.full((10, 14, 3), value, np.uint8), empty)
        expected = torch.tensor(per_channel(value), dtype=torch.float32)[:, None, None].expand_as(x)
        torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)
        if normalize == "tf":
            assert x.flatten()[0].item() == pytest.approx(tf_expected, abs=1e-6)


# ---------------------------------------------------------------------- recipes, TF ssd_random_crop
COLOUR = np.array([250, 20, 30])


@pytest.mark.parametrize("augment", [
    {"recipe": "tf"},
    {"recipe": "torchvision", "photometric_p": 0.0, "zoom_out_p": 0.0},  # min-IoU crop + flip
    {"recipe": "torchvision", "photometric_p": 0.0, "zoom_out_p": 1.0, "crop_p": 0.0},  # zoom-out + flip
], ids=["tf", "torchvision", "zoom_out"])
def test_pixels_and_boxes_move_together(augment: dict) -> None:
    """A coloured block under its box, in a wide image, off-centre: wherever the transform puts the box, the
    pure colour lies inside it and fills most of it (an x/y mix-up in a crop or canvas breaks this)."""
    h, w, size = 90, 150, 96
    img = np.full((h, w, 3), 128, np.uint8)
    img[15:45, 20:70] = COLOUR
    t = {"boxes": np.array([[20, 15, 70, 45]], np.float32), "labels": np.array([1]), "crowd": np.array([False])}
    tf = build_train_transform(size, "imagenet", augment)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    unmoved = np.array([20, 15, 70, 45]) * [size / w, size / h, size / w, size / h]
    checked = moved = 0
    for seed in range(40):
        tf.set_seed(seed)
        x, out = tf(img, t)
        if not len(out["boxes"]):
            continue  # the crop dropped the box
        pix = (x.permute(1, 2, 0).numpy() * std + mean) * 255
        pure = (np.abs(pix - COLOUR) < 3).all(-1)  # only where bilinear sampling saw the block alone
        x0, y0, x1, y1 = out["boxes"][0]
        rows, cols = np.nonzero(pure)
        assert len(rows), f"seed {seed}: the colour is gone but the box {out['boxes'][0]} was kept"
        assert (cols + 0.5 >= x0 - 0.5).all() and (cols + 0.5 <= x1 + 0.5).all(), f"seed {seed}"
        assert (rows + 0.5 >= y0 - 0.5).all() and (rows + 0.5 <= y1 + 0.5).all(), f"seed {seed}"
        if x1 - x0 >= 12 and y1 - y0 >= 12:
            inside = pure[int(np.ceil(y0)):int(y1), int(np.ceil(x0)):int(x1)]
            assert inside.mean() > 0.5, f"seed {seed}: the box {out['boxes'][0]} is not over the colour"
        checked += 1
        moved += not np.allclose(out["boxes"][0], unmoved, atol=0.5)
    assert checked >= 20 and moved >= 10


def test_tf_crop_prunes_by_fraction_of_box_inside_and_clips() -> None:
    crop = SSDRandomCrop()
    shape = (100, 200, 3)  # h, w
    boxes = np.array([[0.25, 0.2, 0.75, 0.6, 0],   # half of it inside the left half of the image
                      [0.1, 0.1, 0.3, 0.3, 1],     # inside
                      [0.6, 0.1, 0.9, 0.5, 2],     # outside
                      [0.5, 0.1, 0.7, 0.3, 3]])    # touches the window from outside: completely outside
    left = (0, 0, 100, 100)  # x0, y0, x1, y1 pixels: x in [0, 0.5] of the image
    kept = crop.apply_to_bboxes(boxes, window=left, min_overlap=0.5, shape=shape)
    assert kept[:, 4].tolist() == [0, 1]
    np.testing.assert_allclose(kept[:, :4], [[0.5, 0.2, 1.0, 0.6], [0.2, 0.1, 0.6, 0.3]], atol=1e-6)  # clipped
    assert crop.apply_to_bboxes(boxes, window=left, min_overlap=0.7, shape=shape)[:, 4].tolist() == [1]
    assert crop.apply_to_bboxes(boxes, window=left, min_overlap=0.0, shape=shape)[:, 4].tolist() == [0, 1]
    top = (0, 0, 200, 50)  # y in [0, 0.5]: box 0 has 1/4 of its area inside (0.3 / 0.4 of its height)
    vertical = np.array([[0.1, 0.25, 0.3, 0.75, 0], [0.1, 0.1, 0.3, 0.6, 1]])
    kept = crop.apply_to_bboxes(vertical, window=top, min_overlap=0.5, shape=shape)
    assert kept[:, 4].tolist() == [0, 1]
    np.testing.assert_allclose(kept[:, :4], [[0.1, 0.5, 0.3, 1.0], [0.1, 0.2, 0.3, 1.0]], atol=1e-6)
    assert crop.apply_to_bboxes(vertical, window=top, min_overlap=0.7, shape=shape)[:, 4].tolist() == [1]
    assert crop.apply_to_bboxes(boxes, window=None, min_overlap=1.0, shape=shape) is boxes  # kept whole


def test_tf_crop_window_covers_min_object_covered_of_some_box() -> None:
    crop = SSDRandomCrop()
    crop.set_random_seed(0)
    h, w = 120, 160
    rects = np.array([[10, 10, 50, 40], [100, 70, 150, 115]])  # far apart: no crop covers both closely
    box_area = (rects[:, 2] - rects[:, 0]) * (rects[:, 3] - rects[:, 1])
    only_one = 0
    for covered in (0.3, 0.7, 1.0):
        for _ in range(100):
            x0, y0, x1, y1 = crop.sample_window(h, w, rects, covered)
            cw, ch = x1 - x0, y1 - y0
            iw = np.clip(np.minimum(x1, rects[:, 2]) - np.maximum(x0, rects[:, 0]), 0, None)
            ih = np.clip(np.minimum(y1, rects[:, 3]) - np.maximum(y0, rects[:, 1]), 0, None)
            fraction = iw * ih / box_area
            assert (fraction >= covered).any()
            only_one += int((fraction >= covered).sum() == 1)
            assert 0.1 * w * h <= cw * ch <= w * h and 0 <= x0 and 0 <= y0 and x1 <= w and y1 <= h
            assert 0.5 - 0.5 / ch <= cw / ch <= 2.0 + 0.5 / ch  # width = lrint(height * aspect)
            assert (y1 < h or ch == h) and (x1 < w or cw == w)  # TF: U{0 .. H - height - 1}
    assert only_one > 50  # "at least one box", not "every box"


def test_tf_crop_keeps_whole_image_with_probability_random_coef() -> None:
    crop = SSDRandomCrop()
    crop.set_random_seed(0)
    data = {"bboxes": np.array([[0.1, 0.1, 0.6, 0.7, 0]])}
    n = 3000
    whole = sum(crop.get_params_dependent_on_data({"shape": (100, 120, 3)}, data)["window"] is None for _ in range(n))
    assert abs(whole / n - 0.15) < 0.02
    never = SSDRandomCrop(random_coef=0.0)
    never.set_random_seed(0)
    assert all(never.get_params_dependent_on_data({"shape": (100, 120, 3)}, data)["window"] is not None
               for _ in range(200))


def test_tf_crop_falls_back_to_the_whole_image() -> None:
    import albumentations as A

    # a crop of at most 30% of the image cannot cover all of an image-sized box: every attempt fails
    crop = SSDRandomCrop(min_object_covered=[1.0], overlap_thresh=[1.0], area_range=(0.1, 0.3), random_coef=0.0)
    crop.set_random_seed(0)
    assert all(crop.sample_window(80, 100, np.array([[0, 0, 100, 80]]), 1.0) == (0, 0, 100, 80) for _ in range(20))
    # boxes under 1 px^2 are not counted, so even min_object_covered 0 finds no window
    assert crop.sample_window(80, 100, np.array([[5, 5, 5, 9]]), 0.0) == (0, 0, 100, 80)
    # through a pipeline: pixels unchanged, boxes pruned / clipped against the whole image (all kept)
    img = np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    compose = A.Compose([crop], bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels", "crowd"]), seed=0)
    boxes = np.array([[0, 0, 100, 80], [5, 5, 95, 75]], np.float32)  # both larger than any crop
    out, o = DetectionTransform(compose)(img, {"boxes": boxes, "labels": np.array([1, 2]), "crowd": np.zeros(2, bool)})
    assert np.array_equal(out, img)
    np.testing.assert_allclose(o["boxes"], boxes, atol=1e-4)


def test_augment_presets_list_every_key_of_their_recipe() -> None:
    folder = Path(__file__).resolve().parents[1] / "conf" / "data" / "augment"
    presets = {p.stem: OmegaConf.to_container(OmegaConf.load(p)) for p in folder.glob("*.yaml")}
    assert {"tf", "torchvision", "light"} <= set(presets)
    for name, cfg in presets.items():
        assert set(cfg) == {"recipe", *RECIPES[cfg["recipe"]]}, name
        assert check_augment(cfg) == cfg, name
    assert presets["tf"] == {"recipe": "tf", **RECIPES["tf"]}
    assert presets["torchvision"] == {"recipe": "torchvision", **RECIPES["torchvision"]}
    assert presets["light"] == {**presets["torchvision"], "zoom_out_p": 0.0, "crop_p": 0.5}
    with pytest.raises(ConfigError, match="data.augment.recipe"):
        check_augment({"recipe": "ssd"})
    with pytest.raises(ConfigError, match="data.augment.zoom_out_p.*tf recipe"):
        check_augment({"recipe": "tf", "zoom_out_p": 0.5})
    with pytest.raises(ConfigError, match="data.augment.overlap_thresh"):
        check_augment({"recipe": "tf", "overlap_thresh": [0.5]})  # one per option
    with pytest.raises(ConfigError, match="data.augment.crop_area"):
        check_augment({"recipe": "tf", "crop_area": [0.0, 1.0]})
    with pytest.raises(ConfigError, match="data.augment.max_attempts"):
        check_augment({"recipe": "tf", "max_attempts": 0})


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


# ------------------------------------------------------------------------- a model's own classes
def test_labels_follow_the_model_category_ids(tiny_coco: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Evaluating a model trained elsewhere (its checkpoint's meta): labels are the MODEL's contiguous
    labels matched by category id, annotations of categories it does not know leave the targets (not the
    ground truth), and each kind of mismatch is one log line."""
    dm = DetDataModule(root=str(tiny_coco), val_split="val2017", image_size=32, num_workers=0, val_batch_size=4)
    dm.use_model_classes({"category_ids": [5, 90, 77], "class_names": ["cat", "zebra", "phone"]})
    with caplog.at_level(logging.INFO, logger="mnv2det.datamodule"):
        dm.setup("validate")
    assert dm.meta["category_ids"] == [5, 90, 77] and dm.meta["num_classes"] == 3
    assert dm.meta["class_names"] == ["cat", "zebra", "phone"]
    ds = dm.val_dataset
    assert ds.category_ids == [2, 5, 90] and ds.label_to_cat_id == {1: 5, 2: 90, 3: 77}  # file's ids are scored
    assert ds.num_unlabelled == 3 and len(ds.coco.getAnnIds(catIds=[2])) == 3  # bike: left out of the targets only
    t = ds.target(ds.ids.index(10))
    np.testing.assert_allclose(t["boxes"], [[2, 3, 12, 8]])  # the zebra; the bike is gone
    assert t["labels"].tolist() == [2]
    assert ds.target(ds.ids.index(14))["labels"].tolist() == [1]  # the (crowd) cat
    batch = next(iter(dm.val_dataloader()))
    assert set(batch["targets"]["labels"][batch["targets"]["valid"]].tolist()) == {1, 2}
    lines = [r.getMessage() for r in caplog.records]
    unknown = [m for m in lines if "unknown to the model" in m]
    absent = [m for m in lines if "not in instances_val2017.json" in m]
    assert len(unknown) == 1 and "1 of the 3 categories" in unknown[0] and "bike (2)" in unknown[0], lines
    assert "their 3 annotations score as missed" in unknown[0]
    assert len(absent) == 1 and "phone (77)" in absent[0], lines
    dm.setup("validate")
    assert len([r for r in caplog.records if "unknown to the model" in r.getMessage()]) == 1  # once

    # the same through the argument, without names: the file's names, category_<id> for the others
    dm = DetDataModule(root=str(tiny_coco), val_split="val2017", image_size=32, label_category_ids=[5, 90, 77])
    dm.setup("validate")
    assert dm.meta["class_names"] == ["cat", "zebra", "category_77"]


def test_datamodule_resize_is_checked(tmp_path: Path) -> None:
    from backbone.errors import ArgumentError

    with pytest.raises(ArgumentError, match="resize must be one of .*cv2_linear.*tf_bilinear"):
        DetDataModule(root=str(tmp_path), resize="area")
    assert DetDataModule(root=str(tmp_path), resize="tf_bilinear").resize == "tf_bilinear"
