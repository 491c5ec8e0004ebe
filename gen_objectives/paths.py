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
    # True where d_sigma is infinite at t = 0 (sigma ~ sqrt(t)): training and sampling times must stay > 0.
    needs_positive_t: bool = False

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

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = log(alpha^2 / sigma^2), decreasing from +inf (data) towards the noise end."""
        return 2.0 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    @abc.abstractmethod
    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        """The inverse of log_snr: the time at which log(alpha^2 / sigma^2) = lam."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class VPPath(GaussianPath):
    """Song et al.'s VP-SDE path (seed eqs. 28-29): beta(t) linear in t, alpha^2 + sigma^2 = 1."""

    name = "vp"
    default_t_end = 1e-3
    needs_positive_t = True

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

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda = log(e^-B / (1 - e^-B)) = -log(expm1(B))."""
        return -torch.log(torch.expm1(self.B(t)))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        """B = log(1 + e^-lam), then the positive root of B(t) = t^2 (bmax - bmin) / 2 + t bmin (cancellation-free)."""
        B = torch.nn.functional.softplus(-lam)
        d = self.beta_max - self.beta_min
        return 2.0 * B / (self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * d * B))

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

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        """lambda = 2 log((1 - t) / t)  =>  t = sigmoid(-lambda / 2)."""
        return torch.sigmoid(-0.5 * lam)


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

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        """lambda = 2 log cot(pi t / 2)  =>  t = (2 / pi) atan(e^(-lambda / 2))."""
        return (2.0 / math.pi) * torch.atan(torch.exp(-0.5 * lam))


class DiscreteVPPath(GaussianPath):
    """The VP path of a discrete DDPM schedule: log(abar) as a C2 cubic spline in t through knots t_i = (i+1)/T.

    abar(0) = 1 and abar(t_i) = alphas_cumprod[i]; alpha = sqrt(abar), sigma = sqrt(1 - abar). The spline keeps
    the ODE drift smooth, so Heun stays second order (a piecewise-linear log abar would make beta(t) jump at every
    knot). A diffusion network sees t_net = T t - 1: its training step index i at the knots.
    """

    name = "vp"
    needs_positive_t = True

    def __init__(self, alphas_cumprod):
        from scipy.interpolate import CubicSpline

        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.T = ac.numel()
        self.alphas_cumprod = ac
        knots = torch.arange(self.T + 1, dtype=torch.float64) / self.T
        log_ac = torch.cat([torch.zeros(1, dtype=torch.float64), ac.log()])
        spline = CubicSpline(knots.numpy(), log_ac.numpy(), bc_type="natural")
        self.coef = torch.from_numpy(spline.c.copy())  # [4, T]: (t - t_k)^3, ^2, ^1, ^0 of segment k
        self.default_t_end = 1.0 / self.T  # the first step of the chain

    def _log_ac_and_slope(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """log abar(t) and d log abar / dt, computed in float64, returned in t's dtype."""
        t64 = t.to(torch.float64).clamp(0.0, 1.0)
        k = (t64 * self.T).floor().clamp(max=self.T - 1).long()
        u = t64 - k.to(torch.float64) / self.T  # (a long tensor / int is float32 in torch)
        c3, c2, c1, c0 = self.coef.to(t.device)[:, k]
        value = ((c3 * u + c2) * u + c1) * u + c0
        slope = (3.0 * c3 * u + 2.0 * c2) * u + c1
        return value.to(t.dtype), slope.to(t.dtype)

    def alpha(self, t: Tensor) -> Tensor:
        return (0.5 * self._log_ac_and_slope(t)[0]).exp()

    def sigma(self, t: Tensor) -> Tensor:
        return (-torch.expm1(self._log_ac_and_slope(t)[0])).clamp_min(0.0).sqrt()

    def d_alpha(self, t: Tensor) -> Tensor:
        return 0.5 * self._log_ac_and_slope(t)[1] * self.alpha(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        log_ac, slope = self._log_ac_and_slope(t)
        return -0.5 * slope * log_ac.exp() / self.sigma(t)

    def sde_g2(self, t: Tensor) -> Tensor:
        """g^2 = beta(t) = -d log abar / dt."""
        return -self._log_ac_and_slope(t)[1]

    def log_snr(self, t: Tensor) -> Tensor:
        log_ac = self._log_ac_and_slope(t)[0]
        return log_ac - torch.log(-torch.expm1(log_ac))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        """Bisection in float64 (log-SNR decreases along the spline): 60 halvings of [0, 1] reach round-off."""
        target = lam.to(torch.float64)
        lo, hi = torch.zeros_like(target), torch.ones_like(target)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid) > target  # still on the data side of the target
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return (0.5 * (lo + hi)).to(lam.dtype)

    def t_net(self, t: Tensor) -> Tensor:
        """The step index a discrete network was trained on: T t - 1 (i at the knot t_i = (i+1)/T)."""
        return self.T * t - 1.0

    def __repr__(self) -> str:
        return f"DiscreteVPPath(T={self.T})"


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


def check_time_on_path(path: GaussianPath, key: str, t: float) -> None:
    """Refuse t = 0 where the path is singular there (vp: d_sigma = beta / (2 sigma) is infinite at sigma = 0)."""
    if path.needs_positive_t and t <= 0.0:
        raise ValueError(f"{key}={float(t)} on path=vp: sigma(0) = 0 makes d_sigma and the score infinite at t = 0 "
                         f"(infinite losses, non-finite samples); use {key} > 0 (e.g. 1e-5 for t_min, 1e-3 for t_end)")


def make_path(name: str, beta_min: float = 0.1, beta_max: float = 20.0) -> GaussianPath:
    """Build a path by config name; beta_min/beta_max are validated even for paths that ignore them."""
    check_choice("path", name, PATHS)
    check_betas(beta_min, beta_max)
    if name == "vp":
        return VPPath(beta_min=beta_min, beta_max=beta_max)
    return PATHS[name]()
