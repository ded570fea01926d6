"""LightningDataModule for VOC-layout segmentation data (real VOC + SBD, or the synthetic set).

Arguments, datasets, loaders and ``meta``: :mod:`backbone.training.datamodule`. Batches:
:func:`mnv2seg.transforms.collate` (val batches padded to ``eval_size``).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import albumentations as A
import numpy as np

from backbone.errors import ConfigError, DataError
from backbone.normalization import NormalizeSpec
from backbone.training.data_health import check_max_bad_fraction, check_setup_fraction
from backbone.training.dataloader import main_process_seed, make_loader, reseed_transform
from backbone.training.datamodule import TaskDataModule, check_num_classes
from backbone.training.voc_format import IGNORE_INDEX, VOC_CLASS_NAMES, class_names_for, voc_palette
from mnv2seg.dataset import VOCSegmentation
from mnv2seg.transforms import collate, eval_transform, fitting_size, train_transform


class SegDataModule(TaskDataModule):
    """VOC 2012 layout segmentation data (common arguments: :class:`backbone.training.datamodule.TaskDataModule`).

    Args:
        root: the VOC2012 folder (VOCdevkit/VOC2012); with ``synthetic``, ``{synthetic.root}/VOCdevkit/VOC2012``.
        train_split / val_split: train | val | trainval | trainaug (trainaug needs sbd_root).
        sbd_root: SBD's benchmark_RELEASE folder (for trainaug).
        num_classes: K, background included, or ``auto`` / None: ``len(class_names)``, else VOC's 21
            (the synthetic set's 7 when ``synthetic`` is set); an explicit K is checked against class_names.
        crop_size: training crop (513 for VOC).
        batch_size / val_batch_size: per device.
        eval_size: N or [h, w]: every val image is padded (bottom/right, mean pixel / 255 = ignored)
            to this one size, as TF DeepLab's eval_crop_size (513 for VOC, whose images are at most
            500 px), so its prediction, and the mIoU, do not depend on val_batch_size or on how DDP
            splits the val set. Use a 16k+1 size that holds the largest val image; a larger image
            pads its batch to the next 16k+1 that fits, with a warning naming it. None: pad each
            batch to its largest image (scores then depend on the batching).
        augment: {scale_min: 0.5, scale_max: 2.0, hflip: true}.
        class_names: names of the K classes, background first (default: VOC's 21 names for K=21,
            the synthetic generator's names for the synthetic set, else class_i).
        check_masks: scan every mask at setup (default: bad masks are found lazily when loaded;
            either way they are reported with their file name and skipped).
        max_bad_fraction: the largest fraction of a split's samples that may be unusable (missing at
            setup: refused at start-up; skipped at load: the run stops, see
            :class:`backbone.training.data_health.DataHealth`); None: no limit (conf/data/voc.yaml: 0.01).

    ``meta`` adds ``palette`` (the VOC colour map) and ``ignore_index`` (255).
    """

    collate_fn = staticmethod(collate)
    root_fix = "data.root=/path/to/VOCdevkit/VOC2012 (or use data=synthetic_seg)"

    def __init__(self, root: str, train_split: str = "train", val_split: str = "val", sbd_root: str | None = None,
                 num_classes: int | str | None = 21, crop_size: int = 513, batch_size: int = 16, val_batch_size: int = 4,
                 num_workers: int = 4, augment: dict[str, Any] | None = None, normalize: NormalizeSpec = "imagenet",
                 synthetic: dict[str, Any] | None = None, class_names: Sequence[str] | None = None,
                 check_masks: bool = False, pin_memory: bool = True,
                 eval_size: int | Sequence[int] | None = 513, max_bad_fraction: float | None = None) -> None:
        super().__init__(root=root, batch_size=batch_size, val_batch_size=val_batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, normalize=normalize, synthetic=synthetic)
        self.train_split, self.val_split = train_split, val_split
        self.sbd_root = sbd_root
        self.num_classes = check_num_classes(num_classes, 2)
        self.crop_size = crop_size
        aug = {"scale_min": 0.5, "scale_max": 2.0, "hflip": True}
        unknown = set(augment or {}) - set(aug)
        if unknown:
            raise ConfigError(f"data.augment.{sorted(unknown)[0]}", "unknown key", f"valid keys: {', '.join(aug)}")
        aug.update(augment or {})
        self.augment = aug
        self.class_names = list(class_names) if class_names is not None else None
        self.resolve_classes()  # from the config alone: `auto` -> K now
        self.check_masks = bool(check_masks)
        self.eval_size = _check_eval_size(eval_size)
        self.max_bad_fraction = None if max_bad_fraction is None else check_max_bad_fraction(max_bad_fraction)
        self._train_transform()  # fail on bad crop / augment settings now, not in a worker

    def _train_transform(self) -> A.Compose:
        aug = self.augment
        return train_transform(self.crop_size, float(aug["scale_min"]), float(aug["scale_max"]), bool(aug["hflip"]),
                               self.normalize)

    def read_classes(self) -> tuple[list[str], str]:
        """data.class_names; else the synthetic set's (when its count fits), VOC's 21 (auto) or class_i."""
        if self.class_names is not None:
            return list(self.class_names), "data.class_names"
        if self.synthetic:
            from backbone.training.synthetic import CLASS_NAMES

            if self.num_classes in (None, len(CLASS_NAMES) + 1):
                return ["background", *CLASS_NAMES], "the synthetic set"
        return class_names_for(self.num_classes or len(VOC_CLASS_NAMES)), "data.num_classes"

    def build_dataset(self, train: bool) -> VOCSegmentation:
        if not train:
            return VOCSegmentation(self.root, self.val_split, self.sbd_root, self.num_classes,
                                   eval_transform(self.normalize), on_bad="ignore")
        tf = self._train_transform()
        # the main-process stream (num_workers=0) follows the global seed and the rank; workers reseed
        reseed_transform(tf, main_process_seed())
        return VOCSegmentation(self.root, self.train_split, self.sbd_root, self.num_classes, tf, on_bad="replace")

    def _loader(self, dataset: VOCSegmentation, batch_size: int, train: bool) -> Any:
        """The base's loader; val batches are padded to ``eval_size`` (training crops are stacked)."""
        fn = self.collate_fn if train else partial(collate, eval_size=self.eval_size)
        return make_loader(dataset, batch_size, train, self.num_workers, fn, self.pin_memory)

    def check_datasets(self) -> None:
        for ds in (self.train_dataset, self.val_dataset):
            if ds is None:
                continue
            check_setup_fraction(ds.health, ds.split, len(ds) + len(ds.missing_ids), self.max_bad_fraction, ds.root)
            if self.check_masks and ds.num_bad == 0:
                bad = ds.check_all()
                if self.max_bad_fraction is not None and len(bad) > self.max_bad_fraction * len(ds):
                    first = ", ".join(list(bad)[:3])
                    raise DataError(ds.root, f"{len(bad)} of {len(ds)} samples of '{ds.split}' are bad "
                                    f"(> data.max_bad_fraction={self.max_bad_fraction:g}), e.g. {first}",
                                    "fix or remove them, or raise data.max_bad_fraction")

    def task_meta(self) -> dict[str, Any]:
        return {"class_names": self.read_classes()[0], "num_classes": self.num_classes,
                "dataset": "/".join([*self.root.parts[-2:], self.val_split]),
                "palette": voc_palette().tolist(), "ignore_index": IGNORE_INDEX}


def _check_eval_size(eval_size: Any) -> tuple[int, int] | None:
    """``data.eval_size`` (null, N or [h, w], integers >= 1) as None or (h, w)."""
    if eval_size is None:
        return None
    values = list(eval_size) if isinstance(eval_size, (list, tuple)) else [eval_size]
    if len(values) not in (1, 2) or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1
                                        for v in values):
        raise ConfigError("data.eval_size", f"must be null, an integer >= 1 or [h, w], got {eval_size!r}",
                          f"a 16k+1 size holding the largest val image, e.g. {fitting_size(500)} for VOC")
    return int(values[0]), int(values[-1])
