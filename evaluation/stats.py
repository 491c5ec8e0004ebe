"""FID and Inception Score arithmetic: float64 running sums that combine exactly across DDP ranks.

Everything here works on sums (count, sum x, sum x x^T; per-split softmax sums for IS) so that the
result does not depend on how the samples were divided between processes, only on which samples exist.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from evaluation.distributed import all_reduce_sum, rank_world

ADM_IS_SPLIT_SIZE = 5000  # ADM's evaluator scores IS on consecutive chunks of 5,000 samples, in file order


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] to uint8 exactly as DiT's sample_ddp.py does, so our FIDs match its .npz files."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8)


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
        if rank_world()[1] == 1:
            return self
        flat = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64),
                          self.sum.cpu(), self.outer.cpu().reshape(-1)])
        total = all_reduce_sum(flat)
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


def sqrt_psd(sigma) -> np.ndarray:
    """The symmetric square root of a symmetric PSD matrix (negative rounding-level eigenvalues clipped)."""
    s = np.asarray(sigma, np.float64)
    w, v = np.linalg.eigh(0.5 * (s + s.T))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2, root1: np.ndarray | None = None) -> float:
    """Eq. (31) in float64: ||mu1-mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2).

    The trace of the square root is the sum of square roots of the eigenvalues of the symmetric PSD
    matrix S1^1/2 S2 S1^1/2, so scipy.linalg.sqrtm's spurious imaginary parts cannot occur.
    root1: sqrt_psd(sigma1) when the caller has it already (many distances to one reference).
    """
    mu1, mu2 = np.asarray(mu1, np.float64).reshape(-1), np.asarray(mu2, np.float64).reshape(-1)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    root1 = sqrt_psd(s1) if root1 is None else root1
    m = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def bootstrap_frechet_std(rows: torch.Tensor, mu_ref, sigma_ref, replicates: int, seed: int = 0) -> float | None:
    """Spread of the Frechet distance when the N samples [N, D] are resampled with replacement (the
    reference fixed): the uncertainty of the FID that comes from having N samples.

    Replicates see ~63% distinct samples, so their mean is biased upwards; only their standard deviation
    is reported. None for fewer than 2 replicates.
    """
    if replicates < 2:
        return None
    x = rows.to(torch.float64)
    root_ref = sqrt_psd(sigma_ref)
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(replicates):
        xb = x[torch.randint(len(x), (len(x),), generator=gen).to(x.device)]
        mu = xb.mean(0)
        cov = (xb - mu).T @ (xb - mu) / (len(xb) - 1)
        values.append(frechet_distance(mu_ref, sigma_ref, mu.cpu().numpy(), cov.cpu().numpy(), root1=root_ref))
    return float(np.std(values, ddof=1))


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
        if rank_world()[1] == 1:
            return self
        k = self.sum_p.shape[1]
        total = all_reduce_sum(torch.cat([self.count, self.sum_p.reshape(-1), self.sum_plogp]))
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
