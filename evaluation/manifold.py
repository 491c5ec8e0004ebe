"""Improved precision and recall (Kynkaanniemi et al. 2019) as ADM's evaluator computes them.

Each feature set is a union of balls: around every point, the distance to its k-th nearest neighbour in
its own set (k = 3; the point itself is the 0-th). Precision = fraction of samples inside some reference
ball; recall = fraction of reference points inside some sample ball. Distances are computed in blocks of
rows x columns keeping only the k+1 smallest per row, so 50K x 50K never exists in memory at once.
ADM compares squared distances computed in float16 (float32 where that overflows); here they are float32
by default (`dtype`), which can flip points lying on a ball's boundary to within rounding.
"""

from __future__ import annotations

import torch

ADM_K = 3


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||^2 as ADM writes it (norms minus twice the Gram matrix, clamped at 0): [n, m]."""
    return ((a * a).sum(1, keepdim=True) - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]).clamp_min_(0.0)


def knn_radii(features: torch.Tensor, k: int = ADM_K, block: int = 10000) -> torch.Tensor:
    """Squared distance of every row to its k-th nearest row of the same set (itself being the 0-th): [n]."""
    n = len(features)
    if n <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points, got {n}")
    radii = torch.empty(n, dtype=features.dtype, device=features.device)
    for i in range(0, n, block):
        rows = features[i:i + block]
        best = None  # the k+1 smallest distances seen so far, per row
        for j in range(0, n, block):
            d = squared_distances(rows, features[j:j + block])
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = torch.topk(cand, min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii[i:i + block] = best[:, k]
    return radii


def inside_any_ball(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor,
                    block: int = 10000) -> torch.Tensor:
    """For each point, whether ||p - c_j||^2 <= r_j for some center j: bool [n]."""
    out = torch.zeros(len(points), dtype=torch.bool, device=points.device)
    for i in range(0, len(points), block):
        p = points[i:i + block]
        for j in range(0, len(centers), block):
            d = squared_distances(p, centers[j:j + block])
            out[i:i + block] |= (d <= radii[None, j:j + block]).any(dim=1)
    return out


def precision_recall(reference: torch.Tensor, samples: torch.Tensor, k: int = ADM_K, block: int = 10000,
                     dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(precision, recall) of samples [n, d] against reference features [m, d], ADM's definition."""
    if reference.ndim != 2 or samples.ndim != 2 or reference.shape[1] != samples.shape[1]:
        raise ValueError(f"precision/recall need features [m, d] and [n, d], got {tuple(reference.shape)} "
                         f"and {tuple(samples.shape)}")
    ref = reference.to(dtype)
    smp = samples.to(ref.device, dtype)
    ref_radii = knn_radii(ref, k, block)
    smp_radii = knn_radii(smp, k, block)
    precision = inside_any_ball(smp, ref, ref_radii, block).double().mean().item()
    recall = inside_any_ball(ref, smp, smp_radii, block).double().mean().item()
    return precision, recall
