"""tools/evaluate.py rebuilds the model from the checkpoint's config; `model.*` overrides from the
command line are merged on top with Hydra's own override grammar (set, add, delete, typed values)."""
from __future__ import annotations

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from backbone.errors import ConfigError
from backbone.training.checkpoint import model_config_from_checkpoint

INFO = {"config": {"model": {"_target_": "x.Module", "inference": "single", "mf_scales": [1.0],
                             "postprocess": {"score_threshold": 0.01, "nms_iou": 0.6},
                             "backbone": {"pretrained": "imagenet", "width_mult": 1.0}}}}


def _merge(*overrides: str):
    return model_config_from_checkpoint(INFO, OverridesParser.create().parse_overrides(list(overrides)))


def test_set_add_delete_and_typed_values() -> None:
    cfg = _merge("model.inference=mf", "model.mf_scales=[0.5,1.0,1.5]", "+model.postprocess.pre_nms_top_k=200",
                 "~model.postprocess.nms_iou")
    assert cfg.inference == "mf" and list(cfg.mf_scales) == [0.5, 1.0, 1.5]
    assert cfg.postprocess.pre_nms_top_k == 200 and isinstance(cfg.postprocess.pre_nms_top_k, int)
    assert "nms_iou" not in cfg.postprocess and cfg.postprocess.score_threshold == 0.01
    assert cfg.backbone.pretrained == "none"  # the weights come from the checkpoint, never re-downloaded
    assert cfg.backbone.width_mult == 1.0


def test_no_overrides_keeps_the_checkpoint_config() -> None:
    cfg = _merge()
    assert cfg.inference == "single" and cfg.postprocess.nms_iou == 0.6


def test_deleting_a_missing_key_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match="model.postprocess.nope"):
        _merge("~model.postprocess.nope")
