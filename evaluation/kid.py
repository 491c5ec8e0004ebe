"""KID (Binkowski et al. 2018): the unbiased MMD^2 between feature sets with the cubic polynomial kernel.

k(a, b) = (a.b / d + 1)^3. With X the n generated and Y the m reference features,
  MMD^2_u = sum_{i!=i'} k(x_i, x_i') / (n(n-1)) + sum_{j!=j'} k(y_j, y_j') / (m(m-1)) - 2 sum_{i,j} k(x_i, y_j) / (nm),
a two-sample U-statistic, unbiased for MMD^2 at any n, m (FID is not: it falls with more samples). It is
computed on all samples at once (papers average it over 100 subsets of 1,000, which has the same
expectation and more variance). Its standard error is the first-order (Hoeffding) term
  Var ~ 4/n Var_x[g_xx(x) - g_xy(x)] + 4/m Var_y[g_yy(y) - g_yx(y)],  g_ab(a) = E_b k(a, b),
estimated from the kernel's row means; it vanishes when the two distributions coincide (then the
error is of order 1/n and this estimate understates it).
"""

from __future__ import annotations

import math

import torch


def cubic_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a b^T / d + 1)^3 for a [n, d], b [m, d] -> [n, m]."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _row_sums(a: torch.Tensor, b: torch.Tensor, block: int) -> torch.Tensor:
    """sum_j k(a_i, b_j) for every row of a, in blocks of rows: [n]."""
    return torch.cat([cubic_kernel(a[i:i + block], b).sum(dim=1) for i in range(0, len(a), block)])


def kid(x: torch.Tensor, y: torch.Tensor, block: int = 4096) -> tuple[float, float]:
    """(MMD^2_u, its standard error) of generated features x [n, d] against reference features y [m, d]."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"KID needs features [n, d] and [m, d], got {tuple(x.shape)} and {tuple(y.shape)}")
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError(f"KID needs at least 2 samples on each side, got {n} and {m}")
    x, y = x.to(torch.float64), y.to(x.device, torch.float64)
    diag_x = ((x * x).sum(1) / x.shape[1] + 1.0) ** 3  # k(x_i, x_i)
    diag_y = ((y * y).sum(1) / y.shape[1] + 1.0) ** 3
    kxx = _row_sums(x, x, block) - diag_x  # sum over i' != i
    kyy = _row_sums(y, y, block) - diag_y
    kxy = _row_sums(x, y, block)           # sum over j, for each x_i
    kyx = _row_sums(y, x, block)           # sum over i, for each y_j
    mmd2 = kxx.sum() / (n * (n - 1)) + kyy.sum() / (m * (m - 1)) - 2.0 * kxy.sum() / (n * m)
    hx = kxx / (n - 1) - kxy / m
    hy = kyy / (m - 1) - kyx / n
    var = 4.0 / n * hx.var(unbiased=True) + 4.0 / m * hy.var(unbiased=True)
    return float(mmd2), math.sqrt(max(float(var), 0.0))
