"""Shared pieces of the latent-cache tests: a JPEG ImageFolder written here, a tiny random VAE, a built cache."""

import shutil

import numpy as np
import pytest
from PIL import Image

from datamodules.image_sources import ImageFolderSource
from datamodules.latent_cache import CacheSpec, build_cache
from datamodules.vae import VAE, build_tiny_autoencoder

RES = 32  # crop size for the tiny VAE (latents 4 x 16 x 16)
SPEC = CacheSpec(vae="tiny-random", scale_factor=0.18215, resolution=RES, shard_size=4)
# (class, file name, (width, height), mode): odd sizes, a grayscale JPEG, a PNG, an upper-case extension.
IMAGES = [
    ("n01", "a.JPEG", (300, 130), "RGB"), ("n01", "b.jpg", (50, 40), "RGB"), ("n01", "c.png", (20, 25), "RGB"),
    ("n01", "d.JPEG", (64, 64), "L"), ("n02", "e.JPEG", (45, 77), "RGB"), ("n02", "f.jpeg", (129, 257), "RGB"),
    ("n02", "g.JPEG", (33, 33), "RGB"), ("n03", "h.JPEG", (100, 31), "RGB"), ("n03", "i.JPEG", (70, 90), "RGB"),
    ("n03", "j.JPEG", (256, 192), "RGB"),
]
CORRUPT = "n02/bad.JPEG"
FILES = sorted([f"{w}/{n}" for w, n, _, _ in IMAGES] + [CORRUPT])  # row order of the cache
CORRUPT_ROW = FILES.index(CORRUPT)


def write_images(folder, seed=0):
    """The IMAGES as files under folder/<wnid>/, plus a corrupt JPEG and a non-image file."""
    rng = np.random.default_rng(seed)
    for wnid, name, (w, h), mode in IMAGES:
        (folder / wnid).mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).convert(mode).save(folder / wnid / name)
    (folder / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" + bytes(200))
    (folder / "n03" / "notes.txt").write_text("not an image")


@pytest.fixture(scope="session")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    write_images(root / "train")
    return root


@pytest.fixture(scope="session")
def tiny_vae():
    return VAE(build_tiny_autoencoder(levels=2), device="cpu", name="tiny-random")


@pytest.fixture(scope="session")
def full_cache(image_root, tiny_vae, tmp_path_factory):
    """The reference cache (read-only: tests that damage a cache copy it first)."""
    cache = tmp_path_factory.mktemp("cache_full")
    build_cache(ImageFolderSource(image_root, "train"), cache, SPEC, tiny_vae, batch_size=3, num_workers=0,
                progress=False, max_failed_fraction=0.2)
    return cache


def load_arrays(cache, names=("mean", "std", "labels")):
    return {name: np.load(cache / f"{name}.npy") for name in names}


def copy_cache(src, dst):
    shutil.copytree(src, dst)
    return dst
