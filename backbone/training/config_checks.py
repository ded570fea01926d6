"""Start-up checks of a whole run config: a bad value fails as one ``error:`` line (ConfigError naming
the key, the value and the fix) before any model is built, weights fetched, data read or synthetic set
generated.

:func:`check_config` is called by ``tools/train.py`` (after the trainer and ``ckpt_path`` checks) and
``tools/evaluate.py`` (once the model config is taken from the checkpoint, whose run info is the one
file it must read first). It looks at the config only, plus, for a checkpoint, its run info (loaded
with the safe :func:`~backbone.training.checkpoint.load_checkpoint`).

A rule about a component's own argument stays in the component (it raises ArgumentError and applies
it again when built); it is only called early here and named by its full config key:

- ``model.backbone.width_mult`` > 0, ``model.backbone.output_stride`` 8 / 16 / 32
  (:func:`backbone.mobilenet_v2.check_architecture`);
- det: ``model.image_size`` an integer >= 32, ``data.image_size`` equal to it (the anchors, the
  predictor and the export all use ``model.image_size``), ``model.anchor.num_layers`` (when set) equal
  to the number of feature maps, 2 + len(``model.extra_depths``)
  (:func:`mnv2det.anchor_generator.check_num_layers`);
- seg (training): ``data.crop_size`` larger than the output stride
  (:func:`mnv2seg.transforms.check_crop_size`); with ``align_corners`` a crop that is not
  ``output_stride * k + 1`` is only warned about (it trains, with logits shifted by up to a stride);
- ``data.root`` an existing folder unless ``data.synthetic`` generates it; ``data.sbd_root`` when set;
- a checkpoint (``ckpt_path``, resumed by train, evaluated by evaluate) of this task; its class count
  equal to the data's where the config alone tells it (an explicit ``data.num_classes`` or
  ``data.class_names``); :func:`check_checkpoint_classes` checks it against the data's resolved classes.

Typos in keys never get here: Hydra refuses an override of a key that is not in the config (its own
error naming the full key, exit code 1), and components refuse unknown arguments when built.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from backbone.errors import ArgumentError, ConfigError
from backbone.mobilenet_v2 import check_architecture

log = logging.getLogger("mnv2")

#: SSDLiteModule's smallest input side (``model.image_size``).
MIN_DET_IMAGE_SIZE = 32
#: Feature maps SSDLite reads from the backbone (stride 16 and 32) before its extra layers.
DET_BACKBONE_MAPS = 2
#: The backbone's output stride when the config does not set it.
DEFAULT_OUTPUT_STRIDE = {"det": 32, "seg": 16}


def check_config(cfg: DictConfig, *, training: bool = True, checkpoint: dict[str, Any] | None = None) -> None:
    """Refuse a run config that would fail (or silently misbehave) only after data is read.

    cfg: the composed run config (``task_name``, ``model``, ``data``, optional ``ckpt_path``).
    training: train-only settings (the seg crop) are checked too.
    checkpoint: the already loaded checkpoint of ``ckpt_path`` (evaluate); None: loaded here when
        ``ckpt_path`` is set (train's resume; ``last`` is left to the train flow).
    """
    task = str(cfg.get("task_name", ""))
    model = cfg.get("model")
    data = cfg.get("data")
    if model is not None:
        output_stride = _check_backbone(model, task)
        if task == "det":
            _check_det(model, data)
        elif task == "seg" and training and data is not None:
            _check_seg_crop(data, output_stride, bool(model.get("align_corners", False)))
    if data is not None:
        _check_data_root(data)
    ckpt_path = cfg.get("ckpt_path")
    if checkpoint is None and ckpt_path and str(ckpt_path) != "last":
        from backbone.training.checkpoint import load_checkpoint  # safe: weights_only=True

        checkpoint = load_checkpoint(ckpt_path)
    if checkpoint is not None:
        info = checkpoint["mnv2"]
        check_checkpoint_task(cfg, info)
        num_classes, source = _config_num_classes(cfg)
        if training and num_classes is not None:  # resuming; evaluate checks the data's resolved classes
            check_checkpoint_classes(cfg, info, num_classes, source)


def check_checkpoint_task(cfg: DictConfig, info: dict[str, Any]) -> None:
    """The checkpoint's run info (``checkpoint["mnv2"]``) must be of this run's task."""
    task, ckpt_task = str(cfg.get("task_name")), info.get("task")
    if ckpt_task != task:
        raise ConfigError("ckpt_path", f"{cfg.ckpt_path} holds a '{ckpt_task}' model but this run is task={task}",
                          f"run with task={ckpt_task}, or pass a task={task} checkpoint")


def checkpoint_num_classes(info: dict[str, Any]) -> int | None:
    """The class count of a checkpoint's model (its config's ``num_classes``, else its data meta's)."""
    for value in (info.get("config", {}).get("model", {}).get("num_classes"), (info.get("meta") or {}).get("num_classes")):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def check_checkpoint_classes(cfg: DictConfig, info: dict[str, Any], num_classes: int, source: str) -> None:
    """The checkpoint's model must have the data's ``num_classes`` (read from ``source``)."""
    ckpt_classes = checkpoint_num_classes(info)
    if ckpt_classes is not None and ckpt_classes != num_classes:
        raise ConfigError("ckpt_path", f"{cfg.ckpt_path} holds a model of {ckpt_classes} classes but {source} has "
                          f"{num_classes}", f"use data with the checkpoint's {ckpt_classes} classes (data=..., "
                          "data.num_classes / data.class_names), or a checkpoint trained on this data")


# ------------------------------------------------------------------------------------ model
def _check_backbone(model: DictConfig, task: str) -> int:
    """width_mult / output_stride of ``model.backbone``; returns the output stride."""
    backbone = model.get("backbone") or {}
    try:
        _, output_stride = check_architecture(backbone.get("width_mult", 1.0),
                                              backbone.get("output_stride", DEFAULT_OUTPUT_STRIDE.get(task, 32)))
    except ArgumentError as err:
        raise err.to_config_error("model.backbone") from None
    return output_stride


def _check_det(model: DictConfig, data: DictConfig | None) -> None:
    from mnv2det.anchor_generator import check_num_layers

    size = model.get("image_size", 300)
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_DET_IMAGE_SIZE:
        raise ConfigError("model.image_size", f"must be an integer >= {MIN_DET_IMAGE_SIZE} (the square network input; "
                          f"the anchors' lowest map is image_size / 16 cells per side), got {size!r}",
                          "e.g. model.image_size=300 (COCO) or 192 (CPU runs)")
    data_size = data.get("image_size") if data is not None else None
    if isinstance(data_size, int) and data_size != size:
        raise ConfigError("data.image_size", f"is {data_size} but model.image_size is {size}: the anchors, the "
                          "predictor and the export all assume model.image_size",
                          f"set model.image_size={data_size} instead (data.image_size follows it)")
    anchor = model.get("anchor") or {}
    if anchor.get("num_layers") is not None:
        num_maps = DET_BACKBONE_MAPS + len(model.get("extra_depths", (512, 256, 256, 128)))
        try:
            check_num_layers(anchor.num_layers, num_maps)
        except ArgumentError as err:
            raise ConfigError("model.anchor.num_layers", f"is {anchor.num_layers} but the model has {num_maps} feature "
                              f"maps ({DET_BACKBONE_MAPS} backbone + {num_maps - DET_BACKBONE_MAPS} model.extra_depths)",
                              f"drop model.anchor.num_layers or set it to {num_maps}") from err


def _check_seg_crop(data: DictConfig, output_stride: int, align_corners: bool) -> None:
    from mnv2seg.transforms import check_crop_size

    if "crop_size" not in data:
        return
    try:
        ch, cw = check_crop_size(data.crop_size, output_stride)
    except ArgumentError as err:
        raise err.to_config_error("data") from None
    if align_corners and ((ch - 1) % output_stride or (cw - 1) % output_stride):
        log.warning("data.crop_size=%s is not output_stride * k + 1 (output stride %d): with model.align_corners=true "
                    "the upsampled logits sit up to a stride off the pixels they were computed at -- fix: e.g. "
                    "data.crop_size=%d", data.crop_size, output_stride,
                    output_stride * max(2, round((min(ch, cw) - 1) / output_stride)) + 1)


# ------------------------------------------------------------------------------------- data
def _root_fix(data: DictConfig) -> str:
    try:
        return str(get_class(str(data.get("_target_"))).root_fix)
    except Exception:  # noqa: BLE001 -- an unknown _target_ is reported when the data is built
        return "set data.root=/path/to/the/dataset"


def _check_data_root(data: DictConfig) -> None:
    """``data.root`` (and ``data.sbd_root``) must be folders, unless a synthetic set is generated there."""
    if "root" not in data.keys() or data.get("synthetic") is not None:  # `in` is False for a ??? value
        return
    if OmegaConf.is_missing(data, "root") or data.root in (None, ""):
        raise ConfigError("data.root", "is not set", _root_fix(data))
    root = Path(str(data.root)).expanduser()
    if not root.is_dir():
        raise ConfigError("data.root", f"{root} is not a directory", _root_fix(data))
    sbd = data.get("sbd_root")
    if sbd and not Path(str(sbd)).expanduser().is_dir():
        raise ConfigError("data.sbd_root", f"{sbd} is not a directory",
                          "data.sbd_root=/path/to/benchmark_RELEASE (SBD), or drop it (data.sbd_root=null)")


def _config_num_classes(cfg: DictConfig) -> tuple[int | None, str]:
    """The data's class count where the config alone tells it: (count or None, where it comes from)."""
    data = cfg.get("data") or {}
    value = data.get("num_classes")
    if isinstance(value, int) and not isinstance(value, bool):
        return value, "data.num_classes"
    names = data.get("class_names")
    if names is not None:
        return len(names), "data.class_names"
    return None, ""
