"""LatentImageNet: ImageNet -> ADM crop -> SD VAE -> latent cache on disk -> (x, y) batches of latents.

Encode once (resumable, sharded across ranks):
  python -m datamodules.latent_imagenet encode data.root=/data/imagenet data.cache_dir=/data/latents
  torchrun --nproc_per_node=8 -m datamodules.latent_imagenet encode data.root=... data.cache_dir=...
Training then reads the memory-mapped cache only; prepare_data builds it when missing (single process).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from datamodules.latent_cache import CacheSpec, build_cache, check_compatible, is_complete, read_metadata
from datamodules.vae import DEFAULT_VAE, KNOWN_VAES, SD_SCALE_FACTOR, VAE, check_vae_available
from workflow.data_order import ResumableLoader, ignore_scheduler_signals


class LatentDataset(Dataset):
    """Items of the cache: a random flip and (optionally) a fresh posterior sample, times the scale factor."""

    def __init__(self, cache_dir: str | os.PathLike, scale_factor: float, sample_posterior: bool = True,
                 random_flip: bool = True, indices: np.ndarray | None = None, rank: int = 0):
        self.cache_dir = Path(cache_dir)
        self.meta = read_metadata(cache_dir)
        self.scale_factor = float(scale_factor)
        self.sample_posterior = sample_posterior
        self.random_flip = random_flip
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.rank = rank
        self._arrays = None
        self._scratch: dict[str, np.ndarray] = {}
        self._gen: torch.Generator | None = None

    def __getstate__(self):
        """Memory maps are reopened in each worker; pickling them would copy the whole cache."""
        state = dict(self.__dict__)
        state["_arrays"] = None
        state["_scratch"] = {}
        state["_gen"] = None
        return state

    def _generator(self) -> torch.Generator:
        """Own RNG per (rank, process): ranks seeded alike still differ, and the model's global RNG is untouched."""
        if self._gen is None:
            self._gen = torch.Generator().manual_seed((torch.initial_seed() + 1_000_003 * self.rank) % 2**63)
        return self._gen

    def _open(self):
        """Open (once per process) the memory-mapped mean/std and the labels."""
        if self._arrays is None:
            mean = np.load(self.cache_dir / "mean.npy", mmap_mode="r")
            std = np.load(self.cache_dir / "std.npy", mmap_mode="r") if self.sample_posterior else None
            labels = np.load(self.cache_dir / "labels.npy")
            self._arrays = (mean, std, labels)
        return self._arrays

    def __len__(self) -> int:
        return self.meta["count"] if self.indices is None else len(self.indices)

    def __getitems__(self, items: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch with one vectorised gather (the DataLoader fast path): (x [B,C,H,W], y [B])."""
        mean, std, labels = self._open()
        rows = np.asarray(items, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"latent index out of range 0..{len(self) - 1}: {rows.min()}..{rows.max()}")
        if self.indices is not None:
            rows = self.indices[rows]
        if self.random_flip:
            flips = torch.randint(0, 2, (len(rows),), generator=self._generator()).numpy()
        else:
            flips = np.zeros(len(rows), dtype=np.int64)
        flat_rows = rows * 2 + flips  # row of (item, flip) in the [N*2, C*H*W] view
        mu = torch.from_numpy(self._gather(mean, flat_rows, "mean"))
        if self.sample_posterior:
            # fp32 noise times the fp16 std, plus the fp16 mean, in place: the cheapest exact form on CPU.
            x = torch.empty(mu.shape, dtype=torch.float32).normal_(generator=self._generator())
            x.mul_(torch.from_numpy(self._gather(std, flat_rows, "std"))).add_(mu)
        else:
            x = mu.float()
        x.mul_(self.scale_factor)
        return x.view(len(rows), *mean.shape[2:]), torch.from_numpy(labels[rows])

    def _gather(self, array: np.ndarray, flat_rows: np.ndarray, name: str) -> np.ndarray:
        """Rows of the [N*2, C*H*W] view into a reused scratch buffer (fresh buffers cost page faults)."""
        buf = self._scratch.get(name)
        if buf is None or buf.shape[0] != len(flat_rows):
            buf = self._scratch[name] = np.empty((len(flat_rows), int(np.prod(array.shape[2:]))), array.dtype)
        np.take(array.reshape(-1, buf.shape[1]), flat_rows, axis=0, out=buf, mode="clip")
        return buf

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([index])
        return x[0], y[0]


def collate_latents(batch):
    """Pass through a batch built by __getitems__; collate a list of single items as usual."""
    if isinstance(batch, tuple):
        return batch
    return default_collate(batch)


class LatentImageNetDataModule(L.LightningDataModule):
    """ImageNet as SD-VAE latents read from a memory-mapped cache; (x, y) batches like digits."""

    def __init__(
        self,
        root: str | None = None,
        cache_dir: str = "data/latents/imagenet256_sd-vae-ft-ema",
        split: str = "train",
        vae=DEFAULT_VAE,
        vae_local_path: str | None = None,
        vae_dtype: str = "auto",
        scale_factor: float = SD_SCALE_FACTOR,
        resolution: int = 256,
        image_size: int = 32,
        channels: int = 4,
        num_classes: int = 1000,
        batch_size: int = 256,
        num_workers: int = 8,
        pin_memory: bool = True,
        drop_last: bool = True,
        sample_posterior: bool = True,
        random_flip: bool = True,
        val_size: int = 0,
        seed: int = 0,
        shuffle_seed: int = 0,  # the training order (train.py passes its seed): workflow/data_order.py
        encode_batch_size: int = 64,
        encode_num_workers: int = 8,
        encode_device: str = "auto",
        shard_size: int = 1000,
        keep_shards: bool = False,
        progress: bool = True,
    ):
        super().__init__()
        if vae in KNOWN_VAES and image_size * 8 != resolution:
            raise ValueError(f"data.image_size={image_size} must be data.resolution/8={resolution / 8} for the SD VAE")
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be >= 1")
        if val_size < 0:
            raise ValueError(f"data.val_size={val_size} must be >= 0")
        self.root, self.cache_dir, self.split = root, cache_dir, split
        self.vae, self.vae_local_path, self.vae_dtype = vae, vae_local_path, vae_dtype
        self.vae_name = vae if isinstance(vae, str) else getattr(vae, "name", "custom-AutoencoderKL")
        self.scale_factor, self.resolution = float(scale_factor), int(resolution)
        self.image_size, self.channels, self.num_classes = int(image_size), int(channels), int(num_classes)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory, self.drop_last = pin_memory, drop_last
        self.sample_posterior, self.random_flip = sample_posterior, random_flip
        self.val_size, self.seed = val_size, seed
        self.shuffle_seed = shuffle_seed
        self.encode_batch_size, self.encode_num_workers = encode_batch_size, encode_num_workers
        self.encode_device, self.shard_size, self.keep_shards = encode_device, shard_size, keep_shards
        self.progress = progress
        self.train_set: LatentDataset | None = None
        self.val_set: LatentDataset | None = None
        self._decoder: VAE | None = None

    @property
    def spec(self) -> CacheSpec:
        """The settings a cache must have been built with to be used by this config."""
        return CacheSpec(vae=self.vae_name, scale_factor=self.scale_factor, resolution=self.resolution,
                         shard_size=self.shard_size)

    def build_vae(self, device: str | torch.device | None = None) -> VAE:
        """The VAE wrapper (a passed-in one is reused; a hub id / local folder is loaded now)."""
        if device is None or str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if isinstance(self.vae, VAE):
            return self.vae.to(device)
        return VAE(self.vae, local_path=self.vae_local_path, scale_factor=self.scale_factor, device=device,
                   dtype=self.vae_dtype, name=self.vae_name)

    def build_cache(self, rank: int = 0, world_size: int = 1, device: str | torch.device | None = None,
                    on_shard_written=None) -> dict:
        """Encode this rank's shards of root/split into cache_dir (resuming), then finalize on rank 0."""
        if not is_complete(self.cache_dir) and not self.root:
            raise FileNotFoundError(
                f"no complete latent cache in data.cache_dir={self.cache_dir!r} and data.root is not set: set "
                f"data.root=/path/to/imagenet (holding {self.split}/<wnid>/*.JPEG) to build it, or point "
                f"data.cache_dir at an existing cache."
            )
        image_dir = Path(self.root) / self.split if self.root else Path(".")
        device = device or self.encode_device
        return build_cache(
            image_dir, self.cache_dir, self.spec, functools.partial(self.build_vae, device),
            batch_size=self.encode_batch_size, num_workers=self.encode_num_workers, rank=rank,
            world_size=world_size, progress=self.progress, keep_shards=self.keep_shards,
            on_shard_written=on_shard_written,
        )

    def prepare_data(self) -> None:
        """Build the cache when missing (Lightning runs this once per node, before setup)."""
        if not is_complete(self.cache_dir):
            self.build_cache()

    def setup(self, stage: str | None = None) -> None:
        """Open the cache and check it against the config (VAE, resolution, scale, shapes, classes, VAE weights)."""
        if self.train_set is not None:
            return
        meta = read_metadata(self.cache_dir)
        check_compatible(meta, self.spec, repr(str(self.cache_dir)))
        want = [2, self.channels, self.image_size, self.image_size]
        if list(meta["latent_shape"]) != want:
            raise ValueError(f"latent cache {self.cache_dir!r} holds latents of shape {meta['latent_shape'][1:]} but "
                             f"data.channels={self.channels}, data.image_size={self.image_size} ask for {want[1:]}")
        if meta["num_classes"] > self.num_classes:
            raise ValueError(f"latent cache {self.cache_dir!r} has {meta['num_classes']} classes but "
                             f"data.num_classes={self.num_classes}")
        if isinstance(self.vae, str):  # decode needs it later (sample grids, FID): fail now, not at step 10,000
            check_vae_available(self.vae, self.vae_local_path)
        if self.val_size >= meta["count"]:
            raise ValueError(f"data.val_size={self.val_size} must be smaller than the cache ({meta['count']} latents)")
        rank = self.trainer.global_rank if self.trainer is not None else 0
        train_idx = val_idx = None
        if self.val_size:
            perm = np.random.default_rng(self.seed).permutation(meta["count"])
            train_idx, val_idx = np.sort(perm[self.val_size:]), np.sort(perm[:self.val_size])
        self.train_set = LatentDataset(self.cache_dir, self.scale_factor, self.sample_posterior, self.random_flip,
                                       indices=train_idx, rank=rank)
        if val_idx is not None:
            self.val_set = LatentDataset(self.cache_dir, self.scale_factor, self.sample_posterior, False,
                                         indices=val_idx, rank=rank)

    def _loader(self, dataset: LatentDataset, shuffle: bool, drop_last: bool) -> DataLoader:
        """DataLoader on the batched fast path; Lightning swaps in a DistributedSampler under DDP."""
        return DataLoader(
            dataset, batch_size=min(self.batch_size, len(dataset)), shuffle=shuffle, drop_last=drop_last,
            num_workers=self.num_workers, collate_fn=collate_latents,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            worker_init_fn=ignore_scheduler_signals if self.num_workers else None,  # workflow/preemption.py
        )

    def train_dataloader(self) -> DataLoader:
        """Seeded by shuffle_seed, resumable mid-epoch, this rank's share under DDP (workflow/data_order.py)."""
        self.setup()
        trainer = self.trainer
        return ResumableLoader(
            self.train_set, batch_size=min(self.batch_size, len(self.train_set)), seed=self.shuffle_seed,
            drop_last=self.drop_last, rank=trainer.global_rank if trainer else None,
            world_size=trainer.world_size if trainer else None, num_workers=self.num_workers,
            collate_fn=collate_latents, pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0)

    def val_dataloader(self):
        """Held-out latents (data.val_size of them); none when val_size is 0."""
        self.setup()
        if self.val_set is None:
            return []
        return self._loader(self.val_set, shuffle=False, drop_last=False)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] through the VAE decoder (built on first use, on x's device)."""
        if self._decoder is None:
            self._decoder = self.build_vae(x.device)
        elif self._decoder.device != x.device:
            self._decoder.to(x.device)
        return self._decoder.decode(x)


def compose_data_config(overrides: list[str]):
    """The data config exactly as training sees it: conf/data/latent_imagenet.yaml plus data.* overrides."""
    from hydra import compose, initialize_config_dir

    conf_dir = str(Path(__file__).resolve().parent.parent / "conf")
    with initialize_config_dir(config_dir=conf_dir, version_base=None):
        cfg = compose(config_name=None, overrides=["+data=latent_imagenet", *overrides])
    return cfg.data


def datamodule_from_config(data_cfg) -> LatentImageNetDataModule:
    """Build the datamodule from a data config node (its _target_ is this class)."""
    from omegaconf import OmegaConf

    kwargs = OmegaConf.to_container(data_cfg, resolve=True)
    kwargs.pop("_target_", None)
    return LatentImageNetDataModule(**kwargs)


def main(argv: list[str] | None = None) -> int:
    """`encode [data.key=value ...]`: build the latent cache; under torchrun each rank takes shards r::world."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "encode":
        print(__doc__, file=sys.stderr)
        print("usage: python -m datamodules.latent_imagenet encode data.root=... [data.cache_dir=...]", file=sys.stderr)
        return 2
    dm = datamodule_from_config(compose_data_config(argv[1:]))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = dm.encode_device
    if world > 1:
        import datetime

        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
        if device == "auto" and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    try:
        meta = dm.build_cache(rank=rank, world_size=world, device=device)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    if rank == 0:
        print(f"latent cache ready: {dm.cache_dir} ({meta['count']} images x 2 flips, "
              f"{meta['num_failed']} skipped, vae {meta['vae']}, resolution {meta['resolution']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
