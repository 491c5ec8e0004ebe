"""LatentImageNet throughput: latents/s read by the datamodule from a warm cache, and images/s encoded; JSON.

Encode: synthetic JPEGs (ImageNet-like 500x375) -> ADM crop -> VAE (both flips) -> shards -> cache. Without
--vae the VAE is a tiny random AutoencoderKL (the JSON says so): the number then measures the pipeline
(JPEG decode, crop, sharding, writing), not the SD VAE, whose throughput needs a GPU.
Read: the encoded latents tiled to --read-count entries, read once to warm the page cache, then the
datamodule's train_dataloader is drained for --read-seconds (target >= 20,000 latents/s per process).

    python benchmarks/latent_loader.py --out results/latent_loader.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from benchmarks.common import machine_info, write_json  # noqa: E402
from datamodules.adm_crop import preprocess  # noqa: E402
from datamodules.image_sources import ImageFolderSource  # noqa: E402
from datamodules.latent_cache import CacheSpec, encode_shards, finalize_cache  # noqa: E402
from datamodules.latent_imagenet import LatentImageNetDataModule  # noqa: E402
from datamodules.vae import VAE, build_tiny_autoencoder  # noqa: E402

TARGET_LATENTS_PER_S = 20_000
TINY_LEVELS = 4  # downsampling 8, as the SD VAE, so latents are 4 x resolution/8 x resolution/8


def write_images(folder: Path, count: int, size: tuple[int, int], classes: int = 4) -> None:
    """Smooth random JPEGs (gradients plus mild noise) so decoding costs what photos cost, roughly."""
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(count):
        wnid = folder / f"n{i % classes:08d}"
        wnid.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(0.2, 2.0, 3)
        base = np.stack([np.sin(xx / (17 * a)), np.cos(yy / (23 * b)), np.sin((xx + yy) / (31 * c))], -1)
        arr = (base * 90 + 128 + rng.normal(0, 8, (h, w, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(wnid / f"img_{i:06d}.JPEG", quality=90)


def bench_encode(work: Path, args) -> tuple[dict, Path, VAE]:
    """Encode a synthetic ImageFolder into a cache; images/s over the sharded encode."""
    image_dir = work / "train"
    write_images(image_dir, args.encode_images, (500, 375))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.vae:
        vae = VAE(args.vae, local_path=args.vae_local_path, device=device)
        label = f"{args.vae} (real SD VAE)"
    else:
        vae = VAE(build_tiny_autoencoder(levels=TINY_LEVELS), device=device, name="tiny-random")
        label = (f"tiny random AutoencoderKL (levels={TINY_LEVELS}, widths 8-16, {sum(p.numel() for p in vae.model.parameters())}"
                 f" params), NOT the SD VAE: measures decode/crop/shard/write, not SD-VAE compute (needs a GPU)")
    spec = CacheSpec(vae=vae.name, scale_factor=vae.scale_factor, shift_factor=vae.shift_factor,
                     resolution=args.resolution, shard_size=args.shard_size, encode_dtype=vae.dtype_name)
    cache = work / "cache"
    warm = torch.zeros(2 * args.encode_batch_size, 3, args.resolution, args.resolution)  # both flips of a batch
    vae.encode_moments(warm.to(vae.device))  # first call builds kernels (oneDNN/cuDNN): keep it out of the timing
    start = time.perf_counter()
    encode_shards(ImageFolderSource(work, "train"), cache, spec, vae, batch_size=args.encode_batch_size,
                  num_workers=args.encode_workers, progress=False)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    finalize_cache(cache, progress=False)  # verifies every shard's checksum and computes the channel stats
    finalize_s = time.perf_counter() - start
    files = sorted(image_dir.rglob("*.JPEG"))
    cpu = time.process_time()
    for path in files:  # the CPU side of encoding (JPEG decode + ADM crop), what DataLoader workers do
        preprocess(path, args.resolution)
    preprocess_rate = len(files) / (time.process_time() - cpu)
    result = {
        "vae": label, "vae_is_sd_vae": bool(args.vae), "device": device, "dtype": str(vae.dtype),
        "resolution": args.resolution, "source_image_size": [500, 375], "images": args.encode_images,
        "batch_size": args.encode_batch_size, "num_workers": args.encode_workers, "shard_size": args.shard_size,
        "encode_seconds": encode_s, "finalize_seconds": finalize_s, "finalize": "sha256 of every shard + channel stats",
        "images_per_s": args.encode_images / encode_s, "latents_per_s": 2 * args.encode_images / encode_s,
        "preprocess_images_per_cpu_s": preprocess_rate, "load_average_1min": os.getloadavg()[0],
    }
    return result, cache, vae


def tile_cache(src: Path, dst: Path, count: int) -> None:
    """A cache of `count` entries in the same format, by repeating the encoded latents (read speed only; it has
    no shard checksums, so `verify` would refuse it)."""
    dst.mkdir(parents=True, exist_ok=True)
    meta = json.loads((src / "metadata.json").read_text())
    rows = np.arange(count) % meta["count"]
    for name in ("mean", "std"):
        arr = np.load(src / f"{name}.npy", mmap_mode="r")
        out = np.lib.format.open_memmap(dst / f"{name}.npy", mode="w+", dtype=arr.dtype, shape=(count, *arr.shape[1:]))
        for start in range(0, count, 4096):
            out[start:start + 4096] = arr[rows[start:start + 4096]]
        out.flush()
        del out
    np.save(dst / "labels.npy", np.load(src / "labels.npy")[rows])
    (dst / "metadata.json").write_text(json.dumps({**meta, "count": count, "num_files": count, "num_failed": 0}))


def bench_read(cache: Path, vae: VAE, args, num_workers: int, sample_posterior: bool) -> dict:
    """Drain the datamodule's train loader for a while; latents/s (each latent [4, H, W], random flip)."""
    meta = json.loads((cache / "metadata.json").read_text())
    dm = LatentImageNetDataModule(
        cache_dir=str(cache), vae=vae, resolution=meta["resolution"], image_size=meta["latent_shape"][-1],
        batch_size=args.batch_size, num_workers=num_workers, pin_memory=False,
        sample_posterior=sample_posterior, random_flip=True, progress=False)
    dm.setup("fit")
    loader = dm.train_dataloader()
    seen, batches, start, cpu_start = 0, 0, None, None
    deadline = None
    while deadline is None or time.perf_counter() < deadline:
        for x, _ in loader:
            if start is None:  # the first batch pays for worker start-up; time from here
                start, cpu_start = time.perf_counter(), time.process_time()
                deadline = start + args.read_seconds
                continue
            seen += x.shape[0]
            batches += 1
            if time.perf_counter() >= deadline:
                break
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"num_workers": num_workers, "sample_posterior": sample_posterior, "random_flip": True,
            "batches": batches, "latents": seen, "seconds": seconds, "latents_per_s": seen / seconds,
            # with workers the reading happens in other processes, so this process's CPU time says nothing
            "latents_per_cpu_s": seen / cpu_seconds if num_workers == 0 else None,
            "load_average_1min": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/latent_loader.json")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--encode-images", type=int, default=64)
    parser.add_argument("--encode-batch-size", type=int, default=16)
    parser.add_argument("--encode-workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--vae", default=None, help="hub id of a real VAE (default: the tiny random one)")
    parser.add_argument("--vae-local-path", default=None)
    parser.add_argument("--read-count", type=int, default=16384, help="entries in the tiled read cache")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--read-seconds", type=float, default=5.0)
    parser.add_argument("--read-workers", type=int, nargs="*", default=[0], help="DataLoader workers to try")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the reading process")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        work = Path(tmp)
        encode, cache, vae = bench_encode(work, args)
        read_cache = work / "read_cache"
        tile_cache(cache, read_cache, args.read_count)
        for name in ("mean", "std", "labels"):  # warm: every page read once
            np.load(read_cache / f"{name}.npy", mmap_mode="r").sum(dtype=np.float64)
        torch.set_num_threads(args.threads)
        runs = [bench_read(read_cache, vae, args, w, sp) for w in args.read_workers for sp in (True, False)]
        latent_shape = list(np.load(read_cache / "mean.npy", mmap_mode="r").shape[2:])
    main_run = next(r for r in runs if r["num_workers"] == runs[0]["num_workers"] and r["sample_posterior"])
    per_process = main_run["latents_per_s"]
    payload = {
        "benchmark": "latent_loader",
        "read": {
            "latent_shape": latent_shape, "dtype_on_disk": "float16", "cache_entries": args.read_count,
            "batch_size": args.batch_size, "torch_threads": args.threads, "runs": runs,
            "latents_per_s_per_process": per_process,
            # CPU-bound: on a shared, oversubscribed machine the CPU-time rate is what one free core would do
            "latents_per_cpu_s_per_process": main_run["latents_per_cpu_s"],
            "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
            "per_process_measured_with_num_workers": runs[0]["num_workers"],
            "target_latents_per_s_per_process": TARGET_LATENTS_PER_S,
            "meets_target": per_process >= TARGET_LATENTS_PER_S,
        },
        "encode": encode,
        "machine": machine_info(),
    }
    path = write_json(args.out, payload)
    cpu_rate = main_run["latents_per_cpu_s"]
    print(f"read: {per_process:,.0f} latents/s per process"
          f"{f' ({cpu_rate:,.0f} per CPU-second)' if cpu_rate else ''} (sample_posterior, random flip, {latent_shape}); "
          f"encode: {encode['images_per_s']:.1f} images/s ({'SD VAE' if args.vae else 'tiny random VAE'}, "
          f"{encode['device']}) -> {path}")
    return payload


if __name__ == "__main__":
    main()
