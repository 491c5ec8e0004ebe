"""Gaussian affine paths x_t = alpha(t) * x0 + sigma(t) * eps, t = 0 data, t = 1 noise.

Every path gives alpha, sigma and their time derivatives d_alpha, d_sigma as elementwise functions of a
time tensor; they keep the input's dtype, so float64 in gives float64 out.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PathCoefs:
    """alpha, sigma, d_alpha, d_sigma at one time per sample, shaped to broadcast against x_t."""

    alpha: Tensor
    sigma: Tensor
    d_alpha: Tensor
    d_sigma: Tensor


def append_dims(t: Tensor, ndim: int) -> Tensor:
    """Reshape [B] to [B,1,...,1] with `ndim` dims so per-sample scalars broadcast over x."""
    return t.reshape(t.shape + (1,) * (ndim - t.ndim))


class GaussianPath(abc.ABC):
    """Base class: a path is its four coefficient functions plus a safe sampling end time."""

    name: str = ""
    # Smallest time the ODE/SDE samplers integrate down to (the path may be singular at t = 0).
    default_t_end: float = 0.0

    @abc.abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """Signal scale alpha(t) of x0 in x_t."""

    @abc.abstractmethod
    def sigma(self, t: Tensor) -> Tensor:
        """Noise scale sigma(t) of eps in x_t."""

    @abc.abstractmethod
    def d_alpha(self, t: Tensor) -> Tensor:
        """Time derivative d alpha / dt."""

    @abc.abstractmethod
    def d_sigma(self, t: Tensor) -> Tensor:
        """Time derivative d sigma / dt."""

    def coefs(self, t: Tensor, ndim: int) -> PathCoefs:
        """All four coefficients at t [B], reshaped to [B,1,..] for an x of `ndim` dims."""
        return PathCoefs(
            alpha=append_dims(self.alpha(t), ndim),
            sigma=append_dims(self.sigma(t), ndim),
            d_alpha=append_dims(self.d_alpha(t), ndim),
            d_sigma=append_dims(self.d_sigma(t), ndim),
        )

    def sde_g2(self, t: Tensor) -> Tensor:
        """Squared diffusion g(t)^2 of the forward SDE dx = (d_alpha/alpha) x dt + g dw with these marginals."""
        alpha, sigma = self.alpha(t), self.sigma(t)
        return 2.0 * sigma * self.d_sigma(t) - 2.0 * (self.d_alpha(t) / alpha) * sigma**2

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class VPPath(GaussianPath):
    """Song et al.'s VP-SDE path (seed eqs. 28-29): beta(t) linear in t, alpha^2 + sigma^2 = 1."""

    name = "vp"
    default_t_end = 1e-3

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        check_betas(beta_min, beta_max)
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t: Tensor) -> Tensor:
        """beta(t) = beta_min + t (beta_max - beta_min)."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def B(self, t: Tensor) -> Tensor:
        """B(t) = int_0^t beta = t^2 (beta_max - beta_min) / 2 + t beta_min."""
        return 0.5 * t**2 * (self.beta_max - self.beta_min) + t * self.beta_min

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(-0.5 * self.B(t))

    def sigma(self, t: Tensor) -> Tensor:
        # sqrt(1 - exp(-B)) via expm1 keeps precision for small t.
        return torch.sqrt(-torch.expm1(-self.B(t)))

    def d_alpha(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t) * self.alpha(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        # Singular at t = 0 (sigma -> 0): callers keep t >= t_min.
        return 0.5 * self.beta(t) * self.alpha(t) ** 2 / self.sigma(t)

    def sde_g2(self, t: Tensor) -> Tensor:
        """g(t)^2 = beta(t) for the VP-SDE."""
        return self.beta(t)

    def __repr__(self) -> str:
        return f"VPPath(beta_min={self.beta_min}, beta_max={self.beta_max})"


class LinearPath(GaussianPath):
    """Rectified-flow / linear interpolant: alpha = 1 - t, sigma = t."""

    name = "linear"

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def d_alpha(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)


class GVPPath(GaussianPath):
    """Generalised VP (trigonometric) interpolant: alpha = cos(pi t / 2), sigma = sin(pi t / 2)."""

    name = "gvp"

    def alpha(self, t: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * t)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sin(0.5 * math.pi * t)

    def d_alpha(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)


PATHS: dict[str, type[GaussianPath]] = {"vp": VPPath, "linear": LinearPath, "gvp": GVPPath}


def check_betas(beta_min: float, beta_max: float) -> None:
    """Fail at construction on a schedule that is not a valid increasing, non-negative beta."""
    if beta_min < 0 or beta_max < 0:
        raise ValueError(f"beta_min and beta_max must be >= 0, got beta_min={beta_min}, beta_max={beta_max}")
    if beta_min >= beta_max:
        raise ValueError(f"beta_min must be < beta_max, got beta_min={beta_min}, beta_max={beta_max}")


def check_choice(key: str, value, choices) -> None:
    """Raise a ValueError naming the config key and the allowed values."""
    if value not in choices:
        raise ValueError(f"Unknown {key} {value!r}; valid choices: {', '.join(sorted(map(str, choices)))}")


def make_path(name: str, beta_min: float = 0.1, beta_max: float = 20.0) -> GaussianPath:
    """Build a path by config name; beta_min/beta_max are validated even for paths that ignore them."""
    check_choice("path", name, PATHS)
    check_betas(beta_min, beta_max)
    if name == "vp":
        return VPPath(beta_min=beta_min, beta_max=beta_max)
    return PATHS[name]()
