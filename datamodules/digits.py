"""The embedded default data: scikit-learn's bundled 8x8 handwritten digits, no download."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from workflow.data_order import ResumableLoader, ignore_scheduler_signals

VALID_SIZES = (8, 16, 32)


def load_digits_tensors(image_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as x [N,1,S,S] in [-1,1] (float32) and y [N] (long), in sklearn's order."""
    if image_size not in VALID_SIZES:
        raise ValueError(f"data.image_size={image_size} is not supported; choose one of {VALID_SIZES}")
    bunch = load_digits()
    pixels = torch.from_numpy(bunch.images.astype(np.float32))  # [N,8,8], values 0..16
    x = (pixels / 8.0 - 1.0).unsqueeze(1)  # [N,1,8,8] in [-1,1]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        x = x.clamp(-1.0, 1.0)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return x, y


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic, class-agnostic permutation split so every run sees the same train/val sets."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class DigitsDataModule(L.LightningDataModule):
    """Digits as pixel-space "latents" with the same (x, y) batches as LatentImageNet."""

    num_classes = 10
    channels = 1

    def __init__(
        self,
        image_size: int = 16,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = True,
        channels: int = 1,
        num_classes: int = 10,
        shuffle_seed: int = 0,
    ):
        super().__init__()
        # channels/num_classes are config keys other groups interpolate; for digits they are fixed.
        if channels != 1 or num_classes != 10:
            raise ValueError(f"digits has channels=1 and num_classes=10, got data.channels={channels}, "
                             f"data.num_classes={num_classes}")
        if image_size not in VALID_SIZES:
            raise ValueError(f"data.image_size={image_size} is not supported; choose one of {VALID_SIZES}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be >= 1")
        self.image_size = image_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.shuffle_seed = shuffle_seed  # the training order: a function of (shuffle_seed, epoch, rank) only
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = load_digits_tensors(self.image_size)
        train_idx, val_idx = split_indices(len(x), self.val_fraction, self.seed)
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])

    def train_dataloader(self) -> ResumableLoader:
        """Shuffled from `shuffle_seed` (not the global RNG), resumable mid-epoch, this rank's share under DDP."""
        self.setup()
        trainer = self.trainer
        return ResumableLoader(
            self.train_set, batch_size=min(self.batch_size, len(self.train_set)), seed=self.shuffle_seed,
            drop_last=self.drop_last, rank=trainer.global_rank if trainer else None,
            world_size=trainer.world_size if trainer else None, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.val_set, batch_size=min(self.batch_size, len(self.val_set)), shuffle=False,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          worker_init_fn=ignore_scheduler_signals if self.num_workers else None)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Digits live in pixel space already: decoding is clamping to the image range."""
        return x.clamp(-1.0, 1.0)
