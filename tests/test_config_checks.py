"""Bad configs fail at start-up with one ``error:`` line naming the key, the value and the fix, before a
model is built, data read or the synthetic set generated (backbone/training/config_checks.py).

In-process tests compose the real configs (conf/) and call ``check_config``; the tool tests run
tools/train.py / tools/evaluate.py with an empty MNV2_CACHE_DIR and check it stays empty (no synthetic
set generated, no weights fetched) and that stderr is one line.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from backbone.errors import ConfigError
from backbone.training.checkpoint import load_checkpoint, run_info
from backbone.training.config_checks import check_config

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _cfg(*overrides: str, name: str = "train") -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def _fake_ckpt(path: Path, task: str, num_classes: int) -> Path:
    """A checkpoint with the run-info layout tools/train.py writes (no weights: nothing may get that far)."""
    model = {"_target_": "x.Module", "num_classes": num_classes, "normalize": "imagenet", "image_size": 64,
             "backbone": {"pretrained": "none"}}
    meta = {"num_classes": num_classes, "class_names": [f"c{i}" for i in range(num_classes)]}
    torch.save({"state_dict": {}, "mnv2": run_info(task, {"model": model, "data": {}}, meta)}, path)
    return path


@pytest.mark.parametrize(("overrides", "key", "value"), [
    (["model.backbone.width_mult=0"], "model.backbone.width_mult", "0"),
    (["model.backbone.width_mult=-0.5"], "model.backbone.width_mult", "-0.5"),
    (["task=seg", "model.backbone.output_stride=12"], "model.backbone.output_stride", "12"),
    (["model.backbone.output_stride=64"], "model.backbone.output_stride", "64"),
    (["model.image_size=16"], "model.image_size", "16"),
    (["data.image_size=300"], "data.image_size", "300"),
    (["+model.anchor.num_layers=5"], "model.anchor.num_layers", "5"),
    (["model.extra_depths=[512,256]", "+model.anchor.num_layers=6"], "model.anchor.num_layers", "6"),
    (["task=seg", "data.crop_size=12"], "data.crop_size", "12"),
    (["task=seg", "data.crop_size=16"], "data.crop_size", "16"),
    (["task=seg", "model.backbone.output_stride=32", "data.crop_size=32"], "data.crop_size", "32"),
    (["data=coco", "data.root=/nonexistent/coco"], "data.root", "/nonexistent/coco"),
    (["task=seg", "data=voc", "data.root=/nonexistent/voc"], "data.root", "/nonexistent/voc"),
    (["data=coco"], "data.root", "is not set"),
])
def test_bad_value_names_key_value_and_fix(overrides: list[str], key: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_config(_cfg(*overrides))
    msg = str(err.value)
    assert err.value.key == key and value in msg and "-- fix: " in msg and "\n" not in msg, msg


@pytest.mark.parametrize("overrides", [
    [], ["task=seg"], ["experiment=ssdlite_mnv2_coco", "data.root=/"], ["model.image_size=64"],
    ["task=seg", "data.crop_size=33", "model.backbone.output_stride=32"],
    ["task=seg", "data.crop_size=17", "model.backbone.output_stride=8"],
    ["model.extra_depths=[512,256]", "+model.anchor.num_layers=4"],
    ["task=seg", "experiment=deeplabv3_mnv2_voc", "data.root=/", "model.backbone.output_stride=8"],
])
def test_good_configs_pass(overrides: list[str]) -> None:
    check_config(_cfg(*overrides))


def test_crop_not_aligned_with_the_stride_is_only_warned(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mnv2"):
        check_config(_cfg("task=seg", "data.crop_size=64"))
    assert "data.crop_size=64 is not output_stride * k + 1" in caplog.text and "data.crop_size=65" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mnv2"):
        check_config(_cfg("task=seg", "data.crop_size=64", "model.align_corners=false"))
        check_config(_cfg("task=seg", "data.crop_size=64"), training=False)  # evaluation: no crop
    assert caplog.text == ""


def test_resume_checkpoint_of_the_other_task_or_class_count(tmp_path: Path) -> None:
    det = str(_fake_ckpt(tmp_path / "det.ckpt", "det", 6))
    with pytest.raises(ConfigError, match=r"'ckpt_path': .*det.ckpt holds a 'det' model but this run is task=seg "
                                          r"-- fix: run with task=det"):
        check_config(_cfg("task=seg", f"ckpt_path={det}"))
    with pytest.raises(ConfigError, match=r"'ckpt_path': .* 6 classes but data.num_classes has 80"):
        check_config(_cfg(f"ckpt_path={det}", "data.num_classes=80"))
    seg = str(_fake_ckpt(tmp_path / "seg.ckpt", "seg", 21))
    with pytest.raises(ConfigError, match=r"21 classes but data.class_names has 7"):  # synthetic_seg lists 7
        check_config(_cfg("task=seg", f"ckpt_path={seg}"))
    check_config(_cfg(f"ckpt_path={det}"))  # same task, class count from the data (auto): left to the train flow
    check_config(_cfg(f"ckpt_path={det}", "data.num_classes=6"))


def _one_error_line(proc: Any, *needles: str) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize(("args", "needles"), [
    (["model.backbone.width_mult=0", "model.backbone.pretrained=imagenet"],
     ["model.backbone.width_mult", "got 0.0", "fix:"]),
    (["task=seg", "data.crop_size=12"], ["data.crop_size", "got 12", "output stride 16", "fix:"]),
    (["model.image_size=16"], ["model.image_size", "got 16", "fix:"]),
    (["data=coco", "data.root=/nonexistent/coco"], ["data.root", "/nonexistent/coco is not a directory",
                                                   "fix: pass data.root="]),
])
def test_train_fails_before_anything_is_built(run_tool: Any, tmp_path: Path, args: list[str],
                                              needles: list[str]) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    proc = run_tool("train.py", [*args, "logger=none"], cache, tmp_path / "out")
    _one_error_line(proc, *needles)
    assert not any(cache.iterdir()), "nothing may be generated or downloaded before the config is checked"
    assert "classes from" not in proc.stdout + proc.stderr  # not even the data's classes were read


@pytest.mark.parametrize("tool", ["evaluate.py", "train.py"])
def test_checkpoint_of_the_other_task_fails_in_both_tools(run_tool: Any, tmp_path: Path, tool: str) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    det = _fake_ckpt(tmp_path / "det.ckpt", "det", 6)
    assert load_checkpoint(det)["mnv2"]["task"] == "det"  # the safe loader (weights_only) reads the fake
    extra = ["logger=none"] if tool == "train.py" else []
    proc = run_tool(tool, ["task=seg", f"ckpt_path={det}", *extra], cache, tmp_path / "out")
    _one_error_line(proc, "'ckpt_path'", "holds a 'det' model but this run is task=seg", "fix: run with task=det")
    assert not any(cache.iterdir())


def test_evaluate_checkpoint_with_other_class_count(run_tool: Any, tmp_path: Path) -> None:
    """A 21-class (VOC) seg model on the 7-class synthetic set: seg labels are mask values, so refused."""
    cache = tmp_path / "cache"
    cache.mkdir()
    seg = _fake_ckpt(tmp_path / "seg.ckpt", "seg", 21)
    proc = run_tool("evaluate.py", ["task=seg", f"ckpt_path={seg}"], cache, tmp_path / "out")
    _one_error_line(proc, "'ckpt_path'", "21 classes but data.class_names has 7", "fix:")
    assert not any(cache.iterdir())


def test_key_typo_is_hydras_error_naming_the_key(run_tool: Any, tmp_path: Path) -> None:
    """Hydra refuses an override of a key not in the config before our code runs: its own short message
    (a few lines, no traceback, exit code 1) naming the full key."""
    proc = run_tool("train.py", ["model.bakcbone.width_mult=0.5"], tmp_path / "cache", tmp_path / "out")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "model.bakcbone" in proc.stderr and len(proc.stderr.strip().splitlines()) <= 8, proc.stderr
