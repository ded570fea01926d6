"""Self-describing checkpoints: the run's model config and dataset meta travel inside the file.

Lightning checkpoints get an extra top-level entry::

    checkpoint["mnv2"] = {
        "format": 1,
        "task": "det" | "seg",
        "config": {"model": {...}, "data": {...}},   # resolved, plain containers
        "meta": {"class_names": [...], ...},         # the datamodule's meta at save time
        "versions": {"torch": ..., "mnv2": ...},
    }

so `tools/evaluate.py ckpt_path=...` (and predict / export) rebuild the model without the original
config. Checkpoints made by other means (e.g. `tools/import_tf.py`) write the same entry plus a
`state_dict` whose keys are the LightningModule's.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf, open_dict

from backbone.errors import ConfigError, DataError

FORMAT = 1
log = logging.getLogger("mnv2")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": str(torch.__version__)}
    for pkg in ("mnv2", "lightning", "torchvision"):
        try:
            out[pkg] = str(version(pkg))
        except PackageNotFoundError:
            pass
    return out


def run_info(task: str, config: dict[str, Any] | DictConfig, meta: dict[str, Any] | None) -> dict[str, Any]:
    """The `checkpoint["mnv2"]` entry."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    return {"format": FORMAT, "task": task, "config": config, "meta": dict(meta or {}), "versions": versions()}


class RunInfoCallback(pl.Callback):
    """Writes `checkpoint["mnv2"]` into every checkpoint Lightning saves."""

    def __init__(self, task: str, config: dict[str, Any]) -> None:
        self.task = task
        self.config = config

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        dm = getattr(trainer, "datamodule", None)
        checkpoint["mnv2"] = run_info(self.task, self.config, getattr(dm, "meta", None))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, but a checkpoint is never left half-written: the file is written
    to a temporary name in the same folder, fsynced, then renamed over the final name (``os.replace`` is
    atomic on POSIX and Windows). A save that fails (disk full, a kill) leaves the previous file as it was
    and no partial file under the final name. Wired in conf/trainer/default.yaml (``plugins``)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        if "://" in str(path):  # remote filesystems (fsspec): Lightning's own write
            super().save_checkpoint(checkpoint, path)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        try:  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY)
        except OSError:  # e.g. Windows: directories cannot be opened
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def find_last_checkpoint(log_dir: str | Path, task: str, exclude: str | Path | None = None) -> Path:
    """``ckpt_path=last``: the newest ``last.ckpt`` of this task's runs,
    ``LOG_DIR/<task>/runs/*/checkpoints/last.ckpt`` (and ``multiruns/*/*/...``), by modification time.
    Every run has its own folder, so Lightning's own "last" lookup (in the new run's folder) finds nothing.
    ``exclude``: a run folder to skip (the run being started). Raises DataError when there is none."""
    root = Path(log_dir).expanduser() / task
    found = [p for pattern in ("runs/*/checkpoints/last.ckpt", "multiruns/*/*/checkpoints/last.ckpt")
             for p in root.glob(pattern)
             if exclude is None or Path(exclude).resolve() not in p.resolve().parents]
    if not found:
        raise DataError(root / "runs", "ckpt_path=last: no */checkpoints/last.ckpt of an earlier run there",
                        "pass ckpt_path=PATH to the checkpoint to resume from (or set paths.log_dir)")
    return max(found, key=lambda p: p.stat().st_mtime)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on CPU as data, never as code, and check that it describes itself.

    ``torch.load(weights_only=True)``: tensors and plain containers only, which is all our
    checkpoints (tools/train.py, tools/import_tf.py) hold. A file that needs more (a pickled object
    whose loading could run arbitrary code) is refused with a DataError naming what it wanted.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(path, "checkpoint file not found", "pass ckpt_path=PATH to a .ckpt written by tools/train.py "
                        "(RUN_DIR/checkpoints/last.ckpt or best-*.ckpt) or tools/import_tf.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:  # not a pickled object we refuse: a broken or foreign file
            raise DataError(path, f"not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]})",
                            "check the file is complete (not a partial download)") from None
        wanted = f"it asks for {found.group(1)}"
        raise DataError(path, "refused: it holds pickled Python objects, not only tensors and plain data, and "
                        f"loading them could run code ({wanted})",
                        "use checkpoints written by tools/train.py or tools/import_tf.py, which hold data "
                        "only") from None
    except Exception as e:  # noqa: BLE001 -- any unreadable file gets the same message
        raise DataError(path, f"not a readable PyTorch checkpoint ({type(e).__name__}: {e})",
                        "check the file is complete (not a partial download)") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise DataError(path, "no 'state_dict' inside: not a Lightning/mnv2 checkpoint",
                        "use a checkpoint written by tools/train.py or tools/import_tf.py")
    info = ckpt.get("mnv2")
    if not isinstance(info, dict) or "config" not in info or "model" not in info.get("config", {}):
        raise DataError(path, "checkpoint carries no mnv2 run config (no 'mnv2' entry)",
                        "use a checkpoint written by tools/train.py or tools/import_tf.py")
    return ckpt


def command_line_overrides(prefix: str = "model.") -> list[Any]:
    """The parsed Hydra overrides (``hydra.core.override_parser``) of keys under ``prefix``."""
    try:
        raw = list(HydraConfig.get().overrides.task)
    except ValueError:  # not under @hydra.main
        return []
    return [o for o in OverridesParser.create().parse_overrides(raw) if o.key_or_group.startswith(prefix)]


def model_config_from_checkpoint(info: dict[str, Any], overrides: list[Any]) -> DictConfig:
    """The checkpoint's model config with the command line's ``model.*`` overrides merged on top."""
    model_cfg = OmegaConf.create(info["config"]["model"])
    for o in overrides:
        key = o.key_or_group[len("model."):]
        if o.is_delete():
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(model_cfg, parent) if parent else model_cfg
            if node is None or leaf not in node:
                raise ConfigError(o.key_or_group, "is not in the checkpoint's model config, nothing to delete")
            with open_dict(node):
                del node[leaf]
        else:
            OmegaConf.update(model_cfg, key, o.value(), merge=True, force_add=True)
    with open_dict(model_cfg):
        if "backbone" in model_cfg:
            model_cfg.backbone.pretrained = "none"  # the checkpoint holds the weights
    return model_cfg
