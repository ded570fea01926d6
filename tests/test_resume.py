"""Exact resume: a run stopped (after an epoch, or mid-epoch) and resumed from its last.ckpt ends with
the same weights as the uninterrupted run, bit for bit (``torch.equal``), for both tasks.

Tiny CPU runs in deterministic mode: 8 synthetic training images, batch 2, 2 epochs of 4 steps. The stop
goes through :class:`~backbone.training.callbacks.GracefulStop` (``stop_at_step``: what a SIGTERM after
that step does), the save through :class:`~backbone.training.checkpoint.AtomicCheckpointIO`, as in
``tools/train.py``. Before the data order and augmentation seeds were a pure function of (seed, epoch,
rank, position) and the loader position was checkpointed, the same check ended up to 7.3e-2 away.

Cost: one uninterrupted reference run per task (module fixture; it also keeps its weights at the stop steps
and its epoch-end checkpoint), then a chain of stopped-and-resumed runs, each segment checked against the
reference at its stop step, so a failure still names the resume that broke. The whole file: ~8 s on an idle
2-core CPU (the six separate stop/resume pairs it replaced, 24 fits: ~13 s), hence not marked slow.
"""
from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path

import pytest
import torch

EPOCHS, STEPS = 2, 4  # 8 images / batch 2
# (stop after global step, num_workers of the segment that ends there): batch 1 of epoch 0 (warm-up), the
# last batch of epoch 0 (stopped before the epoch-end hooks), batch 2 of epoch 1, then to the end. Segments
# alternate 0 and 2 workers: the batches must not depend on them either (per-sample augmentation seeds).
CHAIN = ((1, 0), (STEPS, 2), (STEPS + 2, 0), (None, 2))
Weights = dict[str, torch.Tensor]


def _objects(task: str, syn: Path, workers: int):
    from backbone.training.optim import WarmupCosineLR

    opt = partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=4e-5)
    sched = partial(WarmupCosineLR, warmup_fraction=0.25, warmup_factor=0.01)
    if task == "det":
        from mnv2det.datamodule import DetDataModule
        from mnv2det.lightning_module import SSDLiteModule

        module = SSDLiteModule(num_classes=6, image_size=48, backbone={"pretrained": "none", "width_mult": 0.35},
                               optimizer=opt, scheduler=sched)
        # crop + zoom-out + flip: augmentation that really draws random numbers
        data = DetDataModule(str(syn / "coco"), image_size=48, batch_size=2, num_workers=workers, num_classes=6,
                             augment={"crop_p": 1.0, "zoom_out_p": 0.5, "hflip_p": 0.5})
    else:
        from mnv2seg.datamodule import SegDataModule
        from mnv2seg.lightning_module import DeepLabModule

        module = DeepLabModule(num_classes=7, backbone={"pretrained": "none", "width_mult": 0.35, "output_stride": 16},
                               dropout=0.1, optimizer=opt, scheduler=sched)  # dropout: the global RNG matters too
        data = SegDataModule(str(syn / "VOCdevkit" / "VOC2012"), num_classes=7, crop_size=33, batch_size=2,
                             num_workers=workers)
    return module, data


def _copy(module: torch.nn.Module) -> Weights:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _fit(task: str, syn: Path, run_dir: Path, workers: int = 0, stop_at: int | None = None,
         ckpt: Path | None = None, keep_steps: tuple[int, ...] = ()) -> tuple[Weights, int, dict[int, Weights]]:
    """One fit (seeded as tools/train.py does) writing RUN_DIR/checkpoints/{last,epoch=E}.ckpt; returns (final
    weights, global step reached, the weights after each step in ``keep_steps``)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from backbone.training.callbacks import GracefulStop
    from backbone.training.checkpoint import AtomicCheckpointIO

    kept: dict[int, Weights] = {}

    class Keep(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            if trainer.global_step in keep_steps:
                kept[trainer.global_step] = _copy(pl_module)

    pl.seed_everything(0, workers=True, verbose=False)
    module, data = _objects(task, syn, workers)
    trainer = pl.Trainer(accelerator="cpu", devices=1, deterministic=True, max_epochs=EPOCHS, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, default_root_dir=str(run_dir),
                         callbacks=[Keep(), ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), filename="{epoch}",
                                                            save_last=True, save_top_k=-1),
                                    GracefulStop(stop_at_step=stop_at)],
                         plugins=[AtomicCheckpointIO()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if ckpt else None)
        except SIGTERMException:
            assert stop_at is not None
    return _copy(module), trainer.global_step, kept


def _differ(a: Weights, b: Weights) -> str:
    """'' if every tensor is equal, else how many differ and the largest difference."""
    bad = [k for k, v in a.items() if not torch.equal(v, b[k])]
    if not bad:
        return ""
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in bad if a[k].is_floating_point())
    return f"{len(bad)} of {len(a)} tensors differ (max |diff| {diff:.3g})"


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    from backbone.training.synthetic import ensure_synthetic

    return ensure_synthetic(tmp_path_factory.mktemp("syn"), num_train=8, num_val=2, size=64, seed=3, progress=False)


@pytest.fixture(scope="module")
def reference(syn, tmp_path_factory):
    """reference(task) -> (final weights, {stop step: weights}, run dir): the uninterrupted run, made once."""
    runs: dict[str, tuple[Weights, dict[int, Weights], Path]] = {}

    def get(task: str):
        if task not in runs:
            run_dir = tmp_path_factory.mktemp(f"full-{task}")
            final, steps, kept = _fit(task, syn, run_dir, keep_steps=tuple(s for s, _ in CHAIN if s))
            assert steps == EPOCHS * STEPS
            runs[task] = (final, kept, run_dir)
        return runs[task]

    return get


@pytest.mark.parametrize("task", ["det", "seg"])
def test_resume_mid_epoch_and_at_epoch_end_is_exact(task: str, syn: Path, reference, tmp_path: Path) -> None:
    """Stopped after step 1, resumed and stopped after step 4, resumed and stopped after step 6, resumed to the
    end: at each stop and at the end the weights equal the uninterrupted run's."""
    full, at_step, _ = reference(task)
    ckpt = None
    for i, (stop, workers) in enumerate(CHAIN):
        weights, reached, _ = _fit(task, syn, tmp_path / f"seg{i}", workers, stop_at=stop, ckpt=ckpt)
        what = f"{'resumed from step ' + str(CHAIN[i - 1][0]) if i else 'first run'}, {workers} workers"
        assert reached == (stop or EPOCHS * STEPS), what
        problem = _differ(weights, at_step[stop] if stop else full)
        assert not problem, f"{what}, at step {reached}: {problem} from the uninterrupted run"
        ckpt = tmp_path / f"seg{i}" / "checkpoints" / "last.ckpt"
        assert ckpt.is_file()


@pytest.mark.parametrize("task", ["det", "seg"])
def test_resume_from_the_epoch_end_checkpoint_is_exact(task: str, syn: Path, reference, tmp_path: Path) -> None:
    """Killed after epoch 1: resumed from the checkpoint its epoch end wrote (what the old code got 7.3e-2 off)."""
    full, _, run_dir = reference(task)
    weights, reached, _ = _fit(task, syn, tmp_path / "resumed", ckpt=run_dir / "checkpoints" / "epoch=0.ckpt")
    assert reached == EPOCHS * STEPS
    problem = _differ(weights, full)
    assert not problem, f"resumed after epoch 1: {problem} from the uninterrupted run"


def test_sampler_order_and_seeds_are_pure() -> None:
    """Data order and augmentation seeds depend on (seed, epoch, rank, position) only, not the RNG history."""
    from backbone.training.dataloader import ResumableSampler

    def draw(epoch: int, rank: int = 0, start: int = 0) -> list[tuple[int, int]]:
        s = ResumableSampler(range(10), seed=7, num_replicas=2, rank=rank)
        s.start_at(epoch, start)
        return list(s)

    torch.manual_seed(123)
    a = draw(1)
    torch.rand(1000)  # RNG history must not matter
    assert draw(1) == a and draw(1, start=3) == a[3:]
    assert draw(2) != a and [i for i, _ in draw(1, rank=1)] != [i for i, _ in a]
    assert len({s for _, s in a + draw(1, rank=1)}) == 10  # every sample of both ranks its own seed


def test_loader_state_round_trip(tmp_path: Path) -> None:
    """The loader's state says which batch of which epoch; loading it continues from there."""
    from backbone.training.dataloader import make_loader

    def collate(samples):
        return [int(s) for s in samples]

    torch.manual_seed(0)
    loader = make_loader(list(range(10)), 2, train=True, num_workers=0, collate_fn=collate)
    loader.sampler.set_epoch(3)
    it = iter(loader)
    first = [next(it), next(it)]
    state = loader.state_dict()
    assert state == {"epoch": 3, "batches": 2}
    rest = list(it)
    fresh = make_loader(list(range(10)), 2, train=True, num_workers=0, collate_fn=collate)
    fresh.load_state_dict(state)
    assert list(fresh) == rest and len(first + rest) == 5
    fresh.load_state_dict({"epoch": 3, "batches": 5})  # epoch complete: the next one from its start
    loader.sampler.set_epoch(4)
    assert list(fresh) == list(loader)


def _train_tool():
    """tools/train.py as a module (tools/ is no package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / "train.py"
    spec = importlib.util.spec_from_file_location("mnv2_tools_train", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_ckpt_path_last_takes_the_newest_run_of_the_task(tmp_path: Path, caplog, capsys) -> None:
    """``ckpt_path=last``: the newest last.ckpt under LOG_DIR/<task>/{runs,multiruns}, never another task's
    or the starting run's own; logged. None there: one ``error:`` line, exit 2."""
    import logging
    import os

    from omegaconf import OmegaConf

    from backbone.training.runner import run_cli

    tool, logs = _train_tool(), tmp_path / "outputs"

    def last(run: str, mtime: int) -> Path:
        path = logs / run / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"ckpt")
        os.utime(path, (mtime, mtime))
        return path

    last("det/runs/2025-01-01_00-00-00", 1000)
    newest = last("det/multiruns/2025-01-02_00-00-00/1", 3000)
    last("det/runs/2025-01-03_00-00-00", 2000)  # a later folder name, an older file: mtime decides
    last("seg/runs/2025-01-04_00-00-00", 9000)  # another task
    starting = last("det/runs/now", 9999).parents[1]  # hydra.run.dir of the run being started
    cfg = OmegaConf.create({"ckpt_path": "last", "task_name": "det", "paths": {"log_dir": str(logs)}})
    with caplog.at_level(logging.INFO, logger="mnv2"):
        tool.resolve_ckpt_path(cfg, starting)
    assert cfg.ckpt_path == str(newest)
    assert f"ckpt_path=last: resuming from {newest}" in caplog.text

    cfg = OmegaConf.create({"ckpt_path": "last", "task_name": "seg", "paths": {"log_dir": str(tmp_path / "none")}})
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tool.resolve_ckpt_path, cfg, tmp_path / "run")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and "ckpt_path=last" in err[0] and str(tmp_path / "none" / "seg") in err[0]
