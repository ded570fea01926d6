"""Every DDP rank augments differently, and a run still reproduces.

Two real processes (torch.distributed, gloo on the CPU) each run ``seed_everything(42)`` as
Lightning does on every rank, build the task's datamodule and draw the SAME training image 6 times
through a loader (0 and 1 workers). Without the rank in the seeds both ranks drew identical crops,
flips and jitter at every step.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch.multiprocessing as mp

DRAWS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _draws(rank: int, world: int, port: int, root: str, out: str) -> None:
    import lightning.pytorch as pl
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from backbone.training.dataloader import worker_init_fn
    from mnv2det.datamodule import DetDataModule
    from mnv2seg.datamodule import SegDataModule

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result: dict[str, list[str]] = {}
    try:
        for task in ("det", "seg"):
            for workers in (0, 1):
                pl.seed_everything(42, workers=True, verbose=False)
                if task == "det":
                    dm = DetDataModule(f"{root}/coco", image_size=64, batch_size=1, num_workers=workers,
                                       augment={"crop_p": 1.0, "zoom_out_p": 0.5})
                else:
                    dm = SegDataModule(f"{root}/VOCdevkit/VOC2012", num_classes=7, crop_size=33, batch_size=1,
                                       num_workers=workers)
                dm.setup("fit")
                loader = DataLoader(dm.train_dataset, batch_size=1, sampler=[0] * DRAWS, num_workers=workers,
                                    collate_fn=dm.collate_fn, worker_init_fn=worker_init_fn())
                result[f"{task}-{workers}"] = [hashlib.sha1(b["images"].numpy().tobytes()).hexdigest()
                                               for b in loader]
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def _run(root: Path, out: Path) -> list[dict[str, list[str]]]:
    out.mkdir(parents=True)
    mp.start_processes(_draws, args=(2, _free_port(), str(root), str(out)), nprocs=2, start_method="spawn")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_ranks_draw_different_augmentations_and_runs_reproduce(tmp_path: Path) -> None:
    from backbone.training.synthetic import ensure_synthetic

    root = ensure_synthetic(tmp_path / "syn", num_train=4, num_val=2, size=64, seed=0, progress=False)
    first = _run(root, tmp_path / "a")
    for key in first[0]:
        r0, r1 = first[0][key], first[1][key]
        assert len(r0) == len(r1) == DRAWS
        assert len(set(r0)) > 1, key  # the image really is augmented differently across draws
        same = sum(a == b for a, b in zip(r0, r1))
        assert same <= 1, f"{key}: rank 0 and rank 1 drew the same augmentation at {same} of {DRAWS} steps"
    again = _run(root, tmp_path / "b")
    assert again == first  # same seed, same ranks: the same draws

