"""ValImages: val pictures (prediction | ground truth) and the task's plot in TensorBoard, for both tasks;
a no-op without a TensorBoard logger or with everything turned off."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch


def _tags(log_dir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(log_dir.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {log_dir}"
    tags: list[str] = []
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"images": 0})
        acc.Reload()
        tags += acc.Tags()["images"]
    return sorted(tags)


def _det(tmp_path: Path):
    from backbone.training.synthetic import ensure_synthetic
    from mnv2det.datamodule import DetDataModule
    from mnv2det.lightning_module import SSDLiteModule

    out = ensure_synthetic(tmp_path / "syn", num_train=2, num_val=3, size=64, seed=1, progress=False)
    torch.manual_seed(0)
    module = SSDLiteModule(num_classes=6, image_size=64, backbone={"pretrained": "none", "width_mult": 0.35})
    data = DetDataModule(str(out / "coco"), image_size=64, batch_size=2, val_batch_size=2, num_workers=0)
    return module, data


def _seg(tmp_path: Path):
    from mnv2seg.datamodule import SegDataModule
    from mnv2seg.lightning_module import DeepLabModule

    syn = {"root": str(tmp_path / "syn"), "num_train": 2, "num_val": 3, "size": 64, "seed": 1, "progress": False}
    module = DeepLabModule(num_classes=7, backbone={"pretrained": "none", "width_mult": 0.35, "output_stride": 16})
    data = SegDataModule(str(tmp_path / "syn" / "VOCdevkit" / "VOC2012"), num_classes=7, crop_size=64, batch_size=2,
                         val_batch_size=2, num_workers=0, synthetic=syn, eval_size=97)
    return module, data


def _validate(module, data, tmp_path: Path, callback, logger: bool = True) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers = [TensorBoardLogger(str(tmp_path), name="tb", version="")] if logger else False
    trainer = pl.Trainer(accelerator="cpu", logger=loggers, callbacks=[callback], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.validate(module, datamodule=data, verbose=False)


@pytest.mark.parametrize("task,plot", [("det", "val/pr_curve_iou50"), ("seg", "val/confusion_matrix")])
def test_val_pictures_and_plot_are_logged(tmp_path: Path, task: str, plot: str) -> None:
    from backbone.training.tb_images import ValImages

    module, data = (_det if task == "det" else _seg)(tmp_path)
    callback = ValImages(num_images=3)  # 3 images over two val batches of 2
    _validate(module, data, tmp_path, callback)
    assert _tags(tmp_path / "tb") == sorted([plot, "val_images/0", "val_images/1", "val_images/2"])


def test_off_and_without_tensorboard_it_does_nothing(tmp_path: Path) -> None:
    from backbone.training.tb_images import ValImages

    module, data = _seg(tmp_path)
    callback = ValImages(num_images=4)
    _validate(module, data, tmp_path / "none", callback, logger=False)  # logger=none: no error, nothing kept
    assert callback._pictures == []
    _validate(module, data, tmp_path, ValImages(num_images=0, plots=False))
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert not events or _tags(tmp_path / "tb") == []  # num_images=0 plots=false: no picture
