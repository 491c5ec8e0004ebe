"""The training data order as a pure function of (seed, epoch, rank), resumable mid-epoch from a checkpoint."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

# Signals a scheduler sends to the whole process group; only the main process acts on them (workflow/preemption.py).
SCHEDULER_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class EpochItem(NamedTuple):
    """A dataset item with the pass it is read in, for datasets whose random augmentation is a function of
    (seed, pass, item) (`keyed_by_epoch = True`, e.g. LatentDataset): a resumed run reads bit-identical items."""

    epoch: int
    index: int


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else torch.distributed's, else a single process."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ResumableSampler(DistributedSampler):
    """Pass e's order is randperm(n) seeded by seed + e (never the global RNG); rank r takes every world-th
    index from r, skipping the first `skip` of its share (to continue a pass after a resume).

    A DistributedSampler subclass, so Lightning keeps it under DDP instead of wrapping it. `epoch` and `skip`
    are set by ResumableLoader, which counts passes itself: Lightning's epoch counter is not the data's (a run
    stopped by max_steps in the middle of a pass counts that epoch as finished). For a dataset with
    `keyed_by_epoch = True` it yields EpochItem(pass, index) instead of the bare index.
    """

    def __init__(self, dataset: Dataset, *, seed: int, shuffle: bool = True, rank: int | None = None,
                 world_size: int | None = None, drop_last: bool = True):
        rank, world_size = _rank_and_world(rank, world_size)
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.skip = 0  # indices of this pass's share already consumed before a resume
        self.keyed = bool(getattr(dataset, "keyed_by_epoch", False))

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

    def __iter__(self) -> Iterator[int | EpochItem]:
        indices = self.epoch_indices()[self.skip:]
        if self.keyed:
            return iter([EpochItem(self.epoch, i) for i in indices])
        return iter(indices)

    def set_epoch(self, epoch: int) -> None:
        """Ignored: Lightning calls it with its epoch counter; ResumableLoader sets the pass (see above)."""


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

    Every iteration is the next pass over the data. It counts the batches it hands to the training loop
    (Lightning does not prefetch from a sized loader), so `state_dict()` holds the pass and the number of its
    samples whose optimizer steps are in the checkpoint; after `load_state_dict` the next iteration yields the
    rest of that pass (a short epoch for Lightning), then the passes continue as in an uninterrupted run.
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, seed: int, drop_last: bool = True,
                 rank: int | None = None, world_size: int | None = None,
                 worker_init_fn: Callable[[int], Any] | None = None, **kwargs: Any):
        sampler = ResumableSampler(dataset, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                         worker_init_fn=_WorkerInit(worker_init_fn), **kwargs)
        self.consumed = 0  # samples of this rank's share of the current pass handed out so far
        self._resume: tuple[int, int] | None = None  # (pass, consumed) from a checkpoint, for the next iteration
        self._next_pass = 0

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        sampler.epoch, sampler.skip = self._resume if self._resume is not None else (self._next_pass, 0)
        self._resume, self._next_pass, self.consumed = None, sampler.epoch + 1, sampler.skip
        # worker seeds (torch.initial_seed() in a worker) from (seed, pass), not from the global RNG's state
        self.generator = torch.Generator().manual_seed(sampler.seed * 1_000_003 + sampler.epoch)
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
        share = self.sampler.num_samples
        if self.drop_last:
            share -= share % self.batch_size  # the samples of the full batches
        if consumed >= share:  # saved at the end of a pass: the next one starts afresh
            epoch, consumed = epoch + 1, 0
        self._resume = (epoch, consumed)
        self.sampler.epoch, self.sampler.skip, self.consumed = epoch, consumed, consumed
