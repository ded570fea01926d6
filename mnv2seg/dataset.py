"""PASCAL VOC 2012 segmentation (+ SBD "trainaug") in its on-disk layout.

    ROOT = VOCdevkit/VOC2012
    ROOT/JPEGImages/<id>.jpg
    ROOT/SegmentationClass/<id>.png           palette ("P") PNGs: the pixel values ARE the class
                                              indices (0 background, 1..20, 255 void); the palette
                                              only colours them for viewers
    ROOT/ImageSets/Segmentation/<split>.txt   one id per line
    SBD_ROOT/dataset/cls/<id>.mat             SBD (Hariharan et al.): GTcls.Segmentation (uint8 HxW)
    SBD_ROOT/dataset/{train,val}.txt

"trainaug" = VOC train + SBD train + SBD val - VOC val (10,582 images on the real data); a sample
is read from the VOC PNG when one exists, else from the SBD .mat (SBD images are VOC images, read
from ROOT/JPEGImages, else SBD_ROOT/dataset/img).

Bad samples are checked lazily, when a sample is loaded (no start-up scan of ~10k masks; use
`check_all()` for an up-front scan): a mask whose size differs from its image, a mask with values
>= num_classes other than 255, an RGB (colour, not index) mask or an unreadable file is reported
with its file name in a `BadSampleWarning`, counted in `num_bad` and never trained on:
on_bad="replace" (training) returns a seeded random other good sample instead, on_bad="ignore" (validation)
returns the image with an all-255 mask, so it adds nothing to the loss or the confusion matrix
and no other sample is counted twice. on_bad="raise" raises DataError.

Mask values >= num_classes other than 255 make the sample bad (skipped), not mapped to 255: such a
value is not a class we know, so the whole mask is suspect (most often data.num_classes is wrong or
the mask is a colour export); a systematic cause then exceeds ``data.max_bad_fraction`` and stops the
run with a message, where mapping to ignore would silently train on a fraction of the labels.

Images are read with :func:`backbone.image_io.decode_image` (grayscale, RGBA, CMYK, 16-bit repaired
and reported). VOC masks are in the frame of the stored pixels: the EXIF orientation is applied only
when the mask has the rotated size and not the stored one. Ids of the split list whose image or mask
file is missing are dropped at construction (one warning naming them; all missing: DataError).
Every sample carries ``health``: its data-health events (skipped / repaired), see
:mod:`backbone.training.data_health`.
"""
from __future__ import annotations

import itertools

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from backbone.errors import DataError
from backbone.image_io import UnreadableImage, apply_orientation, decode_image, oriented_size
from backbone.training.data_health import MISSING, REPAIRED, SKIPPED, Event, HealthReport, replacement_order
from backbone.training.voc_format import IGNORE_INDEX

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "trainval", "trainaug")
ON_BAD = ("replace", "ignore", "raise")



class BadSampleWarning(UserWarning):
    """A sample was skipped because its mask is malformed (the message names the file)."""


class BadSample(DataError):
    """A sample that cannot be used; ``reason`` is a short tag for the data-health summary."""

    def __init__(self, path: object, reason: str, problem: str, fix: str = "") -> None:
        self.reason = reason
        super().__init__(path, problem, fix)

    def __reduce__(self):
        return (BadSample, (self.path, self.reason, self.problem, self.fix))


def read_index_png(path: Path) -> np.ndarray:
    """A VOC mask PNG as class indices (H, W) uint8: np.array of the P (or L) image, not its colours."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise ValueError(f"mask has mode {im.mode}, expected a palette ('P') or grayscale ('L') PNG of class "
                             "indices (colour masks must be converted to indices)")
        return np.array(im, dtype=np.uint8)


def read_sbd_mat(path: Path) -> np.ndarray:
    """SBD `cls/<id>.mat` -> GTcls.Segmentation as (H, W) uint8 class indices."""
    from scipy.io import loadmat

    mat = loadmat(str(path), squeeze_me=True, struct_as_record=False)
    if "GTcls" not in mat:
        raise ValueError("no 'GTcls' struct (expected an SBD cls/*.mat file)")
    seg = np.asarray(mat["GTcls"].Segmentation)
    if seg.ndim != 2:
        raise ValueError(f"GTcls.Segmentation has shape {seg.shape}, expected (H, W)")
    return seg.astype(np.uint8) if seg.max(initial=0) <= 255 else seg


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image from its header only."""
    with Image.open(path) as im:
        return im.height, im.width


def read_ids(path: Path, what: str, fix: str) -> list[str]:
    if not path.is_file():
        raise DataError(path, f"{what} not found", fix)
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(path, f"{what} is empty", fix)
    return ids


class VOCSegmentation(Dataset):
    """VOC 2012 segmentation split; items are dicts {image: (H, W, 3) uint8, mask: (H, W) uint8, name: str,
    health: list of data-health events (kind, reason, name)}
    passed through `transform(image=..., mask=...)` (albumentations-style) when one is given.

    Args:
        root: the VOC2012 directory (holding JPEGImages/, SegmentationClass/, ImageSets/).
        split: train | val | trainval | trainaug (needs sbd_root).
        sbd_root: SBD's benchmark_RELEASE directory (holding dataset/cls/, dataset/train.txt).
        num_classes: K; mask values must be < K or 255.
        transform: callable(image=, mask=) -> dict(image=, mask=).
        on_bad: what to do with a bad sample: replace | ignore | raise (see the module docstring).
    """

    def __init__(self, root: str | Path = "VOCdevkit/VOC2012", split: str = "train", sbd_root: str | Path | None = None,
                 num_classes: int = 21, transform: Callable[..., dict[str, Any]] | None = None,
                 on_bad: str = "replace") -> None:
        self.root = Path(root).expanduser()
        self.split = split
        self.sbd_root = Path(sbd_root).expanduser() if sbd_root else None
        self.num_classes = int(num_classes)
        self.transform = transform
        if split not in SPLITS:
            raise DataError(self.root, f"unknown split '{split}'", f"use one of {', '.join(SPLITS)}")
        if on_bad not in ON_BAD:
            raise ValueError(f"on_bad must be one of {ON_BAD}, got {on_bad!r}")
        self.on_bad = on_bad
        if not self.root.is_dir():
            raise DataError(self.root, "VOC root directory not found",
                            "set data.root to the VOC2012 folder (VOCdevkit/VOC2012, holding JPEGImages/ and "
                            "SegmentationClass/), or use data=synthetic_seg")
        for sub in ("JPEGImages", "SegmentationClass"):
            if not (self.root / sub).is_dir():
                raise DataError(self.root / sub, "directory not found",
                                "data.root must be the VOC2012 folder itself (VOCdevkit/VOC2012)")
        sets = self.root / "ImageSets" / "Segmentation"
        fix_split = "download VOC2012 trainval (it ships ImageSets/Segmentation/{train,val,trainval}.txt) or fix data.root"
        self.sbd_ids: set[str] = set()
        self.missing_ids: list[str] = []
        if split == "trainaug":
            if self.sbd_root is None:
                raise DataError(self.root, "split 'trainaug' needs SBD", "set data.sbd_root to SBD's benchmark_RELEASE "
                                "folder (holding dataset/cls/*.mat), or use data.train_split=train")
            voc_val = set(read_ids(sets / "val.txt", "VOC val split file", fix_split))
            voc_train = read_ids(sets / "train.txt", "VOC train split file", fix_split)
            fix_sbd = "data.sbd_root must be SBD's benchmark_RELEASE folder (holding dataset/train.txt, dataset/val.txt)"
            sbd = read_ids(self.sbd_root / "dataset" / "train.txt", "SBD train list", fix_sbd)
            sbd += read_ids(self.sbd_root / "dataset" / "val.txt", "SBD val list", fix_sbd)
            self.sbd_ids = set(sbd)
            self.ids = sorted(set(voc_train) | (self.sbd_ids - voc_val))
        else:
            self.ids = read_ids(sets / f"{split}.txt", f"split file for '{split}'", fix_split)
        self.health = HealthReport()  # setup-time findings; load-time ones travel with the samples
        self.health.samples[split] = 0
        self._drop_missing()
        self.num_bad = 0
        self._bad: dict[int, tuple[str, str]] = {}  # index -> (reason, problem), per process (each worker its own)
        self._logged: set[str] = set()  # names whose repair was logged (once per process)

    def _drop_missing(self) -> None:
        """Drop ids whose image or mask file does not exist (a listdir per folder, no stat per id)."""
        def names(folder: Path, suffix: str) -> set[str]:
            try:
                return {f[: -len(suffix)] for f in os.listdir(folder) if f.endswith(suffix)}
            except OSError:
                return set()

        images = names(self.root / "JPEGImages", ".jpg")
        masks = names(self.root / "SegmentationClass", ".png")
        if self.sbd_root is not None:
            images |= names(self.sbd_root / "dataset" / "img", ".jpg")
            masks |= names(self.sbd_root / "dataset" / "cls", ".mat") & self.sbd_ids
        listed, kept, missing = len(self.ids), [], []
        for name in self.ids:
            if name in images and name in masks:
                kept.append(name)
            else:
                what = "image" if name not in images else "mask"
                missing.append(name)
                self.health.add(self.split, MISSING, f"{what} file not found", name)
        if not missing:
            return
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        if not kept:
            raise DataError(self.root, f"all {listed} ids of split '{self.split}' have a missing image or mask "
                            f"file, e.g. {shown}", "check data.root (the VOC2012 folder) and data.sbd_root")
        log.warning("%s: %d of %d ids of split '%s' have no image or mask file and are skipped: %s", self.root,
                    len(missing), listed, self.split, shown)
        self.ids = kept
        self.missing_ids = missing

    def __len__(self) -> int:
        return len(self.ids)

    # ------------------------------------------------------------------ paths
    def image_path(self, name: str) -> Path:
        path = self.root / "JPEGImages" / f"{name}.jpg"
        if not path.is_file() and self.sbd_root is not None:
            alt = self.sbd_root / "dataset" / "img" / f"{name}.jpg"
            if alt.is_file():
                return alt
        return path

    def mask_path(self, name: str) -> Path:
        """The VOC PNG when present, else (trainaug) the SBD .mat."""
        png = self.root / "SegmentationClass" / f"{name}.png"
        if png.is_file() or self.sbd_root is None or name not in self.sbd_ids:
            return png
        return self.sbd_root / "dataset" / "cls" / f"{name}.mat"

    # ------------------------------------------------------------------ loading
    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        """(image (H, W, 3) uint8 RGB, mask (H, W) uint8 indices, name); raises BadSample (a DataError)."""
        image, mask, name, _ = self._load(index)
        return image, mask, name

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray, str, list[str]]:
        """load() and the repairs made (tags)."""
        name = self.ids[index]
        ipath, mpath = self.image_path(name), self.mask_path(name)
        try:
            decoded = decode_image(ipath, exif=False)
        except UnreadableImage as e:
            raise BadSample(ipath, e.reason, e.problem, "re-extract the dataset") from None
        try:
            mask = read_sbd_mat(mpath) if mpath.suffix == ".mat" else read_index_png(mpath)
        except (OSError, ValueError) as e:
            raise BadSample(mpath, "unreadable mask", f"unreadable mask ({e})",
                            "re-extract the dataset or drop the id from the split") from None
        image, repairs = decoded.pixels, list(decoded.conversions)
        if mask.shape != decoded.stored_size and mask.shape == oriented_size(decoded.stored_size, decoded.orientation):
            image = apply_orientation(image, decoded.orientation)  # annotated on the displayed (rotated) image
            repairs.append("exif-rotated")
        self._validate(mpath, image.shape[:2], mask)
        if repairs and name not in self._logged:
            self._logged.add(name)
            log.info("%s: repaired %s", ipath, ", ".join(repairs))
        return image, mask, name, repairs

    def _validate(self, mpath: Path, image_hw: tuple[int, int], mask: np.ndarray) -> None:
        if mask.shape != tuple(image_hw):
            raise BadSample(mpath, "mask size differs from image",
                            f"mask size {mask.shape[1]}x{mask.shape[0]} differs from its image "
                            f"{image_hw[1]}x{image_hw[0]} (WxH)", "fix or remove this sample")
        values = np.unique(mask)
        bad = values[(values >= self.num_classes) & (values != IGNORE_INDEX)]
        if bad.size:
            raise BadSample(mpath, "mask values >= num_classes",
                            f"mask values {bad[:8].tolist()} are >= num_classes={self.num_classes} "
                            f"and not {IGNORE_INDEX} (ignore)",
                            "set data.num_classes to the dataset's class count, or fix the mask")

    def check(self, index: int) -> str | None:
        """The problem of sample `index` as one line, or None if it is good."""
        try:
            self.load(index)
        except DataError as e:
            return str(e)
        return None

    def check_all(self, progress: bool = True) -> dict[str, str]:
        """Scan every sample (decodes all masks); returns {name: problem} of the bad ones."""
        from tqdm import tqdm

        bad = {}
        for i in tqdm(range(len(self)), desc=f"checking {self.split} masks", disable=not progress):
            try:
                self.load(i)
            except BadSample as e:
                bad[self.ids[i]] = str(e)
                self._mark_bad(i, e)
        return bad

    def _mark_bad(self, index: int, err: BadSample) -> None:
        if index not in self._bad:
            self._bad[index] = (err.reason, str(err))
            self.num_bad += 1
            action = {"replace": "skipped (another sample used instead)",
                      "ignore": "skipped (mask set to ignore, not scored)"}.get(self.on_bad, "")
            warnings.warn(f"bad sample {self.num_bad} in '{self.split}': {err} -- {action}", BadSampleWarning,
                          stacklevel=3)

    def _skip_event(self, index: int) -> Event:
        return (SKIPPED, self._bad[index][0], self.ids[index])

    def _sample(self, index: int) -> tuple[np.ndarray, np.ndarray, str, list[Event]]:
        """(image, mask, name, health events) of ``index`` or, when it is bad, per ``on_bad``."""
        if index not in self._bad:
            try:
                image, mask, name, repairs = self._load(index)
                return image, mask, name, [(REPAIRED, r, name) for r in repairs]
            except BadSample as e:
                if self.on_bad == "raise":
                    raise
                self._mark_bad(index, e)
        events = [self._skip_event(index)]
        if self.on_bad == "ignore":  # kept in place (every val image scored once), its mask ignored
            name = self.ids[index]
            try:
                image = decode_image(self.image_path(name), exif=False).pixels
            except UnreadableImage:
                image = np.zeros((8, 8, 3), np.uint8)  # nothing to show: a blank, all-ignored placeholder
            return image, np.full(image.shape[:2], IGNORE_INDEX, np.uint8), name, events
        # replace: a seeded random other good sample (deterministic, so a seeded run stays reproducible)
        for j in itertools.islice(replacement_order(index, len(self)), 1, None):
            if j in self._bad:
                events.append(self._skip_event(j))
                continue
            try:
                image, mask, name, repairs = self._load(j)
                return image, mask, name, events + [(REPAIRED, r, name) for r in repairs]
            except BadSample as e:
                self._mark_bad(j, e)
                events.append(self._skip_event(j))
        raise DataError(self.root, f"every sample of split '{self.split}' is bad", "check data.root and data.num_classes")

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, mask, name, events = self._sample(index)
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return {"image": image, "mask": mask, "name": name, "health": events}
