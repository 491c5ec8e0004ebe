"""FID during training (Lightning callback) and the sampling/measuring loop that evaluate.py shares.

Which samples exist depends only on (seed, global sample index): sample i gets its initial noise and
class label from a generator seeded by (seed, i), and a chunk of samples [start, end) gets the sampler's
own randomness from (seed, start). Chunks are dealt to ranks round-robin, so ranks never duplicate a
sample and the set of samples is the same for 1 or 64 processes (for stochastic samplers, as long as
the chunk size, i.e. batch_size, is the same).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from tqdm import tqdm

from callbacks.features import default_cache_dir
from callbacks.fid_stats import (
    ADM_IS_SPLIT_SIZE,
    FeatureStats,
    InceptionScoreStats,
    _all_reduce_sum,
    _dist_world,
    frechet_distance,
    load_stats,
    quantize,
    save_stats,
)

GenerateFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def mix_seed(seed: int, index: int, stream: int = 0) -> int:
    """A well-mixed 63-bit seed per (seed, index, stream); seed + index would make runs overlap."""
    return int(np.random.SeedSequence([int(seed), int(index), int(stream)]).generate_state(2, np.uint64)[0] >> 1)


def metric_name(num_samples: int, prefix: str = "") -> str:
    """fid_10k / fid_50k for round thousands, fid_<n> otherwise."""
    k = f"{num_samples // 1000}k" if num_samples % 1000 == 0 else str(num_samples)
    return f"{prefix}fid_{k}"


def chunk_bounds(num_samples: int, chunk_size: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) chunks covering 0..num_samples-1."""
    if num_samples < 1 or chunk_size < 1:
        raise ValueError(f"num_samples ({num_samples}) and batch_size ({chunk_size}) must be >= 1")
    return [(s, min(s + chunk_size, num_samples)) for s in range(0, num_samples, chunk_size)]


def chunks_for_rank(num_samples: int, chunk_size: int, rank: int, world_size: int) -> list[tuple[int, int, int]]:
    """(chunk id, start, end) of the chunks this rank generates: every world_size-th, disjoint by construction."""
    return [(c, s, e) for c, (s, e) in enumerate(chunk_bounds(num_samples, chunk_size)) if c % world_size == rank]


def noise_and_labels(start: int, end: int, shape: tuple[int, ...], num_classes: int,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial noise [B, *shape] and uniform labels [B] of samples start..end-1, each from its own seed."""
    noise, labels = [], []
    for i in range(start, end):
        g = torch.Generator().manual_seed(mix_seed(seed, i))
        labels.append(torch.randint(num_classes, (1,), generator=g))
        noise.append(torch.randn(1, *shape, generator=g))
    return torch.cat(noise), torch.cat(labels)


@torch.no_grad()
def generate_chunk(generate: GenerateFn, decode: Callable[[torch.Tensor], torch.Tensor], start: int, end: int,
                   shape: tuple[int, ...], num_classes: int, seed: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples start..end-1 as uint8 images [B, C, H, W] on the CPU (DiT's quantisation) and their labels."""
    noise, labels = noise_and_labels(start, end, shape, num_classes, seed)
    gen = torch.Generator(device=device).manual_seed(mix_seed(seed, start, stream=1))
    x = generate(noise.to(device), labels.to(device), gen)
    return quantize(decode(x)).cpu(), labels


class MetricAccumulator:
    """FID sums, IS split sums and class-consistency counts for one rank's share; finalize() combines ranks."""

    def __init__(self, extractor: torch.nn.Module, num_samples: int, device: torch.device | str = "cpu",
                 prefix: str | None = None, is_split_size: int = ADM_IS_SPLIT_SIZE):
        self.extractor = extractor
        self.num_samples = num_samples
        self.device = torch.device(device)
        self.prefix = prefix if prefix is not None else ("digits_" if extractor.logits_are_data_classes else "")
        self.stats = FeatureStats(extractor.feature_dim, device=self.device)
        self.is_stats = (InceptionScoreStats(num_samples, extractor.num_logits, is_split_size)
                         if extractor.num_logits and not extractor.logits_are_data_classes else None)
        self.correct = 0
        self.counted = 0

    @torch.no_grad()
    def update(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        """Add uint8 images with the labels they were conditioned on and their global sample indices."""
        feats, logits = self.extractor(images.to(self.device))
        self.stats.update(feats)
        if self.is_stats is not None:
            self.is_stats.update(logits, indices)
        if self.extractor.logits_are_data_classes:
            self.correct += int((logits.argmax(1).cpu() == labels.cpu()).sum())
            self.counted += len(labels)

    def finalize(self, ref: dict | None) -> dict:
        """All-reduce the sums (every rank must call this) and return the metrics."""
        self.stats.all_reduce()
        out = {"num_samples": self.stats.count}
        mu, sigma = self.stats.mean(), self.stats.cov()
        if ref is not None:
            out[metric_name(self.stats.count, self.prefix)] = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
        if self.is_stats is not None:
            out["inception_score"] = self.is_stats.all_reduce().score()
        if self.extractor.logits_are_data_classes:
            total = _all_reduce_sum(torch.tensor([float(self.correct), float(self.counted)], dtype=torch.float64))
            out[f"{self.prefix}class_accuracy"] = float(total[0] / total[1])
        out["_mu"], out["_sigma"] = mu, sigma
        return out


@torch.no_grad()
def reference_stats_from_datamodule(datamodule, extractor: torch.nn.Module, device: torch.device,
                                    max_images: int | None = None, batch_size: int = 256,
                                    progress: bool = True) -> dict:
    """Reference mu/sigma from the real training data, decoded like samples are (every rank takes a share)."""
    datamodule.setup("fit")
    dataset = datamodule.train_dataloader().dataset  # sequential, without the loader's shuffle or drop_last
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    rank, world = _dist_world()
    stats = FeatureStats(extractor.feature_dim, device=device)
    starts = [s for i, s in enumerate(range(0, n, batch_size)) if i % world == rank]
    for s in tqdm(starts, desc="reference stats", unit="batch", disable=not progress or rank != 0):
        idx = list(range(s, min(s + batch_size, n)))
        if hasattr(dataset, "__getitems__"):  # batched fast path (LatentDataset)
            x = dataset.__getitems__(idx)[0]
        else:
            x = torch.stack([dataset[i][0] for i in idx])
        x = x.to(device)
        stats.update(extractor(quantize(datamodule.decode(x)))[0])
    stats.all_reduce()
    return {"mu": stats.mean(), "sigma": stats.cov(), "count": stats.count, "extractor": extractor.name}


def default_ref_path(extractor_name: str, data_cfg: dict) -> str:
    """<cache>/ref_stats/<extractor>-<hash of the data settings that change images>.npz, shared by runs."""
    ignore = {"batch_size", "num_workers", "drop_last", "pin_memory", "persistent_workers"}
    keep = {k: v for k, v in sorted(data_cfg.items()) if k not in ignore}
    digest = hashlib.sha1(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return str(default_cache_dir() / "ref_stats" / f"{extractor_name}-{digest}.npz")


def get_reference(path: str | None, extractor: torch.nn.Module, datamodule, device: torch.device,
                  compute_if_missing: bool, max_images: int | None, batch_size: int) -> dict:
    """Load reference stats, or compute them once from the datamodule and save them (rank 0 writes)."""
    if path and Path(path).is_file():
        return load_stats(path, extractor.name)
    if not compute_if_missing or datamodule is None:
        raise FileNotFoundError(f"reference statistics {path} do not exist; set ref_stats to an .npz with mu/sigma "
                                "(e.g. ADM's VIRTUAL_imagenet256_labeled.npz) or compute_ref_if_missing=true")
    ref = reference_stats_from_datamodule(datamodule, extractor, device, max_images, batch_size)
    if path and _dist_world()[0] == 0:
        save_stats(path, ref["mu"], ref["sigma"], ref["count"], ref["extractor"])
        rank_zero_info(f"[fid] reference statistics of {ref['count']} real images saved to {path}")
    return ref


def module_generate_fn(module, sampler: str | None, num_steps: int | None, cfg_scale: float) -> GenerateFn:
    """Sampling through GenerativeModule.generate (always the EMA weights) with fixed sampler settings."""
    def generate(noise: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return module.generate(noise, labels, generator=generator, sampler=sampler, num_steps=num_steps,
                               cfg_scale=cfg_scale)
    return generate


def sampler_settings(objective, sampler: str | None, num_steps: int | None, cfg_scale: float) -> dict:
    """The sampler, steps and cfg scale actually used (None means the objective's defaults)."""
    return {"sampler": sampler or objective.default_sampler,
            "num_steps": int(num_steps if num_steps is not None else objective.default_num_steps),
            "cfg_scale": float(cfg_scale)}


def build_extractor(extractor, device: torch.device) -> torch.nn.Module:
    """An extractor given as a module, or a Hydra config with _target_."""
    if isinstance(extractor, torch.nn.Module):
        return extractor.to(device).eval()
    from hydra.utils import instantiate
    return instantiate(extractor).to(device).eval()


class FIDCallback(Callback):
    """Every `every_n_steps` and/or at the end of training: sample with EMA weights, measure FID, log it.

    Logged as fid/<name> (fid/fid_10k, fid/inception_score; digits: fid/digits_fid_2k, fid/digits_class_accuracy)
    plus fid/num_steps and fid/cfg_scale; the sampler name is printed with the result.
    """

    def __init__(self, num_samples: int = 10000, batch_size: int = 250, every_n_steps: int = 0,
                 at_train_end: bool = True, sampler: str | None = None, num_steps: int | None = None,
                 cfg_scale: float = 1.0, seed: int = 0, extractor=None, ref_stats: str | None = None,
                 compute_ref_if_missing: bool = True, ref_max_images: int | None = None, progress: bool = True):
        super().__init__()
        if extractor is None:
            raise ValueError("callbacks.fid.extractor must be set (an Inception or digits extractor config)")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.every_n_steps, self.at_train_end = every_n_steps, at_train_end
        self.sampler, self.num_steps, self.cfg_scale = sampler, num_steps, cfg_scale
        self.seed, self.progress = seed, progress
        self.extractor_cfg = extractor
        self.ref_stats, self.compute_ref_if_missing, self.ref_max_images = ref_stats, compute_ref_if_missing, ref_max_images
        self.extractor: torch.nn.Module | None = None
        self.ref: dict | None = None
        self.last_metrics: dict = {}
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_train_end and trainer.global_step != self._last_step:
            self.measure(trainer, pl_module)

    def measure(self, trainer, pl_module) -> dict:
        """Generate this rank's share, combine statistics over ranks, log and return the metrics."""
        device = pl_module.device
        self._last_step = trainer.global_step
        if self.extractor is None:
            self.extractor = build_extractor(self.extractor_cfg, device)
        dm = trainer.datamodule
        if self.ref is None:
            path = self.ref_stats
            run_cfg = pl_module.hparams.get("cfg") or {}
            if path is None and "data" in run_cfg:
                path = default_ref_path(self.extractor.name, run_cfg["data"])
            self.ref = get_reference(path, self.extractor, dm, device, self.compute_ref_if_missing,
                                     self.ref_max_images, self.batch_size)
        rank, world = _dist_world()
        shape = (dm.channels, dm.image_size, dm.image_size)
        generate = module_generate_fn(pl_module, self.sampler, self.num_steps, self.cfg_scale)
        acc = MetricAccumulator(self.extractor, self.num_samples, device)
        chunks = chunks_for_rank(self.num_samples, self.batch_size, rank, world)
        was_training = pl_module.training
        pl_module.eval()
        t0 = time.time()
        bar = tqdm(total=sum(e - s for _, s, e in chunks), desc=f"FID samples (rank {rank})", unit="sample",
                   disable=not self.progress or rank != 0)
        for _, s, e in chunks:
            images, labels = generate_chunk(generate, dm.decode, s, e, shape, dm.num_classes, self.seed, device)
            acc.update(images, labels, torch.arange(s, e))
            bar.update(e - s)
        bar.close()
        pl_module.train(was_training)
        metrics = acc.finalize(self.ref)
        metrics.pop("_mu"), metrics.pop("_sigma")
        metrics.update(sampler_settings(pl_module.objective, self.sampler, self.num_steps, self.cfg_scale))
        metrics["fid_seconds"] = time.time() - t0
        self.last_metrics = metrics
        numeric = {f"fid/{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        if trainer.logger is not None and rank == 0:
            trainer.logger.log_metrics(numeric, step=trainer.global_step)
        summary = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        note = " (digits-FID: small digits CNN features, NOT Inception FID)" if self.extractor.logits_are_data_classes else ""
        rank_zero_only(print)(f"[fid] step {trainer.global_step}: {summary}{note}")
        return metrics
