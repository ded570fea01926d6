"""LightningDataModule for COCO-format detection (real COCO 2017 or the synthetic set).

Batches are dicts::

    images:     (B, 3, S, S) float32, normalised
    targets:    boxes (B, M, 4) float32 xyxy NORMALISED to [0, 1] of the network input,
                labels (B, M) int64 in 1..K (0 in padding), valid (B, M) bool, crowd (B, M) bool
    image_ids:  (B,) int64
    orig_sizes: (B, 2) int64 (h, w) of the original images (the frame predictions are reported in)

M is the largest object count in the batch (at least 1); padded slots have ``valid=False``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from backbone.training.dataloader import make_loader
from backbone.errors import ConfigError, DataError
from mnv2det.dataset import COCODetection
from backbone.errors import ArgumentError
from backbone.normalization import NormalizeSpec, resolve_normalization
from mnv2det.transforms import build_eval_transform, build_train_transform, check_augment

log = logging.getLogger(__name__)

SYNTHETIC_KEYS = ("out", "num_train", "num_val", "size", "seed", "progress")


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


class DetDataModule(pl.LightningDataModule):
    """COCO-format detection data.

    Args:
        root: COCO root (``{train_split,val_split}/`` and ``annotations/``).
        train_split, val_split: image folder / annotation names (``instances_{split}.json``).
        image_size: square network input S.
        batch_size: per-device batch of the training loader (validation: ``val_batch_size`` or same).
        num_workers, pin_memory: DataLoader settings (workers are persistent when > 0).
        augment: overrides of :data:`mnv2det.transforms.AUGMENT_DEFAULTS`.
        normalize: ``imagenet`` | ``tf`` (must match the backbone's pretraining).
        synthetic: if set, ``{out, num_train, num_val, size, seed}`` (``root`` is accepted for ``out``,
            as the shared ``conf/synthetic`` group names it): ``prepare_data`` first makes sure the
            synthetic set exists under ``out`` (``root`` should then be ``out/coco``).
        val_batch_size: batch of the val loader (default: batch_size).
        num_classes: expected number of categories (checked at setup; the model config reads it).
    """

    def __init__(self, root: str, train_split: str = "train2017", val_split: str = "val2017", image_size: int = 300,
                 batch_size: int = 32, num_workers: int = 2, pin_memory: bool = True,
                 augment: dict[str, Any] | None = None, normalize: NormalizeSpec = "imagenet",
                 synthetic: dict[str, Any] | None = None, val_batch_size: int | None = None,
                 num_classes: int | None = None) -> None:
        super().__init__()
        self.root = self._check_root(root)
        self.train_split, self.val_split = str(train_split), str(val_split)
        self.image_size = self._int("image_size", image_size, 32)
        self.batch_size = self._int("batch_size", batch_size, 1)
        self.val_batch_size = self._int("val_batch_size", val_batch_size, 1) if val_batch_size is not None else self.batch_size
        self.num_workers = self._int("num_workers", num_workers, 0)
        self.pin_memory = bool(pin_memory)
        self.augment = check_augment(augment)
        try:
            resolve_normalization(normalize)
        except ArgumentError as e:
            raise e.to_config_error("data") from None
        self.normalize = normalize
        self.synthetic = self._check_synthetic(synthetic)
        self.num_classes = self._int("num_classes", num_classes, 1) if num_classes is not None else None
        self.train_dataset: COCODetection | None = None
        self.val_dataset: COCODetection | None = None
        self.meta: dict[str, Any] = {}

    # --------------------------------------------------------------------------- validation
    @staticmethod
    def _int(key: str, value: Any, lo: int) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
            raise ConfigError(f"data.{key}", f"must be an integer >= {lo}, got {value!r}", f"set data.{key}=...")
        return int(value)

    @staticmethod
    def _check_root(root: Any) -> Path:
        if root is None or str(root) in ("", "???"):
            raise ConfigError("data.root", "is not set",
                              "pass data.root=/path/to/coco (holding train2017/, val2017/, annotations/)")
        return Path(str(root)).expanduser()

    @staticmethod
    def _check_synthetic(synthetic: dict[str, Any] | None) -> dict[str, Any] | None:
        if synthetic is None:
            return None
        if isinstance(synthetic, dict) and "out" not in synthetic and "root" in synthetic:
            synthetic = {("out" if k == "root" else k): v for k, v in synthetic.items()}  # the seg task's name
        if not isinstance(synthetic, dict) or "out" not in synthetic:
            raise ConfigError("data.synthetic", f"must be a dict with at least 'out', got {synthetic!r}",
                              "e.g. data.synthetic={out: DIR, num_train: 512, num_val: 128} or data.synthetic=null")
        unknown = sorted(set(synthetic) - set(SYNTHETIC_KEYS))
        if unknown:
            raise ConfigError(f"data.synthetic.{unknown[0]}", "unknown key", f"use only {', '.join(SYNTHETIC_KEYS)}")
        return dict(synthetic)

    # ---------------------------------------------------------------------------- lifecycle
    def prepare_data(self) -> None:
        """Generate the synthetic set when configured (rank 0 only; cached across runs)."""
        if self.synthetic is not None:
            from backbone.training.synthetic import ensure_synthetic

            kw = dict(self.synthetic)
            out = kw.pop("out")
            log.info("synthetic detection data under %s", out)
            ensure_synthetic(out, **kw)

    def setup(self, stage: str | None = None) -> None:
        if self.val_dataset is None:
            self.val_dataset = COCODetection(self.root, self.val_split,
                                             build_eval_transform(self.image_size, self.normalize))
        if stage in (None, "fit") and self.train_dataset is None:
            # The main-process stream (num_workers=0) follows the global seed; workers reseed.
            seed = torch.initial_seed() % 2**32
            self.train_dataset = COCODetection(self.root, self.train_split, build_train_transform(
                self.image_size, self.normalize, self.augment, seed=seed))
            if self.train_dataset.category_ids != self.val_dataset.category_ids:
                raise DataError(self.train_dataset.ann_file, "categories differ from "
                                f"{self.val_dataset.ann_file.name}", "use annotation files of the same dataset")
            if len(self.train_dataset) == 0:
                raise DataError(self.train_dataset.img_dir, "no training images", "check data.root and the split")
        if len(self.val_dataset) == 0:
            raise DataError(self.val_dataset.img_dir, "no validation images", "check data.root and the split")
        found = len(self.val_dataset.category_ids)
        if self.num_classes is not None and self.num_classes != found:
            raise ConfigError("data.num_classes", f"is {self.num_classes} but {self.val_dataset.ann_file} has "
                              f"{found} categories", f"set data.num_classes={found}")
        self.meta = {"class_names": list(self.val_dataset.class_names),
                     "category_ids": list(self.val_dataset.category_ids),
                     "dataset": self.val_dataset.name}

    # ---------------------------------------------------------------------------- loaders
    def _loader(self, dataset: COCODetection, batch_size: int, train: bool) -> DataLoader:
        return make_loader(dataset, batch_size, train, self.num_workers, collate_detections, self.pin_memory)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        return self._loader(self.train_dataset, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            self.setup("validate")
        return self._loader(self.val_dataset, self.val_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
