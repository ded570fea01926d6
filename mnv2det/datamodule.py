"""LightningDataModule for COCO-format detection (real COCO 2017 or the synthetic set).

Arguments, datasets, loaders and ``meta``: :mod:`backbone.training.datamodule`. Batches are dicts::

    images:     (B, 3, S, S) float32, normalised
    targets:    boxes (B, M, 4) float32 xyxy NORMALISED to [0, 1] of the network input,
                labels (B, M) int64 in 1..K (0 in padding), valid (B, M) bool, crowd (B, M) bool
    image_ids:  (B,) int64
    orig_sizes: (B, 2) int64 (h, w) of the original images (the frame predictions are reported in)
    health:     {samples: B, events: [(kind, reason, item), ...]}: the batch's data-health records,
                aggregated by :class:`backbone.training.data_health.DataHealth`

M is the largest object count in the batch (at least 1); padded slots have ``valid=False``.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from backbone.errors import DataError
from backbone.normalization import NormalizeSpec
from backbone.training.data_health import check_max_bad_fraction, check_setup_fraction
from backbone.training.dataloader import main_process_seed
from backbone.training.datamodule import TaskDataModule, check_int, check_num_classes
from mnv2det.dataset import COCODetection, read_categories, split_paths
from mnv2det.transforms import build_eval_transform, build_train_transform, check_augment, check_resize

log = logging.getLogger(__name__)


def collate_detections(samples: list[tuple[torch.Tensor, dict[str, Any]]]) -> dict[str, Any]:
    """Stack images and pad targets (see the module docstring for the layout)."""
    images = torch.stack([s[0] for s in samples])
    B, _, H, W = images.shape
    counts = [len(s[1]["boxes"]) for s in samples]
    M = max(1, max(counts))
    boxes = np.zeros((B, M, 4), np.float32)
    labels = np.zeros((B, M), np.int64)
    crowd = np.zeros((B, M), bool)
    valid = np.arange(M)[None, :] < np.asarray(counts)[:, None]  # (B, M)
    for i, (_, t) in enumerate(samples):  # per-sample copy of variable-length arrays (cheap, CPU side)
        n = counts[i]
        boxes[i, :n] = t["boxes"]
        labels[i, :n] = t["labels"]
        crowd[i, :n] = t["crowd"]
    boxes /= np.array([W, H, W, H], np.float32)
    return {
        "images": images,
        "targets": {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels),
                    "valid": torch.from_numpy(valid), "crowd": torch.from_numpy(crowd)},
        "image_ids": torch.tensor([int(s[1]["image_id"]) for s in samples], dtype=torch.int64),
        "orig_sizes": torch.tensor([tuple(s[1]["orig_size"]) for s in samples], dtype=torch.int64).reshape(B, 2),
        "health": {"samples": B, "events": [e for s in samples for e in s[1].get("health", ())]},
    }


class DetDataModule(TaskDataModule):
    """COCO-format detection data (common arguments: :class:`backbone.training.datamodule.TaskDataModule`).

    Args:
        root: COCO root (``{train_split,val_split}/`` and ``annotations/``); with ``synthetic``,
            ``{synthetic.root}/coco``.
        train_split, val_split: image folder / annotation names (``instances_{split}.json``).
        image_size: square network input S.
        augment: ``{recipe: tf | torchvision, **settings}``, missing settings from the recipe's defaults
            (:func:`mnv2det.transforms.check_augment`; presets: ``conf/data/augment/``).
        num_classes: number of categories of the annotation file, or ``auto`` / None (what the file has);
            an explicit number is checked (:meth:`resolve_classes`, and at setup).
        resize: how the eval transform resizes, the model's contract (``model.resize``):
            ``cv2_linear`` | ``tf_bilinear`` (:func:`mnv2det.transforms.build_eval_transform`).
        label_category_ids: the category id of each label 1..K of the model (None: the file's
            categories); :meth:`use_model_classes` sets it from a checkpoint's ``meta``.
        max_bad_fraction: the largest fraction of a split's images that may be unusable (missing at
            setup: refused at start-up; unreadable at load: the run stops, see
            :class:`backbone.training.data_health.DataHealth`); None: no limit (the
            configs set 0.01: conf/data/coco.yaml).

    ``meta`` adds ``category_ids``: the category id of contiguous label k at index k-1 (the model's
    when ``label_category_ids`` is set; ``class_names`` then are the model's names).
    """

    collate_fn = staticmethod(collate_detections)
    root_fix = "pass data.root=/path/to/coco (holding train2017/, val2017/, annotations/)"
    classes_noun = "categories"

    def __init__(self, root: str, train_split: str = "train2017", val_split: str = "val2017", image_size: int = 300,
                 batch_size: int = 32, num_workers: int = 2, pin_memory: bool = True,
                 augment: dict[str, Any] | None = None, normalize: NormalizeSpec = "imagenet",
                 synthetic: dict[str, Any] | None = None, val_batch_size: int | None = None,
                 num_classes: int | str | None = None, resize: str = "cv2_linear",
                 label_category_ids: Sequence[int] | None = None, max_bad_fraction: float | None = None) -> None:
        super().__init__(root=root, batch_size=batch_size, val_batch_size=val_batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, normalize=normalize, synthetic=synthetic)
        self.train_split, self.val_split = str(train_split), str(val_split)
        self.image_size = check_int("image_size", image_size, 32)
        self.augment = check_augment(augment)
        self.num_classes = check_num_classes(num_classes, 1)
        self.resize = check_resize(resize)
        self.label_category_ids = [int(c) for c in label_category_ids] if label_category_ids else None
        self.label_class_names: list[str] | None = None  # the model's names (use_model_classes)
        self.max_bad_fraction = None if max_bad_fraction is None else check_max_bad_fraction(max_bad_fraction)

    def build_dataset(self, train: bool) -> COCODetection:
        if not train:
            return COCODetection(self.root, self.val_split, build_eval_transform(self.image_size, self.normalize,
                                                                                 self.resize), self.label_category_ids,
                                 on_bad="blank")  # every val image predicted once, none twice
        # The main-process stream (num_workers=0) follows the global seed and the rank; workers reseed.
        seed = main_process_seed() % 2**32
        return COCODetection(self.root, self.train_split, build_train_transform(
            self.image_size, self.normalize, self.augment, seed=seed), self.label_category_ids)

    # ------------------------------------------------------------------------------- classes
    def read_classes(self) -> tuple[list[str], str]:
        """The val annotation file's category names (json only); a synthetic set not generated yet: the
        generator's categories (what it will write), so nothing is generated before the model is built."""
        ann_file = self.root / "annotations" / f"instances_{self.val_split}.json"
        if self.synthetic is not None and not ann_file.is_file():
            from backbone.training.synthetic import CATEGORY_IDS, CLASS_NAMES

            return [name for _, name in sorted(zip(CATEGORY_IDS, CLASS_NAMES))], "the synthetic set"
        ann_file, _ = split_paths(self.root, self.val_split)
        return read_categories(ann_file)[1], str(ann_file)

    def use_model_classes(self, meta: Mapping[str, Any]) -> None:
        """Labels follow the model's category ids (``meta["category_ids"]``; nothing without them)."""
        if meta.get("category_ids"):
            self.label_category_ids = [int(c) for c in meta["category_ids"]]
            names = [str(n) for n in meta.get("class_names") or []]
            self.label_class_names = names if len(names) == len(self.label_category_ids) else None

    def _report_class_match(self, val: COCODetection) -> None:
        """One log line for the dataset's categories the model does not know, one for the reverse."""
        def listed(ids: list[int], names: dict[int, str]) -> str:
            shown = ", ".join(f"{names[c]} ({c})" if c in names else f"id {c}" for c in ids[:10])
            return shown + (f", ... ({len(ids) - 10} more)" if len(ids) > 10 else "")

        data_names = dict(zip(val.category_ids, val.class_names))
        model_names = dict(zip(val.label_category_ids, self.label_class_names or []))
        unknown = [c for c in val.category_ids if c not in val.cat_id_to_label]
        absent = [c for c in val.label_category_ids if c not in data_names]
        if unknown:
            log.warning("%d of the %d categories of %s are unknown to the model (their %d annotations score as "
                        "missed): %s", len(unknown), len(data_names), val.ann_file.name, val.num_unlabelled,
                        listed(unknown, data_names))
        if absent:
            log.info("%d of the model's %d categories are not in %s (their detections are not scored): %s",
                     len(absent), len(val.label_category_ids), val.ann_file.name, listed(absent, model_names))

    def check_datasets(self) -> None:
        train, val = self.train_dataset, self.val_dataset
        for ds, what in ((train, "training"), (val, "validation")):
            if ds is None:
                continue
            if len(ds) == 0:
                listed = len(ds.missing_ids)
                problem = (f"all {listed} {what} images listed in {ds.ann_file.name} are missing" if listed
                           else f"no {what} images ({ds.ann_file.name} lists none)")
                raise DataError(ds.img_dir, problem, "check data.root and the split")
            check_setup_fraction(ds.health, ds.split, len(ds) + len(ds.missing_ids), self.max_bad_fraction,
                                 ds.img_dir)
        if train is not None and train.category_ids != val.category_ids:
            raise DataError(train.ann_file, f"categories differ from {val.ann_file.name}",
                            "use annotation files of the same dataset")
        self.check_class_count(len(val.category_ids), str(val.ann_file))
        if self.label_category_ids is not None and not self.meta:  # once, at the first setup
            self._report_class_match(val)

    def task_meta(self) -> dict[str, Any]:
        val = self.val_dataset
        ids = val.label_category_ids
        data_names = dict(zip(val.category_ids, val.class_names))
        names = self.label_class_names or [data_names.get(c, f"category_{c}") for c in ids]
        return {"class_names": names, "num_classes": len(ids), "dataset": val.name, "category_ids": list(ids)}
