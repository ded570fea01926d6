"""The Lightning Trainer keys users type are in conf/trainer, with Lightning's meaning."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from backbone.training.runner import build_trainer

CONF = Path(__file__).resolve().parents[1] / "conf"
KNOBS = {"max_steps": 2, "limit_train_batches": 3, "limit_val_batches": 0.5, "val_check_interval": 1.0,
         "check_val_every_n_epoch": 2, "gradient_clip_val": 1.0, "accumulate_grad_batches": 2,
         "log_every_n_steps": 1, "deterministic": True}


@pytest.mark.parametrize("trainer", ["auto", "cpu", "ddp"])
def test_common_trainer_keys_need_no_plus(trainer: str) -> None:
    overrides = [f"trainer={trainer}", *(f"trainer.{k}={v}" for k, v in KNOBS.items())]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    for key, value in KNOBS.items():
        assert cfg.trainer[key] == value, key


def test_knobs_reach_the_trainer(tmp_path: Path) -> None:
    overrides = ["trainer=cpu", "logger=none", f"paths.output_dir={tmp_path}",
                 *(f"trainer.{k}={v}" for k, v in KNOBS.items())]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    trainer = build_trainer(cfg, callbacks=[], loggers=[])
    assert trainer.max_steps == 2 and trainer.limit_train_batches == 3 and trainer.limit_val_batches == 0.5
    assert trainer.check_val_every_n_epoch == 2 and trainer.gradient_clip_val == 1.0
    assert trainer.accumulate_grad_batches == 2 and trainer.log_every_n_steps == 1
