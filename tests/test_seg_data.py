"""VOC / SBD reading, bad-sample reporting, DeepLab transforms, collate and the datamodule."""
from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backbone.errors import ArgumentError, ConfigError, DataError
from backbone.training.voc_format import VOC_CLASS_NAMES, class_names_for, voc_palette
from mnv2seg.dataset import BadSampleWarning, VOCSegmentation
from mnv2seg.transforms import collate, eval_transform, fitting_size, train_transform


def _write_image(path: Path, h: int, w: int, seed: int = 0) -> np.ndarray:
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)  # PNG bytes under a .jpg name: PIL sniffs the format, pixels stay exact
    return img


def _write_mask(path: Path, mask: np.ndarray) -> None:
    im = Image.fromarray(mask.astype(np.uint8))
    im.putpalette(voc_palette().ravel().tolist())  # "L" -> "P": what VOC ships
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def _mask(h: int, w: int, seed: int = 0, k: int = 21) -> np.ndarray:
    m = np.random.default_rng(seed).integers(0, k, (h, w)).astype(np.uint8)
    m[0, :] = 255  # a void band
    return m


def _make_voc(root: Path, splits: dict[str, list[str]], size=(20, 30)) -> dict[str, np.ndarray]:
    masks = {}
    names = sorted({n for ids in splits.values() for n in ids})
    for i, name in enumerate(names):
        _write_image(root / "JPEGImages" / f"{name}.jpg", *size, seed=i)
        masks[name] = _mask(*size, seed=i)
        _write_mask(root / "SegmentationClass" / f"{name}.png", masks[name])
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (sets / f"{split}.txt").write_text("".join(f"{n}\n" for n in ids))
    return masks


def test_palette_png_is_read_as_class_indices_not_colours(tmp_path):
    masks = _make_voc(tmp_path, {"train": ["a", "b"], "val": ["c"]})
    # the PNG really is a palette image whose colours differ from its indices
    with Image.open(tmp_path / "SegmentationClass" / "a.png") as im:
        assert im.mode == "P"
        assert np.array(im.convert("RGB"))[1, 1].tolist() == voc_palette()[masks["a"][1, 1]].tolist()
    ds = VOCSegmentation(tmp_path, "train")
    sample = ds[0]
    assert sample["name"] == "a"
    assert sample["mask"].dtype == np.uint8 and sample["mask"].shape == (20, 30)
    assert np.array_equal(sample["mask"], masks["a"])
    assert sample["image"].shape == (20, 30, 3)
    assert set(np.unique(sample["mask"])) <= set(range(21)) | {255}


def test_rgb_mask_is_reported_as_bad(tmp_path):
    _make_voc(tmp_path, {"train": ["a", "b"]})
    rgb = voc_palette()[_mask(20, 30)]
    Image.fromarray(rgb).save(tmp_path / "SegmentationClass" / "a.png")
    ds = VOCSegmentation(tmp_path, "train", on_bad="raise")
    with pytest.raises(DataError, match=r"a\.png.*mode RGB"):
        ds[0]


def _sbd_mat(path: Path, seg: np.ndarray) -> None:
    """The real SBD cls/*.mat layout: struct GTcls with Boundaries, Segmentation, CategoriesPresent."""
    from scipy.io import savemat

    boundaries = np.empty((20, 1), dtype=object)
    for i in range(20):
        boundaries[i, 0] = np.zeros((2, 2), dtype=np.uint8)
    present = np.unique(seg[(seg > 0) & (seg < 255)]).astype(np.uint8).reshape(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, {"GTcls": {"Boundaries": boundaries, "Segmentation": seg.astype(np.uint8),
                             "CategoriesPresent": present}})


def test_trainaug_merges_voc_and_sbd_and_reads_mat_files(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    masks = _make_voc(voc, {"train": ["a", "b"], "val": ["c"]})
    sbd = tmp_path / "benchmark_RELEASE"
    (sbd / "dataset").mkdir(parents=True)
    (sbd / "dataset" / "train.txt").write_text("b\nc\nd\n")  # c is VOC val: excluded
    (sbd / "dataset" / "val.txt").write_text("e\n")
    sbd_masks = {}
    for i, name in enumerate(["b", "c", "d", "e"]):
        sbd_masks[name] = _mask(20, 30, seed=100 + i)
        _sbd_mat(sbd / "dataset" / "cls" / f"{name}.mat", sbd_masks[name])
        if name in ("d", "e"):  # SBD-only images still come from VOC's JPEGImages
            _write_image(voc / "JPEGImages" / f"{name}.jpg", 20, 30, seed=50 + i)
    ds = VOCSegmentation(voc, "trainaug", sbd_root=sbd)
    assert ds.ids == ["a", "b", "d", "e"]
    by_name = {ds[i]["name"]: ds[i]["mask"] for i in range(len(ds))}
    assert np.array_equal(by_name["b"], masks["b"])  # the VOC PNG wins when both exist
    assert np.array_equal(by_name["d"], sbd_masks["d"])  # else the SBD .mat
    assert np.array_equal(by_name["e"], sbd_masks["e"])
    assert ds.mask_path("d").suffix == ".mat" and ds.mask_path("b").suffix == ".png"


def test_trainaug_without_sbd_root_is_a_clear_error(tmp_path):
    _make_voc(tmp_path, {"train": ["a"], "val": ["c"]})
    with pytest.raises(DataError, match="sbd_root"):
        VOCSegmentation(tmp_path, "trainaug")


def test_missing_root_and_split_file_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"nope.*not found.*fix: set data.root"):
        VOCSegmentation(tmp_path / "nope", "train")
    _make_voc(tmp_path, {"train": ["a"]})
    with pytest.raises(DataError, match=r"val\.txt.*not found"):
        VOCSegmentation(tmp_path, "val")


def test_bad_masks_are_reported_with_file_name_and_skipped(tmp_path):
    _make_voc(tmp_path, {"train": ["a", "b", "c"], "val": ["a", "b", "c"]})
    _write_mask(tmp_path / "SegmentationClass" / "b.png", _mask(21, 30))  # wrong size
    bad_values = _mask(20, 30)
    bad_values[5, 5] = 30  # >= 21 and not 255
    _write_mask(tmp_path / "SegmentationClass" / "c.png", bad_values)

    train = VOCSegmentation(tmp_path, "train", on_bad="replace")
    with pytest.warns(BadSampleWarning) as caught:
        s = train[1]
    assert s["name"] == "a"  # the next good sample (wraps around past the bad c)
    messages = [str(w.message) for w in caught]
    assert any(re.search(r"b\.png.*differs from its image", m) for m in messages)
    assert any(re.search(r"c\.png.*\[30\] are >= num_classes=21", m) for m in messages)  # met while replacing
    assert train.num_bad == 2
    assert train[2]["name"] == "a"  # known bad: skipped without reading or warning again

    val = VOCSegmentation(tmp_path, "val", on_bad="ignore")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = val[1]
    assert any("b.png" in str(w.message) for w in caught)
    assert s["name"] == "b" and (s["mask"] == 255).all()  # kept in place, scored nowhere

    strict = VOCSegmentation(tmp_path, "train", on_bad="raise")
    with pytest.raises(DataError, match=r"b\.png"):
        strict[1]
    with pytest.warns(BadSampleWarning):  # check_all reports each bad file once
        assert set(VOCSegmentation(tmp_path, "train").check_all(progress=False)) == {"b", "c"}


def test_class_names():
    assert class_names_for(21) == list(VOC_CLASS_NAMES) and VOC_CLASS_NAMES[15] == "person"
    assert class_names_for(3) == ["background", "class_1", "class_2"]
    with pytest.raises(ValueError, match="class_names has 2 names"):
        class_names_for(3, ["a", "b"])


def test_train_transform_pads_with_ignore_and_crops():
    img = np.full((30, 40, 3), 200, np.uint8)
    mask = np.ones((30, 40), np.uint8)
    tf = train_transform(64, scale_min=1.0, scale_max=1.0, hflip=False, normalize="imagenet")
    out = tf(image=img, mask=mask)
    assert out["image"].shape == (3, 64, 64) and out["image"].dtype == torch.float32
    assert out["mask"].shape == (64, 64)
    m = out["mask"].long()
    # top-left padding placement + a random crop of exactly the padded size: the image stays at (0, 0)
    assert (m[:30, :40] == 1).all() and (m[30:] == 255).all() and (m[:, 40:] == 255).all()
    # padded image pixels hold the mean pixel, i.e. ~0 after normalisation
    assert out["image"][:, 40:, :].abs().max() < 0.02
    scaled = train_transform(33, scale_min=0.5, scale_max=2.0)(image=img, mask=mask)
    assert scaled["image"].shape == (3, 33, 33)
    assert set(scaled["mask"].unique().tolist()) <= {1, 255}  # nearest-neighbour mask resize


def test_tf_normalisation_and_bad_names():
    out = eval_transform("tf")(image=np.full((4, 5, 3), 255, np.uint8), mask=np.zeros((4, 5), np.uint8))
    torch.testing.assert_close(out["image"], torch.ones(3, 4, 5))
    with pytest.raises(ArgumentError, match="^normalize "):
        eval_transform("caffe")


def test_collate_pads_eval_batches_and_keeps_sizes():
    tf = eval_transform()
    a = {**tf(image=np.zeros((5, 7, 3), np.uint8), mask=np.full((5, 7), 2, np.uint8)), "name": "a"}
    b = {**tf(image=np.zeros((8, 4, 3), np.uint8), mask=np.full((8, 4), 3, np.uint8)), "name": "b"}
    batch = collate([a, b])
    assert batch["images"].shape == (2, 3, 8, 7) and batch["masks"].shape == (2, 8, 7)
    assert batch["masks"].dtype == torch.int64
    assert batch["sizes"].tolist() == [[5, 7], [8, 4]] and batch["names"] == ["a", "b"]
    assert (batch["masks"][0, 5:] == 255).all() and (batch["masks"][0, :5] == 2).all()
    assert (batch["masks"][1, :, 4:] == 255).all() and (batch["images"][1, :, :, 4:] == 0).all()


def _eval_sample(name: str, h: int, w: int, label: int) -> dict:
    rng = np.random.default_rng(h * 100 + w)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return {**eval_transform()(image=img, mask=np.full((h, w), label, np.uint8)), "name": name}


def test_fitting_sizes_are_16k_plus_1():
    assert [fitting_size(n) for n in (1, 2, 17, 18, 85, 338, 341, 353, 354, 500)] == \
        [1, 17, 17, 33, 97, 353, 353, 353, 369, 513]


def test_collate_pads_every_eval_image_to_eval_size_whatever_its_batch():
    a, b, c = _eval_sample("a", 5, 7, 2), _eval_sample("b", 8, 4, 3), _eval_sample("c", 3, 3, 1)
    alone = collate([a], eval_size=17)
    batched = collate([a, b, c], eval_size=17)
    assert alone["images"].shape == (1, 3, 17, 17) and batched["images"].shape == (3, 3, 17, 17)
    # image a is padded identically alone and in a batch with larger images: same tensor, same mask
    assert torch.equal(alone["images"][0], batched["images"][0]) and torch.equal(alone["masks"][0], batched["masks"][0])
    assert batched["sizes"].tolist() == [[5, 7], [8, 4], [3, 3]] and batched["names"] == ["a", "b", "c"]
    # bottom/right padding: the image at (0, 0), 0 (the mean pixel after normalisation) and 255 around it
    assert torch.equal(batched["images"][1, :, :8, :4], b["image"])
    assert (batched["images"][1, :, 8:] == 0).all() and (batched["images"][1, :, :, 4:] == 0).all()
    assert (batched["masks"][1, :8, :4] == 3).all() and int((batched["masks"][1] != 255).sum()) == 8 * 4
    assert collate([a, b], eval_size=[9, 17])["images"].shape == (2, 3, 9, 17)  # [h, w]
    # None keeps the pad-to-the-batch's-largest (batch-dependent) behaviour
    assert collate([a, c], eval_size=None)["images"].shape == (2, 3, 5, 7)


def test_oversize_eval_image_pads_its_batch_to_a_fitting_16k_plus_1_and_warns_once(caplog):
    small, big = _eval_sample("small_one", 5, 7, 2), _eval_sample("big_one", 20, 6, 1)
    with caplog.at_level(logging.WARNING, logger="mnv2seg.transforms"):
        batch = collate([small, big], eval_size=17)
        again = collate([big], eval_size=17)  # the next epoch: no second warning for the same image
    assert batch["images"].shape == (2, 3, 33, 17) and again["images"].shape == (1, 3, 33, 17)
    assert (batch["masks"][1, :20, :6] == 1).all() and (batch["masks"][1, 20:] == 255).all()
    warned = [r.getMessage() for r in caplog.records if r.name == "mnv2seg.transforms"]
    assert len(warned) == 1
    assert "big_one" in warned[0] and "20x6" in warned[0] and "depends on how the val set is batched" in warned[0]
    assert "raise data.eval_size to at least 33" in warned[0]


def test_datamodule_on_a_tiny_synthetic_set(tmp_path):
    from backbone.training.synthetic import CLASS_NAMES
    from mnv2seg.datamodule import SegDataModule

    dm = SegDataModule(root=str(tmp_path / "syn" / "VOCdevkit" / "VOC2012"), num_classes=7, crop_size=48,
                       batch_size=2, val_batch_size=3, num_workers=0, eval_size=97,
                       synthetic={"root": str(tmp_path / "syn"), "num_train": 4, "num_val": 3, "size": 64, "seed": 0,
                                  "progress": False})
    dm.prepare_data()
    dm.setup("fit")
    assert dm.meta["class_names"] == ["background", *CLASS_NAMES]
    assert len(dm.meta["palette"]) == 256
    assert dm.meta["num_classes"] == 7 and dm.meta["ignore_index"] == 255
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (2, 3, 48, 48) and batch["masks"].shape == (2, 48, 48)
    val = next(iter(dm.val_dataloader()))
    # val images padded to eval_size (synthetic size 64: sides <= round(64 * 4/3) = 85 -> 97), crops not
    assert val["images"].shape == (3, 3, 97, 97) and val["masks"].shape == (3, 97, 97)
    assert val["masks"].max() <= 255 and set(val["masks"].unique().tolist()) <= set(range(7)) | {255}
    with pytest.raises(ConfigError, match="data.root"):
        SegDataModule(root="???")
    for bad in (0, "big", [513, 513, 3], True, 51.3):
        with pytest.raises(ConfigError, match="'data.eval_size'"):
            SegDataModule(root=str(tmp_path), eval_size=bad)
    assert SegDataModule(root=str(tmp_path), eval_size=[385, 513]).eval_size == (385, 513)
    assert SegDataModule(root=str(tmp_path), eval_size=None).eval_size is None


def _same_image_voc(root: Path, n: int) -> None:
    names = [f"im{i}" for i in range(n)]
    for name in names:  # identical samples: only the augmentation tells them apart
        _write_image(root / "JPEGImages" / f"{name}.jpg", 40, 50, seed=0)
        _write_mask(root / "SegmentationClass" / f"{name}.png", _mask(40, 50, seed=0))
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        (sets / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))


def test_loader_workers_draw_their_own_augmentations_and_runs_reproduce(tmp_path):
    """A forked worker copies albumentations' generator: without reseeding, worker 0's and worker 1's
    i-th crops are identical and two runs with the same seed differ."""
    from mnv2seg.datamodule import SegDataModule

    _same_image_voc(tmp_path, 8)
    dm = SegDataModule(root=str(tmp_path), num_classes=21, crop_size=24, batch_size=1, val_batch_size=1,
                       num_workers=2)

    def run(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        dm.train_dataset = None
        dm.setup("fit")
        loader = dm.train_dataloader()
        out = [b["images"][0] for b in loader]
        del loader
        return out

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # same seed, same draws
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # batches alternate between the two workers: pairs (0, 1), (2, 3), ... came from different workers
    assert not any(torch.equal(a[i], a[i + 1]) for i in range(0, len(a), 2))
