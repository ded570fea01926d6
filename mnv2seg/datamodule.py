"""LightningDataModule for VOC-layout segmentation data (real VOC + SBD, or the synthetic set)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from backbone.training.dataloader import make_loader, reseed_transform
from backbone.errors import ArgumentError, ConfigError
from backbone.normalization import NormalizeSpec
from backbone.training.voc_format import IGNORE_INDEX, class_names_for, voc_palette
from mnv2seg.dataset import VOCSegmentation
from mnv2seg.transforms import collate, eval_transform, train_transform


class SegDataModule(pl.LightningDataModule):
    """VOC 2012 layout segmentation data.

    Args:
        root: the VOC2012 folder (VOCdevkit/VOC2012).
        train_split / val_split: train | val | trainval | trainaug (trainaug needs sbd_root).
        sbd_root: SBD's benchmark_RELEASE folder (for trainaug).
        num_classes: K, background included (21 for VOC, 7 for the synthetic set).
        crop_size: training crop (513 for VOC).
        batch_size / val_batch_size: per device. Validation batches are padded to their largest
            image (255 = ignored), so any val_batch_size scores exactly the same pixels.
        augment: {scale_min: 0.5, scale_max: 2.0, hflip: true}.
        normalize: imagenet | tf.
        synthetic: None, or {root: DIR, num_train, num_val, size, seed}: `prepare_data` generates
            the synthetic set into DIR with `mnv2.synthetic.ensure_synthetic` (no-op when present).
        class_names: names of the K classes, background first (default: VOC's 21 names for K=21,
            the synthetic generator's names for the synthetic set, else class_i).
        check_masks: scan every mask at setup (default: bad masks are found lazily when loaded;
            either way they are reported with their file name and skipped).
    """

    def __init__(self, root: str, train_split: str = "train", val_split: str = "val", sbd_root: str | None = None,
                 num_classes: int = 21, crop_size: int = 513, batch_size: int = 16, val_batch_size: int = 4,
                 num_workers: int = 4, augment: dict[str, Any] | None = None, normalize: NormalizeSpec = "imagenet",
                 synthetic: dict[str, Any] | None = None, class_names: Sequence[str] | None = None,
                 check_masks: bool = False, pin_memory: bool = True) -> None:
        super().__init__()
        if root is None or str(root) in ("", "???"):
            raise ConfigError("data.root", "is not set", "data.root=/path/to/VOCdevkit/VOC2012 (or use data=synthetic_seg)")
        for key, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if int(value) < 1:
                raise ConfigError(f"data.{key}", f"must be >= 1, got {value}", "e.g. 16")
        if int(num_workers) < 0:
            raise ConfigError("data.num_workers", f"must be >= 0, got {num_workers}", "e.g. 4, or 0 for no workers")
        self.root = Path(str(root)).expanduser()
        self.train_split, self.val_split = train_split, val_split
        self.sbd_root = sbd_root
        self.num_classes = int(num_classes)
        self.crop_size = crop_size
        self.batch_size, self.val_batch_size = int(batch_size), int(val_batch_size)
        self.num_workers = int(num_workers)
        aug = {"scale_min": 0.5, "scale_max": 2.0, "hflip": True}
        unknown = set(augment or {}) - set(aug)
        if unknown:
            raise ConfigError(f"data.augment.{sorted(unknown)[0]}", "unknown key", f"valid keys: {', '.join(aug)}")
        aug.update(augment or {})
        self.augment = aug
        self.normalize = normalize
        self.synthetic = dict(synthetic) if synthetic else None
        self.class_names = list(class_names) if class_names is not None else None
        self.check_masks = bool(check_masks)
        self.pin_memory = bool(pin_memory)
        self.train_set: VOCSegmentation | None = None
        self.val_set: VOCSegmentation | None = None
        self.meta: dict[str, Any] = {}
        # fail on bad transform settings now, not in a worker
        try:
            train_transform(crop_size, float(aug["scale_min"]), float(aug["scale_max"]), bool(aug["hflip"]), normalize)
        except ArgumentError as e:
            raise e.to_config_error("data") from None

    def prepare_data(self) -> None:
        if self.synthetic:
            from backbone.training.synthetic import ensure_synthetic

            kw = dict(self.synthetic)
            out = kw.pop("root", None) or kw.pop("out", None)
            if out is None:
                raise ConfigError("data.synthetic.root", "is not set", "the folder the synthetic set is written to")
            ensure_synthetic(out, **kw)

    def _names(self) -> list[str]:
        if self.class_names is None and self.synthetic:
            from backbone.training.synthetic import CLASS_NAMES

            if self.num_classes == len(CLASS_NAMES) + 1:
                return ["background", *CLASS_NAMES]
        try:
            return class_names_for(self.num_classes, self.class_names)
        except ValueError as e:
            raise ConfigError("data.class_names", str(e)) from None

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            tf = train_transform(self.crop_size, float(self.augment["scale_min"]), float(self.augment["scale_max"]),
                                 bool(self.augment["hflip"]), self.normalize)
            # the main-process stream (num_workers=0) follows the global seed; workers reseed
            reseed_transform(tf, torch.initial_seed())
            self.train_set = VOCSegmentation(self.root, self.train_split, self.sbd_root, self.num_classes, tf,
                                             on_bad="replace")
        if self.val_set is None:
            self.val_set = VOCSegmentation(self.root, self.val_split, self.sbd_root, self.num_classes,
                                           eval_transform(self.normalize), on_bad="ignore")
        if self.check_masks:
            for ds in (self.train_set, self.val_set):
                if ds is not None and ds.num_bad == 0:
                    ds.check_all()
        self.meta = {"class_names": self._names(), "palette": voc_palette().tolist(), "num_classes": self.num_classes,
                     "ignore_index": IGNORE_INDEX, "normalize": self.normalize}

    def _loader(self, dataset: VOCSegmentation, batch_size: int, train: bool) -> DataLoader:
        return make_loader(dataset, batch_size, train, self.num_workers, collate, self.pin_memory)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        return self._loader(self.val_set, self.val_batch_size, train=False)
