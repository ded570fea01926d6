"""The DataLoader both tasks use: per-worker, per-rank augmentation seeds, the DDP val sampler,
`make_loader`.

albumentations' ``Compose`` owns its random generator. A forked DataLoader worker copies it verbatim
from the parent, so without reseeding every worker repeats the others' draws (worker 0 and 1 crop
their i-th images identically) and, with an unseeded Compose, two runs with the same seed differ.
Under DDP every rank runs ``seed_everything`` with the same seed, so the seeds a loader derives
(``torch.initial_seed()``, the workers' ``base_seed + worker_id``) are the same on every rank: the
global rank is mixed in (:func:`rank_seed`), else rank 1 draws rank 0's crops and flips. Rank 0
keeps the plain seed, so single-process runs are unchanged.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler


def reseed_transform(transform: Any, seed: int) -> bool:
    """Reseed an albumentations Compose (``set_random_seed``) or a wrapper with ``set_seed``.

    Returns False when ``transform`` has no random state to seed.
    """
    for name in ("set_seed", "set_random_seed"):
        fn = getattr(transform, name, None)
        if callable(fn):
            fn(int(seed) % 2**32)
            return True
    return False


def global_rank() -> int:
    """This process's rank among all DDP processes (0 without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def rank_seed(seed: int, rank: int | None = None) -> int:
    """``seed`` made distinct per DDP rank (rank 0: ``seed`` itself)."""
    rank = global_rank() if rank is None else int(rank)
    return (int(seed) + rank * 0x9E3779B1) % 2**63  # golden-ratio stride: ranks' streams never meet


def main_process_seed() -> int:
    """The augmentation seed of a loader without workers: the global seed, mixed with the rank."""
    return rank_seed(torch.initial_seed())


def seed_worker(worker_id: int, rank: int = 0) -> None:
    """DataLoader ``worker_init_fn``: give each worker (of each rank) its own augmentation stream.

    ``get_worker_info().seed`` derives from the loader's base seed, so runs under
    ``seed_everything`` stay reproducible. ``rank`` is the creating process's global rank (a
    worker cannot ask torch.distributed: the process group is not usable in it); bind it with
    :func:`worker_init_fn`.
    """
    import random

    import cv2

    cv2.setNumThreads(1)  # the DataLoader already parallelises over workers
    info = torch.utils.data.get_worker_info()
    if info is None:
        return
    seed = rank_seed(info.seed, rank)
    for attr in ("transforms", "transform"):
        if reseed_transform(getattr(info.dataset, attr, None), seed):
            break
    np.random.seed(seed % 2**32)
    random.seed(seed)
    torch.manual_seed(seed)  # rank 0: the seed the DataLoader gave this worker already


def worker_init_fn() -> Callable[[int], None]:
    """:func:`seed_worker` bound to this process's global rank (call it where the loader is made)."""
    return functools.partial(seed_worker, rank=global_rank())


def eval_sampler(dataset: Dataset) -> Sampler | None:
    """Under DDP, a sampler giving each val image to exactly one rank; None in a single process.

    Lightning's default DistributedSampler pads the last ranks with repeated images, which would
    count them twice in a summed confusion matrix or a gathered COCO evaluation.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(dataset, shuffle=False)


def make_loader(dataset: Dataset, batch_size: int, train: bool, num_workers: int,
                collate_fn: Callable[[list[Any]], Any], pin_memory: bool = True) -> DataLoader:
    """Train: shuffled, last partial batch dropped (a 1-sample batch breaks BatchNorm). Val: in
    order, every image once over all DDP ranks (:func:`eval_sampler`). Workers are persistent and
    reseeded (:func:`seed_worker`)."""
    sampler = None if train else eval_sampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train if sampler is None else None, sampler=sampler,
                      num_workers=num_workers, collate_fn=collate_fn,
                      pin_memory=pin_memory and torch.cuda.is_available(),
                      drop_last=train and len(dataset) > batch_size,
                      worker_init_fn=worker_init_fn(), persistent_workers=num_workers > 0)
