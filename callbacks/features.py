"""Feature extractors for FID: torch-fidelity's InceptionV3 (ADM-comparable) and a small digits CNN.

Every extractor takes uint8 images [B, C, H, W] (the quantised samples, exactly what would be saved to
disk) and returns (features [B, D], logits [B, K] or None). `name` identifies the feature space and is
stored with reference statistics so that stats of one extractor are never compared with another's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from callbacks.fid_stats import quantize

INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def default_cache_dir() -> Path:
    """Where cached weights and classifiers live; $D2F_CACHE_DIR overrides ~/.cache/diffusion-to-flow."""
    return Path(os.environ.get("D2F_CACHE_DIR", Path.home() / ".cache" / "diffusion-to-flow"))


@contextlib.contextmanager
def tf32_disabled():
    """TF32 matmuls/convolutions change Inception features enough to move FID; ADM's numbers use fp32."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


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
    """torch-fidelity `inception-v3-compat`: pool '2048' features for FID, bias-free logits for IS.

    It is fed uint8 at native resolution (it resizes like TF1 internally; do not pre-resize), as ADM's
    evaluator and published PyTorch ports that match it to <0.04% FID do.
    """

    name = "inception-v3-compat-2048"
    feature_dim = 2048
    num_logits = 1008
    logits_are_data_classes = False

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

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8:
            raise TypeError(f"Inception features need uint8 images (quantize first), got {images.dtype}")
        if images.shape[1] == 1:  # grayscale data: replicate to RGB, as image viewers do
            images = images.expand(-1, 3, -1, -1)
        with tf32_disabled():
            pool, logits = self.net(images.contiguous())
        return pool, logits


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

    logits_are_data_classes = True

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
        self.feature_dim = feature_dim
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
        logits = self(quantize(x))[1]
        return (logits.argmax(1).cpu() == y).float().mean().item()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8:
            raise TypeError(f"digits features need uint8 images (quantize first), got {images.dtype}")
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"digits CNN was trained on {self.image_size}x{self.image_size} images, got "
                             f"{tuple(images.shape[-2:])}; set the extractor's image_size to the data's")
        return self.net(_uint8_to_unit(images))


def extractor_summary(extractor: nn.Module) -> dict:
    """What to log next to an FID so a reader knows which feature space produced it."""
    out = {"extractor": extractor.name}
    if isinstance(extractor, DigitsFeatures):
        out["extractor_note"] = "digits-FID: penultimate layer of a small digits CNN, not Inception FID"
        out["classifier_val_accuracy"] = extractor.val_accuracy
    return out
