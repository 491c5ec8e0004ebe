"""The training data order as a pure function of (seed, epoch, rank), resumable mid-epoch from a checkpoint."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

# Signals a scheduler sends to the whole process group; only the main process acts on them (workflow/preemption.py).
SCHEDULER_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else torch.distributed's, else a single process."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ResumableSampler(DistributedSampler):
    """Epoch e's order is randperm(n) seeded by seed + e (never the global RNG); rank r takes every world-th
    index from r. `skip` indices of this rank's share are skipped once, to continue an epoch after a resume.

    A DistributedSampler subclass, so Lightning keeps it under DDP instead of wrapping it.
    """

    def __init__(self, dataset: Dataset, *, seed: int, shuffle: bool = True, rank: int | None = None,
                 world_size: int | None = None, drop_last: bool = True):
        rank, world_size = _rank_and_world(rank, world_size)
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.skip = 0  # indices of this epoch's share already consumed before a resume

    def epoch_indices(self) -> list[int]:
        """This rank's share of epoch `self.epoch`, in order (padded by wrapping when not drop_last)."""
        n = len(self.dataset)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=gen).tolist()
        else:
            order = list(range(n))
        if self.drop_last:
            order = order[:self.total_size]
        else:
            order += (order * (self.total_size // max(n, 1) + 1))[:self.total_size - n]
        return order[self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0  # a resume offset applies to one pass only
        return iter(self.epoch_indices()[skip:])

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this before every epoch; a pending resume offset survives a call with its own epoch."""
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch


def ignore_scheduler_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM/USR1/USR2 (sent to the whole process group); the main process
    checkpoints and then shuts them down. Without this a worker dies first and no checkpoint is written."""
    for sig in SCHEDULER_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class _WorkerInit:
    """ignore_scheduler_signals, then the user's worker_init_fn (picklable for spawn)."""

    def __init__(self, user_fn: Callable[[int], Any] | None):
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        ignore_scheduler_signals(worker_id)
        if self.user_fn is not None:
            self.user_fn(worker_id)


class ResumableLoader(DataLoader):
    """A training DataLoader over a ResumableSampler whose position Lightning saves in the checkpoint.

    It counts the batches it hands to the training loop (Lightning does not prefetch from a sized loader), so
    `state_dict()` is the number of samples of the current epoch whose optimizer steps are in the checkpoint.
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, seed: int, drop_last: bool = True,
                 rank: int | None = None, world_size: int | None = None,
                 worker_init_fn: Callable[[int], Any] | None = None, **kwargs: Any):
        sampler = ResumableSampler(dataset, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                         worker_init_fn=_WorkerInit(worker_init_fn), **kwargs)
        self.consumed = 0  # samples of this rank's share of the current epoch handed out so far

    def __iter__(self) -> Iterator[Any]:
        self.consumed = self.sampler.skip if self.sampler.skip else 0
        for batch in super().__iter__():
            self.consumed += self.batch_size
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "consumed": int(self.consumed), "seed": int(self.sampler.seed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continues epoch `state['epoch']` after its first `consumed` samples (of this rank's share)."""
        if int(state["seed"]) != self.sampler.seed:
            raise ValueError(f"the checkpoint's data order was seeded with seed={state['seed']}, this run has "
                             f"seed={self.sampler.seed}: resume with the same seed")
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if consumed >= self.sampler.num_samples:  # saved at the end of an epoch: the next one starts afresh
            epoch, consumed = epoch + 1, 0
        self.sampler.epoch = epoch
        self.sampler.skip = consumed
        self.consumed = consumed
