"""DeepLabModule: loss, validation outputs (metrics.json, palette predictions), configs, and a short
CPU training run on a tiny synthetic set."""
from __future__ import annotations

import json
import math
import time
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from backbone.errors import ArgumentError, ConfigError
from backbone.training.optim import WarmupPolyLR
from backbone.training.voc_format import voc_palette
from mnv2seg.datamodule import SegDataModule
from mnv2seg.lightning_module import DeepLabModule

CONF = Path(__file__).resolve().parents[1] / "conf"


def _module(num_classes: int = 7, **kw) -> DeepLabModule:
    backbone = {"output_stride": 16, "pretrained": "none", **kw.pop("backbone", {})}
    return DeepLabModule(num_classes=num_classes, backbone=backbone, **kw)


def _datamodule(root: Path, **kw) -> SegDataModule:
    syn = {"root": str(root), "num_train": 8, "num_val": 5, "size": 64, "seed": 0, "progress": False}
    syn.update(kw.pop("synthetic", {}))
    args = dict(root=str(root / "VOCdevkit" / "VOC2012"), num_classes=7, crop_size=64, batch_size=4,
                val_batch_size=2, num_workers=0, synthetic=syn)
    args.update(kw)
    return SegDataModule(**args)


def _trainer(tmp_path: Path, **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    args.update(kw)
    return pl.Trainer(**args)


def test_training_loss_ignores_255_pixels():
    torch.manual_seed(0)
    module = _module(num_classes=4, dropout=0.0)  # deterministic: the same logits twice (train-mode BN)
    images = torch.randn(2, 3, 32, 32)
    masks = torch.randint(0, 4, (2, 32, 32))
    masks[:, :, :16] = 255
    loss = module.training_step({"images": images, "masks": masks}, 0)
    logits = module.model(images)
    labelled = masks != 255
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[labelled], masks[labelled])
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    # a different class under the ignored pixels changes nothing
    masks2 = masks.clone()
    masks2[:, :, :16] = 0
    assert not torch.allclose(F.cross_entropy(logits, masks2, ignore_index=255), expected)


class _Trainer:  # the only trainer attribute configure_optimizers reads
    estimated_stepping_batches = 10


def _sgd_poly_module() -> DeepLabModule:
    return _module(optimizer=partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=4e-5),
                   scheduler=partial(WarmupPolyLR, power=0.9))


def test_poly_schedule_and_weight_decay_groups():
    module = _sgd_poly_module()
    module._trainer = _Trainer()
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert cfg["lr_scheduler"]["interval"] == "step"
    assert type(opt) is torch.optim.SGD and isinstance(sched, WarmupPolyLR) and sched.total_steps == 10
    assert {g["weight_decay"] for g in opt.param_groups} == {4e-5, 0.0}
    # biases and BN weights are the no-decay group
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    bn = next(m for m in module.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert id(bn.weight) in no_decay and id(bn.bias) in no_decay
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[5] == pytest.approx(0.01 * (1 - 5 / 10) ** 0.9)
    module._trainer = None
    # the partials stay out of the checkpoint's hyper-parameters; the rest is there
    assert "optimizer" not in module.hparams and "scheduler" not in module.hparams
    assert module.hparams["num_classes"] == 7 and module.hparams["head"] == "lite"


def test_scheduler_state_dict_round_trips():
    module = _sgd_poly_module()
    module._trainer = _Trainer()
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    for _ in range(4):
        opt.step()
        sched.step()
    state = sched.state_dict()
    json.dumps(state)  # plain numbers only (no lambdas, no tensors)
    resumed = module.configure_optimizers()  # a fresh optimizer + schedule, as when resuming
    ropt, rsched = resumed["optimizer"], resumed["lr_scheduler"]["scheduler"]
    ropt.load_state_dict(opt.state_dict())
    rsched.load_state_dict(state)
    assert rsched.last_epoch == 4 and rsched.get_last_lr() == pytest.approx(sched.get_last_lr())
    for _ in range(3):
        opt.step(), sched.step(), ropt.step(), rsched.step()
        assert ropt.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * (1 - 7 / 10) ** 0.9)
    module._trainer = None


def test_training_without_optimizer_is_refused_only_then(tmp_path):
    module = _module()  # optimizer=None: fine for evaluation
    with pytest.raises(ConfigError, match="model.optimizer"):
        module.configure_optimizers()
    with pytest.raises(ArgumentError, match="^optimizer.lr is not set"):
        _module(optimizer=partial(torch.optim.SGD, momentum=0.9))
    with pytest.raises(ArgumentError, match="^scheduler.power must be"):
        _module(optimizer=partial(torch.optim.SGD, lr=0.1), scheduler=partial(WarmupPolyLR, power=-1))


def test_validation_writes_metrics_and_palette_predictions_at_image_size(tmp_path):
    dm = _datamodule(tmp_path / "syn")
    module = _module(save_predictions=True)
    trainer = _trainer(tmp_path)
    trainer.validate(module, datamodule=dm, verbose=False)
    metrics = module.evaluation_metrics()
    assert set(metrics) >= {"miou", "pixel_acc"} and 0.0 <= metrics["pixel_acc"] <= 1.0
    report = module.evaluation_report()
    assert "mIoU" in report and "pixel accuracy" in report and "disc" in report
    out = tmp_path / "eval"
    module.save_evaluation(out)
    doc = json.loads((out / "metrics.json").read_text())
    assert list(doc["iou_per_class"]) == dm.meta["class_names"]
    assert doc["miou"] == pytest.approx(metrics["miou"])
    assert all(v is None or 0.0 <= v <= 1.0 for v in doc["iou_per_class"].values())
    # an absent class is written as null, present ones as numbers
    present = module._metrics["present"]
    assert [v is not None for v in doc["iou_per_class"].values()] == present
    voc = tmp_path / "syn" / "VOCdevkit" / "VOC2012"
    names = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    written = sorted(p.stem for p in (out / "predictions").glob("*.png"))
    assert written == sorted(names)
    for name in names:
        with Image.open(out / "predictions" / f"{name}.png") as pred, Image.open(voc / "JPEGImages" / f"{name}.jpg") as img:
            assert pred.mode == "P" and pred.size == img.size
            assert np.array(pred).max() < 7
            assert np.array_equal(np.array(pred.getpalette()[:21 * 3]).reshape(21, 3), voc_palette()[:21])


def test_predictions_match_the_confusion_matrix(tmp_path):
    """Scoring the written PNGs against the GT masks gives the logged pixel accuracy (crop-back is right)."""
    dm = _datamodule(tmp_path / "syn")
    module = _module(inference="mf", mf_scales=[0.75, 1.0], mf_flip=True)
    module.predictions_dir = tmp_path / "pred"
    _trainer(tmp_path).validate(module, datamodule=dm, verbose=False)
    voc = tmp_path / "syn" / "VOCdevkit" / "VOC2012"
    correct = total = 0
    for p in (tmp_path / "pred").glob("*.png"):
        gt = np.array(Image.open(voc / "SegmentationClass" / p.name))
        pred = np.array(Image.open(p))
        keep = gt != 255
        correct += int((pred[keep] == gt[keep]).sum())
        total += int(keep.sum())
    assert total == module._metrics["num_pixels"]
    assert correct / total == pytest.approx(module.evaluation_metrics()["pixel_acc"])
    assert "MF" in module.evaluation_report()


def test_num_classes_mismatch_is_a_config_error(tmp_path):
    dm = _datamodule(tmp_path / "syn")
    with pytest.raises(ConfigError, match="model.num_classes"):
        _trainer(tmp_path).validate(_module(num_classes=21), datamodule=dm, verbose=False)
    with pytest.raises(ArgumentError, match="^inference "):
        _module(inference="tta")


def test_configs_compose_and_build(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf, open_dict

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["task=seg", f"paths.cache_dir={tmp_path}", "model.backbone.pretrained=none"])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "out")
        assert cfg.model.num_classes == 7 and cfg.data.num_classes == 7
        assert cfg.data.synthetic.root.startswith(f"{tmp_path}/synthetic/")
        assert cfg.data.root == f"{cfg.data.synthetic.root}/VOCdevkit/VOC2012"
        module = instantiate(cfg.model, _convert_="all")
        assert isinstance(module, DeepLabModule) and module.model.output_stride == 16
        assert module.optimizer_factory.func is torch.optim.AdamW and module.scheduler_factory.func is WarmupPolyLR
        assert module.optimizer_factory.keywords == {"lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 4e-5}
        data = instantiate(cfg.data, _convert_="all")
        assert isinstance(data, SegDataModule) and data.normalize == "imagenet"

        voc = compose("train", overrides=["task=seg", "experiment=deeplabv3_mnv2_voc", "data.root=/data/VOC2012",
                                          "data.sbd_root=/data/SBD"])
        assert voc.model.num_classes == 21 and voc.data.train_split == "trainaug" and voc.data.crop_size == 513
        assert voc.trainer.sync_batchnorm is True and voc.trainer.precision == "bf16-mixed"
        assert voc.model.optimizer.lr == 0.007 and voc.model.scheduler._target_.endswith(".WarmupPolyLR")
        assert voc.model.optimizer._target_ == "torch.optim.SGD" and voc.model.scheduler.power == 0.9
        assert voc.model.optimizer.weight_decay == 4e-5 and voc.model.backbone.pretrained == "imagenet"
        assert OmegaConf.select(voc, "data.synthetic") is None
        with pytest.raises(Exception, match="root"):
            compose("train", overrides=["task=seg", "data=voc"]).data.root  # noqa: B018 -- ??? must be set


# Measured on this 2-core CPU (shared with other jobs; 151-247 s), seed 0, ImageNet init, AdamW 1e-3
# poly, 80 steps (10 epochs of 64 synthetic 128-px images, crop 112): val mIoU over the 7 classes went
# from 0.029 (untrained) to 0.193-0.211 in two runs; predicting background everywhere scores ~0.11.
# The test asks for > THRESHOLD (margin >= 0.04 under the measured values) and a rise of > MIN_RISE
# (measured 0.16-0.18).
# (Longer runs go much further: the default `task=seg` run reaches 0.82 after 6 epochs.)
THRESHOLD = 0.15
MIN_RISE = 0.10


@pytest.mark.slow
def test_short_cpu_training_learns(tmp_path, imagenet_weights):
    pl.seed_everything(0, workers=True)
    dm = _datamodule(tmp_path / "syn", synthetic={"num_train": 64, "num_val": 16, "size": 128}, crop_size=112,
                     batch_size=8, val_batch_size=8, augment={"scale_min": 0.75, "scale_max": 1.25, "hflip": True})
    module = _module(backbone={"pretrained": str(imagenet_weights)},
                     optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=4e-5),
                     scheduler=partial(WarmupPolyLR, power=0.9))
    trainer = _trainer(tmp_path, max_epochs=10, check_val_every_n_epoch=10)
    t0 = time.time()
    trainer.validate(module, datamodule=dm, verbose=False)
    before = module.evaluation_metrics()["miou"]
    trainer.fit(module, datamodule=dm)
    after = module.evaluation_metrics()["miou"]
    print(f"val mIoU before {before:.3f}, after {after:.3f} ({time.time() - t0:.0f}s)")
    assert not math.isnan(after)
    assert after > THRESHOLD and after - before > MIN_RISE
