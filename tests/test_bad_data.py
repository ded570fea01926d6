"""Bad data never kills or fools a run: each case is skipped and counted, repaired and logged, or refused
at start-up with one error naming the file / id / key (backbone.training.data_health, both datasets)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from backbone.errors import DataError
from backbone.training.data_health import DataHealth, HealthReport
from backbone.training.voc_format import voc_palette
from mnv2det.datamodule import DetDataModule, collate_detections
from mnv2det.dataset import COCODetection
from mnv2seg.dataset import VOCSegmentation
from mnv2seg.transforms import collate


# ------------------------------------------------------------------------------------------ helpers
def _img(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _exif_jpeg(path: Path, a: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(path, exif=exif.tobytes(), quality=95)


def _coco(root: Path, images: list[dict], anns: list[dict], split: str = "val2017") -> Path:
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    cats = [{"id": 1, "name": "thing"}]
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def _ann(i: int, img: int, bbox, cat: int = 1) -> dict:
    return {"id": i, "image_id": img, "category_id": cat, "bbox": bbox, "area": 1.0, "iscrowd": 0}


def _events(target_or_sample) -> list[tuple[str, str, str]]:
    return list(target_or_sample["health"])


# ------------------------------------------------------------------------------------------ detection
@pytest.fixture
def bad_coco(tmp_path: Path) -> Path:
    """One good image and one of each bad / odd kind, all 24x32 (h, w) as annotated."""
    root = tmp_path / "coco"
    d = root / "val2017"
    d.mkdir(parents=True)
    Image.fromarray(_img(24, 32)).save(d / "good.jpg")
    Image.fromarray(_img(24, 32)).save(d / "trunc.jpg")
    (d / "trunc.jpg").write_bytes((d / "trunc.jpg").read_bytes()[:300])
    (d / "zero.jpg").write_bytes(b"")
    Image.fromarray(_img(24, 32)[..., 0]).save(d / "gray.png")
    Image.fromarray(np.dstack([_img(24, 32), np.full((24, 32), 255, np.uint8)])).save(d / "rgba.png")
    Image.new("CMYK", (32, 24), (0, 255, 255, 0)).save(d / "cmyk.jpg")
    Image.fromarray(np.full((24, 32), 50000, np.uint16)).save(d / "sixteen.png")
    Image.fromarray(_img(48, 64)).save(d / "big.jpg")  # annotated 32x24: boxes rescaled x2
    _exif_jpeg(d / "exif_rot.jpg", _img(32, 24), 6)  # stored 24 wide x 32 high, annotated as the rotated 32x24
    _exif_jpeg(d / "exif_keep.jpg", _img(24, 32), 6)  # stored already 32x24 = annotated: stored pixels used
    names = ["good.jpg", "trunc.jpg", "zero.jpg", "gray.png", "rgba.png", "cmyk.jpg", "sixteen.png", "big.jpg",
             "exif_rot.jpg", "exif_keep.jpg", "gone.jpg"]
    images = [{"id": i + 1, "file_name": n, "width": 32, "height": 24} for i, n in enumerate(names)]
    anns = [_ann(1, 1, [2, 2, 10, 10]), _ann(2, 8, [2, 2, 10, 10]),
            _ann(3, 1, [float("nan"), 2, 5, 5]), _ann(4, 1, [2, 2, 0, 5]), _ann(5, 1, [2, 2, -3, 5]),
            _ann(6, 1, [40, 2, 5, 5]), _ann(7, 1, [31.5, 2, 5, 5])]
    return _coco(root, images, anns)


def test_det_bad_files_skipped_repaired_and_counted(bad_coco: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        ds = COCODetection(bad_coco, "val2017")
    # setup: the missing file is left out and counted, the 5 bad boxes dropped with their reasons
    assert ds.missing_ids == [11] and "gone.jpg" in caplog.text
    setup = ds.health.to_dict()["val2017"]
    assert setup["missing"]["file not found"]["examples"] == ["gone.jpg (image id 11)"]
    assert {r: v["count"] for r, v in setup["boxes_dropped"].items()} == {
        "non-finite (NaN or inf)": 1, "zero or negative size": 2, "outside the image": 1,
        "under 1 px after clipping": 1}
    assert "annotation 3 (image 1)" in setup["boxes_dropped"]["non-finite (NaN or inf)"]["examples"]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mnv2det.dataset"):
        batches = list(DataLoader(ds, batch_size=4, collate_fn=lambda s: s))
    samples = [s for b in batches for s in b]
    events = [e for _, t in samples for e in _events(t)]
    skipped = {(r, item) for k, r, item in events if k == "skipped"}
    assert skipped == {("truncated", "trunc.jpg (image id 2)"), ("empty", "zero.jpg (image id 3)")}
    assert "trunc.jpg" in caplog.text and "zero.jpg" in caplog.text  # logged by name
    repaired = {item.split()[0]: r for k, r, item in events if k == "repaired"}
    assert repaired == {"gray.png": "grayscale", "rgba.png": "rgba", "cmyk.jpg": "cmyk", "sixteen.png": "16-bit",
                        "big.jpg": "size-mismatch", "exif_rot.jpg": "exif-rotated"}
    for name in repaired:
        assert f"{name}" in caplog.text  # one log line per repaired image
    by_id = {t["image_id"]: (img, t) for img, t in samples}
    # 16-bit: scaled (50000 >> 8 = 195), not clipped to white
    assert (by_id[7][0] == 195).all()
    # size mismatch: pixels 64x48, boxes rescaled x2, orig_size stays the annotated frame
    np.testing.assert_allclose(by_id[8][1]["boxes"], [[4, 4, 24, 24]])
    assert by_id[8][1]["orig_size"] == (24, 32)
    # EXIF: rotated only where the annotation says the annotator saw the rotated image
    assert by_id[9][0].shape == (24, 32, 3) and by_id[10][0].shape == (24, 32, 3)
    assert by_id[9][1]["orig_size"] == (24, 32) and "exif_keep.jpg" not in repaired
    # the records survive the collate (and thus the trip from a worker process)
    batch = collate_detections([(torch.zeros(3, 4, 4), t) for _, t in samples[:2]])
    assert batch["health"]["samples"] == 2
    assert batch["health"]["events"] == [e for _, t in samples[:2] for e in _events(t)]


def test_det_events_cross_worker_processes(bad_coco: Path) -> None:
    dm = DetDataModule(str(bad_coco), train_split="val2017", val_split="val2017", image_size=32, batch_size=4,
                       num_workers=1, pin_memory=False, max_bad_fraction=0.5)
    dm.setup("validate")
    report, ids = HealthReport(), []
    for b in dm.val_dataloader():  # built in a worker process, carried by the collate
        report.samples["val"] = report.samples.get("val", 0) + b["health"]["samples"]
        report.add_events("val", b["health"]["events"])
        ids += b["image_ids"].tolist()
    # 6 images repaired (sixteen.png twice: grayscale + 16-bit); val blanks the 2 unreadable ones in place
    assert report.count("val", ["skipped"]) == 2 and report.count("val", ["repaired"]) == 7
    assert ids == list(range(1, 11)) and report.samples["val"] == 10  # every image once, none twice


@pytest.mark.parametrize("case,match", [
    ("no_file_name", r"image 1 has no file_name"),
    ("no_size", r"image 1 has no height, width"),
    ("bad_size", r"image 1 \(a.jpg\) has width 0"),
    ("no_bbox", r"annotation 7 \(image 1\) has no bbox"),
    ("no_category", r"annotation 7 \(image 1\) has no category_id"),
    ("no_image_id", r"annotation 7 has no image_id"),
    ("bbox_len", r"annotation 7 \(image 1\) has bbox \[1, 2, 3\]"),
    ("unknown_cat", r"annotation 7 \(image 1\) has category_id 99 not in 'categories'"),
    ("malformed", r"not a valid COCO instances annotation file"),
])
def test_det_annotation_file_refused_naming_the_id(tmp_path: Path, case: str, match: str) -> None:
    img = {"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}
    ann = _ann(7, 1, [1, 2, 3, 4])
    if case == "no_file_name":
        del img["file_name"]
    elif case == "no_size":
        del img["width"], img["height"]
    elif case == "bad_size":
        img["width"] = 0
    elif case in ("no_bbox", "no_category", "no_image_id"):
        del ann[{"no_bbox": "bbox", "no_category": "category_id", "no_image_id": "image_id"}[case]]
    elif case == "bbox_len":
        ann["bbox"] = [1, 2, 3]
    elif case == "unknown_cat":
        ann["category_id"] = 99
    root = _coco(tmp_path, [img], [ann])
    Image.fromarray(_img(8, 8)).save(root / "val2017" / "a.jpg")
    if case == "malformed":
        (root / "annotations" / "instances_val2017.json").write_text('{"images": [')
    with pytest.raises(DataError, match=match):
        COCODetection(root, "val2017")


def test_det_setup_refusals_name_counts_files_and_key(tmp_path: Path) -> None:
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 8, "height": 8} for i in range(1, 11)]
    root = _coco(tmp_path / "c", images, [])
    for i in range(1, 10):  # 10.jpg missing: 10% > 1%
        Image.fromarray(_img(8, 8)).save(root / "val2017" / f"{i}.jpg")
    dm = DetDataModule(str(root), val_split="val2017", image_size=32, batch_size=2, num_workers=0,
                       max_bad_fraction=0.01)
    with pytest.raises(DataError, match=r"1 of 10 samples .*10\.0% > data\.max_bad_fraction=0\.01.*10\.jpg"
                                        r".*raise data\.max_bad_fraction"):
        dm.setup("validate")
    ok = DetDataModule(str(root), val_split="val2017", image_size=32, batch_size=2, num_workers=0,
                       max_bad_fraction=0.2)
    ok.setup("validate")  # within the limit: runs, with the missing file in the report
    assert ok.val_dataset.health.count() == 1
    # every listed file missing / an empty split: refused at start-up
    gone = _coco(tmp_path / "g", images[:2], [])
    with pytest.raises(DataError, match=r"all 2 validation images listed .* are missing"):
        DetDataModule(str(gone), image_size=32, batch_size=2, num_workers=0).setup("validate")
    empty = _coco(tmp_path / "e", [], [])
    with pytest.raises(DataError, match=r"no validation images"):
        DetDataModule(str(empty), image_size=32, batch_size=2, num_workers=0).setup("validate")


# ------------------------------------------------------------------------------------------ segmentation
def _voc(root: Path, names: list[str], size=(12, 16), split: str = "train") -> Path:
    for i, n in enumerate(names):
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_img(*size, seed=i)).save(root / "JPEGImages" / f"{n}.jpg", format="PNG")
        _mask(root / "SegmentationClass" / f"{n}.png", np.zeros(size, np.uint8))
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return root


def _mask(path: Path, m: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(m.astype(np.uint8))
    im.putpalette(voc_palette().ravel().tolist())
    im.save(path)


def test_seg_bad_samples_skipped_repaired_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _voc(tmp_path, ["a", "b", "c", "d", "e", "f", "g", "h"])
    _mask(root / "SegmentationClass" / "b.png", np.zeros((13, 16)))  # wrong size
    (root / "JPEGImages" / "c.jpg").write_bytes(b"")  # zero bytes
    Image.fromarray(_img(12, 16)[..., 0]).save(root / "JPEGImages" / "d.jpg", format="PNG")  # grayscale
    Image.fromarray(np.full((12, 16), 40000, np.uint16)).save(root / "JPEGImages" / "e.jpg", format="PNG")
    _exif_jpeg(root / "JPEGImages" / "f.jpg", _img(16, 12), 6)  # stored 12 wide x 16 high; mask is the rotated 16x12
    (root / "SegmentationClass" / "g.png").unlink()  # missing mask: dropped at setup
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\nc\nd\ne\nf\ng\nh\nzz\n")  # zz: no files
    with caplog.at_level(logging.INFO, logger="mnv2seg.dataset"):
        to_tensor = lambda image, mask: {"image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float(),
                                         "mask": mask}  # noqa: E731 - raw pixels, to check them
        ds = VOCSegmentation(root, "train", on_bad="ignore", transform=to_tensor)
        assert ds.ids == ["a", "b", "c", "d", "e", "f", "h"] and ds.missing_ids == ["g", "zz"]
        assert "g, zz" in caplog.text
        with pytest.warns(UserWarning):
            batch = collate([ds[i] for i in range(len(ds))])
    events = batch["health"]["events"]
    assert batch["health"]["samples"] == 7
    assert {(k, r, n) for k, r, n in events if k == "skipped"} == {
        ("skipped", "mask size differs from image", "b"), ("skipped", "empty", "c")}
    assert {(r, n) for k, r, n in events if k == "repaired"} == {("grayscale", "d"), ("grayscale", "e"),
                                                                 ("16-bit", "e"), ("exif-rotated", "f")}
    assert (batch["masks"][1] == 255).all() and (batch["masks"][2] == 255).all()  # ignored, not scored
    assert (batch["images"][4].float().mean() - 156).abs() < 1  # 40000 >> 8, not white
    missing = ds.health.to_dict()["train"]["missing"]
    assert missing["mask file not found"]["examples"] == ["g"] and missing["image file not found"]["examples"] == ["zz"]


def test_seg_all_missing_and_empty_split_refused(tmp_path: Path) -> None:
    root = _voc(tmp_path, ["a"])
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("x\ny\n")
    with pytest.raises(DataError, match=r"all 2 ids of split 'train' have a missing image or mask file, e\.g\. x, y"):
        VOCSegmentation(root, "train")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n")
    with pytest.raises(DataError, match=r"train\.txt.*is empty"):
        VOCSegmentation(root, "train")


# ------------------------------------------------------------------------------------------ the callback
def _trainer(dm, tmp: Path) -> SimpleNamespace:
    return SimpleNamespace(datamodule=dm, world_size=1, is_global_zero=True, sanity_checking=False)


def _batch(n: int, events: list) -> dict:
    return {"health": {"samples": n, "events": events}}


def test_callback_summary_and_json(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    setup = HealthReport()
    setup.add("train2017", "missing", "file not found", "x.jpg (image id 4)")
    dm = SimpleNamespace(max_bad_fraction=0.5, root=tmp_path, train_dataset=SimpleNamespace(health=setup),
                         val_dataset=None)
    cb = DataHealth(output_dir=tmp_path / "run", min_samples=1)
    tr = _trainer(dm, tmp_path)
    cb.on_train_batch_start(tr, None, _batch(4, [("skipped", "truncated", "t.jpg (image id 2)"),
                                                 ("repaired", "grayscale", "g.jpg (image id 3)")]), 0)
    cb.on_train_batch_start(tr, None, _batch(4, [("repaired", "grayscale", "h.jpg (image id 5)")]), 1)
    cb.on_validation_batch_start(tr, None, _batch(2, []), 0)
    with caplog.at_level(logging.INFO, logger="backbone.training.data_health"):
        cb.teardown(tr, None, "fit")
    out = json.loads((tmp_path / "run" / "data_health.json").read_text())
    assert out["train"]["samples"] == 8 and out["val"] == {"samples": 2}
    assert out["train"]["skipped"]["truncated"] == {"count": 1, "examples": ["t.jpg (image id 2)"]}
    assert out["train"]["repaired"]["grayscale"]["count"] == 2
    assert out["train"]["missing"]["file not found"]["examples"] == ["x.jpg (image id 4)"]
    text = caplog.text
    assert "data health (after fit)" in text and "skipped: 1" in text and "t.jpg (image id 2)" in text


def test_callback_stops_the_run_past_max_bad_fraction(tmp_path: Path) -> None:
    dm = SimpleNamespace(max_bad_fraction=0.1, root=tmp_path / "coco")
    cb = DataHealth(min_samples=20)
    tr = _trainer(dm, tmp_path)
    bad = [("skipped", "truncated", f"{i}.jpg (image id {i})") for i in range(3)]
    cb.on_train_batch_start(tr, None, _batch(8, bad), 0)  # 3 of 11: too few loaded to judge yet
    cb.on_train_batch_start(tr, None, _batch(8, []), 1)  # 3 of 19: still below min_samples
    with pytest.raises(DataError, match=r"3 of 19 'train' samples .*15\.8% > data\.max_bad_fraction=0\.1.*"
                                        r"0\.jpg \(image id 0\) \[truncated\].*raise data\.max_bad_fraction"):
        cb.on_train_epoch_end(tr, None)  # a whole epoch seen: judged whatever its size
    cb2 = DataHealth(min_samples=20)
    cb2.on_train_batch_start(tr, None, _batch(8, bad), 0)
    with pytest.raises(DataError, match=r"3 of 23 'train' samples"):
        cb2.on_train_batch_start(tr, None, _batch(12, []), 1)  # 23 loads >= min_samples: judged mid-epoch
    # a healthy stream never stops
    ok = DataHealth(min_samples=1)
    ok.on_train_batch_start(_trainer(SimpleNamespace(max_bad_fraction=0.1, root=tmp_path), tmp_path), None,
                            _batch(100, bad[:1]), 0)


# ------------------------------------------------------------------------------------------ a broken copy
def _coco_with_broken_run(root: Path, n_train: int, n_bad: int) -> Path:
    """A COCO set whose train split holds ``n_bad`` consecutive truncated JPEGs (a broken copy)."""
    for split, n in (("train2017", n_train), ("val2017", 8)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(n):
            a = _img(48, 48, seed=i)
            a[12:36, 12:36] = 255  # one object, so the run has something to learn and score
            path = root / split / f"{i:04d}.jpg"
            Image.fromarray(a).save(path, quality=90)
            if split == "train2017" and 40 <= i < 40 + n_bad:
                path.write_bytes(path.read_bytes()[:200])
            images.append({"id": i + 1, "file_name": path.name, "width": 48, "height": 48})
            anns.append(_ann(i + 1, i + 1, [12, 12, 24, 24]))
        _coco(root, images, anns, split)
    return root


def test_bad_files_counted_once_and_replacements_do_not_cascade(tmp_path: Path) -> None:
    """8 consecutive truncated files of 158: each sample's replacement is a random other one, so the
    8 files cost 8 skips an epoch (the next index would cascade: 8 + 7 + ... + 1 = 36), each counted once."""
    root = _coco_with_broken_run(tmp_path / "coco", 158, 8)
    ds = COCODetection(root, "train2017")
    events = [e for i in range(len(ds)) for e in _events(ds[i][1]) if e[0] == "skipped"]
    bad = {f"{i:04d}.jpg" for i in range(40, 48)}
    assert {item.split()[0] for _, _, item in events} == bad
    assert len(events) < 12, len(events)  # a few bad replacements at most, not a cascade
    again = [e for e in _events(ds[43][1]) if e[0] == "skipped"]
    assert again[0][2] == "0043.jpg (image id 44)"  # the draw is seeded: the same replacement each time
    assert again == [e for e in _events(ds[43][1]) if e[0] == "skipped"]
    report = HealthReport()
    report.add_events("train", events + events)  # two epochs
    assert report.files("train") == 8 and report.count("train") == 2 * len(events)
    assert "skipped: 8 files" in report.format()


@pytest.mark.slow
@pytest.mark.parametrize(("n_bad", "stops"), [(8, False), (20, True)])
def test_train_with_a_broken_copy(run_tool, tmp_path: Path, n_bad: int, stops: bool) -> None:
    """tools/train.py data=coco, 158 train images of which ``n_bad`` consecutive ones are truncated, at
    data.max_bad_fraction=0.1 (15.8 files): 8 finish and report 8 files; 20 stop with one error line."""
    root = _coco_with_broken_run(tmp_path / "coco", 158, n_bad)
    out = tmp_path / "run"
    proc = run_tool("train.py", ["data=coco", f"data.root={root}", "data.max_bad_fraction=0.1", "data.num_workers=0",
                                 "data.batch_size=16", "data/augment=light", "model.image_size=96",
                                 "model.backbone.pretrained=none", "trainer.max_epochs=1", "logger=none"],
                    tmp_path / "cache", out)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    if stops:
        assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
        assert "of the 158 'train' samples were found unreadable" in errors[0], errors[0]
        assert "data.max_bad_fraction=0.1" in errors[0] and "Traceback" not in proc.stderr
        return
    assert proc.returncode == 0 and not errors, proc.stderr[-3000:]
    health = json.loads(next(out.rglob("data_health.json")).read_text())
    assert health["train"]["files"] == {"skipped": 8}, health["train"]
    assert health["train"]["skipped"]["truncated"]["count"] >= 8  # every file met, some again as replacements
