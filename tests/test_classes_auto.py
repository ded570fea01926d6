"""`data.num_classes: auto`: the class count comes from the data (det: the val annotation file's
categories; seg: data.class_names, else VOC's 21), resolved once by tools/train.py before the model is
built, without reading an image; an explicit number is still checked against the data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from backbone.errors import ConfigError
from backbone.training.runner import build, resolve_num_classes
from backbone.training.synthetic import CLASS_NAMES

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = [{"id": 4, "name": "kite"}, {"id": 1, "name": "person"}, {"id": 9, "name": "boat"},
              {"id": 2, "name": "bicycle"}, {"id": 77, "name": "cell phone"}]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[*overrides, "paths.output_dir=/tmp/x", "model.backbone.pretrained=none"])


@pytest.fixture
def five_categories(tmp_path: Path) -> Path:
    """A COCO-format set with 5 categories (ids unsorted, with gaps); its images are never read here."""
    root = tmp_path / "myset"
    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True)
    (root / "annotations").mkdir()
    doc = {"images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 9, "bbox": [1, 2, 30, 20], "area": 600,
                            "iscrowd": 0}], "categories": CATEGORIES}
    for split in ("train2017", "val2017"):
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    return root


def test_coco_format_set_trains_without_num_classes(five_categories: Path) -> None:
    cfg = _compose(["data=coco", f"data.root={five_categories}"])
    assert cfg.data.num_classes == "auto"
    datamodule = build(cfg.data, "data")
    assert resolve_num_classes(cfg, datamodule) == 5
    assert cfg.data.num_classes == 5 and cfg.model.num_classes == 5  # the model reads data.num_classes
    module = build(cfg.model, "model")  # built before any image is read (a.jpg does not even exist)
    assert module.num_classes == 5
    names, source = datamodule.read_classes()
    assert names == ["person", "bicycle", "kite", "boat", "cell phone"] and source.endswith("instances_val2017.json")


def test_explicit_num_classes_is_checked_against_the_annotation_file(five_categories: Path) -> None:
    cfg = _compose(["data=coco", f"data.root={five_categories}", "data.num_classes=80"])
    with pytest.raises(ConfigError) as err:
        resolve_num_classes(cfg, build(cfg.data, "data"))
    msg = str(err.value)
    assert msg.startswith("config key 'data.num_classes': is 80 but ") and "instances_val2017.json has 5 categories" in msg
    assert "data.num_classes=5" in msg and "\n" not in msg
    cfg = _compose(["data=coco", f"data.root={five_categories}", "data.num_classes=5"])
    assert resolve_num_classes(cfg, build(cfg.data, "data")) == 5


def test_synthetic_det_count_is_known_before_generation(tmp_path: Path) -> None:
    """A bad model config must still fail before the synthetic set is generated: its classes come from
    the generator when the set is not there yet, and from its annotation file afterwards."""
    cfg = _compose([f"paths.cache_dir={tmp_path}"])
    datamodule = build(cfg.data, "data")
    assert resolve_num_classes(cfg, datamodule) == 6 and cfg.model.num_classes == 6
    assert not (tmp_path / "synthetic").exists()
    assert datamodule.read_classes() == (list(CLASS_NAMES), "the synthetic set")  # ids ascending


@pytest.mark.parametrize("overrides,expected", [
    (["task=seg"], ["background", *CLASS_NAMES]),                      # synthetic_seg.yaml gives its names
    (["task=seg", "data=voc", "data.root=/voc"], 21),                   # VOC's 21
    (["task=seg", "data=voc", "data.root=/voc", "data.class_names=[background,road,car]"], 3),
    (["task=seg", "data=voc", "data.root=/voc", "data.num_classes=5"], 5),  # explicit, no names: class_i
])
def test_seg_num_classes_auto(overrides: list[str], expected) -> None:
    cfg = _compose(overrides)
    count = expected if isinstance(expected, int) else len(expected)
    assert resolve_num_classes(cfg, build(cfg.data, "data")) == count
    assert cfg.model.num_classes == count
    if not isinstance(expected, int):
        assert list(OmegaConf.to_container(cfg.data.class_names)) == expected


def test_seg_explicit_count_is_checked_against_class_names() -> None:
    cfg = _compose(["task=seg", "data=voc", "data.root=/voc", "data.class_names=[background,road,car]",
                    "data.num_classes=21"])
    with pytest.raises(ConfigError, match=r"'data.num_classes': is 21 but data.class_names has 3 classes.*"
                                          r"data.num_classes=3"):
        build(cfg.data, "data")
