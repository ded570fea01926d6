#!/usr/bin/env python
"""Export a checkpoint: `python tools/export.py ckpt_path=CKPT format=onnx|tflite|executorch|all [int8=true] [evaluate=true]`.

The exported model takes `images (B, 3, H, W) float32 RGB 0..255` resized as the eval pipeline does, with
the normalisation (and, det with nms=true, the post-processing) inside; the contract is written into the
file (backbone/export/metadata.py) and read back by backbone.export.runtime.load_exported. Format modules:
backbone.export.<format>.export (signature: backbone/export/__init__.py).

`format=all` writes every installed format (fp32, and int8 with int8=true) into the run dir. With
evaluate=true (or format=all), one table: format, precision, mAP / mIoU on the data's val set through
each exported file, batch-1 latency (median, runs and threads named), size; also written as
`export_table.csv` / `export_table.json` into the run dir.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from backbone.errors import ArgumentError, ConfigError
from backbone.export import FORMATS, SUFFIXES, default_output, format_module, prepare
from backbone.training.checkpoint import command_line_overrides, load_checkpoint, model_config_from_checkpoint
from backbone.training.runner import build, output_dir, run_cli

log = logging.getLogger("mnv2")
#: export settings that are top-level keys of conf/export.yaml (the rest are format options.*)
TOP_LEVEL_KEYS = ("int8", "nms", "argmax", "input_size", "layout", "input_dtype", "pre_nms_top_k", "decoded")
#: the layout a format gets when ``layout: null``: phone clients read TFLite files (backbone/export/layout.py)
DEFAULT_LAYOUT = {"tflite": "mobile"}
#: the runtime package that runs each format (the table names its version)
RUNTIMES = {"onnx": "onnxruntime", "tflite": "ai-edge-litert", "executorch": "executorch"}
TABLE_NAME = "export_table"


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


def _formats(cfg: DictConfig) -> list[str]:
    """The formats to write: the one asked for, or (format=all) every one whose packages are installed."""
    fmt = str(cfg.format)
    if fmt != "all":
        format_module(fmt)  # a clear error when unknown / not installed
        return [fmt]
    if cfg.output:
        raise ConfigError("output", "format=all writes one file per format into the run dir",
                          "drop output=..., or export one format")
    found = []
    for f in FORMATS:
        try:
            format_module(f)
            found.append(f)
        except ConfigError as e:
            log.warning("format=all: skipping %s (%s)", f, e)
    if not found:
        raise ConfigError("format", "format=all found no installed export format", "pip install -e '.[export]'")
    return found


def _layout(cfg: DictConfig, fmt: str) -> str:
    layout = str(cfg.layout or DEFAULT_LAYOUT.get(fmt, "nchw"))
    if layout == "mobile" and fmt != "tflite":
        if str(cfg.format) == "all":
            return "nchw"  # layout=mobile with format=all: the tflite file
        raise ConfigError("layout", f"the mobile layout is written for format=tflite, got format={fmt}",
                          "drop layout=mobile, or export format=tflite")
    return layout


def _export_one(cfg: DictConfig, ckpt: dict, fmt: str, int8: bool, out: Path, datamodule: Any) -> Path:
    """Write one file; int8 calibrates on the datamodule's TRAINING images."""
    from backbone.export.evaluation import calibration_images

    mod = format_module(fmt)
    try:
        module, example, meta = prepare(
            ckpt, nms=bool(cfg.nms), argmax=bool(cfg.argmax), layout=_layout(cfg, fmt),
            input_dtype=str(cfg.input_dtype), decoded=bool(cfg.decoded),
            pre_nms_top_k=None if cfg.pre_nms_top_k is None else int(cfg.pre_nms_top_k),
            input_size=OmegaConf.to_container(cfg.input_size) if OmegaConf.is_config(cfg.input_size) else cfg.input_size)
    except ArgumentError as e:
        raise e.to_config_error("") from None
    calibration = calibration_images(datamodule, meta, int(cfg.calibration.num_images), int(cfg.seed)) if int8 else None
    options = dict(cfg.get("options") or {})
    options.setdefault("calibrate_method", str(cfg.calibration.method))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        return mod.export(module, example, meta, out, int8=int8, calibration=calibration, **options)
    except ArgumentError as e:  # a format refusing a setting: name the key the user typed
        raise e.to_config_error("" if e.arg.split(".")[0] in TOP_LEVEL_KEYS else "options") from None


def export(cfg: DictConfig) -> Path:
    ckpt = load_checkpoint(cfg.ckpt_path)
    info = ckpt["mnv2"]
    fmts = _formats(cfg)
    every = str(cfg.format) == "all"
    int8, evaluate = bool(cfg.int8), bool(cfg.evaluate) or every
    if evaluate and info.get("task") == "det" and not bool(cfg.nms):
        raise ConfigError("evaluate", "scoring a detector through the exported model needs nms=true",
                          "drop nms=false, or evaluate=false" + (" (format=all evaluates)" if every else ""))
    dm = _datamodule(cfg, info) if (int8 or evaluate) else None
    # fp32 beside int8 when a table compares them (in a temp dir unless format=all)
    jobs = [(f, p) for f in fmts for p in (["fp32"] if not int8 else (["fp32", "int8"] if evaluate else ["int8"]))]
    written: list[tuple[str, str, Path]] = []  # (format, precision, file) of every file the table scores
    kept: list[Path] = []  # the files the user asked for
    from tqdm.auto import tqdm

    with tempfile.TemporaryDirectory() as tmp:
        bar = tqdm(jobs, desc="export", unit="file", disable=len(jobs) < 2)
        for fmt, precision in bar:
            bar.set_postfix_str(f"{fmt} {precision}")
            q = precision == "int8"
            baseline = not every and q != int8  # the fp32 baseline of a single-format int8 comparison
            if baseline:
                out = Path(tmp) / f"fp32{SUFFIXES[fmt]}"
            elif cfg.output and not every:
                out = Path(cfg.output)
            else:
                out = output_dir() / default_output(cfg.ckpt_path, fmt, bool(cfg.nms), q)
            try:
                path = _export_one(cfg, ckpt, fmt, q, out, dm)
            except ConfigError as e:
                if not every:
                    raise
                log.warning("format=all: %s %s not written (%s)", fmt, precision, e)
                continue
            written.append((fmt, precision, path))
            if not baseline:
                kept.append(path)
                tqdm.write(f"exported {info.get('task')} model ({fmt}{', int8' if q else ''}) to {path}")
        if evaluate:
            rows = measure(written, dm, int(cfg.latency_runs))
            print(comparison_table(rows, int(cfg.latency_runs)), flush=True)
            _write_table(rows, output_dir() / TABLE_NAME)
    return kept[-1] if kept else output_dir()


def measure(written: list[tuple[str, str, Path]], datamodule: object, runs: int) -> list[dict[str, Any]]:
    """One row per exported file: its metric on the val set through the file, batch-1 latency, size."""
    from backbone.export.evaluation import evaluate_exported, latency_ms
    from backbone.export.runtime import load_exported

    rows = []
    for fmt, precision, path in written:
        model = load_exported(path)
        metrics = evaluate_exported(model, datamodule)
        det = model.metadata["task"] == "det"
        rows.append({
            "format": fmt, "precision": precision, "task": model.metadata["task"],
            "metric": "mAP" if det else "mIoU", "value": float(metrics["map" if det else "miou"]),
            "metric2": "mAP@0.5" if det else "pixel_acc",
            "value2": float(metrics["map_50" if det else "pixel_acc"]),
            "latency_ms": float(latency_ms(model, runs)), "runs": runs,
            "threads": int(getattr(model, "threads", None) or os.cpu_count() or 1),
            "size_mib": path.stat().st_size / 2**20, "runtime": RUNTIMES[fmt], "runtime_version": _version(RUNTIMES[fmt]),
            "file": str(path)})
    return rows


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def comparison_table(rows: list[dict[str, Any]], runs: int) -> str:
    """The rows of :func:`measure` as a text table, with the versions and CPU they ran on."""
    import platform

    import numpy as np
    import torch

    if not rows:
        return "(no exported model to compare)"
    m, m2 = rows[0]["metric"], rows[0]["metric2"]
    lines = [f"{'format':<11} {'precision':<9} {m:>8} {m2:>9} {'latency ms':>11} {'vs fp32':>8} {'threads':>7} "
             f"{'size MiB':>9}"]
    fp32 = {r["format"]: r for r in rows if r["precision"] == "fp32"}
    for r in rows:
        base = fp32.get(r["format"])
        ratio = f"{r['latency_ms'] / base['latency_ms']:.2f}x" if base is not None and base is not r else ""
        lines.append(f"{r['format']:<11} {r['precision']:<9} {r['value']:>8.4f} {r['value2']:>9.4f} "
                     f"{r['latency_ms']:>11.2f} {ratio:>8} {r['threads']:>7} {r['size_mib']:>9.2f}")
    versions = ", ".join(sorted({f"{r['runtime']} {r['runtime_version']}" for r in rows}))
    lines.append(f"latency: batch 1, median of {runs} runs after 5 warm-up runs; versions: {versions}, "
                 f"torch {torch.__version__}, numpy {np.__version__}, python {platform.python_version()}, "
                 f"cpu {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    return "\n".join(lines)


def _write_table(rows: list[dict[str, Any]], stem: Path) -> None:
    if not rows:
        return
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"table written to {stem.with_suffix('.csv')} and .json", flush=True)


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_cli(export, cfg)


if __name__ == "__main__":
    main()
