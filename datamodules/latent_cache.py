"""The on-disk latent cache: sharded, resumable encoding of an ImageFolder and the memory-mapped reader.

Layout of cache_dir once complete (metadata.json is written last; its presence marks completeness):
  mean.npy    float16 [N, 2, C, h, w]  posterior mean of (image, horizontally flipped image), unscaled
  std.npy     float16 [N, 2, C, h, w]  posterior std, likewise
  labels.npy  int64   [N]
  files.txt   the N encoded files (relative to the image folder), in cache order
  report.json images that could not be read (skipped), with the error
While encoding, cache_dir/shards/ holds manifest.json, files.tsv and one shard_XXXXXX.npz per finished
shard (written to a temporary name, then renamed), so a killed run resumes without redoing them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.adm_crop import file_list_hash, list_image_folder, preprocess

CACHE_VERSION = 1
METADATA = "metadata.json"
REPORT = "report.json"
SHARD_DIR = "shards"
MANIFEST = "manifest.json"
FILE_LIST = "files.tsv"


class CacheMismatchError(ValueError):
    """A cache (or partial cache) was built with other settings than the config asks for."""


class CacheIncompleteError(RuntimeError):
    """A cache is missing pieces (no metadata, or shards not yet encoded)."""


@dataclass(frozen=True)
class CacheSpec:
    """What identifies a cache: the VAE, its scale factor, the crop resolution, and the shard size."""

    vae: str
    scale_factor: float
    resolution: int
    shard_size: int = 1000

    def __post_init__(self):
        if self.resolution <= 0 or self.shard_size <= 0:
            raise ValueError(f"resolution and shard_size must be positive, got {self.resolution}, {self.shard_size}")


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see a partial file."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez through a temporary file and rename (np.savez on a name would append .npz)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_complete(cache_dir: str | os.PathLike) -> bool:
    """A cache is complete exactly when its metadata file exists (finalize writes it last)."""
    return (Path(cache_dir) / METADATA).is_file()


def read_metadata(cache_dir: str | os.PathLike) -> dict:
    """The metadata of a complete cache; a clear error when there is none."""
    path = Path(cache_dir) / METADATA
    if not path.is_file():
        raise CacheIncompleteError(
            f"no complete latent cache in {str(cache_dir)!r} ({METADATA} missing). Build it with "
            f"`make latents ARGS=\"data.root=/path/to/imagenet data.cache_dir={cache_dir}\"` "
            f"or let the datamodule's prepare_data do it (needs data.root)."
        )
    return json.loads(path.read_text())


def check_compatible(found: dict, spec: CacheSpec, where: str, keys=("vae", "resolution", "scale_factor")) -> None:
    """Fail, naming both values, when a stored spec disagrees with the config on any of `keys`."""
    wanted = asdict(spec)
    bad = []
    for key in keys:
        have, want = found.get(key), wanted[key]
        same = math.isclose(float(have), float(want), rel_tol=1e-6) if key == "scale_factor" and have is not None \
            else have == want
        if not same:
            bad.append(f"{key}: cache has {have!r}, config asks for data.{key}={want!r}")
    if bad:
        raise CacheMismatchError(
            f"latent cache {where} was built with other settings than the config:\n  " + "\n  ".join(bad)
            + "\n  Point data.cache_dir at a new folder (or fix the config keys) to use this cache."
        )


class _ImageFiles(Dataset):
    """Reads and ADM-crops images; unreadable files come back as an error string instead of raising."""

    def __init__(self, root: Path, files: list[str], resolution: int):
        self.root, self.files, self.resolution = root, files, resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        try:
            return preprocess(self.root / self.files[index], self.resolution), index, ""
        except Exception as err:  # corrupt/truncated/unreadable: reported by the caller, not fatal
            return torch.zeros(3, self.resolution, self.resolution), index, f"{type(err).__name__}: {err}"


class _ShardBatches(Sampler):
    """Batches of file indices that never straddle a shard, for the shards given, in order."""

    def __init__(self, shards: list[int], num_files: int, shard_size: int, batch_size: int):
        self.shards, self.num_files, self.shard_size, self.batch_size = shards, num_files, shard_size, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for shard in self.shards:
            start, stop = shard_range(shard, self.num_files, self.shard_size)
            for first in range(start, stop, self.batch_size):
                yield list(range(first, min(first + self.batch_size, stop)))

    def __len__(self) -> int:
        total = 0
        for shard in self.shards:
            start, stop = shard_range(shard, self.num_files, self.shard_size)
            total += math.ceil((stop - start) / self.batch_size)
        return total


def shard_range(shard: int, num_files: int, shard_size: int) -> tuple[int, int]:
    """[start, stop) file indices of a shard in the sorted file list."""
    return shard * shard_size, min((shard + 1) * shard_size, num_files)


def shard_path(cache_dir: str | os.PathLike, shard: int) -> Path:
    """Where a finished shard lives."""
    return Path(cache_dir) / SHARD_DIR / f"shard_{shard:06d}.npz"


def _prepare_manifest(cache_dir: Path, image_dir: Path, spec: CacheSpec) -> tuple[list[str], list[int], int]:
    """List the images and record (or check) the manifest, so resumed shards match this file list and spec."""
    files, labels, classes = list_image_folder(image_dir)
    odd = [rel for rel in files if "\t" in rel or "\n" in rel]
    if odd:
        raise ValueError(f"image file names with tabs or newlines cannot be listed in the cache: {odd[:3]}")
    shard_dir = cache_dir / SHARD_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    manifest = {**asdict(spec), "version": CACHE_VERSION, "num_files": len(files),
                "file_list_hash": file_list_hash(files, labels), "num_classes": len(classes),
                "classes": classes, "image_dir": str(image_dir)}
    path = shard_dir / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        check_compatible(old, spec, f"{str(shard_dir)!r} (partial, from an earlier encode)",
                         keys=("vae", "resolution", "scale_factor", "shard_size"))
        if old.get("file_list_hash") != manifest["file_list_hash"] or old.get("version") != CACHE_VERSION:
            raise CacheMismatchError(
                f"partial latent cache {str(shard_dir)!r} was started on another image list or cache version "
                f"(cache: {old.get('num_files')} files, hash {str(old.get('file_list_hash'))[:12]}, version "
                f"{old.get('version')}; now: {len(files)} files in {str(image_dir)!r}, hash "
                f"{manifest['file_list_hash'][:12]}, version {CACHE_VERSION}). Delete {str(shard_dir)!r} to start over."
            )
    else:
        # Every rank writes identical content atomically, so concurrent writers are harmless.
        _atomic_write_text(shard_dir / FILE_LIST, "".join(f"{lab}\t{rel}\n" for rel, lab in zip(files, labels)))
        _atomic_write_text(path, json.dumps(manifest, indent=1))
    return files, labels, math.ceil(len(files) / spec.shard_size)


def encode_shards(image_dir: str | os.PathLike, cache_dir: str | os.PathLike, spec: CacheSpec,
                  vae, *, batch_size: int = 64, num_workers: int = 4, rank: int = 0, world_size: int = 1,
                  progress: bool = True, on_shard_written: Callable[[int], None] | None = None) -> list[int]:
    """Encode this rank's unfinished shards (r::world); returns the shards written. vae: VAE or a factory."""
    from tqdm.auto import tqdm

    image_dir, cache_dir = Path(image_dir), Path(cache_dir)
    files, labels, num_shards = _prepare_manifest(cache_dir, image_dir, spec)
    mine = list(range(rank, num_shards, world_size))
    mine_set = set(mine)
    for stale in (cache_dir / SHARD_DIR).glob("shard_*.npz.tmp-*"):  # left by a kill during a write
        if int(stale.name.split("_")[1].split(".")[0]) in mine_set:  # only this rank writes these shards
            stale.unlink()
    pending = [s for s in mine if not shard_path(cache_dir, s).is_file()]
    if not pending:
        return []
    if not hasattr(vae, "encode_moments"):
        vae = vae()
    loader = DataLoader(
        _ImageFiles(image_dir, files, spec.resolution),
        batch_sampler=_ShardBatches(pending, len(files), spec.shard_size, batch_size),
        num_workers=num_workers, pin_memory=vae.device.type == "cuda",
    )
    total = sum(stop - start for start, stop in (shard_range(s, len(files), spec.shard_size) for s in pending))
    written: list[int] = []
    parts: dict[str, list] = {"indices": [], "mean": [], "std": [], "bad_indices": [], "bad_errors": []}
    done_in_shard = 0
    shard_iter = iter(pending)
    shard = next(shard_iter)
    with tqdm(total=total, desc=f"encode latents (rank {rank}/{world_size})", unit="img", position=rank,
              disable=not progress) as bar:
        for images, indices, errors in loader:
            ok = torch.tensor([e == "" for e in errors], dtype=torch.bool)
            for i, err in zip(indices[~ok].tolist(), [e for e in errors if e]):
                parts["bad_indices"].append(i)
                parts["bad_errors"].append(err)
            if ok.any():
                good = images[ok]
                mean, std = vae.encode_moments(torch.cat([good, good.flip(-1)]).to(vae.device, non_blocking=True))
                n = good.shape[0]
                parts["mean"].append(torch.stack([mean[:n], mean[n:]], 1).cpu().to(torch.float16).numpy())
                parts["std"].append(torch.stack([std[:n], std[n:]], 1).cpu().to(torch.float16).numpy())
                parts["indices"].append(indices[ok].numpy().astype(np.int64))
            done_in_shard += len(errors)
            bar.update(len(errors))
            start, stop = shard_range(shard, len(files), spec.shard_size)
            if done_in_shard == stop - start:
                _write_shard(cache_dir, shard, parts)
                written.append(shard)
                if on_shard_written is not None:
                    on_shard_written(shard)
                parts = {k: [] for k in parts}
                done_in_shard = 0
                shard = next(shard_iter, None)
    return written


def _write_shard(cache_dir: Path, shard: int, parts: dict[str, list]) -> None:
    """Save one finished shard atomically (empty arrays when every image of it was unreadable)."""
    if parts["mean"]:
        mean, std = np.concatenate(parts["mean"]), np.concatenate(parts["std"])
        indices = np.concatenate(parts["indices"])
    else:
        mean = std = np.zeros((0,), np.float16)
        indices = np.zeros((0,), np.int64)
    _atomic_write_npz(shard_path(cache_dir, shard), indices=indices, mean=mean, std=std,
                      bad_indices=np.asarray(parts["bad_indices"], dtype=np.int64),
                      bad_errors=np.asarray(parts["bad_errors"], dtype=np.str_))


def finalize_cache(cache_dir: str | os.PathLike, keep_shards: bool = False) -> dict:
    """Merge all shards into the memory-mapped arrays, write the report, then the metadata (last)."""
    cache_dir = Path(cache_dir)
    shard_dir = cache_dir / SHARD_DIR
    for stale in cache_dir.glob("*.tmp-*"):  # a killed finalize (only one process ever finalizes)
        stale.unlink()
    manifest = json.loads((shard_dir / MANIFEST).read_text())
    rows = [line.split("\t", 1) for line in (shard_dir / FILE_LIST).read_text().split("\n")[:-1]]
    labels_all = np.asarray([int(lab) for lab, _ in rows], dtype=np.int64)
    files_all = [rel for _, rel in rows]
    if file_list_hash(files_all, labels_all.tolist()) != manifest["file_list_hash"]:
        raise CacheIncompleteError(f"{shard_dir / FILE_LIST} does not match its manifest; delete {shard_dir} and re-encode")
    num_shards = math.ceil(len(files_all) / manifest["shard_size"])
    missing = [s for s in range(num_shards) if not shard_path(cache_dir, s).is_file()]
    if missing:
        raise CacheIncompleteError(
            f"latent cache {str(cache_dir)!r} is incomplete: {len(missing)} of {num_shards} shards not encoded yet "
            f"(first: {missing[:5]}). Rerun the encode; finished shards are kept."
        )
    kept, bad, latent_shape = 0, [], None
    for s in range(num_shards):
        with np.load(shard_path(cache_dir, s)) as z:
            kept += len(z["indices"])
            bad += [{"path": files_all[i], "error": str(e)} for i, e in zip(z["bad_indices"].tolist(), z["bad_errors"])]
            if latent_shape is None and len(z["indices"]):
                latent_shape = list(z["mean"].shape[1:])
    if kept == 0:
        raise CacheIncompleteError(f"no image under {manifest['image_dir']!r} could be read; see the errors in the shards")
    mean_tmp, std_tmp = cache_dir / f"mean.npy.tmp-{os.getpid()}", cache_dir / f"std.npy.tmp-{os.getpid()}"
    mean = np.lib.format.open_memmap(mean_tmp, mode="w+", dtype=np.float16, shape=(kept, *latent_shape))
    std = np.lib.format.open_memmap(std_tmp, mode="w+", dtype=np.float16, shape=(kept, *latent_shape))
    labels = np.empty(kept, np.int64)
    kept_files: list[str] = []
    pos = 0
    for s in range(num_shards):
        with np.load(shard_path(cache_dir, s)) as z:
            idx = z["indices"]
            if len(idx) == 0:
                continue
            mean[pos:pos + len(idx)] = z["mean"]
            std[pos:pos + len(idx)] = z["std"]
            labels[pos:pos + len(idx)] = labels_all[idx]
            kept_files += [files_all[i] for i in idx.tolist()]
            pos += len(idx)
    mean.flush()
    std.flush()
    del mean, std
    os.replace(mean_tmp, cache_dir / "mean.npy")
    os.replace(std_tmp, cache_dir / "std.npy")
    labels_tmp = cache_dir / f"labels.npy.tmp-{os.getpid()}"
    with open(labels_tmp, "wb") as f:
        np.save(f, labels)
    os.replace(labels_tmp, cache_dir / "labels.npy")
    _atomic_write_text(cache_dir / "files.txt", "".join(f"{rel}\n" for rel in kept_files))
    report = {"num_files": len(files_all), "num_encoded": kept, "num_failed": len(bad), "failed": bad}
    _atomic_write_text(cache_dir / REPORT, json.dumps(report, indent=1))
    metadata = {
        "version": CACHE_VERSION, "vae": manifest["vae"], "scale_factor": manifest["scale_factor"],
        "resolution": manifest["resolution"], "count": kept, "num_files": len(files_all), "num_failed": len(bad),
        "num_classes": manifest["num_classes"], "classes": manifest["classes"], "latent_shape": latent_shape,
        "flips": 2, "dtype": "float16", "moments": "mean,std (unscaled; latent = (mean + std * eps) * scale_factor)",
        "file_list_hash": manifest["file_list_hash"], "shard_size": manifest["shard_size"],
        "image_dir": manifest["image_dir"],
    }
    _atomic_write_text(cache_dir / METADATA, json.dumps(metadata, indent=1))
    if bad:
        print(f"latent cache: skipped {len(bad)} unreadable image(s); listed in {cache_dir / REPORT}")
    if not keep_shards:
        shutil.rmtree(shard_dir)
    return metadata


def _barrier(world_size: int) -> None:
    """Wait for every rank (no-op without an initialised process group; give it a long timeout)."""
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def build_cache(image_dir: str | os.PathLike, cache_dir: str | os.PathLike, spec: CacheSpec, vae, *,
                batch_size: int = 64, num_workers: int = 4, rank: int = 0, world_size: int = 1,
                progress: bool = True, keep_shards: bool = False,
                on_shard_written: Callable[[int], None] | None = None) -> dict:
    """Encode (this rank's share), wait for all ranks, rank 0 finalizes; returns the metadata."""
    if is_complete(cache_dir):
        meta = read_metadata(cache_dir)
        check_compatible(meta, spec, repr(str(cache_dir)))
        return meta
    encode_shards(image_dir, cache_dir, spec, vae, batch_size=batch_size, num_workers=num_workers, rank=rank,
                  world_size=world_size, progress=progress, on_shard_written=on_shard_written)
    _barrier(world_size)
    if rank == 0:
        finalize_cache(cache_dir, keep_shards=keep_shards)
    _barrier(world_size)
    return read_metadata(cache_dir)
