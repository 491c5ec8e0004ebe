"""FID and Inception Score arithmetic: float64 running sums that combine exactly across DDP ranks.

Everything here works on sums (count, sum x, sum x x^T; per-split softmax sums for IS) so that the
result does not depend on how the samples were divided between processes, only on which samples exist.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

ADM_IS_SPLIT_SIZE = 5000  # ADM's evaluator scores IS on consecutive chunks of 5,000 samples, in file order


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] to uint8 exactly as DiT's sample_ddp.py does, so our FIDs match its .npz files."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8)


def _dist_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(flat: torch.Tensor) -> torch.Tensor:
    """Sum a float64 vector over all ranks (NCCL needs it on the GPU, gloo on the CPU)."""
    if _dist_world()[1] == 1:
        return flat
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    buf = flat.to(device=device, dtype=torch.float64).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.cpu()


class FeatureStats:
    """Running float64 sums of features; mean and covariance follow np.cov(rowvar=False) (n - 1)."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.dim = dim
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> None:
        """Add a batch [B, dim] of features (any float dtype; promoted to float64 before summing)."""
        x = torch.as_tensor(features).to(device=self.sum.device, dtype=torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be [B, {self.dim}], got {tuple(x.shape)}")
        self.count += x.shape[0]
        self.sum += x.sum(dim=0)
        self.outer += x.T @ x

    def all_reduce(self) -> FeatureStats:
        """Replace the local sums by the sums over all ranks (a no-op without a process group)."""
        if _dist_world()[1] == 1:
            return self
        flat = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64),
                          self.sum.cpu(), self.outer.cpu().reshape(-1)])
        total = _all_reduce_sum(flat)
        self.count = int(round(total[0].item()))
        self.sum = total[1:1 + self.dim].to(self.sum.device)
        self.outer = total[1 + self.dim:].reshape(self.dim, self.dim).to(self.outer.device)
        return self

    def mean(self) -> np.ndarray:
        if self.count < 1:
            raise ValueError("no features were accumulated")
        return (self.sum / self.count).cpu().numpy()

    def cov(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
        mu = self.sum / self.count
        cov = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        cov = 0.5 * (cov + cov.T)  # exact symmetry; the sums are symmetric up to rounding
        return cov.cpu().numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Eq. (31) in float64: ||mu1-mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2).

    The trace of the square root is the sum of square roots of the eigenvalues of the symmetric PSD
    matrix S1^1/2 S2 S1^1/2, so scipy.linalg.sqrtm's spurious imaginary parts cannot occur.
    """
    mu1, mu2 = np.asarray(mu1, np.float64).reshape(-1), np.asarray(mu2, np.float64).reshape(-1)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    w, v = np.linalg.eigh(0.5 * (s1 + s1.T))
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


class InceptionScoreStats:
    """IS as ADM computes it (consecutive splits of split_size in sample order), kept as per-split sums.

    Within a split, mean_i KL(p_i || p_bar) = mean_i sum_k p_ik log p_ik - sum_k p_bar_k log p_bar_k, so
    each split needs only count, sum_i p_i and sum_i sum_k p_ik log p_ik, which all_reduce exactly.
    """

    def __init__(self, num_samples: int, num_classes: int, split_size: int = ADM_IS_SPLIT_SIZE):
        self.split_size = split_size
        self.num_splits = max(1, math.ceil(num_samples / split_size))
        self.num_samples = num_samples
        self.count = torch.zeros(self.num_splits, dtype=torch.float64)
        self.sum_p = torch.zeros(self.num_splits, num_classes, dtype=torch.float64)
        self.sum_plogp = torch.zeros(self.num_splits, dtype=torch.float64)

    def update(self, logits: torch.Tensor, indices: torch.Tensor) -> None:
        """Add softmax(logits) of samples whose global indices (file order) are `indices`."""
        logits = torch.as_tensor(logits).detach().cpu().to(torch.float64)
        indices = torch.as_tensor(indices).cpu().long()
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise ValueError(f"sample indices must lie in [0, {self.num_samples})")
        p = torch.softmax(logits, dim=1)
        split = indices // self.split_size
        self.count.index_add_(0, split, torch.ones_like(split, dtype=torch.float64))
        self.sum_p.index_add_(0, split, p)
        self.sum_plogp.index_add_(0, split, torch.special.xlogy(p, p).sum(dim=1))

    def all_reduce(self) -> InceptionScoreStats:
        if _dist_world()[1] == 1:
            return self
        k = self.sum_p.shape[1]
        total = _all_reduce_sum(torch.cat([self.count, self.sum_p.reshape(-1), self.sum_plogp]))
        s = self.num_splits
        self.count, self.sum_p, self.sum_plogp = total[:s], total[s:s + s * k].reshape(s, k), total[s + s * k:]
        return self

    def score(self) -> float:
        """Mean over splits of exp(mean KL(p(y|x) || p(y)))."""
        scores = []
        for i in range(self.num_splits):
            n = self.count[i].item()
            if n == 0:
                continue
            p_bar = self.sum_p[i] / n
            kl = self.sum_plogp[i].item() / n - torch.special.xlogy(p_bar, p_bar).sum().item()
            scores.append(math.exp(kl))
        if not scores:
            raise ValueError("no logits were accumulated")
        return float(np.mean(scores))


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, count: int, extractor: str) -> Path:
    """Write reference statistics atomically (tmp + rename) so a crash never leaves a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
                 count=np.int64(count), extractor=np.array(extractor))
    os.replace(tmp, path)
    return path


def load_stats(path: str | os.PathLike, extractor: str | None = None) -> dict:
    """Read mu/sigma from our .npz or ADM's reference batch (VIRTUAL_imagenet256_labeled.npz).

    ADM's files carry no extractor id; they are Inception pool features, so they are accepted for any
    Inception extractor. A file written for a different extractor is refused: that FID would be garbage.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} do not exist")
    with np.load(path, allow_pickle=False) as data:
        if "mu" not in data or "sigma" not in data:
            raise KeyError(f"{path} has no 'mu'/'sigma' arrays (keys: {sorted(data.keys())}); "
                           "reference stats must be an .npz with mu and sigma, like ADM's reference batches")
        stored = str(data["extractor"]) if "extractor" in data else None
        out = {"mu": data["mu"].astype(np.float64), "sigma": data["sigma"].astype(np.float64),
               "count": int(data["count"]) if "count" in data else None, "extractor": stored}
    if extractor is not None:
        same = stored == extractor if stored is not None else extractor.startswith("inception")
        if not same:
            raise ValueError(f"{path} holds statistics of extractor {stored or 'inception (ADM file)'}, "
                             f"but features come from {extractor}; recompute the reference statistics")
    return out
