"""Synthetic dataset: both on-disk formats load, agree with each other, and are deterministic."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import backbone.training.synthetic as syn
from backbone.errors import ConfigError, DataError
from backbone.training.synthetic import CATEGORY_IDS, CLASS_NAMES
from backbone.training.voc_format import IGNORE_INDEX, voc_palette

REPO = Path(__file__).resolve().parents[1]
K = len(CLASS_NAMES)
TINY = {"num_train": 6, "num_val": 4, "size": 128, "seed": 0}


def _coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress
        return COCO(str(path))


def _ann_file(root: Path, split: str) -> Path:
    return syn.coco_root(root) / "annotations" / f"instances_{split}2017.json"


def _mask(root: Path, stem: str) -> np.ndarray:
    return np.asarray(Image.open(syn.voc_root(root) / "SegmentationClass" / f"{stem}.png"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return syn.generate(tmp_path_factory.mktemp("syn") / "data", progress=False, **TINY)


def test_voc_palette_matches_pascal() -> None:
    pal = voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert pal[0].tolist() == [0, 0, 0]
    assert pal[1].tolist() == [128, 0, 0]  # aeroplane
    assert pal[2].tolist() == [0, 128, 0]  # bicycle
    assert pal[15].tolist() == [192, 128, 128]  # person
    assert pal[255].tolist() == [224, 224, 192]  # void
    assert len({tuple(c) for c in pal.tolist()}) == 256


def test_coco_json_is_valid(tiny: Path) -> None:
    image_ids: set[int] = set()
    ann_ids: set[int] = set()
    for split, n in (("train", TINY["num_train"]), ("val", TINY["num_val"])):
        data = json.loads(_ann_file(tiny, split).read_text())
        assert set(data) >= {"info", "licenses", "images", "annotations", "categories"}
        coco = _coco(_ann_file(tiny, split))
        assert [c["id"] for c in data["categories"]] == list(CATEGORY_IDS)
        assert [c["name"] for c in data["categories"]] == list(CLASS_NAMES)
        assert sorted(CATEGORY_IDS) != list(range(1, K + 1)), "ids must be non-contiguous like COCO"
        assert len(coco.getImgIds()) == n
        empty = [i for i in coco.getImgIds() if not coco.getAnnIds(imgIds=[i])]
        assert empty, f"{split}: no image without annotations"
        sizes = []
        for img in coco.loadImgs(coco.getImgIds()):
            path = syn.coco_root(tiny) / f"{split}2017" / img["file_name"]
            with Image.open(path) as im:
                assert im.format == "JPEG" and im.size == (img["width"], img["height"])
            sizes.append((img["width"], img["height"]))
            image_ids.add(img["id"])
        assert any(w != h for w, h in sizes), "all images are square"
        assert len(set(sizes)) > 1, "all images have the same size"
        for ann in coco.loadAnns(coco.getAnnIds()):
            img = coco.imgs[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and ann["area"] > 0 and ann["iscrowd"] == 0
            assert x >= 0 and y >= 0 and x + w <= img["width"] + 1e-6 and y + h <= img["height"] + 1e-6
            poly = np.asarray(ann["segmentation"][0]).reshape(-1, 2)
            assert np.allclose([poly[:, 0].min(), poly[:, 1].min()], [x, y], atol=0.011)
            assert np.allclose([poly[:, 0].max(), poly[:, 1].max()], [x + w, y + h], atol=0.011)
            # polygon area vs pycocotools' rasterised area of the same polygon
            raster_area = float(mask_utils.area(coco.annToRLE(ann)))
            assert abs(raster_area - ann["area"]) <= 0.1 * ann["area"] + 10
            ann_ids.add(ann["id"])
    assert len(image_ids) == TINY["num_train"] + TINY["num_val"], "image ids collide across splits"
    total_anns = sum(len(json.loads(_ann_file(tiny, s).read_text())["annotations"]) for s in ("train", "val"))
    assert len(ann_ids) == total_anns, "annotation ids collide"


def test_voc_layout_and_masks(tiny: Path) -> None:
    voc = syn.voc_root(tiny)
    sets = voc / "ImageSets" / "Segmentation"
    train = sets.joinpath("train.txt").read_text().split()
    val = sets.joinpath("val.txt").read_text().split()
    assert sets.joinpath("trainval.txt").read_text().split() == train + val
    assert len(train) == TINY["num_train"] and len(val) == TINY["num_val"] and not set(train) & set(val)
    assert sorted(p.stem for p in (voc / "JPEGImages").glob("*.jpg")) == sorted(train + val)
    assert sorted(p.stem for p in (voc / "SegmentationClass").glob("*.png")) == sorted(train + val)
    palette = voc_palette().ravel().tolist()
    for split, stems in (("train", train), ("val", val)):
        coco_names = {img["file_name"] for img in json.loads(_ann_file(tiny, split).read_text())["images"]}
        assert coco_names == {s + ".jpg" for s in stems}, "VOC and COCO splits differ"
        for stem in stems:
            jpg = voc / "JPEGImages" / f"{stem}.jpg"
            assert jpg.read_bytes() == (syn.coco_root(tiny) / f"{split}2017" / f"{stem}.jpg").read_bytes()
            with Image.open(voc / "SegmentationClass" / f"{stem}.png") as m, Image.open(jpg) as im:
                assert m.mode == "P" and m.getpalette()[: len(palette)] == palette
                assert m.size == im.size
                values = set(np.unique(np.asarray(m)).tolist())
            assert values <= set(range(K + 1)) | {IGNORE_INDEX}
    # image 0 of each split is empty: background only, no void band
    for stem in (train[0], val[0]):
        assert set(np.unique(_mask(tiny, stem)).tolist()) == {0}
    all_values = set().union(*(np.unique(_mask(tiny, s)).tolist() for s in train + val))
    assert IGNORE_INDEX in all_values and len(all_values & set(range(1, K + 1))) >= 3


def test_formats_agree(tiny: Path) -> None:
    for split in ("train", "val"):
        coco = _coco(_ann_file(tiny, split))
        for img in coco.loadImgs(coco.getImgIds()):
            mask = _mask(tiny, Path(img["file_name"]).stem)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
            for label, cid in enumerate(CATEGORY_IDS, start=1):
                cls_anns = [a for a in anns if a["category_id"] == cid]
                in_class = mask == label
                if not cls_anns:
                    assert not in_class.any(), f"{img['file_name']}: class {label} in mask, not in COCO"
                    continue
                in_boxes = np.zeros_like(in_class)
                full = np.zeros_like(in_class)
                for a in cls_anns:
                    x, y, w, h = a["bbox"]
                    # pixels whose centre (j + 0.5, i + 0.5) lies in the box: no slack
                    box = np.zeros_like(in_class)
                    box[int(np.ceil(y - 0.5)):int(np.floor(y + h - 0.5)) + 1,
                        int(np.ceil(x - 0.5)):int(np.floor(x + w - 0.5)) + 1] = True
                    assert (in_class & box).any(), f"ann {a['id']}: no class-{label} pixel in its bbox"
                    in_boxes |= box
                    full |= coco.annToMask(a).astype(bool)
                assert in_class[in_boxes].sum() == in_class.sum(), "class pixels outside all its boxes"
                # visible VOC pixels lie inside the COCO outlines (up to rasteriser rounding)
                assert (in_class & full).sum() >= 0.97 * in_class.sum()


def test_rasterizer_matches_pycocotools(tiny: Path) -> None:
    """The renderer fills exactly the written polygon, with pycocotools' pixel convention."""
    coco = _coco(_ann_file(tiny, "train"))
    checked = 0
    for ann in coco.loadAnns(coco.getAnnIds()):
        img = coco.imgs[ann["image_id"]]
        poly = np.asarray(ann["segmentation"][0]).reshape(-1, 2)
        ours = syn._rasterize(poly, 0, 0, img["width"], img["height"])
        theirs = coco.annToMask(ann).astype(bool)
        iou = (ours & theirs).sum() / (ours | theirs).sum()
        assert iou > (0.9 if ann["area"] > 300 else 0.75), f"ann {ann['id']}: IoU {iou:.3f}"
        assert abs(ours.sum() - ann["area"]) <= 0.05 * ann["area"] + 5
        checked += 1
    assert checked >= 5


def test_objects_are_drawn_in_their_colour_family(tiny: Path) -> None:
    """The JPEG shows each labelled region in its class's hue (what a small CNN can learn)."""
    import colorsys

    voc = syn.voc_root(tiny)
    checked = 0
    for stem in voc.joinpath("ImageSets", "Segmentation", "trainval.txt").read_text().split():
        image = np.asarray(Image.open(voc / "JPEGImages" / f"{stem}.jpg"), dtype=np.float64)
        mask = _mask(tiny, stem)
        for label in range(1, K + 1):
            region = mask == label
            if region.sum() < 30:
                continue
            hue = colorsys.rgb_to_hsv(*(image[region].mean(0) / 255.0))[0]
            dist = min(abs(hue - syn._HUES[label - 1]), 1 - abs(hue - syn._HUES[label - 1]))
            assert dist < 0.1, f"{stem}: class {CLASS_NAMES[label - 1]} drawn with hue {hue:.2f}"
            checked += 1
    assert checked >= 5


def test_occlusion_rule_and_visible_mask() -> None:
    """Every kept object stays >= MIN_VISIBLE visible; the VOC mask is the top-most object's class."""
    seen_occlusion = False
    for i in range(1, 13):
        scene = syn.render_scene(np.random.default_rng([3, 0, i]), 192)
        h, w = scene.mask.shape
        inst = np.zeros((h, w), np.int64)
        areas = []
        for k, poly in enumerate(scene.polygons):
            m = syn._rasterize(poly, 0, 0, w, h)
            inst[m] = k + 1
            areas.append(m.sum())
        visible = np.bincount(inst.ravel(), minlength=len(areas) + 1)[1:]
        assert np.all(visible >= syn.MIN_VISIBLE * np.asarray(areas))
        seen_occlusion |= bool(np.any(visible < np.asarray(areas)))
        labels = np.array([0] + [c + 1 for c in scene.classes])[inst]
        keep = scene.mask != IGNORE_INDEX
        assert np.array_equal(scene.mask[keep], labels[keep])
        assert (scene.mask == IGNORE_INDEX).mean() < 0.3
    assert seen_occlusion, "no scene had overlapping objects"


def test_object_sizes_span_coco_ranges(tmp_path: Path) -> None:
    root = syn.generate(tmp_path / "d", num_train=16, num_val=0, size=256, progress=False)
    areas = np.array([a["area"] for a in json.loads(_ann_file(root, "train").read_text())["annotations"]])
    assert (areas < 32 ** 2).sum() >= 3 and ((areas >= 32 ** 2) & (areas < 96 ** 2)).sum() >= 3
    assert (areas >= 96 ** 2).sum() >= 3
    cats = {a["category_id"] for a in json.loads(_ann_file(root, "train").read_text())["annotations"]}
    assert cats == set(CATEGORY_IDS)


def _read_all(root: Path) -> tuple[bytes, bytes, list[np.ndarray], list[np.ndarray]]:
    voc = syn.voc_root(root)
    stems = sorted(p.stem for p in (voc / "SegmentationClass").glob("*.png"))
    masks = [_mask(root, s) for s in stems]
    images = [np.asarray(Image.open(voc / "JPEGImages" / f"{s}.jpg")) for s in stems]
    return _ann_file(root, "train").read_bytes(), _ann_file(root, "val").read_bytes(), masks, images


def test_deterministic_per_seed(tmp_path: Path) -> None:
    args = {"num_train": 3, "num_val": 2, "size": 96}
    a = _read_all(syn.generate(tmp_path / "a", seed=5, progress=False, **args))
    b = _read_all(syn.generate(tmp_path / "b", seed=5, progress=False, **args))
    c = _read_all(syn.generate(tmp_path / "c", seed=6, progress=False, **args))
    assert a[0] == b[0] and a[1] == b[1]
    assert all(np.array_equal(x, y) for x, y in zip(a[2] + a[3], b[2] + b[3]))
    assert a[0] != c[0]
    assert not all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a[3], c[3]))
    # scene i does not depend on how many scenes are asked for
    d = _read_all(syn.generate(tmp_path / "d", seed=5, num_train=4, num_val=0, size=96, progress=False))
    assert all(np.array_equal(x, y) for x, y in zip(a[2][:3], d[2][:3]))


def test_generate_refuses_existing_unless_overwrite(tmp_path: Path) -> None:
    root = syn.generate(tmp_path / "d", num_train=1, num_val=1, size=64, progress=False)
    (root / "keep.txt").write_text("user file")
    with pytest.raises(DataError, match="overwrite"):
        syn.generate(root, num_train=1, num_val=1, size=64, progress=False)
    syn.generate(root, num_train=2, num_val=1, size=64, overwrite=True, progress=False)
    assert (root / "keep.txt").exists()
    assert len(json.loads(_ann_file(root, "train").read_text())["images"]) == 2


@pytest.mark.parametrize("bad", [{"size": 10}, {"num_train": -1}, {"seed": 1.5}, {"num_train": 0, "num_val": 0}])
def test_bad_arguments(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ConfigError):
        syn.generate(tmp_path / "d", **{**TINY, **bad})
    with pytest.raises(ConfigError, match="colour"):
        syn.ensure_synthetic(tmp_path / "e", colour="red")


def test_ensure_synthetic_caches_and_regenerates(tmp_path: Path) -> None:
    root = tmp_path / "syn"
    args = {"num_train": 2, "num_val": 1, "size": 64, "progress": False}
    assert syn.ensure_synthetic(root, **args) == root
    marker = root / syn.MARKER
    mtime = marker.stat().st_mtime_ns
    ann_mtime = _ann_file(root, "train").stat().st_mtime_ns
    syn.ensure_synthetic(root, **args)
    assert marker.stat().st_mtime_ns == mtime and _ann_file(root, "train").stat().st_mtime_ns == ann_mtime
    syn.ensure_synthetic(root, **{**args, "num_train": 3})
    assert json.loads(marker.read_text())["num_train"] == 3
    assert len(json.loads(_ann_file(root, "train").read_text())["images"]) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["syn"], "temporary directories left behind"


def test_ensure_synthetic_crash_leaves_nothing_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "syn"
    calls = {"n": 0}
    real = syn.render_scene

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(syn, "render_scene", flaky)
    with pytest.raises(RuntimeError):
        syn.ensure_synthetic(root, num_train=2, num_val=1, size=64, progress=False)
    assert not (root / syn.MARKER).exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(syn, "render_scene", real)
    syn.ensure_synthetic(root, num_train=2, num_val=1, size=64, progress=False)
    assert (root / syn.MARKER).exists()


def test_ensure_synthetic_never_deletes_foreign_data(tmp_path: Path) -> None:
    root = tmp_path / "mydata"
    root.mkdir()
    (root / "precious.txt").write_text("x")
    with pytest.raises(DataError, match="not a synthetic dataset"):
        syn.ensure_synthetic(root, num_train=1, num_val=1, size=64, progress=False)
    assert (root / "precious.txt").exists()


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [sys.executable, str(REPO / "tools" / "make_synthetic.py"), "--out", str(out), "--num-train", "2",
           "--num-val", "1", "--size", "64", "--seed", "3", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / syn.MARKER).read_text())["seed"] == 3
    assert len(json.loads(_ann_file(out, "val").read_text())["images"]) == 1
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------- both tasks' DataModules on the same synthetic set
def _datamodule(task: str, root: Path, synthetic: object = "default", **common):
    """The task's DataModule on the synthetic set under `root` (built with `common` overrides)."""
    from mnv2det.datamodule import DetDataModule
    from mnv2seg.datamodule import SegDataModule

    if synthetic == "default":
        synthetic = {"root": str(root), **TINY, "progress": False}
    args = {"batch_size": 2, "val_batch_size": 3, "num_workers": 0, "synthetic": synthetic, **common}
    if task == "det":
        return DetDataModule(**{"root": str(syn.coco_root(root)), "image_size": 64, "num_classes": K, **args})
    return SegDataModule(**{"root": str(syn.voc_root(root)), "num_classes": K + 1, "crop_size": 48, **args})


def test_datamodules_share_the_contract(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from backbone.training.datamodule import META_KEYS, TaskDataModule

    calls = []
    real = syn.ensure_synthetic
    monkeypatch.setattr(syn, "ensure_synthetic", lambda root, **kw: calls.append((root, kw)) or real(root, **kw))
    det, seg = _datamodule("det", tiny), _datamodule("seg", tiny)
    for dm in (det, seg):
        assert isinstance(dm, TaskDataModule)
        dm.prepare_data()
        dm.setup("fit")
        assert dm.train_dataset is not None and dm.val_dataset is not None
        meta = dm.meta
        assert set(META_KEYS) <= set(meta) and meta["normalize"] == "imagenet"
        assert meta["num_classes"] == len(meta["class_names"]) and isinstance(meta["dataset"], str)
        for stage in ("val", "test", "predict"):  # every val image once, in order, in each of them
            loader = getattr(dm, f"{stage}_dataloader")()
            assert loader.dataset is dm.val_dataset and loader.batch_size == 3
            assert sum(len(batch["images"]) for batch in loader) == len(dm.val_dataset) == TINY["num_val"]
        assert dm.train_dataloader().batch_size == 2
    assert calls == [(str(tiny), {**TINY, "progress": False})] * 2  # `root` popped
    # the same keys in both, plus each task's own
    assert set(det.meta) - {"category_ids"} == set(seg.meta) - {"palette", "ignore_index"} == set(META_KEYS)
    assert det.meta["class_names"] == list(CLASS_NAMES) and det.meta["num_classes"] == K
    assert det.meta["category_ids"] == list(CATEGORY_IDS) and det.meta["dataset"].endswith("coco/val2017")
    assert seg.meta["class_names"] == ["background", *CLASS_NAMES] and seg.meta["num_classes"] == K + 1
    assert seg.meta["ignore_index"] == IGNORE_INDEX and seg.meta["palette"] == voc_palette().tolist()
    assert seg.meta["dataset"] == "VOCdevkit/VOC2012/val"


@pytest.mark.parametrize("task", ["det", "seg"])
@pytest.mark.parametrize("synthetic, key", [
    ({"num_train": 2}, "data.synthetic.root"),
    ({"out": "/tmp/x", "num_train": 2}, "data.synthetic.root"),  # no `out` alias any more
    ({"root": "/tmp/x", "out": "/tmp/x"}, "data.synthetic.out"),
    ({"root": "/tmp/x", "colour": "red"}, "data.synthetic.colour"),
    ("/tmp/x", "data.synthetic"),
])
def test_datamodules_refuse_bad_synthetic_config(tmp_path: Path, task: str, synthetic: object, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        _datamodule(task, tmp_path, synthetic=synthetic)


@pytest.mark.parametrize("override, key", [
    ({"root": "???"}, "data.root"), ({"root": None}, "data.root"), ({"batch_size": 0}, "data.batch_size"),
    ({"val_batch_size": True}, "data.val_batch_size"), ({"num_workers": -1}, "data.num_workers"),
    ({"num_workers": 1.5}, "data.num_workers"), ({"normalize": "caffe"}, "data.normalize"),
    ({"normalize": {"mean": [0.5] * 3, "std": [0, 1, 1]}}, "data.normalize"),
])
def test_datamodules_check_common_arguments_alike(tmp_path: Path, override: dict, key: str) -> None:
    from mnv2det.datamodule import DetDataModule
    from mnv2seg.datamodule import SegDataModule

    for cls in (DetDataModule, SegDataModule):
        with pytest.raises(ConfigError, match=f"'{key}'"):
            cls(**{"root": str(tmp_path), **override})


def test_datamodules_accept_common_arguments_alike(tmp_path: Path) -> None:
    normalize = {"mean": [0.5] * 3, "std": [0.25] * 3}
    det, seg = (_datamodule(task, tmp_path, synthetic=None, normalize=normalize, pin_memory=False)
                for task in ("det", "seg"))
    assert det.val_batch_size == seg.val_batch_size == 3 and not det.pin_memory and not seg.pin_memory
    assert det.synthetic is None and seg.synthetic is None
