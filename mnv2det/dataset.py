"""COCO 2017 detection dataset (the real on-disk layout), read with pycocotools.

Layout::

    ROOT/train2017/*.jpg, ROOT/val2017/*.jpg
    ROOT/annotations/instances_{train2017,val2017}.json

Labels: by default the categories of the annotation file, sorted by id, become contiguous labels
``1..K`` (0 is the background slot of the SSD classifier). A model trained elsewhere brings its own
category ids (``label_category_ids``, e.g. a TF label map's 90 ids for COCO's 80 categories): label k
is then the model's ``label_category_ids[k-1]`` and annotations of categories the model does not
know are left out of the targets (they stay in ``coco``, the ground truth scored by
:mod:`mnv2det.coco_eval`). ``label_to_cat_id`` / ``cat_id_to_label`` translate either way.
:func:`read_categories` reads only the ``categories`` of an annotation file (no index, no image).

Robustness choices:
* Boxes are converted xywh -> xyxy and clipped to the image. Boxes with width or height < 1 px
  after clipping are dropped (counted and logged once per dataset). Crowd boxes are kept with
  ``crowd=True`` (the loss ignores anchors matched to them; COCOeval ignores them).
* Images whose file is missing are removed at construction (one warning with the count and the
  first names). Images listed in the annotation file without objects are kept, as in COCO.
* An image that exists but cannot be decoded is found only when it is read: ``__getitem__`` then
  logs a warning naming the file and image id, counts it in ``skipped``, and returns a seeded random other
  readable sample instead (a batch never has holes and a run never dies on one bad JPEG). The
  evaluator still scores that image's ground truth (it is listed in the annotation file).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from backbone.errors import DataError
from backbone.image_io import UnreadableImage, apply_orientation, decode_image, oriented_size
from backbone.training.data_health import (BOXES_DROPPED, MISSING, REPAIRED, SKIPPED, Event, HealthReport,
                                          replacement_order)

log = logging.getLogger(__name__)

LAYOUT = "ROOT/{train2017,val2017}/*.jpg and ROOT/annotations/instances_{split}.json"
Target = dict[str, Any]
# transforms(image HWC uint8, target) -> (image, target); see mnv2det.transforms.DetectionTransform.
Transforms = Callable[[np.ndarray, Target], tuple[Any, Target]]


def split_paths(root: Path | str, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) of ``split`` under ``root``; DataError naming what is missing."""
    root = Path(root).expanduser()
    fix = f"set data.root=... to a directory laid out as {LAYOUT}"
    if not root.is_dir():
        raise DataError(root, "dataset root not found", fix)
    ann_file = root / "annotations" / f"instances_{split}.json"
    if not ann_file.is_file():
        raise DataError(ann_file, f"annotation file for split '{split}' not found", fix)
    img_dir = root / split
    if not img_dir.is_dir():
        raise DataError(img_dir, f"image directory for split '{split}' not found", fix)
    return ann_file, img_dir


def categories(dataset: dict[str, Any], ann_file: Path | str) -> tuple[list[int], list[str]]:
    """(ids sorted, their names) of a COCO instances dict's ``categories``; DataError when there are none."""
    cats = {}
    for c in dataset.get("categories") or []:
        cats[int(c["id"])] = str(c.get("name", c["id"]))
    if not cats:
        raise DataError(ann_file, "has no categories", "use a COCO instances file with 'categories'")
    ids = sorted(cats)
    return ids, [cats[c] for c in ids]


def read_categories(ann_file: Path | str) -> tuple[list[int], list[str]]:
    """The ``categories`` of an annotation file, read with ``json`` (no pycocotools index): (ids, names)."""
    ann_file = Path(ann_file)
    try:
        with open(ann_file) as f:
            dataset = json.load(f)
        return categories(dataset, ann_file)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(ann_file, f"not a valid COCO instances annotation file ({type(e).__name__}: {e})",
                        "re-download or regenerate the annotations") from e


def load_coco(ann_file: Path | str) -> Any:
    """pycocotools COCO object, without its prints; a clear DataError if the file is broken.

    The JSON is checked first (:func:`check_coco_dict`), so a missing key names the image or
    annotation id that lacks it instead of surfacing as a KeyError inside pycocotools.
    """
    from pycocotools.coco import COCO

    ann_file = Path(ann_file)
    fix = "re-download or regenerate the annotations"
    try:
        with open(ann_file) as f:
            dataset = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # bad json
        raise DataError(ann_file, f"not a valid COCO instances annotation file ({type(e).__name__}: {e})", fix) from e
    check_coco_dict(dataset, ann_file)
    try:
        coco = COCO()
        coco.dataset = dataset
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise DataError(ann_file, f"not a valid COCO instances annotation file ({type(e).__name__}: {e})", fix) from e


IMAGE_KEYS = ("id", "file_name", "width", "height")
ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")


def check_coco_dict(dataset: Any, ann_file: Path | str) -> None:
    """Refuse (DataError naming the image / annotation id and the key) what pycocotools or the targets
    cannot use: no ``images`` list, an image without id / file_name / positive width and height, an
    annotation without id / image_id / category_id / a 4-number bbox. One pass, no image read."""
    fix = "fix the annotation file (every image needs id, file_name, width, height; every annotation id, " \
          "image_id, category_id, bbox [x, y, w, h])"
    if not isinstance(dataset, dict) or not isinstance(dataset.get("images"), list):
        raise DataError(ann_file, "not a COCO instances annotation file (no 'images' list)", fix)
    anns = dataset.get("annotations", [])
    if not isinstance(anns, list):
        raise DataError(ann_file, "'annotations' is not a list", fix)
    need = set(IMAGE_KEYS)
    for i, img in enumerate(dataset["images"]):
        if not isinstance(img, dict) or not need <= img.keys():
            missing = sorted(need - set(img)) if isinstance(img, dict) else list(IMAGE_KEYS)
            ident = img.get("id", f"#{i}") if isinstance(img, dict) else f"#{i}"
            raise DataError(ann_file, f"image {ident} has no {', '.join(missing)}", fix)
        w, h = img["width"], img["height"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not isinstance(h, (int, float)) or w <= 0 or h <= 0:
            raise DataError(ann_file, f"image {img['id']} ({img['file_name']}) has width {w!r}, height {h!r}; "
                            "both must be positive numbers", fix)
    need = set(ANNOTATION_KEYS)
    for i, a in enumerate(anns):
        if not isinstance(a, dict) or not need <= a.keys():
            missing = sorted(need - set(a)) if isinstance(a, dict) else list(ANNOTATION_KEYS)
            ident = a.get("id", f"#{i}") if isinstance(a, dict) else f"#{i}"
            image = f" (image {a['image_id']})" if isinstance(a, dict) and "image_id" in a else ""
            raise DataError(ann_file, f"annotation {ident}{image} has no {', '.join(missing)}", fix)
        b = a["bbox"]
        if not isinstance(b, (list, tuple)) or len(b) != 4 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in b):
            raise DataError(ann_file, f"annotation {a['id']} (image {a['image_id']}) has bbox {b!r}, expected "
                            "[x, y, w, h] numbers", fix)


class COCODetection:
    """COCO-format detection dataset.

    Args:
        root: directory holding ``{split}/`` and ``annotations/instances_{split}.json``.
        split: ``train2017`` | ``val2017`` (any name with that layout works).
        transforms: ``(image, target) -> (image, target)``; None returns the raw sample.
        label_category_ids: the category id of each label ``1..K`` (a model's classes); default: the
            file's categories sorted by id. Annotations of other categories are left out of the targets.
        on_bad: an unreadable image: ``replace`` (training) returns the next readable sample instead;
            ``blank`` (evaluation) returns a black image of the annotated size without boxes under the
            SAME image id, so every image is predicted exactly once (its objects score as missed) and
            no other image is scored twice.

    ``category_ids`` / ``class_names`` are the FILE's categories (what is scored);
    ``label_category_ids`` what the labels mean.

    ``dataset[i] -> (image, target)`` with image (H, W, 3) uint8 RGB (or what the transforms
    return) and target::

        boxes: (N, 4) float32 xyxy pixels, labels: (N,) int64 in 1..K, crowd: (N,) bool,
        image_id: int, orig_size: (h, w) of the image as annotated (the frame of the boxes and
        of the predictions scored against them).
    """

    def __init__(self, root: str | Path, split: str = "train2017", transforms: Transforms | None = None,
                 label_category_ids: Sequence[int] | None = None, on_bad: str = "replace") -> None:
        if on_bad not in ("replace", "blank"):
            raise ValueError(f"on_bad must be 'replace' or 'blank', got {on_bad!r}")
        self.on_bad = on_bad
        self.root = Path(root).expanduser()
        self.split = split
        self.transforms = transforms
        self.ann_file, self.img_dir = split_paths(self.root, split)

        self.coco = load_coco(self.ann_file)
        self.category_ids, self.class_names = categories(self.coco.dataset, self.ann_file)
        self.label_category_ids: list[int] = [int(c) for c in (label_category_ids or self.category_ids)]
        self.label_to_cat_id: dict[int, int] = {i + 1: c for i, c in enumerate(self.label_category_ids)}
        self.cat_id_to_label: dict[int, int] = {c: i + 1 for i, c in enumerate(self.label_category_ids)}

        on_disk = set(os.listdir(self.img_dir))  # one listdir instead of a stat per image
        ids, missing = [], []
        for img_id in sorted(self.coco.imgs):
            (ids if self.coco.imgs[img_id]["file_name"] in on_disk else missing).append(img_id)
        if missing:
            names = ", ".join(f"{self.coco.imgs[i]['file_name']} (id {i})" for i in missing[:5])
            log.warning("%s: %d of %d images listed in %s are missing and skipped: %s%s", self.img_dir,
                        len(missing), len(self.coco.imgs), self.ann_file.name, names, " ..." if len(missing) > 5 else "")
        self.ids: list[int] = ids
        self.missing_ids: list[int] = missing
        self.skipped: int = 0  # images found unreadable while loading (per process)
        #: setup-time findings (missing files, dropped boxes); load-time ones travel with the samples
        self.health = HealthReport()
        self.health.samples[split] = 0
        for i in missing:
            self.health.add(split, MISSING, "file not found", self._item(i))
        self._logged: set[int] = set()  # image ids whose repair was logged (once per process)
        self._targets = self._build_targets()

    # ------------------------------------------------------------------------------- targets
    def _build_targets(self) -> dict[int, Target]:
        """All targets at once (one pass over the annotations), degenerate boxes dropped."""
        empty = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64), "crowd": np.zeros(0, bool)}
        all_anns = self.coco.dataset.get("annotations", [])
        anns = [a for a in all_anns if a["image_id"] in self.coco.imgs]
        orphans = [a for a in all_anns if a["image_id"] not in self.coco.imgs]
        for a in orphans[:5]:
            self.health.add(self.split, BOXES_DROPPED, "image_id not in 'images'",
                            f"annotation {a['id']} (image {a['image_id']})", count=0)
        if orphans:
            self.health.add(self.split, BOXES_DROPPED, "image_id not in 'images'", count=len(orphans))
            log.warning("%s: %d annotations refer to image ids not in 'images' and are ignored, e.g. annotation %s",
                        self.ann_file.name, len(orphans), orphans[0]["id"])
        known = set(self.category_ids)
        unknown = [a for a in anns if a.get("category_id") not in known]
        if unknown:
            a = unknown[0]
            raise DataError(self.ann_file, f"annotation {a.get('id')} (image {a.get('image_id')}) has category_id "
                            f"{a.get('category_id')} not in 'categories'", "fix the annotation file")
        labelled = [a for a in anns if a["category_id"] in self.cat_id_to_label]
        #: annotations of categories without a label (not in ``label_category_ids``): not in the targets
        self.num_unlabelled = len(anns) - len(labelled)
        anns = labelled
        out: dict[int, Target] = {}
        if anns:
            img_id = np.array([a["image_id"] for a in anns], dtype=np.int64)
            xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
            labels = np.array([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=np.int64)
            crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
            size = np.array([(self.coco.imgs[i]["width"], self.coco.imgs[i]["height"]) for i in img_id.tolist()],
                            dtype=np.float64)  # (N, 2) w, h
            boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            boxes = np.clip(boxes, 0.0, np.tile(size, 2))
            keep = ((boxes[:, 2] - boxes[:, 0]) >= 1.0) & ((boxes[:, 3] - boxes[:, 1]) >= 1.0)  # NaN: False
            # why each dropped box was dropped (first matching reason)
            finite = np.isfinite(xywh).all(1)
            positive = finite & (xywh[:, 2] > 0) & (xywh[:, 3] > 0)
            inside = positive & (xywh[:, 0] < size[:, 0]) & (xywh[:, 1] < size[:, 1]) & \
                (xywh[:, 0] + xywh[:, 2] > 0) & (xywh[:, 1] + xywh[:, 3] > 0)
            reasons = {"non-finite (NaN or inf)": ~finite, "zero or negative size": finite & ~positive,
                       "outside the image": positive & ~inside, "under 1 px after clipping": inside & ~keep}
            ann_ids = [a.get("id") for a in anns]
            for reason, mask in reasons.items():
                where = np.flatnonzero(mask)
                if where.size:
                    self.health.add(self.split, BOXES_DROPPED, reason, count=int(where.size))
                    for j in where[:5].tolist():
                        self.health.add(self.split, BOXES_DROPPED, reason,
                                        f"annotation {ann_ids[j]} (image {int(img_id[j])})", count=0)
            dropped = int((~keep).sum())
            if dropped:
                log.info("%s: dropped %d of %d boxes (%s)", self.ann_file.name, dropped, len(anns),
                         ", ".join(f"{int(m.sum())} {r}" for r, m in reasons.items() if m.any()))
            self.num_degenerate = dropped
            img_id, boxes, labels, crowd = img_id[keep], boxes[keep].astype(np.float32), labels[keep], crowd[keep]
            order = np.argsort(img_id, kind="stable")
            img_id, boxes, labels, crowd = img_id[order], boxes[order], labels[order], crowd[order]
            uniq, start = np.unique(img_id, return_index=True)
            end = np.append(start[1:], len(img_id))
            for i, s, e in zip(uniq.tolist(), start.tolist(), end.tolist()):
                out[i] = {"boxes": boxes[s:e], "labels": labels[s:e], "crowd": crowd[s:e]}
        else:
            self.num_degenerate = 0
        return {i: out.get(i, empty) for i in self.ids}

    def target(self, index: int) -> Target:
        """The raw target of sample ``index`` (copies; no image read)."""
        img_id = self.ids[index]
        info = self.coco.imgs[img_id]
        t = self._targets[img_id]
        return {"boxes": t["boxes"].copy(), "labels": t["labels"].copy(), "crowd": t["crowd"].copy(),
                "image_id": int(img_id), "orig_size": (int(info["height"]), int(info["width"]))}

    # ------------------------------------------------------------------------------- samples
    def __len__(self) -> int:
        return len(self.ids)

    def _item(self, img_id: int) -> str:
        return f"{self.coco.imgs[img_id]['file_name']} (image id {img_id})"

    def read_image(self, index: int) -> np.ndarray | None:
        """(H, W, 3) uint8 RGB of sample ``index`` as stored; None (logged, counted) if unreadable."""
        try:
            return decode_image(self.img_dir / self.coco.imgs[self.ids[index]]["file_name"], exif=False).pixels
        except UnreadableImage as e:
            self._skip(self.ids[index], e)
            return None

    def _skip(self, img_id: int, err: UnreadableImage) -> Event:
        self.skipped += 1
        log.warning("skipping unreadable image %s (image id %d): %s [%d skipped so far in this process]",
                    err.path, img_id, err.problem, self.skipped)
        return (SKIPPED, err.reason, self._item(img_id))

    def load(self, index: int) -> tuple[np.ndarray, Target, list[Event]]:
        """(image (H, W, 3) uint8 RGB in the frame of the annotations, raw target, repairs made).

        Raises UnreadableImage. The image is decoded as stored (COCO boxes are in the stored-pixel
        frame); the EXIF orientation is applied only when the annotated size is the rotated size and
        not the stored one; any other size mismatch rescales the boxes to the pixels (orig_size stays
        the annotated size, the frame predictions are reported and scored in).
        """
        img_id = self.ids[index]
        decoded = decode_image(self.img_dir / self.coco.imgs[img_id]["file_name"], exif=False)
        image, target = decoded.pixels, self.target(index)
        repairs = list(decoded.conversions)
        annotated = target["orig_size"]
        if decoded.stored_size != annotated and oriented_size(decoded.stored_size, decoded.orientation) == annotated:
            image = apply_orientation(image, decoded.orientation)
            repairs.append("exif-rotated")
        h, w = image.shape[:2]
        if (h, w) != annotated:
            sy, sx = h / annotated[0], w / annotated[1]
            target["boxes"] = target["boxes"] * np.array([sx, sy, sx, sy], dtype=np.float32)
            repairs.append("size-mismatch")
        if repairs and img_id not in self._logged:
            self._logged.add(img_id)
            log.info("%s: repaired %s (file %dx%d, annotated %dx%d, WxH)", self._item(img_id), ", ".join(repairs),
                     decoded.stored_size[1], decoded.stored_size[0], annotated[1], annotated[0])
        return image, target, [(REPAIRED, r, self._item(img_id)) for r in repairs]

    def __getitem__(self, index: int) -> tuple[Any, Target]:
        """(image, target); ``target["health"]``: this load's data-health events (skipped / repaired)."""
        n = len(self.ids)
        if n == 0:
            raise IndexError("empty dataset")
        events: list[Event] = []
        for i in replacement_order(index, n):  # a seeded random other sample; gives up only if none can be read
            try:
                image, target, repairs = self.load(i)
            except UnreadableImage as e:
                events.append(self._skip(self.ids[i], e))
                if self.on_bad == "blank":
                    target = self.target(i)
                    image = np.zeros((*target["orig_size"], 3), np.uint8)
                    target.update(boxes=target["boxes"][:0], labels=target["labels"][:0], crowd=target["crowd"][:0])
                    repairs = []
                else:
                    continue
            if self.transforms is not None:
                image, target = self.transforms(image, target)
            target["health"] = events + repairs
            return image, target
        raise DataError(self.img_dir, "no image of this split can be read", "check the image files")

    @property
    def name(self) -> str:
        """Short description for reports: the last two folders of the root and the split."""
        return "/".join([*self.root.parts[-2:], self.split])

    def __repr__(self) -> str:
        return (f"COCODetection(root={str(self.root)!r}, split={self.split!r}, images={len(self)}, "
                f"classes={len(self.category_ids)})")
