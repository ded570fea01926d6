"""`TaskDataModule`: what the detection and segmentation LightningDataModules share.

Contract (``cfg.data``): ``_target_`` names the task's subclass (``mnv2det.datamodule.DetDataModule``,
COCO layout; ``mnv2seg.datamodule.SegDataModule``, VOC layout), built with
``hydra.utils.instantiate(cfg.data, _convert_="all")``, so every argument is a plain value, list or dict.

Arguments every subclass takes (validated here, once; a bad value raises
:class:`~backbone.errors.ConfigError` naming ``data.<key>``):

    root:            the dataset folder (required: ``???``, "" or None is refused as ``data.root``).
    batch_size:      per-device batch of the training loader (integer >= 1).
    val_batch_size:  per-device batch of the val / test / predict loaders (integer >= 1; None: batch_size).
    num_workers:     DataLoader workers (integer >= 0; persistent and reseeded when > 0).
    pin_memory:      pin host memory (only takes effect when CUDA is available).
    normalize:       input normalisation, a preset name (``imagenet`` | ``tf``) or ``{mean, std}``
                     (:func:`backbone.normalization.resolve_normalization`); it must match the backbone's
                     pretraining, which is why the configs read it from ``model.normalize``.
    synthetic:       None, or the embedded synthetic set to generate first: ``{root: DIR, num_train,
                     num_val, size, seed, progress}`` (the keys of ``conf/synthetic/default.yaml``; only
                     ``root`` is required). ``root`` then points inside DIR (``DIR/coco`` or
                     ``DIR/VOCdevkit/VOC2012``). Any other key is refused as ``data.synthetic.<key>``.

Subclasses add their own arguments (splits, input/crop size, augmentation), among them
``num_classes``: an integer, or ``auto`` (:data:`AUTO`, the configs' default) for "what the data
has" (det: the categories of the val annotation file; seg: ``len(class_names)``, else VOC's 21).

Classes, before any image is read:

- ``read_classes()`` -> (class names, where they come from): det reads only the ``categories`` of the
  val annotation file (json; a synthetic set not generated yet answers with the generator's
  categories, so a bad model config still fails before anything is generated); seg the configured
  names.
- ``resolve_classes()``: ``auto`` becomes that count, an explicit number is checked against it (a
  ConfigError naming ``data.num_classes`` with both numbers). ``tools/train.py`` calls it before
  building the model and writes the count into ``data.num_classes``, which ``model.num_classes`` reads.
- ``use_model_classes(meta)``: ``tools/evaluate.py`` hands over the checkpoint's ``meta`` before
  ``setup`` so the data's labels mean the model's classes (det: matched by category id; the base
  does nothing: seg class indices are the mask values).

Lifecycle:

- ``prepare_data()`` (once per node, before ``setup``): when ``synthetic`` is set,
  ``backbone.training.synthetic.ensure_synthetic(root, **rest)`` makes sure the set exists (a no-op
  when it does; generated scenes are cached across runs).
- ``setup(stage)`` builds ``self.val_dataset`` for every stage and ``self.train_dataset`` for
  ``fit`` (or None); each is built once and kept. It then checks them and fills ``self.meta``.
- ``train_dataloader()``: ``train_dataset``, shuffled, last partial batch dropped.
  ``val_dataloader()``, ``test_dataloader()``, ``predict_dataloader()``: ``val_dataset`` in order,
  every image on exactly one DDP rank (:func:`backbone.training.dataloader.eval_sampler`, not
  Lightning's sampler, which repeats images to even out the ranks). All are
  :func:`backbone.training.dataloader.make_loader` with the subclass's ``collate_fn``; each calls
  ``setup`` itself when its dataset is not built yet.

``meta`` (a dict, filled by ``setup``; saved into every checkpoint by
:mod:`backbone.training.checkpoint`; the LightningModule reads ``self.trainer.datamodule.meta``):

    class_names:  list[str], the names of the classes the model's outputs mean, in output order
                  (det: the K object classes, label k is ``class_names[k-1]``; seg: the K classes,
                  background first, class index k is ``class_names[k]``).
    num_classes:  int, what ``model.num_classes`` must equal (det: K objects, background excluded;
                  seg: K including background); always ``len(class_names)``.
    dataset:      str, a short name of the val data for reports (last folders of the root + split).
    normalize:    the ``normalize`` argument as given.
    det adds      category_ids: list[int], the dataset's category id of contiguous label k at index k-1.
    seg adds      palette: (256, 3) nested lists of ints (the VOC colour map) and ignore_index: int (255),
                  from :mod:`backbone.training.voc_format`.

Batch layout is the subclass's: see ``mnv2det.datamodule`` (images, targets, image_ids, orig_sizes)
and ``mnv2seg.transforms.collate`` (images, masks, sizes, names).

A subclass sets ``collate_fn`` (a plain function, ``staticmethod``), ``root_fix`` (the hint printed when
``data.root`` is missing) and implements ``build_dataset(train)`` and ``task_meta()``; it may
override ``check_datasets()``.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import numpy as np
from torch.utils.data import DataLoader, Dataset

from backbone.errors import ArgumentError, ConfigError
from backbone.normalization import NormalizeSpec, resolve_normalization
from backbone.training import synthetic as synthetic_data
from backbone.training.dataloader import make_loader

log = logging.getLogger(__name__)

#: The keys ``data.synthetic`` may hold: the generator's arguments, ``progress`` and the folder ``root``.
SYNTHETIC_KEYS: tuple[str, ...] = ("root", *synthetic_data.DEFAULTS, "progress")
#: The keys every ``meta`` holds (subclasses add their own).
META_KEYS: tuple[str, ...] = ("class_names", "num_classes", "dataset", "normalize")
#: ``num_classes: auto``: the count comes from the data (:meth:`TaskDataModule.resolve_classes`).
AUTO = "auto"


def check_int(key: str, value: Any, lo: int) -> int:
    """``value`` as an int >= ``lo``, else a ConfigError naming ``data.<key>``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ConfigError(f"data.{key}", f"must be an integer >= {lo}, got {value!r}", f"set data.{key}=...")
    return int(value)


def check_num_classes(value: Any, lo: int) -> int | None:
    """``data.num_classes`` as an int >= ``lo``, or None for :data:`AUTO` (or None)."""
    if value is None or (isinstance(value, str) and value == AUTO):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ConfigError("data.num_classes", f"must be {AUTO} or an integer >= {lo}, got {value!r}",
                          f"set data.num_classes={AUTO} (read from the data)")
    return int(value)


def check_synthetic(synthetic: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """None, or a copy of ``synthetic`` holding ``root`` and nothing but :data:`SYNTHETIC_KEYS`."""
    if synthetic is None:
        return None
    example = "e.g. data.synthetic={root: DIR, num_train: 512, num_val: 128} or data.synthetic=null"
    if not isinstance(synthetic, Mapping):
        raise ConfigError("data.synthetic", f"must be null or a dict, got {synthetic!r}", example)
    if synthetic.get("root") in (None, "", "???"):
        raise ConfigError("data.synthetic.root", "is not set (the folder the synthetic set is generated into)", example)
    unknown = sorted(set(synthetic) - set(SYNTHETIC_KEYS))
    if unknown:
        raise ConfigError(f"data.synthetic.{unknown[0]}", "unknown key", f"use only {', '.join(SYNTHETIC_KEYS)}")
    return dict(synthetic)


class TaskDataModule(pl.LightningDataModule):
    """Base of the tasks' DataModules; the contract is in the module docstring."""

    #: ``(samples) -> batch``; set by the subclass as ``staticmethod(fn)`` (it goes to every loader worker).
    collate_fn: Callable[[list[Any]], Any]
    #: the fix printed when ``data.root`` is not set.
    root_fix: str = "set data.root=/path/to/the/dataset"
    #: what :meth:`read_classes` counts, for the mismatch message
    classes_noun: str = "classes"
    #: the class count the data must have; None: ``auto`` (set by the subclass, see :func:`check_num_classes`)
    num_classes: int | None = None

    def __init__(self, root: str, batch_size: int, val_batch_size: int | None = None, num_workers: int = 0,
                 pin_memory: bool = True, normalize: NormalizeSpec = "imagenet",
                 synthetic: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if root is None or str(root) in ("", "???"):
            raise ConfigError("data.root", "is not set", self.root_fix)
        self.root = Path(str(root)).expanduser()
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.val_batch_size = (self.batch_size if val_batch_size is None
                               else check_int("val_batch_size", val_batch_size, 1))
        self.num_workers = check_int("num_workers", num_workers, 0)
        self.pin_memory = bool(pin_memory)
        try:
            resolve_normalization(normalize)
        except ArgumentError as err:
            raise err.to_config_error("data") from None
        self.normalize = normalize
        self.synthetic = check_synthetic(synthetic)
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.meta: dict[str, Any] = {}

    # ------------------------------------------------------------------------ subclass hooks
    def build_dataset(self, train: bool) -> Dataset:
        """The training (``train``) or validation dataset, with its transforms."""
        raise NotImplementedError

    def check_datasets(self) -> None:
        """Refuse datasets that cannot be used (called by ``setup`` after building them)."""

    def task_meta(self) -> dict[str, Any]:
        """``meta`` but ``normalize``: ``class_names``, ``num_classes``, ``dataset`` and the task's own keys."""
        raise NotImplementedError

    def read_classes(self) -> tuple[list[str], str]:
        """(the data's class names, what they were read from), without reading any image."""
        raise NotImplementedError

    def use_model_classes(self, meta: Mapping[str, Any]) -> None:
        """Make the labels mean the classes of a trained model (its checkpoint's ``meta``); before ``setup``."""

    # ------------------------------------------------------------------------------- classes
    def check_class_count(self, found: int, source: str) -> None:
        """Refuse an explicit ``num_classes`` that differs from the ``found`` classes of ``source``."""
        if self.num_classes is not None and self.num_classes != found:
            raise ConfigError("data.num_classes", f"is {self.num_classes} but {source} has {found} {self.classes_noun}",
                              f"set data.num_classes={found}, or data.num_classes={AUTO} to take it from the data")

    def resolve_classes(self) -> tuple[list[str], str]:
        """``num_classes``: ``auto`` -> the data's class count; an explicit number is checked against it.
        Returns :meth:`read_classes`'s (names, source)."""
        names, source = self.read_classes()
        self.check_class_count(len(names), source)
        self.num_classes = len(names)
        return names, source

    # ----------------------------------------------------------------------------- lifecycle
    def prepare_data(self) -> None:
        """Generate the synthetic set when configured (once per node; cached across runs)."""
        if self.synthetic is not None:
            kw = dict(self.synthetic)
            root = kw.pop("root")
            log.info("synthetic data under %s", root)
            synthetic_data.ensure_synthetic(root, **kw)

    def setup(self, stage: str | None = None) -> None:
        if self.val_dataset is None:
            self.val_dataset = self.build_dataset(train=False)
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self.build_dataset(train=True)
        self.check_datasets()
        meta = {**self.task_meta(), "normalize": self.normalize}
        missing = [k for k in META_KEYS if k not in meta]
        if missing:
            raise TypeError(f"{type(self).__name__}.task_meta() misses {missing}")
        self.meta = meta

    # ------------------------------------------------------------------------------- loaders
    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        return make_loader(dataset, batch_size, train, self.num_workers, self.collate_fn, self.pin_memory)

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
