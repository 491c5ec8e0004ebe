"""Conversions between eps, x0, score and velocity for any Gaussian affine path x_t = alpha x0 + sigma eps.

All coefficients are PathCoefs (alpha, sigma, d_alpha, d_sigma shaped [B,1,..]); arguments are keyword-free
tensors so the equations read as written:
  x0 = (x_t - sigma eps) / alpha,  score = -eps / sigma,  v = d_alpha x0 + d_sigma eps,
  eps = (alpha v - d_alpha x_t) / (alpha d_sigma - d_alpha sigma).
"""

from __future__ import annotations

from torch import Tensor

from .paths import PathCoefs


def x0_from_eps(x_t: Tensor, eps: Tensor, c: PathCoefs) -> Tensor:
    """x0 = (x_t - sigma eps) / alpha."""
    return (x_t - c.sigma * eps) / c.alpha


def eps_from_x0(x_t: Tensor, x0: Tensor, c: PathCoefs) -> Tensor:
    """eps = (x_t - alpha x0) / sigma."""
    return (x_t - c.alpha * x0) / c.sigma


def score_from_eps(eps: Tensor, c: PathCoefs) -> Tensor:
    """grad log p_t(x_t) = -eps / sigma (Tweedie for a Gaussian kernel)."""
    return -eps / c.sigma


def eps_from_score(score: Tensor, c: PathCoefs) -> Tensor:
    """eps = -sigma * score."""
    return -c.sigma * score


def velocity_from_x0_eps(x0: Tensor, eps: Tensor, c: PathCoefs) -> Tensor:
    """v = d_alpha x0 + d_sigma eps (seed eq. 27's target)."""
    return c.d_alpha * x0 + c.d_sigma * eps


def velocity_from_eps(x_t: Tensor, eps: Tensor, c: PathCoefs) -> Tensor:
    """v from eps through x0 = (x_t - sigma eps) / alpha."""
    return velocity_from_x0_eps(x0_from_eps(x_t, eps, c), eps, c)


def velocity_from_x0(x_t: Tensor, x0: Tensor, c: PathCoefs) -> Tensor:
    """v from x0 through eps = (x_t - alpha x0) / sigma."""
    return velocity_from_x0_eps(x0, eps_from_x0(x_t, x0, c), c)


def eps_from_velocity(x_t: Tensor, v: Tensor, c: PathCoefs) -> Tensor:
    """eps = (alpha v - d_alpha x_t) / (alpha d_sigma - d_alpha sigma); finite wherever the path is regular."""
    return (c.alpha * v - c.d_alpha * x_t) / (c.alpha * c.d_sigma - c.d_alpha * c.sigma)


def x0_from_velocity(x_t: Tensor, v: Tensor, c: PathCoefs) -> Tensor:
    """x0 = (d_sigma x_t - sigma v) / (alpha d_sigma - d_alpha sigma), no division by alpha."""
    return (c.d_sigma * x_t - c.sigma * v) / (c.alpha * c.d_sigma - c.d_alpha * c.sigma)


def score_from_velocity(x_t: Tensor, v: Tensor, c: PathCoefs) -> Tensor:
    """score = -eps(v) / sigma."""
    return score_from_eps(eps_from_velocity(x_t, v, c), c)


def velocity_from_score(x_t: Tensor, score: Tensor, c: PathCoefs) -> Tensor:
    """v = (d_alpha / alpha) x_t + (d_alpha sigma^2 / alpha - d_sigma sigma) score (the PF-ODE drift)."""
    return (c.d_alpha / c.alpha) * x_t + (c.d_alpha * c.sigma**2 / c.alpha - c.d_sigma * c.sigma) * score
