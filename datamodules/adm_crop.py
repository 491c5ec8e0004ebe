"""ADM/DiT image preprocessing (center crop to a square) and the ImageFolder file listing."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Same extension set as torchvision's ImageFolder, compared case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def adm_resize_plan(width: int, height: int, size: int) -> list[tuple[int, int, str]]:
    """The (width, height, filter) resize steps of the ADM crop, so tests can check the rule by hand."""
    steps: list[tuple[int, int, str]] = []
    w, h = width, height
    while min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
        steps.append((w, h, "box"))
    scale = size / min(w, h)
    steps.append((round(w * scale), round(h * scale), "bicubic"))
    return steps


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's center crop: box-halve while the short side >= 2*size, bicubic to short side = size, crop."""
    filters = {"box": Image.BOX, "bicubic": Image.BICUBIC}
    for w, h, name in adm_resize_plan(image.width, image.height, size):
        image = image.resize((w, h), resample=filters[name])
    left = (image.width - size) // 2
    top = (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image fully (so truncated files fail here, not later) and convert it to RGB."""
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


def to_tensor_pm1(image: Image.Image) -> torch.Tensor:
    """uint8 HWC RGB image -> float [3,H,W] in [-1, 1], as DiT's Normalize(0.5, 0.5)."""
    arr = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def preprocess(path: str | os.PathLike, size: int) -> torch.Tensor:
    """File -> ADM-cropped [3,size,size] tensor in [-1, 1]."""
    return preprocess_image(load_image(path), size)


def preprocess_image(image: Image.Image, size: int) -> torch.Tensor:
    """RGB image -> ADM-cropped [3,size,size] tensor in [-1, 1]."""
    return to_tensor_pm1(adm_center_crop(image, size))


def list_image_folder(root: str | os.PathLike) -> tuple[list[str], list[int], list[str]]:
    """ImageFolder listing of root/<wnid>/**: sorted relative paths, labels by sorted wnid, the wnids."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist (expected <root>/<wnid>/*.JPEG)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"image folder {str(root)!r} has no class sub-folders (expected <root>/<wnid>/*.JPEG)")
    files: list[str] = []
    labels: list[int] = []
    for label, wnid in enumerate(classes):
        found = []
        for dirpath, _dirs, names in os.walk(root / wnid, followlinks=True):
            for name in names:
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(os.path.relpath(os.path.join(dirpath, name), root))
        for rel in sorted(found):
            files.append(rel.replace(os.sep, "/"))
            labels.append(label)
    if not files:
        raise FileNotFoundError(f"image folder {str(root)!r} has class folders but no images")
    return files, labels, classes


def file_list_hash(files: list[str], labels: list[int]) -> str:
    """sha256 over the (label, path) list: identifies which images a cache was built from."""
    digest = hashlib.sha256()
    for rel, label in zip(files, labels, strict=True):
        digest.update(f"{label}\t{rel}\n".encode())
    return digest.hexdigest()
