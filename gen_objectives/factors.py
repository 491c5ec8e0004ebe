"""The factors that make diffusion, score and flow three corners of one grid: prediction, weighting, time sampling.

Every prediction target P is affine in eps at fixed x_t, P = a(x_t) + c_P(t) eps, so every regression loss is a
time-dependent multiple of the eps-MSE: |P_hat - P|^2 = c_P^2 |eps_hat - eps|^2. A weighting is therefore one
function w(t) on the eps-MSE; it is applied in the prediction's own space as w / c_P^2 (exactly 1 where the
weighting is native to the prediction: eps-MSE for eps, v-MSE for velocity), so each corner's loss is unchanged.
  eps:      c = 1                       velocity: c = d_sigma - d_alpha sigma / alpha
  x0:       c = -sigma / alpha          score:    c = -1 / sigma
"""

from __future__ import annotations

import torch
from torch import Tensor

from .conversions import (
    eps_from_score,
    eps_from_velocity,
    eps_from_x0,
    score_from_eps,
    score_from_velocity,
    velocity_from_eps,
    velocity_from_score,
    velocity_from_x0,
    x0_from_eps,
    x0_from_velocity,
)
from .paths import GaussianPath, PathCoefs


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dims -> [B]."""
    return x.flatten(1).mean(1)


# ---- predictions: what the first C output channels estimate --------------------------------------------------
class EpsPrediction:
    """out = eps_hat."""

    name = "eps"

    def target(self, x0: Tensor, eps: Tensor, c: PathCoefs) -> Tensor:
        return eps

    def eps_coef(self, c: PathCoefs) -> Tensor:
        return torch.ones_like(c.sigma)

    def eps(self, out: Tensor, x: Tensor, c: PathCoefs) -> Tensor:
        return out

    def x0(self, out: Tensor, x: Tensor, c: PathCoefs) -> Tensor:
        return x0_from_eps(x, out, c)

    def velocity(self, out: Tensor, x: Tensor, c: PathCoefs) -> Tensor:
        return velocity_from_eps(x, out, c)

    def score(self, out: Tensor, x: Tensor, c: PathCoefs) -> Tensor:
        return score_from_eps(out, c)


class VelocityPrediction:
    """out = v_hat = d_alpha x0_hat + d_sigma eps_hat (seed eq. 27)."""

    name = "velocity"

    def target(self, x0: Tensor, eps: Tensor, c: PathCoefs) -> Tensor:
        return c.d_alpha * x0 + c.d_sigma * eps  # d/dt x_t

    def eps_coef(self, c: PathCoefs) -> Tensor:
        return (c.alpha * c.d_sigma - c.d_alpha * c.sigma) / c.alpha

    def eps(self, out: Tensor, x: Tensor, c: PathCoefs) -> Tensor:
        return eps_from_velocity(x, out, c)

    def x0(self, out: Tensor, x: Tensor, c: PathCoefs) -> Tensor:
        return x0_from_velocity(x, out, c)

    def velocity(self, out: Tensor, x: Tensor, c: PathCoefs) -> Tensor:
        return out

    def score(self, out: Tensor, x: Tensor, c: PathCoefs) -> Tensor:
        return score_from_velocity(x, out, c)


class X0Prediction:
    """out = x0_hat."""

    name = "x0"

    def target(self, x0: Tensor, eps: Tensor, c: PathCoefs) -> Tensor:
        return x0

    def eps_coef(self, c: PathCoefs) -> Tensor:
        return -c.sigma / c.alpha

    def eps(self, out: Tensor, x: Tensor, c: PathCoefs) -> Tensor:
        return eps_from_x0(x, out, c)

    def x0(self, out: Tensor, x: Tensor, c: PathCoefs) -> Tensor:
        return out

    def velocity(self, out: Tensor, x: Tensor, c: PathCoefs) -> Tensor:
        return velocity_from_x0(x, out, c)

    def score(self, out: Tensor, x: Tensor, c: PathCoefs) -> Tensor:
        return score_from_eps(eps_from_x0(x, out, c), c)


class ScorePrediction:
    """out = score_hat = grad log p_t(x_t) = -eps_hat / sigma."""

    name = "score"

    def target(self, x0: Tensor, eps: Tensor, c: PathCoefs) -> Tensor:
        return -eps / c.sigma

    def eps_coef(self, c: PathCoefs) -> Tensor:
        return -1.0 / c.sigma

    def eps(self, out: Tensor, x: Tensor, c: PathCoefs) -> Tensor:
        return eps_from_score(out, c)

    def x0(self, out: Tensor, x: Tensor, c: PathCoefs) -> Tensor:
        return x0_from_eps(x, eps_from_score(out, c), c)

    def velocity(self, out: Tensor, x: Tensor, c: PathCoefs) -> Tensor:
        return velocity_from_score(x, out, c)

    def score(self, out: Tensor, x: Tensor, c: PathCoefs) -> Tensor:
        return out


PREDICTIONS = {p.name: p for p in (EpsPrediction, VelocityPrediction, X0Prediction, ScorePrediction)}


# ---- weightings: w(t) on the eps-MSE, stated in the space where each is native --------------------------------
class Sigma2Weighting:
    """w = 1: the eps-MSE (lambda = sigma^2 on the score, DDPM's simple loss)."""

    name = "sigma2"
    native = "eps"

    def weight(self, path: GaussianPath, t: Tensor, c: PathCoefs) -> Tensor:
        return t.new_ones(t.shape)


class LikelihoodWeighting:
    """w = g^2 / sigma^2 = -d log SNR / dt: Song et al.'s lambda = g(t)^2 (beta(t) on vp) on the score MSE."""

    name = "likelihood"
    native = "eps"

    def weight(self, path: GaussianPath, t: Tensor, c: PathCoefs) -> Tensor:
        return path.sde_g2(t) / c.sigma.flatten() ** 2


class VelocityWeighting:
    """w = (d_sigma - d_alpha sigma / alpha)^2: the v-MSE of velocity matching (weight 1 on velocity)."""

    name = "velocity"
    native = "velocity"

    def weight(self, path: GaussianPath, t: Tensor, c: PathCoefs) -> Tensor:
        return t.new_ones(t.shape)


class MinSNRWeighting:
    """w = min(SNR, gamma) / SNR (Hang et al. 2023): the eps-MSE, down-weighted where SNR > gamma."""

    name = "min_snr"
    native = "eps"

    def __init__(self, gamma: float = 5.0):
        if not gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {gamma}")
        self.gamma = float(gamma)

    def weight(self, path: GaussianPath, t: Tensor, c: PathCoefs) -> Tensor:
        snr = (c.alpha / c.sigma).flatten() ** 2
        return snr.clamp(max=self.gamma) / snr


WEIGHTINGS = {w.name: w for w in (Sigma2Weighting, LikelihoodWeighting, VelocityWeighting, MinSNRWeighting)}


def loss_weight(prediction, weighting, path: GaussianPath, t: Tensor, c: PathCoefs) -> Tensor:
    """The factor [B] on the prediction's own MSE: w_native * (c_native / c_P)^2 (exactly w_native if native)."""
    w = weighting.weight(path, t, c)
    if weighting.native == prediction.name:
        return w
    native = PREDICTIONS[weighting.native]()
    return w * (native.eps_coef(c) / prediction.eps_coef(c)).flatten() ** 2


def regression_loss(prediction, weighting, path: GaussianPath, out: Tensor, x0: Tensor, eps: Tensor, t: Tensor,
                    c: PathCoefs) -> Tensor:
    """Per-sample weighted loss [B] of the first C output channels against the prediction's target."""
    return loss_weight(prediction, weighting, path, t, c) * mean_flat((out - prediction.target(x0, eps, c)) ** 2)


# ---- time sampling ---------------------------------------------------------------------------------------------
def _uniform(batch_size: int, device, generator: torch.Generator | None) -> Tensor:
    """U[0, 1) float32 [B], drawn on the generator's device."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(batch_size, generator=generator, device=gen_device).to(device)


class DiscreteTimes:
    """i ~ U{0..T-1} (long): the 1000 DDPM steps; continuous objectives read it as t = (i + 1) / T."""

    name = "discrete"

    def __init__(self, num_timesteps: int, t_min: float, t_max: float):
        self.T = int(num_timesteps)

    def sample(self, batch_size: int, device, generator: torch.Generator | None = None) -> Tensor:
        gen_device = generator.device if generator is not None else device
        return torch.randint(0, self.T, (batch_size,), generator=generator, device=gen_device).to(device)

    def density_ratio(self, t: Tensor) -> Tensor | None:
        return None


class UniformTimes:
    """t ~ U[t_min, t_max]."""

    name = "uniform"

    def __init__(self, num_timesteps: int, t_min: float, t_max: float):
        self.t_min, self.t_max = t_min, t_max

    def sample(self, batch_size: int, device, generator: torch.Generator | None = None) -> Tensor:
        return self.t_min + (self.t_max - self.t_min) * _uniform(batch_size, device, generator)

    def density_ratio(self, t: Tensor) -> Tensor | None:
        return None


class LogitNormalTimes:
    """t = t_min + (t_max - t_min) sigmoid(n), n ~ N(mean, std^2) (SD3's logit-normal, mapped into the range)."""

    name = "logit_normal"

    def __init__(self, num_timesteps: int, t_min: float, t_max: float, mean: float = 0.0, std: float = 1.0):
        if not std > 0:
            raise ValueError(f"logit_normal_std must be > 0, got {std}")
        self.t_min, self.t_max, self.mean, self.std = t_min, t_max, float(mean), float(std)

    def sample(self, batch_size: int, device, generator: torch.Generator | None = None) -> Tensor:
        gen_device = generator.device if generator is not None else device
        n = torch.randn(batch_size, generator=generator, device=gen_device).to(device)
        return self.t_min + (self.t_max - self.t_min) * torch.sigmoid(self.mean + self.std * n)

    def density_ratio(self, t: Tensor) -> Tensor | None:
        return None


class LikelihoodImportanceTimes:
    """Song et al.'s importance sampling for the likelihood weighting: q(t) = w(t) / Z with w = -d lambda / dt.

    q is uniform in lambda = log SNR between lambda(t_max) and lambda(t_min), and Z = lambda(t_min) - lambda(t_max).
    The loss is multiplied by p(t) / q(t) (p = U[t_min, t_max]), so its expectation is the uniform-t one while
    the per-sample weight w p / q = Z / (t_max - t_min) is constant instead of heavy-tailed (w ~ 1/t at t -> 0).
    """

    name = "likelihood_importance"

    def __init__(self, path: GaussianPath, t_min: float, t_max: float):
        ends = path.log_snr(torch.tensor([t_min, t_max], dtype=torch.float64))
        if not torch.isfinite(ends).all():
            raise ValueError(f"importance_sampling needs a finite log-SNR at t_min={t_min} and t_max={t_max} on "
                             f"path={path.name} (got {ends.tolist()}); use t_min > 0 and t_max < 1 off vp")
        self.path, self.t_min, self.t_max = path, t_min, t_max
        self.lam_min_t, self.lam_max_t = float(ends[0]), float(ends[1])
        self.Z = self.lam_min_t - self.lam_max_t

    def sample(self, batch_size: int, device, generator: torch.Generator | None = None) -> Tensor:
        u = _uniform(batch_size, device, generator).double()
        lam = self.lam_min_t - u * self.Z
        return self.path.t_from_log_snr(lam).clamp(self.t_min, self.t_max).float()

    def density_ratio(self, t: Tensor) -> Tensor:
        """p(t) / q(t) = Z / ((t_max - t_min) w(t)), w = g^2 / sigma^2."""
        t64 = t.double()
        w = self.path.sde_g2(t64) / self.path.sigma(t64) ** 2
        return (self.Z / ((self.t_max - self.t_min) * w)).to(t.dtype)


TIME_SAMPLINGS = {s.name: s for s in (DiscreteTimes, UniformTimes, LogitNormalTimes)}
