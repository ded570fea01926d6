"""LightningDataModule for COCO-format detection (real COCO 2017 or the synthetic set).

Arguments, datasets, loaders and ``meta``: :mod:`backbone.training.datamodule`. Batches are dicts::

    images:     (B, 3, S, S) float32, normalised
    targets:    boxes (B, M, 4) float32 xyxy NORMALISED to [0, 1] of the network input,
                labels (B, M) int64 in 1..K (0 in padding), valid (B, M) bool, crowd (B, M) bool
    image_ids:  (B,) int64
    orig_sizes: (B, 2) int64 (h, w) of the original images (the frame predictions are reported in)

M is the largest object count in the batch (at least 1); padded slots have ``valid=False``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from backbone.errors import ConfigError, DataError
from backbone.normalization import NormalizeSpec
from backbone.training.dataloader import main_process_seed
from backbone.training.datamodule import TaskDataModule, check_int
from mnv2det.dataset import COCODetection
from mnv2det.transforms import build_eval_transform, build_train_transform, check_augment


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
    }


class DetDataModule(TaskDataModule):
    """COCO-format detection data (common arguments: :class:`backbone.training.datamodule.TaskDataModule`).

    Args:
        root: COCO root (``{train_split,val_split}/`` and ``annotations/``); with ``synthetic``,
            ``{synthetic.root}/coco``.
        train_split, val_split: image folder / annotation names (``instances_{split}.json``).
        image_size: square network input S.
        augment: overrides of :data:`mnv2det.transforms.AUGMENT_DEFAULTS`.
        num_classes: expected number of categories (checked at setup; the model config reads it).

    ``meta`` adds ``category_ids``: the dataset's category id of contiguous label k at index k-1.
    """

    collate_fn = staticmethod(collate_detections)
    root_fix = "pass data.root=/path/to/coco (holding train2017/, val2017/, annotations/)"

    def __init__(self, root: str, train_split: str = "train2017", val_split: str = "val2017", image_size: int = 300,
                 batch_size: int = 32, num_workers: int = 2, pin_memory: bool = True,
                 augment: dict[str, Any] | None = None, normalize: NormalizeSpec = "imagenet",
                 synthetic: dict[str, Any] | None = None, val_batch_size: int | None = None,
                 num_classes: int | None = None) -> None:
        super().__init__(root=root, batch_size=batch_size, val_batch_size=val_batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, normalize=normalize, synthetic=synthetic)
        self.train_split, self.val_split = str(train_split), str(val_split)
        self.image_size = check_int("image_size", image_size, 32)
        self.augment = check_augment(augment)
        self.num_classes = check_int("num_classes", num_classes, 1) if num_classes is not None else None

    def build_dataset(self, train: bool) -> COCODetection:
        if not train:
            return COCODetection(self.root, self.val_split, build_eval_transform(self.image_size, self.normalize))
        # The main-process stream (num_workers=0) follows the global seed and the rank; workers reseed.
        seed = main_process_seed() % 2**32
        return COCODetection(self.root, self.train_split, build_train_transform(
            self.image_size, self.normalize, self.augment, seed=seed))

    def check_datasets(self) -> None:
        train, val = self.train_dataset, self.val_dataset
        if train is not None:
            if train.category_ids != val.category_ids:
                raise DataError(train.ann_file, f"categories differ from {val.ann_file.name}",
                                "use annotation files of the same dataset")
            if len(train) == 0:
                raise DataError(train.img_dir, "no training images", "check data.root and the split")
        if len(val) == 0:
            raise DataError(val.img_dir, "no validation images", "check data.root and the split")
        found = len(val.category_ids)
        if self.num_classes is not None and self.num_classes != found:
            raise ConfigError("data.num_classes", f"is {self.num_classes} but {val.ann_file} has "
                              f"{found} categories", f"set data.num_classes={found}")

    def task_meta(self) -> dict[str, Any]:
        val = self.val_dataset
        return {"class_names": list(val.class_names), "num_classes": len(val.category_ids), "dataset": val.name,
                "category_ids": list(val.category_ids)}
