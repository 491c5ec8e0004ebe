"""LatentImageNet: images -> ADM crop -> VAE -> latent cache on disk (built once) -> (x, y) batches of latents.

Build the cache before training (training never encodes; see docs/DATA.md):
  python -m datamodules.latent_imagenet encode [--verify] [--retry-failed] data.root=/data/imagenet [data.*=...]
  torchrun --standalone --nproc_per_node=8 -m datamodules.latent_imagenet encode data.root=...   # one node
  srun python -m datamodules.latent_imagenet encode data.root=...         # SLURM: SLURM_PROCID/NTASKS/LOCALID
  python -m datamodules.latent_imagenet verify [data.*=...]               # read-only check; exit 1 if damaged
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from datamodules.image_sources import SOURCES, make_source
from datamodules.latent_cache import (
    LAYOUTS,
    CacheCorruptError,
    CacheIncompleteError,
    CacheMismatchError,
    CacheSpec,
    TooManyFailuresError,
    build_cache,
    check_compatible,
    is_complete,
    open_cache_arrays,
    read_metadata,
    verify_cache,
)
from datamodules.vae import VAE, VAEUnavailableError, _resolve_dtype, check_vae_available
from datamodules.vae_presets import check_preset, vae_preset
from workflow.data_order import ResumableLoader, ignore_scheduler_signals

MASK32 = np.uint64(0xFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 (a bijection; wraps mod 2^64): well-mixed bits from a counter."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def fmix32(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer on uint64 holding 32-bit values (a bijection on 32 bits)."""
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x85EBCA6B)) & MASK32
    x = x ^ (x >> np.uint64(13))
    x = (x * np.uint64(0xC2B2AE35)) & MASK32
    return x ^ (x >> np.uint64(16))


class LatentDataset(Dataset):
    """Items of the cache: a random flip and (optionally) a fresh posterior sample, normalised (z - shift) * scale.

    The flip and the posterior noise of an item are a function of (seed, pass, item) alone, so a run resumed in
    the middle of a pass reads bit-identical batches whatever num_workers: the training sampler yields
    EpochItem(pass, index); a bare index reads as pass 0. `reference_items` reads without either (reference
    statistics).
    """

    keyed_by_epoch = True  # ResumableSampler yields EpochItem(pass, index)

    def __init__(self, cache_dir: str | os.PathLike, scale_factor: float, sample_posterior: bool = True,
                 random_flip: bool = True, indices: np.ndarray | None = None, seed: int = 0,
                 shift_factor: float = 0.0):
        self.cache_dir = Path(cache_dir)
        self.meta = read_metadata(cache_dir)
        self.scale_factor, self.shift_factor = float(scale_factor), float(shift_factor)
        self.sample_posterior = sample_posterior
        self.random_flip = random_flip
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        if self.indices is not None and len(self.indices) and not 0 <= self.indices.min() <= self.indices.max() < self.meta["count"]:
            raise IndexError(f"indices must lie in 0..{self.meta['count'] - 1}")
        self.seed = int(seed)
        self._arrays = None
        self._scratch: dict[str, np.ndarray] = {}

    def __getstate__(self):
        """Memory maps are reopened in each worker; pickling them would copy the whole cache."""
        state = dict(self.__dict__)
        state["_arrays"] = None
        state["_scratch"] = {}
        return state

    def _counters(self, epochs: np.ndarray, items: np.ndarray) -> np.ndarray:
        """The place of each read in the run's sequence of reads, epoch * len + item (uint64): distinct for every
        (pass, item), so no two reads of a run share a draw (noise seeds repeat after 2^32 reads: 3,355 ImageNet
        passes)."""
        return epochs.astype(np.uint64) * np.uint64(len(self)) + items.astype(np.uint64)

    def _flips(self, counters: np.ndarray) -> np.ndarray:
        """0/1 per read: the top bit of splitmix64(counter ^ seed's own splitmix64)."""
        key = splitmix64(np.array([self.seed], dtype=np.uint64))
        return (splitmix64(counters ^ key) >> np.uint64(63)).astype(np.int64)

    def _noise(self, counters: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
        """Standard normal [B, *shape] float32: row b from a generator seeded by a 32-bit bijective mix of
        (seed, counter) (torch's CPU generator keeps 32 bits of a seed; a bijection keeps the seeds of a run's
        reads distinct). Never touches the global RNG."""
        key = fmix32(np.array([self.seed], dtype=np.uint64) & MASK32)
        seeds = fmix32((counters + key) & MASK32).tolist()
        eps = torch.empty(len(seeds), *shape, dtype=torch.float32)
        gen = torch.Generator()
        for row, seed in zip(eps, seeds):
            row.normal_(generator=gen.manual_seed(seed))
        return eps

    def _open(self):
        """Open (once per process) the memory-mapped arrays, every length checked against the metadata, and
        the map item -> row (rows of unreadable images are left out)."""
        if self._arrays is None:
            names = ("mean", "std") if self.sample_posterior else ("mean",)
            arrays = open_cache_arrays(self.cache_dir, self.meta, names)
            labels = np.asarray(arrays["labels"])
            rows = np.flatnonzero(labels >= 0) if self.meta["num_failed"] else None
            if self.indices is not None:
                rows = self.indices if rows is None else rows[self.indices]
            self._arrays = (arrays["mean"], arrays.get("std"), labels, rows)
        return self._arrays

    def __len__(self) -> int:
        return self.meta["count"] if self.indices is None else len(self.indices)

    def __getitems__(self, items: list) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch with one vectorised gather (the DataLoader fast path): (x [B,C,H,W], y [B]).
        items: EpochItem(pass, index) pairs (the training sampler) or bare indices (pass 0)."""
        if len(items) and isinstance(items[0], tuple):
            epochs, index = np.asarray(items, dtype=np.int64).reshape(-1, 2).T
        else:
            index = np.asarray(items, dtype=np.int64).reshape(-1)
            epochs = np.zeros_like(index)
        counters = self._counters(epochs, index) if self.random_flip or self.sample_posterior else None
        flips = self._flips(counters) if self.random_flip else np.zeros(len(index), dtype=np.int64)
        return self._read(index, flips, counters if self.sample_posterior else None)

    def reference_items(self, items: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) like __getitems__ but deterministic: the posterior means of the unflipped images (what reference
        statistics read, so a computed reference is bit-reproducible)."""
        index = np.asarray(items, dtype=np.int64).reshape(-1)
        return self._read(index, np.zeros(len(index), dtype=np.int64), None)

    def _read(self, index: np.ndarray, flips: np.ndarray, counters: np.ndarray | None):
        """Items `index` (flip 0/1 each), z = mean + std * noise(counters) or the mean when counters is None."""
        mean, std, labels, row_of = self._open()
        rows = index
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"latent index out of range 0..{len(self) - 1}: {rows.min()}..{rows.max()}")
        if row_of is not None:
            rows = row_of[rows]
        flat_rows = rows * 2 + flips  # row of (item, flip) in the [N*2, C*H*W] view
        mu = torch.from_numpy(self._gather(mean, flat_rows, "mean"))
        if counters is not None:
            # fp32 noise times the fp16 std, plus the fp16 mean, in place: the cheapest exact form on CPU.
            x = self._noise(counters, mu.shape[1:])
            x.mul_(torch.from_numpy(self._gather(std, flat_rows, "std"))).add_(mu)
        else:
            x = mu.float()
        if self.shift_factor:
            x.sub_(self.shift_factor)
        x.mul_(self.scale_factor)
        return x.view(len(rows), *mean.shape[2:]), torch.from_numpy(labels[rows])

    def _gather(self, array: np.ndarray, flat_rows: np.ndarray, name: str) -> np.ndarray:
        """Rows of the [N*2, C*H*W] view into a reused scratch buffer (fresh buffers cost page faults).
        Every row is in range (items checked above, arrays checked against the metadata at open), so "wrap"
        never wraps; it only avoids the buffered copy numpy makes for mode="raise" (2x slower)."""
        buf = self._scratch.get(name)
        if buf is None or buf.shape[0] != len(flat_rows):
            buf = self._scratch[name] = np.empty((len(flat_rows), int(np.prod(array.shape[2:]))), array.dtype)
        np.take(array.reshape(-1, buf.shape[1]), flat_rows, axis=0, out=buf, mode="wrap")
        return buf

    def __getitem__(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([index])
        return x[0], y[0]


def collate_latents(batch):
    """Pass through a batch built by __getitems__; collate a list of single items as usual."""
    if isinstance(batch, tuple):
        return batch
    return default_collate(batch)


class LatentImageNetDataModule(L.LightningDataModule):
    """ImageNet as VAE latents read from a memory-mapped cache; (x, y) batches like digits."""

    def __init__(
        self,
        root: str | None = None,
        cache_dir: str = "data/latents/imagenet256_train_sd-vae-ft-ema",
        split: str = "train",
        source: str = "image_folder",
        labels_file: str | None = None,
        image_column: str = "image",
        label_column: str = "label",
        vae="sd-vae-ft-ema",
        vae_local_path: str | None = None,
        vae_dtype: str = "float32",
        layout: str = "mean_std",
        resolution: int = 256,
        image_size: int = 32,
        channels: int | None = None,
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
        max_failed_fraction: float = 0.001,
        progress: bool = True,
    ):
        super().__init__()
        if isinstance(vae, VAE):  # a built VAE (tests, benchmarks): its own normalisation and shape
            self.vae_cfg = {"name": vae.name, "scale": vae.scale_factor, "shift": vae.shift_factor,
                            "channels": vae.latent_channels, "downsample": vae.downsample}
        else:
            self.vae_cfg = check_preset(vae_preset(vae) if isinstance(vae, str) else dict(vae))
        channels = self.vae_cfg["channels"] if channels is None else int(channels)
        if channels != self.vae_cfg["channels"]:
            raise ValueError(f"data.channels={channels} but data.vae ({self.vae_cfg['name']}) has "
                             f"{self.vae_cfg['channels']} latent channels; leave data.channels at ${{data.vae.channels}}")
        if image_size * self.vae_cfg["downsample"] != resolution:
            raise ValueError(f"data.image_size={image_size} must be data.resolution/data.vae.downsample="
                             f"{resolution / self.vae_cfg['downsample']:g}")
        if layout not in LAYOUTS:
            raise ValueError(f"data.layout={layout!r} is not one of {list(LAYOUTS)}")
        if sample_posterior and layout == "mean":
            raise ValueError("data.sample_posterior=true needs data.layout=mean_std (layout mean stores no posterior "
                             "std); set data.sample_posterior=false or data.layout=mean_std")
        if source not in SOURCES:
            raise ValueError(f"data.source={source!r} is not one of {list(SOURCES)}")
        _resolve_dtype(vae_dtype)
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be >= 1")
        if val_size < 0:
            raise ValueError(f"data.val_size={val_size} must be >= 0")
        if not 0 <= max_failed_fraction <= 1:
            raise ValueError(f"data.max_failed_fraction={max_failed_fraction} must lie in [0, 1]")
        self.root, self.cache_dir, self.split = root, cache_dir, split
        self.source_kind, self.source_opts = source, {"labels_file": labels_file, "image_column": image_column,
                                                      "label_column": label_column}
        self.vae, self.vae_local_path, self.vae_dtype, self.layout = vae, vae_local_path, vae_dtype, layout
        self.vae_name = self.vae_cfg["name"]
        self.scale_factor, self.shift_factor = float(self.vae_cfg["scale"]), float(self.vae_cfg["shift"])
        self.resolution = int(resolution)
        self.image_size, self.channels, self.num_classes = int(image_size), channels, int(num_classes)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory, self.drop_last = pin_memory, drop_last
        self.sample_posterior, self.random_flip = sample_posterior, random_flip
        self.val_size, self.seed = val_size, seed
        self.shuffle_seed = shuffle_seed
        self.encode_batch_size, self.encode_num_workers = encode_batch_size, encode_num_workers
        self.encode_device, self.shard_size = encode_device, shard_size
        self.max_failed_fraction, self.progress = max_failed_fraction, progress
        self.train_set: LatentDataset | None = None
        self.val_set: LatentDataset | None = None
        self._decoder: VAE | None = None

    @property
    def spec(self) -> CacheSpec:
        """The settings a cache must have been built with to be used by this config."""
        return CacheSpec(vae=self.vae_name, scale_factor=self.scale_factor, shift_factor=self.shift_factor,
                         resolution=self.resolution, shard_size=self.shard_size, layout=self.layout,
                         encode_dtype=self.vae_dtype)

    def image_source(self):
        """Where the images come from (data.source over data.root / data.split)."""
        if not self.root:
            raise FileNotFoundError(
                f"data.root is not set: set data.root=/path/to/imagenet (data.source={self.source_kind}, "
                f"data.split={self.split}) to build the latent cache in data.cache_dir={self.cache_dir!r}"
            )
        return make_source(self.source_kind, self.root, self.split, **self.source_opts)

    def encode_command(self, flags: str = "") -> str:
        """The `make latents` line that builds the cache this config reads."""
        args = [flags] if flags else []
        args += [f"data.root={self.root or '/path/to/imagenet'}", f"data.cache_dir={self.cache_dir}"]
        if self.split != "train":
            args.append(f"data.split={self.split}")
        if self.source_kind != "image_folder":
            args.append(f"data.source={self.source_kind}")
        if self.vae_name != "sd-vae-ft-ema" and not isinstance(self.vae, VAE):
            args.append(f"data/vae={self.vae_name}")
        if self.layout != "mean_std":
            args.append(f"data.layout={self.layout}")
        return f'make latents ARGS="{" ".join(args)}"'

    def build_vae(self, device: str | torch.device | None = None) -> VAE:
        """The VAE wrapper (a passed-in one is reused; a preset's hub id / local folder is loaded now)."""
        if device is None or str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if isinstance(self.vae, VAE):
            return self.vae.to(device)
        cfg = self.vae_cfg
        vae = VAE(cfg["hub_id"], local_path=self.vae_local_path, scale_factor=cfg["scale"], shift_factor=cfg["shift"],
                  device=device, dtype=self.vae_dtype, name=cfg["name"], subfolder=cfg["subfolder"],
                  revision=cfg["revision"])
        if vae.latent_channels != cfg["channels"] or vae.downsample != cfg["downsample"]:
            raise ValueError(f"data.vae ({cfg['name']}) says {cfg['channels']} channels / downsample "
                             f"{cfg['downsample']}, the loaded weights have {vae.latent_channels} / {vae.downsample}")
        return vae

    def build_cache(self, rank: int = 0, world_size: int = 1, device: str | torch.device | None = None,
                    retry_failed: bool = False, verify: bool = False, on_shard_written=None) -> dict:
        """Encode this rank's shards of the source into cache_dir (resuming, verifying), finalize on rank 0."""
        device = device or self.encode_device
        return build_cache(
            self.image_source(), self.cache_dir, self.spec, functools.partial(self.build_vae, device),
            batch_size=self.encode_batch_size, num_workers=self.encode_num_workers, rank=rank,
            world_size=world_size, progress=self.progress, retry_failed=retry_failed, verify=verify,
            max_failed_fraction=self.max_failed_fraction, encode_command=self.encode_command(),
            on_shard_written=on_shard_written,
        )

    def missing_cache_error(self) -> CacheIncompleteError:
        """What to run when the cache is missing (training never builds it)."""
        return CacheIncompleteError(
            f"no complete latent cache at data.cache_dir={self.cache_dir!r} (metadata.json missing); training never "
            f"encodes. Build it first: {self.encode_command()} (for all GPUs of a node add LAUNCH=\".venv/bin/torchrun "
            f"--standalone --nproc_per_node=8 --no-python\"; under SLURM LAUNCH=srun). docs/DATA.md has the details."
        )

    def prepare_data(self) -> None:
        """Training never encodes: with the cache missing, fail at once (8 GPUs waiting on one encoder would
        hit the NCCL timeout long before ImageNet is done) and say how to build it."""
        if not is_complete(self.cache_dir):
            raise self.missing_cache_error()

    def setup(self, stage: str | None = None) -> None:
        """Open the cache and check it against the config (VAE, scale, shift, crop, layout, split/root, shapes)."""
        if self.train_set is not None:
            return
        if not is_complete(self.cache_dir):  # every rank, also those that skip prepare_data
            raise self.missing_cache_error()
        meta = read_metadata(self.cache_dir)
        where = repr(str(self.cache_dir))
        source = self.image_source().identity() if self.root else {"split": self.split}  # root: optional here
        check_compatible(meta, self.spec, where, source=source, source_keys=tuple(source))
        want = [2, self.channels, self.image_size, self.image_size]
        if list(meta["latent_shape"]) != want:
            raise ValueError(f"latent cache {self.cache_dir!r} holds latents of shape {meta['latent_shape'][1:]} but "
                             f"data.channels={self.channels}, data.image_size={self.image_size} ask for {want[1:]}")
        if meta["num_classes"] > self.num_classes:
            raise ValueError(f"latent cache {self.cache_dir!r} has {meta['num_classes']} classes but "
                             f"data.num_classes={self.num_classes}")
        if not isinstance(self.vae, VAE):  # decode needs it later (sample grids, FID): fail now, not at step 10,000
            check_vae_available(self.vae_cfg["hub_id"], self.vae_local_path, self.vae_cfg["subfolder"])
        if self.val_size >= meta["count"]:
            raise ValueError(f"data.val_size={self.val_size} must be smaller than the cache ({meta['count']} latents)")
        open_cache_arrays(self.cache_dir, meta, ("mean", "std") if self.sample_posterior else ("mean",))
        train_idx = val_idx = None
        if self.val_size:
            perm = np.random.default_rng(self.seed).permutation(meta["count"])
            train_idx, val_idx = np.sort(perm[self.val_size:]), np.sort(perm[:self.val_size])
        self.train_set = LatentDataset(self.cache_dir, self.scale_factor, self.sample_posterior, self.random_flip,
                                       indices=train_idx, seed=self.shuffle_seed, shift_factor=self.shift_factor)
        if val_idx is not None:  # bare indices: pass 0's fixed noise at every validation
            self.val_set = LatentDataset(self.cache_dir, self.scale_factor, self.sample_posterior, False,
                                         indices=val_idx, seed=self.shuffle_seed, shift_factor=self.shift_factor)

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
        """Normalised latents -> images in [-1, 1] through the VAE decoder (built on first use, on x's device);
        the decoder's weights must be the ones that encoded the cache."""
        if self._decoder is None:
            decoder = self.build_vae(x.device)
            encoded_by = (read_metadata(self.cache_dir).get("vae_weights") or {}) if is_complete(self.cache_dir) else {}
            if encoded_by.get("sha256") not in (None, decoder.weights_info["sha256"]):
                raise CacheMismatchError(
                    f"the VAE loaded for decoding ({decoder.weights_info}) is not the one that encoded "
                    f"{self.cache_dir!r} ({encoded_by}); set data.vae_local_path / data.vae.revision to those weights"
                )
            self._decoder = decoder
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


def launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) under torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or srun (SLURM_PROCID,
    SLURM_STEP_NUM_TASKS, SLURM_LOCALID; MASTER_ADDR/PORT derived as Lightning does); (0, 1, 0) otherwise.
    A bare sbatch script also carries SLURM_PROCID=0 and SLURM_NTASKS, so only srun's step variables count."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        from lightning.fabric.plugins.environments import SLURMEnvironment

        if "MASTER_ADDR" not in env:  # the first node of the step, and a port from the job id (Lightning's rule)
            env["MASTER_ADDR"] = SLURMEnvironment.resolve_root_node_address(env.get("SLURM_NODELIST", "127.0.0.1"))
        if "MASTER_PORT" not in env:
            env["MASTER_PORT"] = str(15000 + int(env["SLURM_JOB_ID"][-4:]) if "SLURM_JOB_ID" in env else 12910)
        return int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", 0))
    if int(env.get("SLURM_NTASKS", 1)) > 1:
        print(f"latent cache: SLURM_NTASKS={env['SLURM_NTASKS']} but this process was not started by srun: encoding "
              f"in one process (launch with `srun` to use every task)", file=sys.stderr)
    return 0, 1, 0


def main(argv: list[str] | None = None) -> int:
    """`encode [--verify] [--retry-failed] [overrides]` builds the cache (each rank takes shards r::world);
    `verify [overrides]` checks a finished one. Known failures print one message (no traceback), exit 1."""
    parser = argparse.ArgumentParser(prog="python -m datamodules.latent_imagenet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["encode", "verify"])
    parser.add_argument("--verify", action="store_true", help="encode: re-check every shard of a finished cache "
                        "(checksums, finiteness) and re-encode the damaged ones")
    parser.add_argument("--retry-failed", action="store_true", help="encode: re-read the images that failed before")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.root=/data/imagenet data/vae=sd3")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        dm = datamodule_from_config(compose_data_config(args.overrides))
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        print(f"latent cache: config error: {err}", file=sys.stderr)
        return 2
    try:
        if args.command == "verify":
            if not is_complete(dm.cache_dir):
                raise dm.missing_cache_error()
            problems = verify_cache(dm.cache_dir, dm.progress)
            for problem in problems:
                print(f"latent cache: {problem}", file=sys.stderr)
            if problems:
                print(f"latent cache {dm.cache_dir}: damaged. Fix: {dm.encode_command('--verify')}"
                      f" re-encodes the damaged shards", file=sys.stderr)
                return 1
            meta = read_metadata(dm.cache_dir)
            print(f"latent cache {dm.cache_dir}: ok ({meta['count']} images, {meta['num_files']} rows, every shard "
                  f"matches its checksum, all finite)")
            return 0
        rank, world, local_rank = launch_env()
        device = dm.encode_device
        if device == "auto" and torch.cuda.is_available():
            device = f"cuda:{local_rank}"
        if world > 1:
            import datetime

            torch.distributed.init_process_group("gloo", rank=rank, world_size=world,
                                                 timeout=datetime.timedelta(hours=48))
        try:
            meta = dm.build_cache(rank=rank, world_size=world, device=device, retry_failed=args.retry_failed,
                                  verify=args.verify)
        finally:
            if world > 1:
                torch.distributed.destroy_process_group()
    except (CacheCorruptError, CacheIncompleteError, CacheMismatchError, TooManyFailuresError, VAEUnavailableError,
            FileNotFoundError, ValueError) as err:
        print(f"latent cache: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if rank == 0:
        print(f"latent cache ready: {dm.cache_dir} ({meta['count']} images x 2 flips, {meta['num_failed']} skipped, "
              f"vae {meta['vae']} sha256 {meta['vae_weights']['sha256'][:12]}, resolution {meta['resolution']}, "
              f"layout {meta['layout']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
