"""The variational-bound terms of DiT/IDDPM's learned variance, for the discrete chain and for any Gaussian path.

One reverse step s = t - delta < t on a path x_t = alpha_t x0 + sigma_t eps (Kingma et al. 2021, VDM):
  alpha_ts = alpha_t / alpha_s,   sigma2_ts = sigma_t^2 - alpha_ts^2 sigma_s^2          (q(x_t | x_s))
  q(x_s | x_t, x0) = N(alpha_ts sigma_s^2 / sigma_t^2 x_t + alpha_s sigma2_ts / sigma_t^2 x0,
                       sigma2_ts sigma_s^2 / sigma_t^2)
On vp at the knots of a discrete schedule sigma2_ts is beta_i and the posterior variance beta-tilde_i. The learned
log variance is frac log sigma2_ts + (1 - frac) log beta-tilde, frac = (v + 1) / 2; at the first step (s = 0)
beta-tilde is 0 and is replaced by the next step's (IDDPM's clipping), and the term is the decoder NLL.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .factors import mean_flat
from .paths import GaussianPath, append_dims

LOG2 = math.log(2.0)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def gaussian_log_likelihood(x: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """log N(x; mean, e^log_var) elementwise, in nats (continuous decoder)."""
    return -0.5 * (math.log(2 * math.pi) + log_var + (x - mean) ** 2 * torch.exp(-log_var))


class ExactNormalCDF:
    """Phi through log_ndtr: exact in the tails."""

    name = "exact"

    def log_cdf(self, z: Tensor) -> Tensor:
        return torch.special.log_ndtr(z)

    def log_sf(self, z: Tensor) -> Tensor:
        return torch.special.log_ndtr(-z)

    def log_mass(self, upper: Tensor, lower: Tensor) -> Tensor:
        return (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp_min(1e-12).log()


class DiTTanhCDF:
    """DiT/IDDPM's Phi(z) ~ (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))) / 2, logs clamped at 1e-12 (as published)."""

    name = "dit_tanh"

    def cdf(self, z: Tensor) -> Tensor:
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))

    def log_cdf(self, z: Tensor) -> Tensor:
        return self.cdf(z).clamp(min=1e-12).log()

    def log_sf(self, z: Tensor) -> Tensor:
        return (1.0 - self.cdf(z)).clamp(min=1e-12).log()

    def log_mass(self, upper: Tensor, lower: Tensor) -> Tensor:
        return (self.cdf(upper) - self.cdf(lower)).clamp(min=1e-12).log()


NORMAL_CDFS = {c.name: c for c in (ExactNormalCDF, DiTTanhCDF)}


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor, bin_width: float = 2.0 / 255.0,
                                        cdf=None) -> Tensor:
    """log P(bin of x) under N(mean, e^(2 log_scale)) for data on a grid of spacing bin_width in [-1, 1], nats.

    The outermost bins extend to -inf / +inf (IDDPM's decoder semantics); 2/255 is DiT's 8-bit grid.
    """
    cdf = ExactNormalCDF() if cdf is None else cdf
    inv_std = torch.exp(-log_scale)
    half = 0.5 * bin_width
    upper = inv_std * (x - mean + half)
    lower = inv_std * (x - mean - half)
    return torch.where(x < -0.999, cdf.log_cdf(upper), torch.where(x > 0.999, cdf.log_sf(lower),
                                                                    cdf.log_mass(upper, lower)))


class Decoder:
    """The t = 0 term: discretised (bin_width, CDF) or continuous Gaussian log-likelihood of x0, elementwise nats."""

    def __init__(self, discretized: bool, bin_width: float, cdf: str = "exact"):
        self.discretized, self.bin_width, self.cdf = discretized, float(bin_width), NORMAL_CDFS[cdf]()

    def log_prob(self, x0: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
        if self.discretized:
            return discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var, self.bin_width, self.cdf)
        return gaussian_log_likelihood(x0, mean, log_var)


def path_step(path: GaussianPath, t: Tensor, s: Tensor) -> dict[str, Tensor]:
    """float64 coefficients [B] of q(x_s | x_t, x0): mean_xt, mean_x0, var, and sigma2_ts (the upper variance)."""
    a_t, s_t, a_s, s_s = path.alpha(t), path.sigma(t), path.alpha(s), path.sigma(s)
    a_ts = a_t / a_s
    sigma2_ts = s_t**2 - a_ts**2 * s_s**2
    return {"mean_xt": a_ts * s_s**2 / s_t**2, "mean_x0": a_s * sigma2_ts / s_t**2,
            "var": sigma2_ts * s_s**2 / s_t**2, "sigma2_ts": sigma2_ts}


def path_vlb_bits(path: GaussianPath, t: Tensor, delta: float, x0: Tensor, x_t: Tensor, x0_hat: Tensor,
                  v: Tensor, decoder: Decoder) -> Tensor:
    """L(t) in bits per dim [B]: KL(q(x_s|x_t,x0) || p(x_s|x_t)) with s = t - delta, or the decoder NLL if s <= 0.

    p's mean is q's mean at x0_hat (held fixed by the caller: the hybrid loss trains only the variance).
    """
    t64 = t.double()
    first = t64 <= delta * (1.0 + 1e-6)  # the chain's first step: s = 0, x0 is decoded
    s64 = torch.where(first, torch.zeros_like(t64), t64 - delta)
    step = path_step(path, t64, s64)
    nxt = path_step(path, t64 + delta, t64)  # the next step's posterior variance clips the first (IDDPM)
    log_lo = torch.where(first, nxt["var"].log(), step["var"].clamp_min(1e-300).log())
    log_hi = step["sigma2_ts"].log()

    def bcast(a: Tensor) -> Tensor:
        return append_dims(a.to(x_t.dtype), x_t.ndim)

    frac = (v + 1.0) / 2.0
    log_var = frac * bcast(log_hi) + (1.0 - frac) * bcast(log_lo)
    mean = bcast(step["mean_xt"]) * x_t + bcast(step["mean_x0"]) * x0_hat
    true_mean = bcast(step["mean_xt"]) * x_t + bcast(step["mean_x0"]) * x0
    true_log_var = bcast(step["var"].clamp_min(1e-300).log()).expand_as(x_t)
    kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / LOG2
    nll = -mean_flat(decoder.log_prob(x0, mean, log_var)) / LOG2
    return torch.where(first, nll, kl)
