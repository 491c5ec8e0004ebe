"""Reference statistics: what real images a metric is measured against, keyed and checked.

A reference is identified by its source (the run's training data, described by a hash of the data
settings that change images; or a file such as ADM's reference batch), split, cap, subset seed and
extractor. Computed references are saved under a name built from that identity, so references with
different caps or extractors never share a file, and the identity (with the image count, checked on
load) goes into every metrics record. A cap takes a seeded random subset of the whole split, never its
first N images (latent caches are sorted by class). Under DDP rank 0 alone decides whether to load or
compute and broadcasts the decision, so node-local caches cannot make ranks disagree.

Files use ADM's key names: mu/sigma (pool features), mu_s/sigma_s (spatial, sFID); ours add `acts` (pool
features of up to `rows` reference images, for precision/recall and KID), `count` and `identity`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from evaluation.distributed import barrier, broadcast_object, gather_rows, rank_world
from evaluation.features import default_cache_dir
from evaluation.stats import FeatureStats, quantize

ADM_STAT_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}
DEFAULT_ROWS = 10000  # ADM's reference batches hold 10,000 images for precision/recall
# Data keys that do not change the reference images: loader settings, and the training reads' random flips and
# posterior samples (references read the posterior means of the unflipped images: LatentDataset.reference_items).
LOADER_ONLY_KEYS = {"batch_size", "num_workers", "drop_last", "pin_memory", "persistent_workers", "progress",
                    "encode_batch_size", "encode_num_workers", "encode_device", "shard_size", "keep_shards", "root",
                    "sample_posterior", "random_flip"}


class ReferenceError(ValueError):
    """A reference file cannot be used with this extractor or setting; the message says why and what to do."""


@dataclass
class Reference:
    """Statistics of real images in one extractor's feature space."""

    stats: dict[str, tuple[np.ndarray, np.ndarray]]  # feature key -> (mu, sigma)
    rows: np.ndarray | None  # [R, D] pool features of R reference images (precision/recall, KID)
    count: int | None        # images behind mu/sigma
    identity: dict = field(default_factory=dict)
    path: str | None = None


def data_source(data_cfg: dict) -> str:
    """'data:<DataModule>:<hash of the settings that change images>' for a data config."""
    keep = {k: v for k, v in sorted(data_cfg.items()) if k not in LOADER_ONLY_KEYS}
    digest = hashlib.sha1(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"data:{str(data_cfg.get('_target_', '?')).rsplit('.', 1)[-1]}:{digest}"


def reference_identity(source: str, extractor: str, cap: int | None, subset_seed: int, rows: int,
                       split: str = "train") -> dict:
    return {"source": source, "split": split, "cap": None if cap is None else int(cap),
            "subset_seed": int(subset_seed), "extractor": extractor, "rows": int(rows)}


def default_reference_path(identity: dict) -> Path:
    """<cache>/ref_stats/<extractor>-<source hash>-<split>-cap<N|all>-seed<s>-rows<R>.npz: one file per identity."""
    src = str(identity["source"]).rsplit(":", 1)[-1]
    cap = "all" if identity["cap"] is None else identity["cap"]
    name = (f"{identity['extractor']}-{src}-{identity['split']}-cap{cap}-seed{identity['subset_seed']}"
            f"-rows{identity['rows']}.npz")
    return default_cache_dir() / "ref_stats" / name


def subset_plan(n_total: int, cap: int | None, seed: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset indices to read, sorted; their row slot or -1). The chosen images are the first `cap` of a
    seeded permutation of the whole split (all of it without a cap); rows are the first `rows` of those."""
    perm = np.random.default_rng(seed).permutation(n_total)
    count = n_total if cap is None else min(int(cap), n_total)
    chosen = perm[:count]
    order = np.argsort(chosen, kind="stable")
    slots = np.where(order < rows, order, -1)  # order[k] is the position in perm of the k-th smallest index
    return chosen[order], slots


def save_reference(path: str | os.PathLike, ref: Reference) -> Path:
    """Atomic write (tmp + rename): a crash never leaves a truncated file that looks complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"count": np.int64(ref.count), "extractor": np.array(ref.identity["extractor"]),
              "identity": np.array(json.dumps(ref.identity, sort_keys=True))}
    for key, (mu, sigma) in ref.stats.items():
        m, s = ADM_STAT_KEYS[key]
        arrays[m], arrays[s] = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if ref.rows is not None:
        arrays["acts"] = np.asarray(ref.rows, np.float32)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path


def load_reference(path: str | os.PathLike) -> tuple[Reference, np.ndarray | None]:
    """(Reference, ADM's arr_0 images or None) from our file or an ADM reference batch."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.keys())
            if "mu" not in keys or "sigma" not in keys:
                raise ReferenceError(f"reference {path} has no 'mu'/'sigma' arrays (keys: {sorted(keys)}); it must "
                                     "be an .npz with mu and sigma, like ADM's reference batches")
            stats = {key: (data[m].astype(np.float64), data[s].astype(np.float64))
                     for key, (m, s) in ADM_STAT_KEYS.items() if m in keys and s in keys}
            identity = json.loads(str(data["identity"])) if "identity" in keys else {}
            if not identity:  # ADM's files (and hand-made ones): only what the file says
                identity = {"source": f"file:{path.resolve()}",
                            "extractor": str(data["extractor"]) if "extractor" in keys else None}
            ref = Reference(stats, data["acts"].astype(np.float32) if "acts" in keys else None,
                            int(data["count"]) if "count" in keys else None, identity, str(path))
            images = data["arr_0"] if "arr_0" in keys and ref.rows is None else None
    except (OSError, ValueError) as err:
        if isinstance(err, ReferenceError):
            raise
        raise ReferenceError(f"reference {path} cannot be read as .npz ({type(err).__name__}: {err})") from None
    return ref, images


def check_reference(ref: Reference, extractor, want: dict | None, expected_count: int | None) -> None:
    """Refuse a reference of another feature space, identity or size (before any sampling)."""
    where = ref.path or "reference"
    stored = ref.identity.get("extractor")
    if stored is None:  # ADM's files carry no id: they are Inception statistics
        if not extractor.name.startswith("inception"):
            raise ReferenceError(f"{where} holds Inception statistics (an ADM file, no extractor id), but the features "
                                 f"come from {extractor.name}; use a reference of that extractor")
    elif stored != extractor.name:
        raise ReferenceError(f"{where} holds statistics of extractor {stored}, but the features come from "
                             f"{extractor.name}; recompute the reference statistics (or point ref_stats elsewhere)")
    for key, (mu, sigma) in ref.stats.items():
        dim = extractor.dims.get(key)
        if dim is not None and (mu.shape != (dim,) or sigma.shape != (dim, dim)):
            raise ReferenceError(f"{where}: {ADM_STAT_KEYS[key][0]} has shape {mu.shape}, sigma {sigma.shape}, but "
                                 f"{extractor.name} gives {dim} {key} features; this file belongs to another extractor")
    if "pool" not in ref.stats:
        raise ReferenceError(f"{where} has no pool statistics (mu/sigma)")
    if ref.rows is not None and ref.rows.shape[1:] != (extractor.dims["pool"],):
        raise ReferenceError(f"{where}: acts have shape {ref.rows.shape}, but {extractor.name} gives "
                             f"{extractor.dims['pool']} features")
    if want is not None:
        keys = ("split", "cap", "subset_seed", "rows") + (("source",) if want.get("source") else ())
        diff = [k for k in keys if ref.identity.get(k) != want.get(k)]
        if diff:
            raise ReferenceError(f"{where} was computed for {', '.join(f'{k}={ref.identity.get(k)!r}' for k in diff)}, "
                                 f"not {', '.join(f'{k}={want.get(k)!r}' for k in diff)}; point ref_stats elsewhere "
                                 "or leave it null (files are then keyed by these settings)")
    if expected_count is not None and ref.count is not None and ref.count != expected_count:
        raise ReferenceError(f"{where} holds statistics of {ref.count} images, but the split has {expected_count} "
                             "for this cap; the data changed: delete the file to recompute it")


@torch.no_grad()
def extract(extractor, images: torch.Tensor, device) -> dict[str, torch.Tensor]:
    return extractor(images.to(device))


def _reference_dataset(datamodule):
    """The training split, read sequentially (without the loader's shuffle or drop_last)."""
    datamodule.setup("fit")
    return datamodule.train_dataloader().dataset


def _read(dataset, idx: list[int]) -> torch.Tensor:
    """The images behind idx; deterministic where the dataset offers it (LatentDataset: unflipped means)."""
    if hasattr(dataset, "reference_items"):
        return dataset.reference_items(idx)[0]
    if hasattr(dataset, "__getitems__"):  # batched fast path
        return dataset.__getitems__(idx)[0]
    return torch.stack([dataset[i][0] for i in idx])


@torch.no_grad()
def compute_reference(identity: dict, extractor, datamodule, device, batch_size: int = 256,
                      progress: bool = True) -> Reference:
    """Statistics of the (seeded subset of the) training split, decoded and quantised like samples; every
    rank takes a share, sums and rows are combined exactly."""
    dataset = _reference_dataset(datamodule)
    indices, slots = subset_plan(len(dataset), identity["cap"], identity["subset_seed"], identity["rows"])
    rows_total = int((slots >= 0).sum())
    rank, world = rank_world()
    stats = {key: FeatureStats(dim, device=device) for key, dim in extractor.dims.items()}
    my_rows, my_slots = [], []
    batches = [b for k, b in enumerate(range(0, len(indices), batch_size)) if k % world == rank]
    for s in tqdm(batches, desc=f"reference statistics ({extractor.name})", unit="batch",
                  disable=not progress or rank != 0, dynamic_ncols=True):
        idx, slot = indices[s:s + batch_size], slots[s:s + batch_size]
        feats = extract(extractor, quantize(datamodule.decode(_read(dataset, idx.tolist()).to(device))), device)
        for key, st in stats.items():
            st.update(feats[key])
        keep = slot >= 0
        my_rows.append(feats["pool"][torch.from_numpy(keep).to(feats["pool"].device)].float().cpu())
        my_slots.append(torch.from_numpy(slot[keep]))
    dim = extractor.dims["pool"]
    rows = gather_rows(torch.cat(my_rows) if my_rows else torch.zeros(0, dim),
                       torch.cat(my_slots) if my_slots else torch.zeros(0, dtype=torch.long), rows_total)
    out = {}
    for key, st in stats.items():
        st.all_reduce()
        out[key] = (st.mean(), st.cov())
    count = stats["pool"].count
    return Reference(out, rows.numpy(), count, {**identity, "count": count})


@torch.no_grad()
def rows_from_images(images: np.ndarray, extractor, device, batch_size: int = 250) -> np.ndarray:
    """Pool features of NHWC uint8 images (ADM's arr_0), on this process."""
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).permute(0, 3, 1, 2)
        out.append(extract(extractor, x, device)["pool"].float().cpu())
    return torch.cat(out).numpy()


def _plan(path: Path | None, keyed: bool, identity: dict, extractor, datamodule, compute_if_missing: bool,
          device, batch_size: int):
    """Rank 0's decision: ('load', Reference) | ('compute', None) | ('error', message)."""
    try:
        if path is None or not path.is_file():
            if not compute_if_missing or datamodule is None:
                return ("error", f"reference statistics {path} do not exist; set ref_stats to an .npz with mu/sigma "
                                 "(e.g. ADM's VIRTUAL_imagenet256_labeled.npz) or compute_ref_if_missing=true")
            return ("compute", None)
        ref, images = load_reference(path)
        ours = str(ref.identity.get("source", "")).startswith("data:")
        expected = None
        if ours and datamodule is not None:
            n = len(_reference_dataset(datamodule))
            expected = n if identity["cap"] is None else min(identity["cap"], n)
        try:
            check_reference(ref, extractor, identity if ours else None, expected)
        except ReferenceError as err:
            if not keyed:
                raise
            print(f"[eval] recomputing {path}: {err}")  # our own cache file, out of date
            return ("compute", None)
        if ref.rows is None and images is not None and identity["rows"] > 0:
            ref.rows = rows_from_images(images[: identity["rows"]], extractor, device, batch_size)
        if ref.count is None and images is not None:
            ref.count = len(images)
        ref.identity = {**ref.identity, "count": ref.count}
        return ("load", ref)
    except ReferenceError as err:
        return ("error", str(err))
    except Exception as err:  # anything else must reach the other ranks too, or they wait for rank 0 forever
        return ("error", f"reference {path}: {type(err).__name__}: {err}")


def get_reference(path: str | None, extractor, datamodule, device, compute_if_missing: bool = True,
                  max_images: int | None = None, batch_size: int = 256, *, subset_seed: int = 0,
                  rows: int = DEFAULT_ROWS, data_cfg: dict | None = None, split: str = "train",
                  progress: bool = True) -> Reference:
    """Load or compute (once, rank 0 saving) the reference for this extractor; the same on every rank.

    path: an explicit file (ADM's reference batch, or ours; computed there when missing), or None for the
    file keyed by the identity under <cache>/ref_stats/ (needs data_cfg, the data config that describes
    the images; without either nothing is saved). max_images: the cap (a seeded random subset).
    """
    device = torch.device(device)
    source = data_source(data_cfg) if data_cfg is not None else None  # None: not known here, not compared
    identity = reference_identity(source, extractor.name, max_images, subset_seed, rows, split)
    keyed = path is None and data_cfg is not None
    target = Path(path) if path is not None else (default_reference_path(identity) if keyed else None)
    plan = None
    if rank_world()[0] == 0:
        plan = _plan(target, keyed, identity, extractor, datamodule, compute_if_missing, device, batch_size)
    kind, ref = broadcast_object(plan)
    if kind == "error":
        raise ReferenceError(ref)
    if kind == "compute":
        identity["source"] = identity["source"] or "data:" + type(datamodule).__name__
        ref = compute_reference(identity, extractor, datamodule, device, batch_size, progress)
        if target is not None and rank_world()[0] == 0:
            save_reference(target, ref)
            print(f"[eval] reference statistics of {ref.count} real images ({extractor.name}) saved to {target}")
        ref.path = str(target) if target is not None else None
        barrier()  # the file exists before any rank goes on
    return ref
