"""Exported models: one contract for every format (ONNX here; TFLite / ExecuTorch in sibling modules).

Model input (all formats): ``images (B, 3, H, W) float32 RGB in 0..255``, already resized to the
model's ``input_size`` with the eval pipeline's ``resize``; the normalisation is INSIDE the graph.
The contract travels in the file (:mod:`backbone.export.metadata`) and
:func:`backbone.export.runtime.load_exported` reads it back. A file may also be written in the
``mobile`` layout that phone clients read (NHWC input, TF Object Detection API outputs:
:mod:`backbone.export.layout`); its loader translates back, so callers see this contract either way.

Every format module ``backbone.export.<format>`` (``onnx``, ``tflite``, ``executorch``) implements

    export(module: torch.nn.Module, example: torch.Tensor, metadata: dict, output: Path, *,
           int8: bool = False, calibration: Iterable[np.ndarray] | None = None,
           **options) -> Path

    module:      the end-to-end wrapper (:class:`mnv2det.export.DetectionExport`,
                 :class:`mnv2seg.export.SegmentationExport`), in eval mode: ``images`` as above ->
                 a tuple of tensors, in the order of ``metadata["outputs"]``. With ``nms`` the detection
                 wrapper calls the custom op ``torch.ops.mnv2.multiclass_nms`` (eager implementation =
                 the reference semantics; a format lowers it to its own NMS, ONNX: NonMaxSuppression).
    example:     (b, 3, H, W) float32 0..255 example input; the batch dimension is exported dynamic.
    metadata:    :func:`backbone.export.metadata.make_metadata` dict, written into the file as is
                 (``format`` and ``int8`` already set by the caller).
    output:      the file to write (its parent exists).
    int8:        post-training static quantisation; ``calibration`` then yields (1, 3, H, W) float32
                 0..255 images drawn from the TRAINING data.
    options:     format-specific settings (ONNX: opset, calibrate_method); unknown ones are refused.
    returns:     the path written.

    load(path: Path) -> object with ``.metadata: dict`` and
                        ``__call__(images: np.ndarray (B, 3, H, W) float32) -> dict[str, np.ndarray]``

:func:`prepare` builds (module, example, metadata) from a checkpoint for either task.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from backbone.errors import ConfigError, DataError

FORMATS = ("onnx", "tflite", "executorch")
SUFFIXES = {"onnx": ".onnx", "tflite": ".tflite", "executorch": ".pte"}


def prepare(ckpt: dict[str, Any], *, nms: bool = True, argmax: bool = False, input_size: Any = None,
            layout: str = "nchw", input_dtype: str = "float32", pre_nms_top_k: int | None = None,
            decoded: bool = True) -> tuple[torch.nn.Module, torch.Tensor, dict[str, Any]]:
    """(wrapper in eval mode, example input, metadata without format/int8) of a loaded checkpoint
    (:func:`backbone.training.checkpoint.load_checkpoint`). ``layout`` / ``input_dtype``: see
    :mod:`backbone.export.layout`; ``pre_nms_top_k`` (det): the candidate cap, None = the model's;
    ``decoded`` (det, nms=False): decoded boxes + scores, else the raw head outputs and anchors."""
    from hydra.utils import instantiate

    info = ckpt["mnv2"]
    task = info.get("task")
    model_cfg = dict(info["config"]["model"])
    if isinstance(model_cfg.get("backbone"), dict):
        model_cfg["backbone"] = {**model_cfg["backbone"], "pretrained": "none"}  # the checkpoint holds the weights
    for k in ("optimizer", "scheduler"):
        model_cfg.pop(k, None)
    try:
        module = instantiate(model_cfg, _convert_="all")
    except Exception as e:  # noqa: BLE001
        raise DataError("ckpt_path", f"its model config cannot be built ({type(e).__name__}: {e})") from None
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise DataError("ckpt_path", f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    meta = dict(info.get("meta") or {})
    if task == "det":
        from mnv2det.export import build_export

        return build_export(module, meta, nms=nms, layout=layout, input_dtype=input_dtype,
                            pre_nms_top_k=pre_nms_top_k, decoded=decoded)
    if task == "seg":
        from mnv2seg.export import build_export

        return build_export(module, meta, info["config"].get("data") or {}, argmax=argmax, input_size=input_size,
                            layout=layout, input_dtype=input_dtype)
    raise DataError("ckpt_path", f"unknown task {task!r} in the checkpoint", "export det or seg checkpoints")


def format_module(fmt: str) -> Any:
    """``backbone.export.<fmt>`` (ConfigError naming ``format`` when unknown or not installed)."""
    import importlib

    if fmt not in FORMATS:
        raise ConfigError("format", f"must be one of {list(FORMATS)}, got {fmt!r}", "e.g. format=onnx")
    try:
        return importlib.import_module(f"backbone.export.{fmt}")
    except ImportError as e:
        raise ConfigError("format", f"{fmt} export needs a package that is not installed ({e})",
                          "pip install -e '.[export]'") from None


def default_output(ckpt_path: str | Path, fmt: str, nms: bool, int8: bool) -> Path:
    """CKPT_STEM[-nonms][-int8].<suffix> next to the run's output."""
    stem = Path(ckpt_path).stem + ("" if nms else "-nonms") + ("-int8" if int8 else "")
    return Path(stem + SUFFIXES[fmt])
