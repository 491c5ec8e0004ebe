"""Which samples exist, who generates them, and the resumable chunk store they are written to.

Which samples exist depends only on (seed, global sample index): sample i gets its initial noise and
class label from a generator seeded by (seed, i), and a chunk of samples [start, end) gets the sampler's
own randomness from (seed, start). Chunks are dealt to ranks round-robin, so ranks never duplicate a
sample and the set of samples is the same for 1 or 64 processes (for stochastic samplers, as long as
the chunk size, i.e. batch_size, is the same).
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from evaluation.distributed import rank_world
from evaluation.stats import quantize

LABEL_MODES = ("uniform", "balanced")
GenerateFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def mix_seed(seed: int, index: int, stream: int = 0) -> int:
    """A well-mixed 63-bit seed per (seed, index, stream); seed + index would make runs overlap."""
    return int(np.random.SeedSequence([int(seed), int(index), int(stream)]).generate_state(2, np.uint64)[0] >> 1)


def chunk_bounds(num_samples: int, chunk_size: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) chunks covering 0..num_samples-1."""
    if num_samples < 1 or chunk_size < 1:
        raise ValueError(f"num_samples ({num_samples}) and batch_size ({chunk_size}) must be >= 1")
    return [(s, min(s + chunk_size, num_samples)) for s in range(0, num_samples, chunk_size)]


def chunks_for_rank(num_samples: int, chunk_size: int, rank: int, world_size: int) -> list[tuple[int, int, int]]:
    """(chunk id, start, end) of the chunks this rank generates: every world_size-th, disjoint by construction."""
    return [(c, s, e) for c, (s, e) in enumerate(chunk_bounds(num_samples, chunk_size)) if c % world_size == rank]


def noise_and_labels(start: int, end: int, shape: tuple[int, ...], num_classes: int, seed: int,
                     labels: str = "uniform") -> tuple[torch.Tensor, torch.Tensor]:
    """Initial noise [B, *shape] and labels [B] of samples start..end-1, each from its own seed.

    labels: `uniform` draws each label at random (DiT's protocol); `balanced` gives sample i the class
    i mod num_classes (exactly N / num_classes per class, e.g. 50 per class for 50K on ImageNet). The
    noise is the same in both modes: the random label is drawn (and discarded) either way.
    """
    if labels not in LABEL_MODES:
        raise ValueError(f"labels={labels!r}; choose one of {LABEL_MODES}")
    noise, ys = [], []
    for i in range(start, end):
        g = torch.Generator().manual_seed(mix_seed(seed, i))
        y = torch.randint(num_classes, (1,), generator=g)
        ys.append(y if labels == "uniform" else torch.tensor([i % num_classes]))
        noise.append(torch.randn(1, *shape, generator=g))
    return torch.cat(noise), torch.cat(ys)


@torch.no_grad()
def generate_chunk(generate: GenerateFn, decode: Callable[[torch.Tensor], torch.Tensor], start: int, end: int,
                   shape: tuple[int, ...], num_classes: int, seed: int, device: torch.device,
                   labels: str = "uniform") -> tuple[torch.Tensor, torch.Tensor]:
    """Samples start..end-1 as uint8 images [B, C, H, W] on the CPU (DiT's quantisation) and their labels."""
    noise, y = noise_and_labels(start, end, shape, num_classes, seed, labels)
    gen = torch.Generator(device=device).manual_seed(mix_seed(seed, start, stream=1))
    x = generate(noise.to(device), y.to(device), gen)
    return quantize(decode(x)).cpu(), y


class ChunkStore:
    """A folder of sample chunks, each written atomically, plus settings.json naming the sample set.

    A rerun with the same settings skips complete chunks and regenerates missing or truncated ones; a
    folder made for other settings (another checkpoint fingerprint, sampler, seed ...) is refused.
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.chunk_dir = self.out_dir / "chunks"

    def claim(self, settings: dict) -> None:
        """Refuse a folder holding another sample set; rank 0 writes settings.json (call after a barrier)."""
        path = self.out_dir / "settings.json"
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored != settings:
                diff = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
                what = ", ".join(f"{k}: {stored.get(k)!r} there, {settings.get(k)!r} now" for k in diff)
                raise ValueError(f"{self.out_dir} holds samples of another sample set ({what}); choose another "
                                 "out_dir or delete that folder")
        elif rank_world()[0] == 0:
            tmp = path.with_name(f"settings.json.tmp{os.getpid()}")
            tmp.write_text(json.dumps(settings, indent=2))
            os.replace(tmp, path)

    def path(self, chunk: int) -> Path:
        return self.chunk_dir / f"chunk_{chunk:06d}.npz"

    def read(self, chunk: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray, float | None] | None:
        """(images NHWC uint8, labels, network evaluations per sample) of a complete chunk file covering
        [start, end), else None."""
        path = self.path(chunk)
        if not path.is_file():
            return None
        try:
            with np.load(path) as f:
                if int(f["start"]) != start or int(f["end"]) != end:
                    return None
                nfe = float(f["nfe"]) if "nfe" in f.files else None
                return f["images"], f["labels"], nfe
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None  # unreadable: regenerate

    def write(self, chunk: int, images: np.ndarray, labels: np.ndarray, start: int, end: int,
              nfe: float | None = None) -> None:
        """Atomic write: a chunk file either is complete or does not exist."""
        path = self.path(chunk)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            extra = {} if nfe is None else {"nfe": np.float64(nfe)}
            np.savez(f, images=images, labels=labels, start=np.int64(start), end=np.int64(end), **extra)
        os.replace(tmp, path)

    def first_images(self, n: int, num_samples: int, batch_size: int) -> np.ndarray:
        """The first n samples (NHWC uint8), for the grid."""
        parts = [self.read(c, s, e)[0] for c, (s, e) in enumerate(chunk_bounds(num_samples, batch_size)) if s < n]
        return np.concatenate(parts)[:n]

    def write_adm_npz(self, num_samples: int, batch_size: int, shape: tuple[int, int, int]) -> Path:
        """ADM/DiT format: arr_0 uint8 [N, H, W, 3] in sample order, streamed through a memmap (50K fits on disk)."""
        h, w = shape[1], shape[2]
        tmp_npy = self.out_dir / "samples_arr_0.tmp.npy"
        arr = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.uint8, shape=(num_samples, h, w, 3))
        for c, (s, e) in enumerate(chunk_bounds(num_samples, batch_size)):
            images = self.read(c, s, e)[0]
            arr[s:e] = images if images.shape[-1] == 3 else np.repeat(images, 3, axis=-1)
        arr.flush()
        path = self.out_dir / f"samples_{num_samples}.npz"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, arr_0=arr)
        del arr
        tmp_npy.unlink()
        os.replace(tmp, path)
        return path


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
    tmp = path.with_name(path.name + ".tmp.png")
    pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST).save(tmp)
    os.replace(tmp, path)
