"""Feature extractors: torch-fidelity's InceptionV3 (ADM-comparable), the digits CNN, DINOv2 ViT-L/14.

Every extractor takes uint8 images [B, C, H, W] (the quantised samples, exactly what would be saved to
disk) and returns a dict of features: `pool` [B, D] (FID, precision/recall, KID), optionally `spatial`
[B, D_s] (sFID) and `logits` [B, K] (IS, or class accuracy when they are the data's classes). `name`
identifies the feature space and is stored with reference statistics, so that statistics of one
extractor are never compared with another's; `fd_names`/`prefix` name its metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluation.stats import quantize

INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
EXTRACTORS = ("auto", "inception", "digits", "dinov2")
ADM_SPATIAL_CHANNELS = 7  # ADM's sFID: mixed_6/conv[..., :7] -> 17 * 17 * 7 = 2023 features


def default_cache_dir() -> Path:
    """Where cached weights, classifiers and reference statistics live; $D2F_CACHE_DIR overrides
    ~/.cache/diffusion-to-flow."""
    return Path(os.environ.get("D2F_CACHE_DIR") or Path.home() / ".cache" / "diffusion-to-flow")  # empty = unset


def inception_weight_candidates(weights_path: str | None, cache_dir: str | None) -> list[Path]:
    """The places searched for the Inception weights, in order."""
    if weights_path:
        return [Path(weights_path).expanduser()]
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return [cache / INCEPTION_FILE, Path("data/assets").resolve() / INCEPTION_FILE,  # `make assets` default
            Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE]


def missing_inception_message(searched: list[Path]) -> str:
    where = "\n  ".join(str(p) for p in searched)
    return (
        "FID needs torch-fidelity's InceptionV3 weights (inception-v3-compat), which were not found at:\n  "
        f"{where}\n"
        f"Download {INCEPTION_URL}\n"
        f"(`make assets` does this on a machine with internet) and put it at {searched[0]}, or point the "
        "config at the file: `extractor.weights_path=/path/to/" + INCEPTION_FILE + "` for evaluate.py, "
        "`callbacks.fid.extractor.weights_path=...` for the training callback."
    )


class InceptionFeatures(nn.Module):
    """torch-fidelity `inception-v3-compat`: pool_3 (2048) for FID, mixed_6/conv[:7] (2023) for sFID, and the
    bias-free logits for IS, as ADM's evaluator reads them from the same TF graph.

    It is fed uint8 at native resolution (it resizes like TF1 internally; do not pre-resize). TF's
    `mixed_6/conv` is torchvision's Mixed_6d.branch1x1 (conv, batch norm, ReLU) at 17x17; ADM keeps its
    first 7 channels and flattens in NHWC order, which this does too (so ADM's mu_s/sigma_s apply).
    """

    name = "inception-v3-compat"
    dims = {"pool": 2048, "spatial": 17 * 17 * ADM_SPATIAL_CHANNELS}
    fd_names = {"pool": "fid", "spatial": "sfid"}
    prefix = ""
    num_logits = 1008
    logits_are_data_classes = False
    note = None

    def __init__(self, weights_path: str | None = None, cache_dir: str | None = None, download: bool = False):
        """download: fetch torch-fidelity's release file when weights_path is None and no local copy exists."""
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        searched = inception_weight_candidates(weights_path, cache_dir)
        found = next((p for p in searched if p.is_file()), None)
        if found is None and (not download or weights_path):  # an explicit path that is missing is an error
            raise FileNotFoundError(missing_inception_message(searched))
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"],
                feature_extractor_weights_path=str(found) if found is not None else None)
        except OSError as err:  # the download failed (offline node)
            raise FileNotFoundError(missing_inception_message(searched)) from err
        self.weights_file = str(found) if found is not None else INCEPTION_URL
        self._spatial: torch.Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output) -> None:
        """[B, 192, 17, 17] -> the first 7 channels, flattened as TF's NHWC [B, 17 * 17 * 7]."""
        self._spatial = output[:, :ADM_SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(output), -1).float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8:
            raise TypeError(f"Inception features need uint8 images (quantize first), got {images.dtype}")
        if images.shape[1] == 1:  # grayscale data: replicate to RGB, as image viewers do
            images = images.expand(-1, 3, -1, -1)
        pool, logits = self.net(images.contiguous())
        spatial, self._spatial = self._spatial, None
        return {"pool": pool, "spatial": spatial, "logits": logits}


class DigitsCNN(nn.Module):
    """A small classifier for 1-channel digits; its 64-d penultimate layer is the digits-FID space."""

    def __init__(self, width: int = 16, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(16 * width, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.body(x)
        return feats, self.head(feats)


def _uint8_to_unit(images: torch.Tensor) -> torch.Tensor:
    """Invert `quantize` to [-1, 1] floats (grayscale; RGB input is averaged)."""
    x = (images.float() - 128.0) / 127.5
    return x.mean(dim=1, keepdim=True) if x.shape[1] != 1 else x


def train_digits_cnn(x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int, lr: float, seed: int,
                     width: int, feature_dim: int) -> DigitsCNN:
    """Train on quantised digits (the same uint8 round trip samples take) with tiny random shifts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsCNN(width, feature_dim, int(y.max()) + 1)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    xq = _uint8_to_unit(quantize(x))
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xq), generator=gen)
        for i in range(0, len(xq), batch_size):
            idx = perm[i:i + batch_size]
            xb = xq[idx]
            shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(net(xb)[1], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return net.eval()


class DigitsFeatures(nn.Module):
    """digits-FID features (NOT Inception FID): a DigitsCNN trained on the digits train split, cached.

    The cache file is keyed by a hash of every setting and of the training data, so a change to either
    retrains instead of silently reusing a stale classifier. Logits give class-consistency accuracy.
    """

    fd_names = {"pool": "digits_fid"}
    prefix = "digits_"
    logits_are_data_classes = True
    note = "digits-CNN features (a small digits classifier): NOT comparable with Inception numbers"

    def __init__(self, image_size: int = 16, val_fraction: float = 0.1, split_seed: int = 0, epochs: int = 30,
                 batch_size: int = 64, lr: float = 3e-3, seed: int = 0, width: int = 16, feature_dim: int = 64,
                 cache_dir: str | None = None, verbose: bool = True):
        super().__init__()
        from datamodules.digits import load_digits_tensors, split_indices

        x, y = load_digits_tensors(image_size)
        train_idx, val_idx = split_indices(len(x), val_fraction, split_seed)
        settings = dict(arch="DigitsCNN-v1", image_size=image_size, val_fraction=val_fraction,
                        split_seed=split_seed, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                        width=width, feature_dim=feature_dim,
                        data=hashlib.sha1(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest())
        key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.cache_file = cache / "digits_cnn" / f"{key}.pt"
        self.name = f"digits-cnn-{key}"
        self.image_size = image_size
        self.dims = {"pool": feature_dim}
        self.num_logits = 10
        self.net = DigitsCNN(width, feature_dim, 10)
        if self.cache_file.is_file():
            state = torch.load(self.cache_file, map_location="cpu", weights_only=True)
            self.net.load_state_dict(state["state_dict"])
            self.val_accuracy = float(state["val_accuracy"])
        else:
            net = train_digits_cnn(x[train_idx], y[train_idx], epochs=epochs, batch_size=batch_size, lr=lr,
                                   seed=seed, width=width, feature_dim=feature_dim)
            self.net.load_state_dict(net.state_dict())
            self.val_accuracy = self._accuracy(x[val_idx], y[val_idx]) if len(val_idx) else float("nan")
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_name(self.cache_file.name + f".tmp{os.getpid()}")
            torch.save({"state_dict": self.net.state_dict(), "settings": settings,
                        "val_accuracy": self.val_accuracy}, tmp)
            os.replace(tmp, self.cache_file)
            if verbose:
                print(f"[digits-cnn] trained, held-out accuracy {self.val_accuracy:.4f}; cached at {self.cache_file}")
        self.net.eval().requires_grad_(False)

    @torch.no_grad()
    def _accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        logits = self(quantize(x))["logits"]
        return (logits.argmax(1).cpu() == y).float().mean().item()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8:
            raise TypeError(f"digits features need uint8 images (quantize first), got {images.dtype}")
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"digits CNN was trained on {self.image_size}x{self.image_size} images, got "
                             f"{tuple(images.shape[-2:])}; set the extractor's image_size to the data's")
        feats, logits = self.net(_uint8_to_unit(images))
        return {"pool": feats, "logits": logits}


def resolve_extractor_names(names, is_digits: bool) -> list[str]:
    """`auto` -> digits for digits runs, inception otherwise; unknown names fail naming the choices."""
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError(f"extractor.name is empty; choose from {EXTRACTORS}")
    out = []
    for name in names:
        if name not in EXTRACTORS:
            raise ValueError(f"extractor.name={name!r}; choose from {EXTRACTORS}")
        name = ("digits" if is_digits else "inception") if name == "auto" else name
        if name not in out:
            out.append(name)
    return out


def build_extractor(name: str, options, data: dict) -> nn.Module:
    """One extractor by name. options: the `extractor` config block; data: the data config (digits settings)."""
    opt = dict(options or {})
    if name == "digits":
        if not data.get("_target_", "").endswith("DigitsDataModule"):
            raise ValueError("extractor.name=digits needs digits data (the digits CNN knows only 8x8/16x16/32x32 "
                             "digits); use inception or dinov2")
        return DigitsFeatures(image_size=data["image_size"], val_fraction=data.get("val_fraction", 0.1),
                              split_seed=data.get("seed", 0), epochs=opt.get("digits_epochs", 30),
                              cache_dir=opt.get("cache_dir"))
    if name == "inception":
        return InceptionFeatures(weights_path=opt.get("weights_path"), cache_dir=opt.get("cache_dir"),
                                 download=bool(opt.get("download", False)))
    if name == "dinov2":
        from evaluation.dinov2 import DinoV2Features

        return DinoV2Features(weights_path=opt.get("dinov2_weights_path"), cache_dir=opt.get("cache_dir"))
    raise ValueError(f"extractor.name={name!r}; choose from {EXTRACTORS}")


def extractor_summary(extractor: nn.Module) -> dict:
    """What to record next to the numbers so a reader knows which feature space produced them."""
    out = {"name": extractor.name}
    if extractor.note:
        out["note"] = extractor.note
    if isinstance(extractor, DigitsFeatures):
        out["classifier_val_accuracy"] = extractor.val_accuracy
    if isinstance(extractor, InceptionFeatures):
        out["weights"] = extractor.weights_file
    return out
