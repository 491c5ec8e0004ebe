"""FD-DINOv2 (Stein et al. 2023, dgm-eval): DINOv2 ViT-L/14 CLS features of images resized to 224.

`DinoViT` is a plain ViT whose parameter names and shapes are those of the official DINOv2 hub models
(`dinov2_vitl14`: patch 14, dim 1024, depth 24, 16 heads, LayerScale, pos_embed for 518 px, no register
tokens), so the official `dinov2_vitl14_pretrain.pth` loads with strict=True from a local path (`make
assets ARGS=--dinov2`). Inference only: no stochastic depth, no masking (mask_token is kept for the keys).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
DINOV2_FILE = "dinov2_vitl14_pretrain.pth"
VITL14 = {"name": "vitl14", "dim": 1024, "depth": 24, "heads": 16, "patch": 14, "pretrain_size": 518,
          "mlp_ratio": 4}
INPUT_SIZE = 224  # dgm-eval resizes every image to 224 x 224 (bicubic)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POS_INTERPOLATE_OFFSET = 0.1  # DINOv2's interpolate_offset: the scale factor is (n + 0.1) / M


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # [B, h, N, c/h]
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))); LayerNorm eps 1e-6."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, dim]


class DinoViT(nn.Module):
    """The DINOv2 backbone's inference path: returns the final-norm CLS token [B, dim]."""

    def __init__(self, dim: int, depth: int, heads: int, patch: int, pretrain_size: int, mlp_ratio: int = 4,
                 name: str = "custom"):
        super().__init__()
        self.patch = patch
        grid = pretrain_size // patch
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # used only in training; kept so the keys match
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        """pos_embed resized bicubically to an (h/p) x (w/p) grid, with DINOv2's +0.1 scale-factor offset."""
        n = self.pos_embed.shape[1] - 1
        gh, gw = h // self.patch, w // self.patch
        if gh * gw == n and h == w:
            return self.pos_embed
        m = int(math.sqrt(n))
        pos = self.pos_embed.float()
        grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)  # [1, dim, M, M]
        scale = ((gh + POS_INTERPOLATE_OFFSET) / m, (gw + POS_INTERPOLATE_OFFSET) / m)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
        if grid.shape[-2:] != (gh, gw):
            raise ValueError(f"pos_embed interpolation gave {tuple(grid.shape[-2:])}, expected {(gh, gw)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([pos[:, :1], grid], dim=1).to(self.pos_embed.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        tokens = tokens + self.pos_embed_for(h, w)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


def dinov2_weight_candidates(weights_path: str | None, cache_dir: str | None) -> list[Path]:
    """The places searched for dinov2_vitl14_pretrain.pth, in order."""
    from evaluation.features import default_cache_dir

    if weights_path:
        return [Path(weights_path).expanduser()]
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return [cache / DINOV2_FILE, Path("data/assets").resolve() / DINOV2_FILE,
            Path(torch.hub.get_dir()) / "checkpoints" / DINOV2_FILE]


def missing_dinov2_message(searched: list[Path]) -> str:
    where = "\n  ".join(str(p) for p in searched)
    return (f"FD-DINOv2 needs the DINOv2 ViT-L/14 weights, which were not found at:\n  {where}\n"
            f"Download {DINOV2_URL} (`make assets ARGS=--dinov2` on a machine with internet) and set "
            f"extractor.dinov2_weights_path=/path/to/{DINOV2_FILE} (callbacks: callbacks.fid.extractor."
            "dinov2_weights_path=...).")


def resize_like_pil(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> uint8 [B, 3, size, size] with PIL's bicubic resize, as torchvision's Resize does
    on the PIL images dgm-eval feeds (antialiased, uint8 between the two 1-D passes)."""
    from PIL import Image

    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    out = np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.BICUBIC)) for a in arr])
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(images.device)


class DinoV2Features(nn.Module):
    """FD-DINOv2's feature space: the official ViT-L/14 weights, dgm-eval's preprocessing, CLS features."""

    fd_names = {"pool": "fd_dinov2"}
    prefix = "dinov2_"
    num_logits = 0
    logits_are_data_classes = False
    note = None

    def __init__(self, weights_path: str | None = None, cache_dir: str | None = None, arch: dict | None = None):
        """arch: the ViT's shape (default ViT-L/14); tests pass a tiny one with a weights file of that shape."""
        super().__init__()
        arch = dict(arch or VITL14)
        searched = dinov2_weight_candidates(weights_path, cache_dir)
        found = next((p for p in searched if p.is_file()), None)
        if found is None:
            raise FileNotFoundError(missing_dinov2_message(searched))
        with torch.device("meta"):  # no random init of 300M numbers: the file's tensors are assigned
            self.net = DinoViT(**arch)
        state = torch.load(found, map_location="cpu", weights_only=True)
        try:
            self.net.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise ValueError(f"{found} is not a DINOv2 {arch['name']} state dict ({first})") from None
        self.net.eval().requires_grad_(False)
        self.name = f"dinov2-{arch['name']}"
        self.dims = {"pool": arch["dim"]}
        self.weights_file = str(found)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8:
            raise TypeError(f"DINOv2 features need uint8 images (quantize first), got {images.dtype}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        x = resize_like_pil(images).float() / 255.0
        x = (x - self.mean) / self.std
        return {"pool": self.net(x).float()}
