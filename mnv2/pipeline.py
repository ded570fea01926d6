"""Train and evaluate flows behind `tools/train.py` and `tools/evaluate.py`.

Everything is built from the Hydra config with `hydra.utils.instantiate`; see docs/DESIGN.md for what
the task's LightningModule / LightningDataModule provide.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from mnv2.checkpoint import RunInfoCallback, load_checkpoint
from mnv2.errors import ConfigError, DataError, Mnv2Error

log = logging.getLogger("mnv2")


def build(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """`instantiate(node)`, turning failures into one line that names the config key."""
    if node is None or "_target_" not in node:
        raise ConfigError(key, "is missing or has no _target_", f"choose one with {key.split('.')[0]}=NAME")
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, Mnv2Error) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, Mnv2Error):
            raise cause from None
        detail = str(cause or e).splitlines()[0] if (cause or e) else ""
        raise ConfigError(key, f"could not build {node.get('_target_')}: {detail}",
                          "check the keys under this config group (python tools/train.py --cfg job shows them)") from None


def resolve_precision(trainer_cfg: DictConfig) -> None:
    """`precision: auto` -> bf16-mixed on a GPU that has it, else 32-bit."""
    if str(trainer_cfg.get("precision", "auto")) != "auto":
        return
    on_gpu = str(trainer_cfg.get("accelerator", "auto")) in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    precision = "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else ("16-mixed" if on_gpu else "32-true")
    with open_dict(trainer_cfg):
        trainer_cfg.precision = precision


def _instantiate_group(group: DictConfig | None, key: str) -> list[Any]:
    out = []
    for name, node in (group or {}).items():
        if node is not None and "_target_" in node:
            out.append(build(node, f"{key}.{name}"))
    return out


def check_trainer(trainer_cfg: DictConfig) -> None:
    """Refuse trainer settings that would only fail after the data is loaded (on every rank)."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if trainer_cfg.get("sync_batchnorm") and on_cpu:
        raise ConfigError("trainer.sync_batchnorm", "SyncBatchNorm runs only on GPUs, and this run is on the CPU",
                          "add trainer.sync_batchnorm=false (DDP on CPU: trainer=ddp trainer.accelerator=cpu "
                          "trainer.devices=2 trainer.precision=32 trainer.sync_batchnorm=false)")


def build_trainer(cfg: DictConfig, callbacks: list[pl.Callback], loggers: list[Any]) -> pl.Trainer:
    resolve_precision(cfg.trainer)
    return build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)


def output_dir() -> Path:
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not under @hydra.main (e.g. called from a test)
        return Path.cwd()


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _report(module: pl.LightningModule, trainer: pl.Trainer, out_dir: Path) -> dict[str, float]:
    if not trainer.is_global_zero:
        return {}
    metrics = module.evaluation_metrics()
    print("\n" + module.evaluation_report(), flush=True)
    module.save_evaluation(out_dir)
    log.info("evaluation written to %s", out_dir)
    return metrics


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured model on the configured data, then evaluate the best checkpoint."""
    out_dir = output_dir()
    check_trainer(cfg.trainer)
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise DataError(cfg.ckpt_path, "checkpoint to resume from not found", "fix ckpt_path= or drop it")
    pl.seed_everything(int(cfg.seed), workers=True)
    log.info("seed %d, run dir %s", int(cfg.seed), out_dir)

    # Model first: it validates its own config and loads weights before any data is read.
    module = build(cfg.model, "model")
    datamodule = build(cfg.data, "data")
    config = OmegaConf.to_container(cfg, resolve=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))

    callbacks = _instantiate_group(cfg.get("callbacks"), "callbacks")
    callbacks.append(RunInfoCallback(cfg.task_name, {"model": config["model"], "data": config["data"]}))
    loggers = _instantiate_group(cfg.get("logger"), "logger")
    if not loggers:  # logger=none: the LR monitor needs a logger
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    trainer = build_trainer(cfg, callbacks, loggers)

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    if not cfg.get("evaluate_after_fit", True):
        return {}
    ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    log.info("evaluating %s on the whole val set", ckpt or "the final weights")
    trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt or None, verbose=False)
    return _report(module, trainer, out_dir)


def model_config_from_checkpoint(cfg: DictConfig, info: dict[str, Any]) -> DictConfig:
    """The checkpoint's model config with the command line's `model.*` overrides on top."""
    model_cfg = OmegaConf.create(info["config"]["model"])
    try:
        overrides = HydraConfig.get().overrides.task
    except ValueError:
        overrides = []
    dotlist = [o.lstrip("+")[len("model."):] for o in overrides if o.lstrip("+").startswith("model.")]
    model_cfg = OmegaConf.merge(model_cfg, OmegaConf.from_dotlist(dotlist))
    with open_dict(model_cfg):
        if "backbone" in model_cfg:
            model_cfg.backbone.pretrained = "none"  # the checkpoint holds the weights
    return model_cfg


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate a checkpoint on the whole val set of the configured data."""
    out_dir = output_dir()
    check_trainer(cfg.trainer)
    ckpt = load_checkpoint(cfg.ckpt_path)
    info = ckpt["mnv2"]
    if info.get("task") != cfg.task_name:
        raise ConfigError("task", f"{cfg.ckpt_path} holds a '{info.get('task')}' model but task={cfg.task_name}",
                          f"run with task={info.get('task')}")
    pl.seed_everything(int(cfg.seed), workers=True)
    with open_dict(cfg):
        cfg.model = model_config_from_checkpoint(cfg, info)  # data may interpolate ${model.*}
    module = build(cfg.model, "model")
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise DataError(cfg.ckpt_path, f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}",
                        "evaluate with the checkpoint's own model config (drop model.* overrides that change the architecture)")
    if cfg.get("save_predictions"):
        module.predictions_dir = out_dir / "predictions"
    datamodule = build(cfg.data, "data")
    trainer = build_trainer(cfg, callbacks=[], loggers=[])
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return _report(module, trainer, out_dir)


def run_cli(fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run a flow; known user errors become one line on stderr and exit code 2 (no traceback)."""
    try:
        return fn(cfg)
    except Mnv2Error as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
