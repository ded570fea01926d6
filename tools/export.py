#!/usr/bin/env python
"""Export a checkpoint: `python tools/export.py ckpt_path=CKPT format=onnx [nms=true] [int8=true] [output=FILE]`.

The exported model takes `images (B, 3, H, W) float32 RGB 0..255` resized as the eval pipeline does, with
the normalisation (and, det with nms=true, the post-processing) inside; the contract is written into the
file (backbone/export/metadata.py) and read back by backbone.export.runtime.load_exported. Format modules:
backbone.export.<format>.export (signature: backbone/export/__init__.py). With evaluate=true, prints fp32
(and int8) mAP / mIoU on the data's val set through the exported model(s) and batch-1 CPU latency.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from backbone.errors import ArgumentError, ConfigError
from backbone.export import SUFFIXES, default_output, format_module, prepare
from backbone.training.checkpoint import command_line_overrides, load_checkpoint, model_config_from_checkpoint
from backbone.training.runner import build, output_dir, run_cli

log = logging.getLogger("mnv2")
#: export settings that are top-level keys of conf/export.yaml (the rest are format options.*)
TOP_LEVEL_KEYS = ("int8", "nms", "argmax", "input_size", "layout", "input_dtype", "pre_nms_top_k", "decoded")
#: the layout a format gets when ``layout: null``: phone clients read TFLite files (backbone/export/layout.py)
DEFAULT_LAYOUT = {"tflite": "mobile"}


def _datamodule(cfg: DictConfig, info: dict) -> object:
    """The configured data with the eval pipeline's resize and pixels left in 0..255."""
    from backbone.export.evaluation import IDENTITY_NORMALIZE

    if info.get("task") != cfg.task_name:
        raise ConfigError("task", f"{cfg.ckpt_path} holds a '{info.get('task')}' model but the data config is "
                          f"task={cfg.task_name}'s", f"run with task={info.get('task')}")
    with open_dict(cfg):
        cfg.model = model_config_from_checkpoint(info, command_line_overrides())  # data reads ${model.*}
        cfg.data.normalize = IDENTITY_NORMALIZE
        cfg.data.num_workers = 0
    dm = build(cfg.data, "data")
    dm.use_model_classes(info.get("meta") or {})
    dm.prepare_data()
    dm.setup("validate")
    return dm


def export(cfg: DictConfig) -> Path:
    ckpt = load_checkpoint(cfg.ckpt_path)
    info = ckpt["mnv2"]
    fmt = str(cfg.format)
    mod = format_module(fmt)
    int8, evaluate = bool(cfg.int8), bool(cfg.evaluate)
    layout = str(cfg.layout or DEFAULT_LAYOUT.get(fmt, "nchw"))
    if layout == "mobile" and fmt != "tflite":
        raise ConfigError("layout", f"the mobile layout is written for format=tflite, got format={fmt}",
                          "drop layout=mobile, or export format=tflite")
    try:
        module, example, meta = prepare(
            ckpt, nms=bool(cfg.nms), argmax=bool(cfg.argmax), layout=layout, input_dtype=str(cfg.input_dtype),
            pre_nms_top_k=None if cfg.pre_nms_top_k is None else int(cfg.pre_nms_top_k), decoded=bool(cfg.decoded),
            input_size=OmegaConf.to_container(cfg.input_size) if OmegaConf.is_config(cfg.input_size) else cfg.input_size)
    except ArgumentError as e:
        raise e.to_config_error("") from None
    if evaluate and meta["task"] == "det" and not meta["nms"]:
        raise ConfigError("evaluate", "scoring a detector through the exported model needs nms=true")
    out = Path(cfg.output) if cfg.output else output_dir() / default_output(cfg.ckpt_path, fmt, bool(cfg.nms), int8)
    out.parent.mkdir(parents=True, exist_ok=True)
    options = dict(cfg.get("options") or {})
    if fmt == "onnx":
        options.setdefault("calibrate_method", str(cfg.calibration.method))
    dm = _datamodule(cfg, info) if (int8 or evaluate) else None
    calibration = None
    if int8:
        from backbone.export.evaluation import calibration_images

        calibration = calibration_images(dm, meta, int(cfg.calibration.num_images), int(cfg.seed))
    try:
        mod.export(module, example, meta, out, int8=int8, calibration=calibration, **options)
    except ArgumentError as e:  # a format refusing a setting: name the key the user typed
        raise e.to_config_error("" if e.arg.split(".")[0] in TOP_LEVEL_KEYS else "options") from None
    print(f"exported {meta['task']} model ({fmt}{', int8' if int8 else ''}) to {out}", flush=True)
    if evaluate:
        with tempfile.TemporaryDirectory() as tmp:
            paths = {"int8" if int8 else "fp32": out}
            if int8:  # the fp32 baseline, same graph before quantisation
                paths = {"fp32": mod.export(module, example, meta, Path(tmp) / f"fp32{SUFFIXES[fmt]}"), **paths}
            print(comparison_table(paths, dm, int(cfg.latency_runs)), flush=True)
    return out


def comparison_table(paths: dict[str, Path], datamodule: object, runs: int) -> str:
    """Metric and batch-1 latency of each exported model, with the versions they ran on."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import numpy as np
    import torch

    from backbone.export.evaluation import evaluate_exported, latency_ms
    from backbone.export.runtime import load_exported

    rows = []
    for name, path in paths.items():
        model = load_exported(path)
        metrics = evaluate_exported(model, datamodule)
        key, label = ("map", "mAP") if model.metadata["task"] == "det" else ("miou", "mIoU")
        extra = metrics.get("map_50") if key == "map" else metrics.get("pixel_acc")
        rows.append((name, metrics[key], extra, latency_ms(model, runs), path.stat().st_size / 2**20))
    extra_label = "mAP@0.5" if label == "mAP" else "pixel acc"
    lines = [f"{'model':<6} {label:>8} {extra_label:>10} {'latency ms (b=1, median)':>26} {'size MiB':>9}"]
    lines += [f"{n:<6} {m:>8.4f} {e:>10.4f} {lt:>26.2f} {s:>9.2f}" for n, m, e, lt, s in rows]
    runtime = {".onnx": "onnxruntime", ".tflite": "ai-edge-litert", ".pte": "executorch"}[next(iter(paths.values())).suffix]
    try:
        runtime_version = version(runtime)
    except PackageNotFoundError:
        runtime_version = "?"
    lines.append(f"versions: {runtime} {runtime_version}, torch {torch.__version__}, numpy {np.__version__}, "
                 f"python {platform.python_version()}, cpu {platform.processor() or platform.machine()}, "
                 f"{os.cpu_count()} cores (the runtime's default threads), {runs} runs")
    return "\n".join(lines)


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_cli(export, cfg)


if __name__ == "__main__":
    main()
