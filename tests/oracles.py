"""Analytic oracles: for x0 | y ~ N(m_y, s^2 I) every optimal network output is closed form.

With x_t = alpha x0 + sigma eps, x_t | y ~ N(alpha m_y, (alpha^2 s^2 + sigma^2) I) and
  E[eps | x_t] = sigma (x_t - alpha m) / (alpha^2 s^2 + sigma^2)
  E[x0 | x_t]  = m + alpha s^2 (x_t - alpha m) / (alpha^2 s^2 + sigma^2)
  Var[x0 | x_t] = s^2 sigma^2 / (alpha^2 s^2 + sigma^2)
  score        = -(x_t - alpha m) / (alpha^2 s^2 + sigma^2)
  velocity     = d_alpha E[x0 | x_t] + d_sigma E[eps | x_t].
Each oracle net reads time in its objective's own t_net convention, so a wrong convention breaks the tests.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from gen_objectives.paths import GaussianPath, append_dims
from gen_objectives.schedules import DiscreteSchedule


class GaussianData:
    """Class-conditional isotropic Gaussians; means [K(+1 null), C, H, W], shared std s."""

    def __init__(self, means: Tensor, s: float):
        self.means = means.double()
        self.s = float(s)

    def sample(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        m = self.means[y]
        return m + self.s * torch.randn(m.shape, generator=generator, dtype=m.dtype)

    def log_prob(self, x0: Tensor, y: Tensor) -> Tensor:
        """log N(x0; m_y, s^2 I) [B] in nats."""
        D = x0[0].numel()
        r2 = ((x0 - self.means[y]) / self.s).flatten(1).pow(2).sum(1)
        return -0.5 * r2 - D * math.log(self.s) - 0.5 * D * math.log(2 * math.pi)

    def posterior(self, x_t: Tensor, y: Tensor, alpha: Tensor, sigma: Tensor):
        """E[x0|x_t], E[eps|x_t], Var[x0|x_t] (alpha, sigma broadcastable to x_t)."""
        m, s2 = self.means[y].to(x_t), self.s**2
        denom = alpha**2 * s2 + sigma**2
        r = x_t - alpha * m
        return m + alpha * s2 * r / denom, sigma * r / denom, s2 * sigma**2 / denom

    def min_eps_mse(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        """Irreducible E|E[eps|x_t] - eps|^2 per dimension = alpha^2 s^2 / (alpha^2 s^2 + sigma^2)."""
        a2s2 = alpha**2 * self.s**2
        return a2s2 / (a2s2 + sigma**2)


class ContinuousOracle:
    """Optimal net on a path: reads t = t_net / 1000 (score/flow; diffusion: (t_net + 1) / T with
    `net_time="index"`) and returns eps, score, velocity or x0."""

    def __init__(self, data: GaussianData, path: GaussianPath, predict: str, extra_channels: bool = False,
                 perturb: float = 0.0, net_time: str = "1000t"):
        assert predict in ("eps", "score", "velocity", "x0") and net_time in ("1000t", "index")
        self.data, self.path, self.predict = data, path, predict
        self.extra_channels, self.perturb, self.net_time = extra_channels, perturb, net_time
        self.calls = 0

    def __call__(self, x_t: Tensor, t_net: Tensor, y: Tensor) -> Tensor:
        self.calls += 1
        t = t_net / 1000.0 if self.net_time == "1000t" else (t_net.double() + 1.0) / self.path.T
        c = self.path.coefs(t.to(x_t.dtype), x_t.ndim)
        x0_hat, eps_hat, _ = self.data.posterior(x_t, y, c.alpha, c.sigma)
        if self.predict == "eps":
            out = eps_hat
        elif self.predict == "score":
            out = -eps_hat / c.sigma
        elif self.predict == "x0":
            out = x0_hat
        else:
            out = c.d_alpha * x0_hat + c.d_sigma * eps_hat
        out = out + self.perturb
        if self.extra_channels:  # a learn_sigma net: the objective must ignore these
            out = torch.cat([out, torch.full_like(out, 123.0)], dim=1)
        return out


class DiffusionOracle:
    """Optimal DDPM net: t_net = step index i; eps from alphas_cumprod[i]; with learn_sigma the exact v.

    v interpolates log variance between beta-tilde and beta of `variance_schedule` (the chain the sampler
    runs: a respaced one if given, else the full one, as a network trained on the full chain would).
    """

    def __init__(self, data: GaussianData, schedule: DiscreteSchedule, learn_sigma: bool,
                 variance_schedule: DiscreteSchedule | None = None, perturb_eps: float = 0.0,
                 perturb_v: float = 0.0):
        self.data, self.schedule, self.learn_sigma = data, schedule, learn_sigma
        self.var_schedule = schedule if variance_schedule is None else variance_schedule
        # position[i] = index k of original step i in the variance chain (-1 where i is not kept)
        self.position = torch.full((schedule.num_timesteps,), -1, dtype=torch.long)
        self.position[torch.tensor(self.var_schedule.timestep_map)] = torch.arange(self.var_schedule.num_timesteps)
        self.perturb_eps, self.perturb_v = perturb_eps, perturb_v

    def __call__(self, x_t: Tensor, t_net: Tensor, y: Tensor) -> Tensor:
        i = t_net.round().long()
        assert torch.equal(i.to(t_net), t_net), "diffusion t_net must be an integer step index"
        ac = append_dims(self.schedule.alphas_cumprod[i].to(x_t), x_t.ndim)
        alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
        _, eps_hat, var_x0 = self.data.posterior(x_t, y, alpha, sigma)
        eps_hat = eps_hat + self.perturb_eps
        if not self.learn_sigma:
            return eps_hat
        k = self.position[i]
        assert (k >= 0).all(), "the sampler queried a step outside the oracle's variance chain"
        vs = self.var_schedule
        post_var = append_dims(vs.posterior_variance[k].to(x_t), x_t.ndim)
        coef1 = append_dims(vs.posterior_mean_coef1[k].to(x_t), x_t.ndim)
        log_min = append_dims(vs.posterior_log_variance_clipped[k].to(x_t), x_t.ndim)
        log_max = append_dims(vs.log_betas[k].to(x_t), x_t.ndim)
        true_var = post_var + coef1**2 * var_x0  # variance of the exact reverse kernel p(x_{k-1} | x_k)
        frac = (true_var.log() - log_min) / (log_max - log_min)
        v = (2 * frac - 1).expand_as(x_t) + self.perturb_v
        return torch.cat([eps_hat, v], dim=1)


def exact_ode_map(data: GaussianData, path: GaussianPath, x1: Tensor, y: Tensor, t_end: float,
                  means: Tensor | None = None, t_start: float = 1.0) -> Tensor:
    """Where the exact PF-ODE carries x(t_start) = x1 at t_end: the standardised z = (x - alpha m) / std_t is constant.

    `means` [B,...] overrides m_y (e.g. the guided mean under classifier-free guidance).
    """
    m = data.means[y] if means is None else means
    one, end = torch.full((1,), t_start, dtype=torch.float64), torch.full((1,), t_end, dtype=torch.float64)
    a1, s1, ae, se = path.alpha(one), path.sigma(one), path.alpha(end), path.sigma(end)
    std1, stde = (a1**2 * data.s**2 + s1**2).sqrt(), (ae**2 * data.s**2 + se**2).sqrt()
    z = (x1 - a1 * m) / std1
    return ae * m + stde * z


def pushforward_log_prob(data: GaussianData, path: GaussianPath, x0: Tensor, y: Tensor,
                         t_start: float) -> Tensor:
    """Exact log-density the PF-ODE model assigns to x0 at t_start: N(0, I) pulled back through the affine flow.

    It differs from data.log_prob only because p_1 is not exactly N(0, I) (alpha(1) != 0 on vp) and t_start > 0.
    """
    m, D = data.means[y], x0[0].numel()
    one, st = torch.ones(1, dtype=torch.float64), torch.full((1,), t_start, dtype=torch.float64)
    a1, s1, a0, s0 = path.alpha(one), path.sigma(one), path.alpha(st), path.sigma(st)
    std1, std0 = (a1**2 * data.s**2 + s1**2).sqrt(), (a0**2 * data.s**2 + s0**2).sqrt()
    x1 = a1 * m + std1 * (x0 - a0 * m) / std0
    log_n = -0.5 * x1.flatten(1).pow(2).sum(1) - 0.5 * D * math.log(2 * math.pi)
    return log_n + D * torch.log(std1 / std0)


# ---- the shared small problem used by the objective tests ----------------------------------------------

# Two classes plus the null class (index 2) used by classifier-free guidance; x is [N, 2, 1, 1].
MEANS = torch.tensor([[1.0, -0.5], [-1.0, 2.0], [0.3, 0.1]], dtype=torch.float64).reshape(3, 2, 1, 1)
S = 0.5
NUM_CLASSES = 2


def gaussian_problem(n: int, seed: int = 0):
    """(data, y [n], noise [n,2,1,1] float64 standardised per class) with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    data = GaussianData(MEANS, S)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    noise = torch.randn(n, 2, 1, 1, dtype=torch.float64, generator=g)
    for k in range(NUM_CLASSES):  # exact first two moments per class: deterministic samplers show only their bias
        nk = noise[y == k]
        noise[y == k] = (nk - nk.mean(0)) / nk.std(0)
    return data, y, noise


def class_stats_errors(x: torch.Tensor, y: torch.Tensor, data: GaussianData, means: torch.Tensor | None = None):
    """Worst |sample mean - m_y| and |sample std - s| over classes and dims."""
    means = data.means if means is None else means
    mean_err, std_err = 0.0, 0.0
    for k in range(NUM_CLASSES):
        xk = x[y == k]
        mean_err = max(mean_err, (xk.mean(0) - means[k]).abs().max().item())
        std_err = max(std_err, (xk.std(0) - data.s).abs().max().item())
    return mean_err, std_err


@pytest.fixture(autouse=False)
def single_thread():
    """Tiny tensors: one intra-op thread avoids oversubscribing shared CPUs (30x faster under load here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
