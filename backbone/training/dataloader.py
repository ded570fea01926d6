"""The DataLoader both tasks use: per-worker, per-rank augmentation seeds, the DDP val sampler,
`make_loader`.

albumentations' ``Compose`` owns its random generator. A forked DataLoader worker copies it verbatim
from the parent, so without reseeding every worker repeats the others' draws (worker 0 and 1 crop
their i-th images identically) and, with an unseeded Compose, two runs with the same seed differ.
Under DDP every rank runs ``seed_everything`` with the same seed, so the seeds a loader derives
(``torch.initial_seed()``, the workers' ``base_seed + worker_id``) are the same on every rank: the
global rank is mixed in (:func:`rank_seed`), else rank 1 draws rank 0's crops and flips. Rank 0
keeps the plain seed, so single-process runs are unchanged.

Training loaders are also *resumable*: data order and augmentation are a pure function of (seed, epoch,
rank, position in the epoch), never of the RNG history, and the loader's position is saved in every
checkpoint (Lightning calls ``state_dict`` / ``load_state_dict`` of a train loader that has them), so a
run resumed from any checkpoint, mid-epoch included, draws the same batches as an uninterrupted run:

- :class:`ResumableSampler` (a ``DistributedSampler``, so Lightning never swaps it out under DDP):
  the permutation of epoch ``e`` is ``randperm`` seeded with ``seed + e`` (the same as
  ``DistributedSampler``), each rank takes its share, and every index comes with its own augmentation
  seed :func:`sample_seed` ``(seed, epoch, rank, position)``.
- :class:`SeededSamples` wraps the dataset: it reseeds the transform with that seed before each sample,
  so a sample's augmentation depends neither on the worker that draws it nor on what that worker
  drew before (num_workers=0 and num_workers=2 give the same batches).
- :class:`ResumableLoader` counts the batches it has handed out this epoch; its ``state_dict`` is
  {epoch, batches}; ``load_state_dict`` makes the next iteration start at that batch.
- Every loader gets its own ``torch.Generator``, so making an iterator (worker base seeds) never draws
  from the global RNG (which the model's dropout uses, and which a checkpoint restores).
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


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


def sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """The augmentation seed of the ``position``-th sample of ``epoch`` on ``rank``: a pure function
    (numpy's SeedSequence hash), so it never depends on RNG history or on the worker."""
    return int(np.random.SeedSequence([int(seed) % 2**63, int(epoch), int(rank), int(position)]).generate_state(1)[0])


class ResumableSampler(DistributedSampler):
    """Training sampler: shuffled per epoch (``seed + epoch``), split over DDP ranks, yielding
    ``(index, augmentation seed)`` pairs, and able to start an epoch part-way (:meth:`start_at`).

    Args:
        dataset: the (wrapped) dataset; only its length is used.
        seed: the run's seed (:func:`torch.initial_seed` after ``seed_everything``).
        shuffle: draw a new permutation every epoch (``set_epoch``, called by Lightning).
        num_replicas, rank: DDP world size and rank (default: torch.distributed's, else 1 and 0).
    """

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool = True, num_replicas: int | None = None,
                 rank: int | None = None) -> None:
        if num_replicas is None or rank is None:
            distributed = dist.is_available() and dist.is_initialized()
            num_replicas = dist.get_world_size() if distributed else 1 if num_replicas is None else num_replicas
            rank = dist.get_rank() if distributed else 0 if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=int(seed) % 2**63)
        self.start = 0  # samples of the current epoch to skip once (a resumed run)

    def start_at(self, epoch: int, samples: int) -> None:
        """Make the next iteration be epoch ``epoch`` from its ``samples``-th sample on."""
        self.set_epoch(epoch)
        self.start = int(samples)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())  # this rank's share of epoch `self.epoch`, padded like DistributedSampler
        start, self.start = self.start, 0
        for position in range(start, len(indices)):
            yield indices[position], sample_seed(self.seed, self.epoch, self.rank, position)


class SeededSamples(Dataset):
    """``dataset`` read with ``(index, seed)`` keys: the transform is reseeded with ``seed`` before
    the sample is made (plain integer keys read the sample as is). Other attributes pass through."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, tuple):
            index, seed = key
            for attr in ("transforms", "transform"):
                if reseed_transform(getattr(self.dataset, attr, None), seed):
                    break
            return self.dataset[index]
        return self.dataset[key]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling in a worker): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ResumableLoader(DataLoader):
    """A training DataLoader over a :class:`ResumableSampler` whose position Lightning checkpoints.

    ``state_dict()`` -> ``{"epoch": e, "batches": b}``: ``b`` batches of epoch ``e`` were handed out
    (Lightning fetches ahead only for loaders without a length, which this is not, so the batches
    handed out are the batches trained on). ``load_state_dict`` makes the next iteration continue there:
    the rest of epoch ``e``, or epoch ``e + 1`` from its start when ``e`` was complete.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epoch_batches = 0  # batches handed out in the current epoch

    def _resumable_sampler(self) -> ResumableSampler | None:
        sampler = getattr(self.batch_sampler, "sampler", None) or self.sampler
        return sampler if isinstance(sampler, ResumableSampler) else None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = self._resumable_sampler()
        self.epoch_batches = sampler.start // self.batch_size if sampler is not None and self.batch_size else 0
        for batch in super().__iter__():
            self.epoch_batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler = self._resumable_sampler()
        return {"epoch": int(sampler.epoch) if sampler is not None else 0, "batches": int(self.epoch_batches)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self._resumable_sampler()
        if sampler is None or not self.batch_size:
            return
        epoch, batches = int(state.get("epoch", 0)), int(state.get("batches", 0))
        if batches >= len(self):  # the epoch was complete: the next one from its start
            epoch, batches = epoch + 1, 0
        sampler.start_at(epoch, batches * self.batch_size)


def restore_loader_states(trainer: Any) -> None:
    """Hand the checkpointed train-loader states to the loaders, if Lightning has not.

    Lightning 2.6 loads them only when it builds the train loader after restoring the checkpoint; a
    module whose ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (ours: the step
    schedule's length) makes it build the loader before, and the states are never loaded. Call from
    ``on_train_start`` (before the first batch is drawn; :class:`ResumableLoader` iterates lazily).
    """
    fit_loop = trainer.fit_loop
    states = getattr(fit_loop, "_combined_loader_states_to_load", None)
    combined = getattr(fit_loop, "_combined_loader", None)
    if states and combined is not None:
        combined._load_state_dicts(states)
        fit_loop._combined_loader_states_to_load = []


def loader_generator(seed: int | None = None) -> torch.Generator:
    """A generator for a DataLoader's own draws (worker base seeds), seeded from the run's seed and
    the rank, so creating an iterator never consumes the global RNG."""
    return torch.Generator().manual_seed(rank_seed(torch.initial_seed() if seed is None else seed) % 2**63)


def make_loader(dataset: Dataset, batch_size: int, train: bool, num_workers: int,
                collate_fn: Callable[[list[Any]], Any], pin_memory: bool = True) -> DataLoader:
    """Train: a :class:`ResumableLoader` (shuffled per (seed, epoch), per-sample augmentation seeds,
    its position checkpointed), last partial batch dropped (a 1-sample batch breaks BatchNorm). Val:
    in order, every image once over all DDP ranks (:func:`eval_sampler`). Workers are persistent and
    reseeded (:func:`seed_worker`); loaders draw from their own generator, not the global RNG."""
    if num_workers > 0:
        # OpenCV's thread pool does not survive fork: a worker forked while this process holds one hangs in
        # its first cv2 call (seen: seed_worker's setNumThreads, at the validate after fit). One thread here
        # too; the workers are the parallelism.
        import cv2

        cv2.setNumThreads(1)
    seed = torch.initial_seed()  # the run's seed after seed_everything
    common = dict(batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn,
                  pin_memory=pin_memory and torch.cuda.is_available(), worker_init_fn=worker_init_fn(),
                  persistent_workers=num_workers > 0, generator=loader_generator(seed))
    if train:
        wrapped = SeededSamples(dataset)
        return ResumableLoader(wrapped, sampler=ResumableSampler(wrapped, seed), drop_last=len(dataset) > batch_size,
                               **common)
    return DataLoader(dataset, shuffle=False, sampler=eval_sampler(dataset), **common)
