"""Sample from a checkpoint and report FID (+ IS, or digits-FID + class accuracy): `make eval CKPT=path`.

Multi-GPU: `torchrun --nproc_per_node=8 evaluate.py ckpt=...` (each rank generates every world-th chunk).
Samples are written as chunk files (tmp + rename), so an interrupted run continues where it stopped and
a larger num_samples reuses the smaller run's samples (same seed and batch_size). Protocol: docs/EVALUATION.md.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from callbacks.features import DigitsFeatures, InceptionFeatures
from callbacks.fid import (
    MetricAccumulator,
    chunk_bounds,
    chunks_for_rank,
    default_ref_path,
    generate_chunk,
    get_reference,
    module_generate_fn,
    sampler_settings,
)
from callbacks.fid_stats import _all_reduce_sum, _dist_world
from workflow.config_guard import instantiate_trusted

EXTRACTORS = ("auto", "inception", "digits")


def setup_distributed() -> torch.device:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join the group (nccl on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def barrier() -> None:
    if _dist_world()[1] > 1:
        dist.barrier()


def build_extractor(cfg: DictConfig, data_cfg: dict, device: torch.device) -> torch.nn.Module:
    """The feature extractor named by extractor.name; `auto` is the digits CNN for digits runs, Inception otherwise."""
    ex = cfg.extractor
    name = ex.name
    if name not in EXTRACTORS:
        raise ValueError(f"extractor.name={name!r}; choose one of {EXTRACTORS}")
    if name == "auto":
        name = "digits" if data_cfg["_target_"].endswith("DigitsDataModule") else "inception"
    if name == "digits":
        ext = DigitsFeatures(image_size=data_cfg["image_size"], val_fraction=data_cfg.get("val_fraction", 0.1),
                             split_seed=data_cfg.get("seed", 0), epochs=ex.digits_epochs, cache_dir=ex.cache_dir)
    else:
        ext = InceptionFeatures(weights_path=ex.weights_path, cache_dir=ex.cache_dir, download=ex.download)
    return ext.to(device).eval()


def default_out_dir(cfg: DictConfig, settings: dict) -> Path:
    """<ckpt dir>/eval/<ckpt stem>/<sampler>-<steps>steps-cfg<scale>-seed<seed>-bs<batch>: one folder per sample set."""
    ckpt = Path(cfg.ckpt).resolve()
    tag = (f"{settings['sampler']}-{settings['num_steps']}steps-cfg{settings['cfg_scale']:g}"
           f"-seed{cfg.seed}-bs{cfg.batch_size}")
    return ckpt.parent / "eval" / ckpt.stem / tag


def check_settings(out_dir: Path, settings: dict) -> None:
    """Refuse to mix chunks of different sample sets in one folder (rank 0 writes, others wait)."""
    path = out_dir / "settings.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != settings:
            raise ValueError(f"{out_dir} holds samples made with {stored}, not {settings}; "
                             "choose another out_dir or delete that folder")
    elif _dist_world()[0] == 0:
        tmp = path.with_name(f"settings.json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(settings, indent=2))
        os.replace(tmp, path)


def chunk_path(out_dir: Path, chunk: int) -> Path:
    return out_dir / "chunks" / f"chunk_{chunk:06d}.npz"


def read_chunk(path: Path, start: int, end: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(images NHWC uint8, labels) of a complete chunk file covering [start, end), else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as f:
            if int(f["start"]) != start or int(f["end"]) != end:
                return None
            return f["images"], f["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # unreadable: regenerate


def write_chunk(path: Path, images: np.ndarray, labels: np.ndarray, start: int, end: int) -> None:
    """Atomic write: a chunk file either is complete or does not exist."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, images=images, labels=labels, start=np.int64(start), end=np.int64(end))
    os.replace(tmp, path)


def save_grid(images: np.ndarray, path: Path, nrow: int, pad: int = 1) -> None:
    """A PNG grid of NHWC uint8 samples, mid-grey separators, nearest-upscaled so 8x8 digits stay visible."""
    from PIL import Image

    n, h, w, c = images.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 128, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = img
    scale = max(1, -(-64 // h))
    pil = Image.fromarray(grid[..., 0] if c == 1 else grid)
    pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST).save(path)


def write_adm_npz(out_dir: Path, num_samples: int, batch_size: int, shape: tuple[int, int, int]) -> Path:
    """ADM/DiT format: arr_0 uint8 [N, H, W, 3] in sample order, streamed through a memmap (50K fits on disk)."""
    h, w = shape[1], shape[2]
    tmp_npy = out_dir / "samples_arr_0.tmp.npy"
    arr = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.uint8, shape=(num_samples, h, w, 3))
    for c, (s, e) in enumerate(chunk_bounds(num_samples, batch_size)):
        images, _ = read_chunk(chunk_path(out_dir, c), s, e)
        arr[s:e] = images if images.shape[-1] == 3 else np.repeat(images, 3, axis=-1)
    arr.flush()
    path = out_dir / f"samples_{num_samples}.npz"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, arr_0=arr)
    del arr
    tmp_npy.unlink()
    os.replace(tmp, path)
    return path


def run(cfg: DictConfig) -> dict:
    """Everything evaluate.py does; returns the metrics (on every rank)."""
    if not cfg.ckpt or not Path(cfg.ckpt).is_file():
        raise FileNotFoundError(f"ckpt={cfg.ckpt!r} is not a file; usage: make eval CKPT=path/to/last.ckpt "
                                "(or python evaluate.py ckpt=path/to/last.ckpt)")
    device = setup_distributed()
    rank, world = _dist_world()
    torch.backends.cuda.matmul.allow_tf32 = bool(cfg.tf32)  # sampling only; the Inception pass always runs without
    torch.backends.cudnn.allow_tf32 = bool(cfg.tf32)
    from gen_objectives.module import GenerativeModule

    module = GenerativeModule.from_checkpoint(cfg.ckpt, map_location="cpu").to(device).eval()
    run_cfg = module.hparams["cfg"]
    data_cfg = {**run_cfg["data"], **OmegaConf.to_container(cfg.data, resolve=True)}
    datamodule = instantiate_trusted(data_cfg, f"{cfg.ckpt}: data")  # read from the file: project classes only
    settings = {"ckpt": str(Path(cfg.ckpt).resolve()), "seed": int(cfg.seed), "batch_size": int(cfg.batch_size),
                **sampler_settings(module.objective, cfg.sampler, cfg.num_steps, cfg.cfg_scale)}
    out_dir = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(cfg, settings)
    (out_dir / "chunks").mkdir(parents=True, exist_ok=True)
    barrier()
    check_settings(out_dir, settings)
    shape = (data_cfg["channels"], data_cfg["image_size"], data_cfg["image_size"])
    num_classes = data_cfg["num_classes"]
    generate = module_generate_fn(module, settings["sampler"], settings["num_steps"], settings["cfg_scale"])

    # 0. the extractor and reference statistics first: missing weights fail before hours of sampling
    t1 = time.time()
    extractor = build_extractor(cfg, data_cfg, device)
    ref_path = cfg.ref_stats or default_ref_path(extractor.name, data_cfg)
    ref = get_reference(ref_path, extractor, datamodule, device, cfg.compute_ref_if_missing, cfg.ref_max_images,
                        cfg.feature_batch_size)
    ref_seconds = time.time() - t1

    # 1. samples: this rank's chunks, skipping the ones already on disk
    mine = chunks_for_rank(cfg.num_samples, cfg.batch_size, rank, world)
    todo = [(c, s, e) for c, s, e in mine if read_chunk(chunk_path(out_dir, c), s, e) is None]
    done = sum(e - s for _, s, e in mine) - sum(e - s for _, s, e in todo)
    if rank == 0 and done:
        print(f"[eval] resuming: {done} of this rank's samples already in {out_dir / 'chunks'}")
    t0 = time.time()
    bar = tqdm(total=sum(e - s for _, s, e in todo), unit="sample", desc=f"sampling (x{world} ranks)",
               disable=not cfg.progress or rank != 0, dynamic_ncols=True)
    for c, s, e in todo:
        images, labels = generate_chunk(generate, datamodule.decode, s, e, shape, num_classes, cfg.seed, device)
        write_chunk(chunk_path(out_dir, c), images.permute(0, 2, 3, 1).numpy(), labels.numpy(), s, e)
        bar.update(e - s)
    bar.close()
    sampling_seconds = time.time() - t0
    generated = _all_reduce_sum(torch.tensor([float(sum(e - s for _, s, e in todo))], dtype=torch.float64))
    barrier()

    # 2. features and statistics, each rank over its own chunks, combined exactly
    t1 = time.time()
    acc = MetricAccumulator(extractor, cfg.num_samples, device)
    for c, s, e in mine:
        images, labels = read_chunk(chunk_path(out_dir, c), s, e)
        imgs = torch.from_numpy(images).permute(0, 3, 1, 2)
        for i in range(0, e - s, cfg.feature_batch_size):
            sl = slice(i, i + cfg.feature_batch_size)
            acc.update(imgs[sl], torch.from_numpy(labels[sl]), torch.arange(s + i, min(s + i + cfg.feature_batch_size, e)))
    metrics = acc.finalize(ref)
    metrics.pop("_mu"), metrics.pop("_sigma")
    feature_seconds = time.time() - t1

    metrics.update(settings)
    metrics.update(extractor=extractor.name, ref_stats=ref_path, world_size=world, out_dir=str(out_dir),
                   ref_seconds=ref_seconds, sampling_seconds=sampling_seconds, feature_seconds=feature_seconds,
                   samples_generated=int(generated.item()),
                   samples_per_second=generated.item() / sampling_seconds if generated.item() else None)
    if isinstance(extractor, DigitsFeatures):
        metrics["note"] = "digits-FID uses a small digits CNN's features: NOT comparable with Inception FID"
        metrics["classifier_val_accuracy"] = extractor.val_accuracy

    # 3. outputs (rank 0)
    if rank == 0:
        first = min(cfg.grid_samples, cfg.num_samples)
        grid = [read_chunk(chunk_path(out_dir, c), s, e)[0] for c, (s, e) in
                enumerate(chunk_bounds(cfg.num_samples, cfg.batch_size)) if s < first]
        save_grid(np.concatenate(grid)[:first], out_dir / "samples_grid.png", cfg.grid_nrow)
        if cfg.save_npz:
            metrics["npz"] = str(write_adm_npz(out_dir, cfg.num_samples, cfg.batch_size, shape))
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(json.dumps(metrics, indent=2))
        print(f"[eval] wrote {out_dir / 'metrics.json'} and {out_dir / 'samples_grid.png'}")
    barrier()
    return metrics


@hydra.main(config_path="conf", config_name="eval", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
