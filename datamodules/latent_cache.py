"""The on-disk latent cache: sharded, resumable, verified encoding straight into the final memory-mapped arrays.

Layout of cache_dir (metadata.json is written last; the cache is complete exactly when it exists):
  mean.npy      float16 [N, 2, C, h, w]  raw VAE posterior mean z of (image, horizontally flipped image)
  std.npy       float16 [N, 2, C, h, w]  posterior std (layout mean_std only; layout mean stores no std)
  labels.npy    int64   [N]              class index; -1 for an image that could not be read (left out)
  files.tsv     `label<TAB>key` for the N listed images, in row order (key: path in the folder / shard#row)
  report.json   the images that could not be read, with their errors
  shards/       manifest.json (what the cache is: VAE, scale, shift, resolution, layout, source, file list) and
                shard_XXXXXX.json per finished shard (rows, sha256 of its bytes in each array, failures, VAE hash)
Rows are written in place (N is known from the listing), so there is no merge copy and no second disk peak;
a shard counts as finished only when its marker exists AND its rows match the marker's checksums, so a killed,
truncated or damaged shard is re-encoded by the next run. Training reads (z - shift) * scale.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.adm_crop import file_list_hash, preprocess_image

CACHE_VERSION = 2
METADATA = "metadata.json"
REPORT = "report.json"
FILE_LIST = "files.tsv"
SHARD_DIR = "shards"
MANIFEST = "manifest.json"
LAYOUTS = {"mean_std": ("mean", "std"), "mean": ("mean",)}  # data.layout -> the arrays stored
DTYPE = np.float16


class CacheMismatchError(ValueError):
    """A cache (or partial cache) was built with other settings or from other images than the config asks for."""


class CacheIncompleteError(RuntimeError):
    """A cache is missing pieces (no metadata, or shards not yet encoded)."""


class CacheCorruptError(RuntimeError):
    """A file of the cache cannot be read or disagrees with its checksum; the message names it and the fix."""


class TooManyFailuresError(RuntimeError):
    """More images than data.max_failed_fraction could not be read; they are listed in report.json."""


@dataclass(frozen=True)
class CacheSpec:
    """What the cache's contents depend on (besides the images): VAE, its normalisation, crop, layout, precision."""

    vae: str
    scale_factor: float
    resolution: int
    shard_size: int = 1000  # how the work is cut; not part of a finished cache's identity
    shift_factor: float = 0.0
    layout: str = "mean_std"
    encode_dtype: str = "float32"

    def __post_init__(self):
        if self.resolution <= 0 or self.shard_size <= 0:
            raise ValueError(f"resolution and shard_size must be positive, got {self.resolution}, {self.shard_size}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"data.layout={self.layout!r} is not one of {list(LAYOUTS)}")

    @property
    def arrays(self) -> tuple[str, ...]:
        return LAYOUTS[self.layout]


# keys of the spec that identify a finished cache, and the config key each one comes from
IDENTITY_KEYS = {"vae": "data.vae.name", "scale_factor": "data.vae.scale", "shift_factor": "data.vae.shift",
                 "resolution": "data.resolution", "layout": "data.layout", "encode_dtype": "data.vae_dtype"}


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so readers never see a partial file."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode())


def _atomic_write_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    _atomic_write_bytes(path, buf.getvalue())


def is_complete(cache_dir: str | os.PathLike) -> bool:
    """A cache is complete exactly when its metadata file exists (finalize writes it last)."""
    return (Path(cache_dir) / METADATA).is_file()


def _read_json(path: Path, what: str, fix: str) -> dict:
    """JSON from a cache file, or CacheCorruptError naming the file, the problem and the fix."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CacheCorruptError(f"{what} {str(path)!r} is damaged (not JSON: {err}). Fix: {fix}") from err
    if not isinstance(data, dict):
        raise CacheCorruptError(f"{what} {str(path)!r} is damaged (not a JSON object). Fix: {fix}")
    return data


def read_metadata(cache_dir: str | os.PathLike) -> dict:
    """The metadata of a complete cache; a clear error when there is none or it is damaged or too old."""
    path = Path(cache_dir) / METADATA
    if not path.is_file():
        raise CacheIncompleteError(
            f"no complete latent cache in {str(cache_dir)!r} ({METADATA} missing). Build it with "
            f"`make latents ARGS=\"data.root=/path/to/imagenet data.cache_dir={cache_dir}\"` (see docs/DATA.md)."
        )
    meta = _read_json(path, "latent cache metadata", "delete it and rerun `make latents` with the same data.* "
                      "settings: the arrays and their per-shard checksums are kept, so only the metadata is rebuilt.")
    if meta.get("version") != CACHE_VERSION:
        raise CacheMismatchError(
            f"latent cache {str(cache_dir)!r} has format version {meta.get('version')}, this code reads version "
            f"{CACHE_VERSION} (per-shard checksums, source identity). Rebuild it into a new data.cache_dir."
        )
    return meta


def _same(key: str, have, want) -> bool:
    if isinstance(want, float) and have is not None:
        return math.isclose(float(have), want, rel_tol=1e-6, abs_tol=1e-9)
    return have == want


def check_compatible(found: dict, spec: CacheSpec, where: str, keys=None, source: dict | None = None,
                     source_keys: tuple[str, ...] = ()) -> None:
    """Fail, naming both values, when a stored spec (or source) disagrees with the config on any key checked."""
    wanted = asdict(spec)
    bad = []
    for key in keys or ("vae", "scale_factor", "shift_factor", "resolution", "layout"):
        have, want = found.get(key), wanted[key]
        if not _same(key, have, want):
            bad.append(f"{key}: cache has {have!r}, config asks for {IDENTITY_KEYS.get(key, 'data.' + key)}={want!r}")
    stored = found.get("source") or {}
    for key in source_keys:
        if stored.get(key) != (source or {}).get(key):
            bad.append(f"source {key}: cache was built from {stored.get(key)!r}, config gives {(source or {}).get(key)!r}")
    if bad:
        raise CacheMismatchError(
            f"latent cache {where} was built with other settings than the config:\n  " + "\n  ".join(bad)
            + "\n  Point data.cache_dir at a new folder (or fix the config keys) to use this cache."
        )


# ---------------------------------------------------------------- arrays written in place


@dataclass
class ArrayFile:
    """One .npy array of the cache opened for row writes/reads at byte offsets (header parsed once)."""

    path: Path
    offset: int
    row_bytes: int
    shape: tuple[int, ...]

    def read_rows(self, start: int, stop: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self.row_bytes)
            return f.read((stop - start) * self.row_bytes)

    def write_rows(self, start: int, block: np.ndarray) -> None:
        """Write rows start.. and fsync, so a marker written afterwards never points at unwritten bytes."""
        with open(self.path, "r+b") as f:
            f.seek(self.offset + start * self.row_bytes)
            f.write(np.ascontiguousarray(block, dtype=DTYPE).tobytes())
            f.flush()
            os.fsync(f.fileno())


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of an .npy file; CacheCorruptError when the header cannot be read."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}[version]
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    except (ValueError, OSError, SyntaxError, KeyError) as err:
        raise CacheCorruptError(
            f"{str(path)!r} has no readable .npy header ({err}). Fix: delete it and rerun `make latents` with the "
            f"same data.* settings (every shard is then re-encoded)."
        ) from err
    if fortran:
        raise CacheCorruptError(f"{str(path)!r} is Fortran-ordered, not a latent cache array; delete it and rerun.")
    return tuple(shape), np.dtype(dtype), offset


def open_array_files(cache_dir: Path, names: tuple[str, ...], shape: tuple[int, ...], create: bool) -> dict:
    """The cache's arrays of `shape` as ArrayFiles: created sparse when missing (once, whichever rank is first),
    checked against `shape`, and extended when shorter than the header says (those shards then fail their
    checksums and are re-encoded)."""
    files = {}
    for name in names:
        path = cache_dir / f"{name}.npy"
        if not path.exists() and create:
            tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
            created = np.lib.format.open_memmap(tmp, mode="w+", dtype=DTYPE, shape=shape)  # header + sparse rows
            del created
            try:
                os.link(tmp, path)  # atomic and never replaces: concurrent ranks all end up on one file
            except FileExistsError:
                pass
            except OSError:  # a filesystem without hard links
                if not path.exists():
                    os.replace(tmp, path)
            tmp.unlink(missing_ok=True)
        if not path.exists():
            raise CacheIncompleteError(f"{str(path)!r} is missing")
        have, dtype, offset = _npy_header(path)
        if have != tuple(shape) or dtype != DTYPE:
            raise CacheMismatchError(
                f"{str(path)!r} holds {dtype} {list(have)}, this encode writes {np.dtype(DTYPE)} {list(shape)} "
                f"(another VAE or file list?). Point data.cache_dir at a new folder, or delete the cache to rebuild."
            )
        row_bytes = int(np.prod(shape[1:])) * np.dtype(DTYPE).itemsize
        want_size = offset + shape[0] * row_bytes
        if create and path.stat().st_size < want_size:
            print(f"latent cache: {path} is shorter than its header says (truncated?); extending it, the shards "
                  f"past the cut fail their checksums and are re-encoded")
            os.truncate(path, want_size)
        files[name] = ArrayFile(path, offset, row_bytes, tuple(shape))
    return files


def open_cache_arrays(cache_dir: str | os.PathLike, meta: dict, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Memory-map the arrays of a complete cache, checking every length and shape against the metadata."""
    cache_dir = Path(cache_dir)
    fix = (f"run `python -m datamodules.latent_imagenet encode --verify data.root=... data.cache_dir={cache_dir}` "
           f"(re-encodes the damaged shards), or rebuild the cache.")
    arrays = {}
    want = {name: (meta["num_files"], *meta["latent_shape"]) for name in names}
    want["labels"] = (meta["num_files"],)
    for name, shape in want.items():
        path = cache_dir / f"{name}.npy"
        if not path.is_file():
            raise CacheCorruptError(f"latent cache file {str(path)!r} is missing (data.layout / sample_posterior "
                                    f"need it). Fix: {fix}")
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as err:
            raise CacheCorruptError(f"latent cache file {str(path)!r} cannot be read ({err}); it is truncated or "
                                    f"damaged. Fix: {fix}") from err
        if tuple(arr.shape) != tuple(shape):
            raise CacheCorruptError(f"latent cache file {str(path)!r} has shape {list(arr.shape)} but {METADATA} says "
                                    f"{list(shape)}; the file is truncated or from another encode. Fix: {fix}")
        arrays[name] = arr
    valid = int((arrays["labels"] >= 0).sum())
    if valid != meta["count"]:
        raise CacheCorruptError(f"{str(cache_dir / 'labels.npy')!r} marks {valid} images valid but {METADATA} says "
                                f"{meta['count']}. Fix: {fix}")
    return arrays


# ---------------------------------------------------------------- manifest and shard markers


def shard_range(shard: int, num_files: int, shard_size: int) -> tuple[int, int]:
    """[start, stop) rows of a shard in the file list."""
    return shard * shard_size, min((shard + 1) * shard_size, num_files)


def shard_path(cache_dir: str | os.PathLike, shard: int) -> Path:
    """Where a finished shard's marker (its checksums and failures) lives."""
    return Path(cache_dir) / SHARD_DIR / f"shard_{shard:06d}.json"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def source_listing(source):
    """The source's listing, refusing keys that files.tsv cannot hold."""
    listing = source.list()
    odd = [k for k in listing.keys if "\t" in k or "\n" in k]
    if odd:
        raise ValueError(f"image file names with tabs or newlines cannot be listed in the cache: {odd[:3]}")
    return listing


def _prepare_manifest(cache_dir: Path, source, spec: CacheSpec):
    """List the images and record (or check) the manifest, so resumed shards match this file list and spec."""
    listing = source_listing(source)
    shard_dir = cache_dir / SHARD_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    manifest = {**asdict(spec), "version": CACHE_VERSION, "source": source.identity(),
                "num_files": len(listing.keys), "file_list_hash": file_list_hash(listing.keys, listing.labels),
                "num_classes": len(listing.classes), "classes": listing.classes}
    path = shard_dir / MANIFEST
    if path.is_file():
        old = _read_json(path, "partial latent cache manifest", f"delete {str(shard_dir)!r} and the .npy files "
                         f"beside it, then rerun (the finished shards cannot be trusted without it).")
        if old.get("version") != CACHE_VERSION:
            raise CacheMismatchError(f"partial latent cache {str(shard_dir)!r} has format version {old.get('version')}, "
                                     f"not {CACHE_VERSION}. Delete {str(cache_dir)!r} to start over.")
        check_compatible(old, spec, f"{str(cache_dir)!r} (partial, from an earlier encode)",
                         keys=(*IDENTITY_KEYS, "shard_size"), source=manifest["source"],
                         source_keys=tuple(manifest["source"]))
        if old.get("file_list_hash") != manifest["file_list_hash"]:
            raise CacheMismatchError(
                f"partial latent cache {str(cache_dir)!r} was started on another image list (cache: "
                f"{old.get('num_files')} files, hash {str(old.get('file_list_hash'))[:12]}; now: {len(listing.keys)} "
                f"files in {manifest['source']['path']!r}, hash {manifest['file_list_hash'][:12]}). "
                f"Point data.cache_dir at a new folder, or delete {str(cache_dir)!r} to start over."
            )
    else:
        # Every rank writes identical content atomically, so concurrent writers are harmless.
        _atomic_write_text(cache_dir / FILE_LIST, "".join(f"{lab}\t{k}\n" for k, lab in zip(listing.keys, listing.labels)))
        _atomic_write_text(path, json.dumps(manifest, indent=1))
    return listing, manifest


def _read_marker(cache_dir: Path, shard: int, manifest: dict) -> tuple[dict | None, str]:
    """(marker, "") for a readable marker that fits the manifest, else (None, why not)."""
    path = shard_path(cache_dir, shard)
    if not path.is_file():
        return None, "not encoded"
    try:
        marker = json.loads(path.read_text())
        start, stop = shard_range(shard, manifest["num_files"], manifest["shard_size"])
        if (marker["start"], marker["stop"]) != (start, stop) or set(marker["sha256"]) != set(LAYOUTS[manifest["layout"]]):
            return None, f"{path.name} describes other rows or arrays"
        return marker, ""
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        return None, f"{path.name} is damaged ({type(err).__name__})"


def _check_rows(arrays: dict[str, ArrayFile], marker: dict) -> tuple[str, dict[str, bytes]]:
    """("", the rows' bytes) when every array's rows match the marker's sha256, else (what differs, {})."""
    blocks = {}
    for name, arr in arrays.items():
        data = arr.read_rows(marker["start"], marker["stop"])
        if len(data) != (marker["stop"] - marker["start"]) * arr.row_bytes or _sha256(data) != marker["sha256"][name]:
            return f"rows {marker['start']}..{marker['stop'] - 1} of {arr.path.name} fail their checksum", {}
        blocks[name] = data
    return "", blocks


# ---------------------------------------------------------------- encoding


class _ImageItems(Dataset):
    """Opens and ADM-crops images by key; unreadable ones come back as an error string instead of raising."""

    def __init__(self, source, keys: list[str], resolution: int):
        self.source, self.keys, self.resolution = source, keys, resolution

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int):
        try:
            return preprocess_image(self.source.open(self.keys[index]), self.resolution), index, ""
        except Exception as err:  # corrupt/truncated/unreadable: reported by the caller, not fatal
            return torch.zeros(3, self.resolution, self.resolution), index, f"{type(err).__name__}: {err}"


@dataclass
class _Work:
    """One shard to (re-)encode: all its rows, or (retry) only its failed rows."""

    shard: int
    start: int
    stop: int
    rows: list[int]
    retry: bool = False
    old_failed: dict[int, str] = field(default_factory=dict)


class _WorkBatches(Sampler):
    """Batches of rows that never straddle a work item, in order."""

    def __init__(self, work: list[_Work], batch_size: int):
        self.work, self.batch_size = work, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for item in self.work:
            for first in range(0, len(item.rows), self.batch_size):
                yield item.rows[first:first + self.batch_size]

    def __len__(self) -> int:
        return sum(math.ceil(len(item.rows) / self.batch_size) for item in self.work)


def _plan(cache_dir: Path, manifest: dict, shards: list[int], arrays: dict | None, retry_failed: bool,
          say: Callable[[str], None]) -> tuple[list[_Work], str | None]:
    """This rank's work: shards not finished or failing verification, plus (retry) shards with failures.
    Also returns the VAE hash recorded by a verified shard (None when there is none)."""
    work, vae_hash = [], None
    n, size = manifest["num_files"], manifest["shard_size"]
    for shard in shards:
        start, stop = shard_range(shard, n, size)
        marker, why = _read_marker(cache_dir, shard, manifest)
        if marker is not None and arrays is None:
            why = "its arrays are missing"
        elif marker is not None:
            why, _ = _check_rows(arrays, marker)
        if marker is None or why:
            if why != "not encoded":
                say(f"latent cache: shard {shard}: {why}; re-encoding it")
            work.append(_Work(shard, start, stop, list(range(start, stop))))
            continue
        vae_hash = vae_hash or marker.get("vae_sha256")
        if retry_failed and marker["failed"]:
            failed = {int(i): e for i, e in marker["failed"]}
            work.append(_Work(shard, start, stop, sorted(failed), retry=True, old_failed=failed))
    return work, vae_hash


def encode_shards(source, cache_dir: str | os.PathLike, spec: CacheSpec, vae, *, batch_size: int = 64,
                  num_workers: int = 4, rank: int = 0, world_size: int = 1, progress: bool = True,
                  retry_failed: bool = False, on_shard_written: Callable[[int], None] | None = None) -> list[int]:
    """Encode this rank's shards (r::world) that are missing, damaged, or (retry_failed) have failed images;
    returns the shards written. vae: a VAE or a factory of one (built only when there is work)."""
    from tqdm.auto import tqdm

    cache_dir = Path(cache_dir)
    listing, manifest = _prepare_manifest(cache_dir, source, spec)
    num_shards = math.ceil(manifest["num_files"] / spec.shard_size)
    mine = list(range(rank, num_shards, world_size))
    for stale in (cache_dir / SHARD_DIR).glob("shard_*.json.tmp-*"):  # left by a kill during a write
        if int(stale.name.split("_")[1].split(".")[0]) in set(mine):  # only this rank writes these markers
            stale.unlink(missing_ok=True)
    say = print if progress else (lambda _msg: None)
    arrays = None
    if all((cache_dir / f"{name}.npy").is_file() for name in spec.arrays):
        shape = _npy_header(cache_dir / f"{spec.arrays[0]}.npy")[0]
        arrays = open_array_files(cache_dir, spec.arrays, shape, create=True)
    work, vae_hash = _plan(cache_dir, manifest, mine, arrays, retry_failed, say)
    if not work:
        return []
    if not hasattr(vae, "encode_moments"):
        vae = vae()
    if vae_hash is not None and vae_hash != vae.weights_info["sha256"]:
        raise CacheMismatchError(
            f"partial latent cache {str(cache_dir)!r} was encoded with other VAE weights (sha256 {vae_hash[:12]}) "
            f"than the ones loaded now ({vae.weights_info['sha256'][:12]}, {vae.weights_info}). Load the same "
            f"weights (data.vae_local_path / data.vae.revision), or point data.cache_dir at a new folder."
        )
    side = spec.resolution // vae.downsample
    shape = (manifest["num_files"], 2, vae.latent_channels, side, side)
    arrays = open_array_files(cache_dir, spec.arrays, shape, create=True)
    loader = DataLoader(_ImageItems(source, listing.keys, spec.resolution),
                        batch_sampler=_WorkBatches(work, batch_size), num_workers=num_workers,
                        pin_memory=vae.device.type == "cuda")
    written: list[int] = []
    batches = iter(loader)
    with tqdm(total=sum(len(w.rows) for w in work), desc=f"encode latents (rank {rank}/{world_size})", unit="img",
              position=rank, disable=not progress) as bar:
        for item in work:
            rows = item.stop - item.start
            blocks = {name: np.zeros((rows, *shape[1:]), DTYPE) for name in spec.arrays}
            if item.retry:  # start from the shard as it is on disk
                for name, arr in arrays.items():
                    blocks[name][:] = np.frombuffer(arr.read_rows(item.start, item.stop), DTYPE).reshape(blocks[name].shape)
            failed = dict(item.old_failed)
            for _ in range(math.ceil(len(item.rows) / batch_size)):
                images, indices, errors = next(batches)
                _encode_batch(vae, images, indices, errors, blocks, item.start, failed)
                bar.update(len(errors))
            for name, arr in arrays.items():
                arr.write_rows(item.start, blocks[name])
            marker = {"shard": item.shard, "start": item.start, "stop": item.stop,
                      "sha256": {name: _sha256(np.ascontiguousarray(b).tobytes()) for name, b in blocks.items()},
                      "failed": sorted([i, e] for i, e in failed.items()),
                      "vae_sha256": vae.weights_info["sha256"], "vae_weights": vae.weights_info}
            _atomic_write_text(shard_path(cache_dir, item.shard), json.dumps(marker))
            written.append(item.shard)
            if on_shard_written is not None:
                on_shard_written(item.shard)
    return written


def _encode_batch(vae, images, indices, errors, blocks: dict[str, np.ndarray], start: int, failed: dict) -> None:
    """Encode the readable images of a batch (and their flips) into the shard's blocks; record the failures."""
    ok = torch.tensor([e == "" for e in errors], dtype=torch.bool)
    for i, err in zip(indices.tolist(), errors):
        if err:
            failed[i] = err
    if not ok.any():
        return
    good = images[ok]
    mean, std = vae.encode_moments(torch.cat([good, good.flip(-1)]).to(vae.device, non_blocking=True))
    n = good.shape[0]
    moments = {"mean": torch.stack([mean[:n], mean[n:]], 1).cpu().to(torch.float16).numpy(),
               "std": torch.stack([std[:n], std[n:]], 1).cpu().to(torch.float16).numpy()}
    finite = np.isfinite(moments["mean"]).reshape(n, -1).all(1) & np.isfinite(moments["std"]).reshape(n, -1).all(1)
    for j, i in enumerate(indices[ok].tolist()):
        if not finite[j]:  # fp16 overflow or a VAE NaN: never store it as a latent
            failed[i] = "non-finite latent (the VAE output does not fit float16 or is NaN)"
            continue
        failed.pop(i, None)
        for name, block in blocks.items():
            block[i - start] = moments[name][j]


# ---------------------------------------------------------------- finalize and verify


def _load_manifest(cache_dir: Path) -> tuple[dict, list[str], np.ndarray]:
    """The manifest and the file list (checked against the manifest's hash)."""
    fix = f"delete {str(cache_dir)!r} and rebuild it (the shards cannot be matched to images without it)."
    path = cache_dir / SHARD_DIR / MANIFEST
    if not path.is_file():
        raise CacheIncompleteError(f"latent cache {str(cache_dir)!r} has no {SHARD_DIR}/{MANIFEST}: nothing was "
                                   f"encoded there yet. Run `make latents` (docs/DATA.md).")
    manifest = _read_json(path, "latent cache manifest", fix)
    rows = [line.split("\t", 1) for line in (cache_dir / FILE_LIST).read_text().split("\n")[:-1]]
    labels = np.asarray([int(lab) for lab, _ in rows], dtype=np.int64)
    keys = [k for _, k in rows]
    if file_list_hash(keys, labels.tolist()) != manifest.get("file_list_hash"):
        raise CacheCorruptError(f"{str(cache_dir / FILE_LIST)!r} does not match its manifest. Fix: {fix}")
    return manifest, keys, labels


@dataclass
class _Scan:
    """What one pass over every shard's rows finds: damaged shards, non-finite rows, per-channel moments."""

    bad: list[str] = field(default_factory=list)
    nonfinite: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    vae_hashes: dict[str, int] = field(default_factory=dict)
    vae_weights: dict | None = None
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    count: int = 0


def _scan(cache_dir: Path, manifest: dict, arrays: dict[str, ArrayFile], progress: bool) -> _Scan:
    """Verify every shard (marker, checksums, finiteness) and accumulate per-channel sums of z, z^2, std^2."""
    from tqdm.auto import tqdm

    scan = _Scan()
    num_shards = math.ceil(manifest["num_files"] / manifest["shard_size"])
    for shard in tqdm(range(num_shards), desc="verify latent cache", unit="shard", disable=not progress):
        marker, why = _read_marker(cache_dir, shard, manifest)
        if marker is None:
            scan.bad.append(f"shard {shard}: {why}")
            continue
        why, blocks = _check_rows(arrays, marker)
        if why:
            scan.bad.append(f"shard {shard}: {why}")
            continue
        failed = {int(i): e for i, e in marker["failed"]}
        scan.failed.update(failed)
        scan.vae_hashes[marker["vae_sha256"]] = scan.vae_hashes.get(marker["vae_sha256"], 0) + 1
        scan.vae_weights = scan.vae_weights or marker["vae_weights"]
        keep = np.asarray([i not in failed for i in range(marker["start"], marker["stop"])])
        for name, data in blocks.items():
            c, hw = arrays[name].shape[2], int(np.prod(arrays[name].shape[3:]))
            block = np.frombuffer(data, DTYPE).reshape(-1, 2, c, hw)[keep]  # [rows, flips, C, h*w]
            x = block.astype(np.float32).reshape(-1, c, block.shape[-1])  # [rows * 2 flips, C, h*w]
            total, squares = x.sum((0, 2), dtype=np.float64), np.einsum("ncx,ncx->c", x, x).astype(np.float64)
            if not (np.isfinite(total).all() and np.isfinite(squares).all()):  # a sum is finite iff every term is
                rows = np.flatnonzero(keep)[~np.isfinite(x.reshape(len(block), -1)).all(1)] + marker["start"]
                scan.nonfinite += rows.tolist()
                scan.bad.append(f"shard {shard}: rows {rows[:5].tolist()} of {name}.npy are not finite")
                continue
            if name == "mean":
                scan.sums["z"] = scan.sums.get("z", 0) + total
                scan.sums["z2"] = scan.sums.get("z2", 0) + squares
                scan.count += x.shape[0] * x.shape[2]
            else:
                scan.sums["var"] = scan.sums.get("var", 0) + squares
    return scan


def _channel_stats(scan: _Scan, scale: float, shift: float) -> dict:
    """Per-channel mean/std of the latents training sees ((z - shift) * scale over all images and both flips)."""
    mean = scan.sums["z"] / scan.count
    var = np.maximum(scan.sums["z2"] / scan.count - mean**2, 0.0)
    stats = {"channel_mean": ((mean - shift) * scale).tolist(), "channel_std": (np.sqrt(var) * scale).tolist()}
    if "var" in scan.sums:  # a posterior sample's spread adds the mean posterior variance
        stats["channel_std_sampled"] = (np.sqrt(var + scan.sums["var"] / scan.count) * scale).tolist()
    return stats


def finalize_cache(cache_dir: str | os.PathLike, max_failed_fraction: float = 0.001, progress: bool = True,
                   encode_command: str = "make latents") -> dict:
    """Verify every shard, compute channel stats, write labels and report, then the metadata (last)."""
    cache_dir = Path(cache_dir)
    for stale in cache_dir.glob("*.tmp-*"):  # a killed finalize or array creation (all ranks are done)
        stale.unlink(missing_ok=True)
    manifest, keys, labels_all = _load_manifest(cache_dir)
    num_files = manifest["num_files"]
    num_shards = math.ceil(num_files / manifest["shard_size"])
    missing = [s for s in range(num_shards) if not shard_path(cache_dir, s).is_file()]
    if missing:
        raise CacheIncompleteError(
            f"latent cache {str(cache_dir)!r} is incomplete: {len(missing)} of {num_shards} shards not encoded yet "
            f"(first: {missing[:5]}). Rerun `{encode_command}`; finished shards are kept."
        )
    names = LAYOUTS[manifest["layout"]]
    shape = _npy_header(cache_dir / f"{names[0]}.npy")[0]
    arrays = open_array_files(cache_dir, names, shape, create=False)
    scan = _scan(cache_dir, manifest, arrays, progress)
    if scan.bad:
        raise CacheCorruptError(
            f"latent cache {str(cache_dir)!r}: {len(scan.bad)} shard(s) are damaged:\n  " + "\n  ".join(scan.bad[:10])
            + f"\n  Fix: rerun `{encode_command}` with the same data.* settings: shards that fail their check are "
              f"re-encoded."
        )
    if len(scan.vae_hashes) > 1:
        raise CacheMismatchError(f"latent cache {str(cache_dir)!r} mixes shards encoded by different VAE weights "
                                 f"{ {h[:12]: n for h, n in scan.vae_hashes.items()} }; rebuild it into a new folder.")
    failed = [{"row": i, "path": keys[i], "error": e} for i, e in sorted(scan.failed.items())]
    report = {"num_files": num_files, "num_encoded": num_files - len(failed), "num_failed": len(failed),
              "max_failed_fraction": max_failed_fraction, "failed": failed}
    _atomic_write_text(cache_dir / REPORT, json.dumps(report, indent=1))
    if len(failed) > max_failed_fraction * num_files:
        listed = "\n  ".join(f"{f['path']}: {f['error']}" for f in failed[:10])
        raise TooManyFailuresError(
            f"{len(failed)} of {num_files} images ({100 * len(failed) / num_files:.3g}%) could not be read, more "
            f"than data.max_failed_fraction={max_failed_fraction}:\n  {listed}\n  All of them, with errors, are in "
            f"{cache_dir / REPORT}. Fix or replace those files, then rerun `{encode_command}` with --retry-failed "
            f"added to ARGS (only they are re-read), or raise data.max_failed_fraction to accept them."
        )
    if len(failed) == num_files:
        raise TooManyFailuresError(f"no image of {manifest['source']['path']!r} could be read; see {cache_dir / REPORT}")
    labels = labels_all.copy()
    labels[[f["row"] for f in failed]] = -1
    _atomic_write_npy(cache_dir / "labels.npy", labels)
    metadata = {
        "version": CACHE_VERSION, "vae": manifest["vae"], "scale_factor": manifest["scale_factor"],
        "shift_factor": manifest["shift_factor"], "vae_weights": scan.vae_weights,
        "encode_dtype": manifest["encode_dtype"], "resolution": manifest["resolution"], "layout": manifest["layout"],
        "arrays": list(names), "dtype": "float16", "flips": 2, "latent_shape": list(shape[1:]),
        "count": num_files - len(failed), "num_files": num_files, "num_failed": len(failed),
        "num_classes": manifest["num_classes"], "classes": manifest["classes"], "source": manifest["source"],
        "file_list_hash": manifest["file_list_hash"], "shard_size": manifest["shard_size"],
        "moments": "raw posterior z; training reads x = (z - shift_factor) * scale_factor, z = mean (+ std * eps)",
        **_channel_stats(scan, manifest["scale_factor"], manifest["shift_factor"]),
    }
    _atomic_write_text(cache_dir / METADATA, json.dumps(metadata, indent=1))
    if failed:
        print(f"latent cache: skipped {len(failed)} unreadable image(s); listed in {cache_dir / REPORT}")
    return metadata


def verify_cache(cache_dir: str | os.PathLike, progress: bool = True) -> list[str]:
    """Every problem of a complete cache (shapes, lengths, checksums, finiteness); [] when it is sound."""
    cache_dir = Path(cache_dir)
    try:
        meta = read_metadata(cache_dir)
        names = tuple(meta["arrays"])
        open_cache_arrays(cache_dir, meta, names)
        manifest, _, _ = _load_manifest(cache_dir)
        arrays = open_array_files(cache_dir, names, (meta["num_files"], *meta["latent_shape"]), create=False)
    except (CacheCorruptError, CacheIncompleteError, CacheMismatchError) as err:
        return [str(err)]
    scan = _scan(cache_dir, manifest, arrays, progress)
    problems = list(scan.bad)
    if not problems and sorted(scan.failed) != sorted(np.flatnonzero(np.load(cache_dir / "labels.npy") < 0).tolist()):
        problems.append(f"labels.npy and the shards disagree on which images failed; delete {METADATA} and rerun")
    return problems


# ---------------------------------------------------------------- the whole build


def _barrier(world_size: int) -> None:
    """Wait for every rank (no-op without an initialised process group)."""
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def check_finished_cache(meta: dict, cache_dir, spec: CacheSpec, source, listing=None) -> None:
    """A finished cache must match the config's VAE, crop, layout, precision AND image source and file list."""
    identity = source.identity()
    check_compatible(meta, spec, repr(str(cache_dir)), keys=tuple(IDENTITY_KEYS), source=identity,
                     source_keys=tuple(identity))
    if listing is not None and file_list_hash(listing.keys, listing.labels) != meta["file_list_hash"]:
        raise CacheMismatchError(
            f"latent cache {str(cache_dir)!r} was built from another file list of {identity['path']!r} (cache: "
            f"{meta['num_files']} files, hash {meta['file_list_hash'][:12]}; now: {len(listing.keys)} files, hash "
            f"{file_list_hash(listing.keys, listing.labels)[:12]}). Images were added, removed or relabelled: "
            f"point data.cache_dir at a new folder."
        )


def build_cache(source, cache_dir: str | os.PathLike, spec: CacheSpec, vae, *, batch_size: int = 64,
                num_workers: int = 4, rank: int = 0, world_size: int = 1, progress: bool = True,
                retry_failed: bool = False, verify: bool = False, max_failed_fraction: float = 0.001,
                encode_command: str = "make latents",
                on_shard_written: Callable[[int], None] | None = None) -> dict:
    """Encode (this rank's share), wait for all ranks, rank 0 finalizes; returns the metadata.
    On a finished cache: check it is the one the config asks for; --verify re-checks every shard and repairs
    damaged ones, --retry-failed re-reads the images that failed."""
    cache_dir = Path(cache_dir)
    if is_complete(cache_dir):
        meta = read_metadata(cache_dir)
        check_finished_cache(meta, cache_dir, spec, source, source_listing(source))
        if rank == 0:
            problems = verify_cache(cache_dir, progress) if verify else []
            for problem in problems:
                print(f"latent cache: {problem}")
            if problems or (retry_failed and meta["num_failed"]):
                (cache_dir / METADATA).unlink()  # incomplete again until the repaired cache is finalized
        _barrier(world_size)
        if is_complete(cache_dir):
            return read_metadata(cache_dir)
    encode_shards(source, cache_dir, spec, vae, batch_size=batch_size, num_workers=num_workers, rank=rank,
                  world_size=world_size, progress=progress, retry_failed=retry_failed,
                  on_shard_written=on_shard_written)
    _barrier(world_size)
    if rank == 0:
        finalize_cache(cache_dir, max_failed_fraction, progress, encode_command)
    _barrier(world_size)
    return read_metadata(cache_dir)
