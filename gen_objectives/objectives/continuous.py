"""Shared machinery for continuous-time objectives on a Gaussian path (score and flow).

A subclass says how its net output (first C channels) turns into the PF-ODE velocity and the score, and
what its per-sample loss is; sampling (ODE or reverse SDE) and the likelihood are the same for both:
  PF-ODE      dx/dt = v(x, t)
  reverse SDE dx = [v(x, t) - w(t)/2 * score(x, t)] dt + sqrt(w(t)) dw_bar   (any w >= 0 keeps the marginals)
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor

from ..likelihood import ode_log_likelihood
from ..paths import GaussianPath, PathCoefs
from ..solvers import ODE_SOLVERS, EulerMaruyama, make_ode_solver, randn_like
from .base import Net, Objective

T_NET_SCALE = 1000.0  # t_net = 1000 t for score and flow (docs/ARCHITECTURE.md)


class ContinuousObjective(Objective):
    """Score/flow base: t ~ U[t_min, t_max], t_net = 1000 t, samplers integrate t = 1 -> t_end."""

    samplers = ("euler_maruyama", *ODE_SOLVERS)

    def __init__(
        self,
        path: GaussianPath,
        *,
        t_min: float,
        t_max: float,
        t_end: float,
        sampler: str,
        num_steps: int,
        atol: float,
        rtol: float,
        likelihood_solver: str,
        likelihood_num_steps: int,
        num_classes: int | None,
        guidance_channels: int | None,
    ):
        super().__init__(num_classes=num_classes, guidance_channels=guidance_channels)
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        if not 0.0 <= t_end < 1.0:
            raise ValueError(f"t_end must lie in [0, 1), got t_end={t_end}")
        self.path = path
        self.t_min, self.t_max, self.t_end = float(t_min), float(t_max), float(t_end)
        self.default_sampler = self.resolve_sampler(sampler)
        self.default_num_steps = int(num_steps)
        self.resolve_num_steps(None)
        self.atol, self.rtol = float(atol), float(rtol)
        make_ode_solver(likelihood_solver)  # validate the name at start-up
        self.likelihood_solver = likelihood_solver
        self.likelihood_num_steps = int(likelihood_num_steps)

    # ---- what a subclass defines -------------------------------------------------------------------------
    @abc.abstractmethod
    def velocity(self, out: Tensor, x_t: Tensor, c: PathCoefs) -> Tensor:
        """PF-ODE velocity from the net output (first C channels)."""

    @abc.abstractmethod
    def score(self, out: Tensor, x_t: Tensor, c: PathCoefs) -> Tensor:
        """grad log p_t(x_t) from the net output (first C channels)."""

    @abc.abstractmethod
    def per_sample_loss(self, out: Tensor, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor,
                        c: PathCoefs) -> Tensor:
        """Per-sample weighted loss [B] from the net output (first C channels) and the drawn eps, x_t, t."""

    @abc.abstractmethod
    def sde_w(self, t: Tensor) -> Tensor:
        """Reverse-SDE diffusion w(t) = g(t)^2."""

    def corrector(self, net: Net, y: Tensor, cfg_scale: float, generator):
        """Optional corrector step for the reverse SDE (None: predictor only)."""
        return None

    # ---- the interface ---------------------------------------------------------------------------------
    def output_channels(self, C: int) -> tuple[int, ...]:
        """C, or 2C from a learn_sigma network whose extra channels are ignored (SiT convention)."""
        return (C, 2 * C)

    def sample_t(self, batch_size: int, device, generator: torch.Generator | None = None) -> Tensor:
        """t ~ U[t_min, t_max] float32 [B]."""
        gen_device = generator.device if generator is not None else device
        u = torch.rand(batch_size, generator=generator, device=gen_device).to(device)
        return self.t_min + (self.t_max - self.t_min) * u

    def unit_time(self, t: Tensor) -> Tensor:
        return t.float()

    def t_net(self, t: Tensor) -> Tensor:
        return T_NET_SCALE * t

    def loss(self, net: Net, x0: Tensor, y: Tensor, *, t: Tensor | None = None,
             noise: Tensor | None = None) -> Tensor:
        """Per-sample weighted regression loss [B] at x_t = alpha x0 + sigma eps."""
        t = self.sample_t(x0.shape[0], x0.device) if t is None else t
        t = t.to(device=x0.device, dtype=x0.dtype)
        eps = torch.randn_like(x0) if noise is None else noise
        c = self.path.coefs(t, x0.ndim)
        x_t = c.alpha * x0 + c.sigma * eps
        out = self.net_output(net, x_t, self.t_net(t), y)[:, : x0.shape[1]]
        return self.per_sample_loss(out, x0, eps, x_t, t, c)

    def predict(self, net: Net, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float = 1.0):
        """Net output (first C channels) and path coefficients at a 0-dim time t for the whole batch."""
        t_b = t.to(x.dtype).expand(x.shape[0])
        c = self.path.coefs(t_b, x.ndim)
        out = self.net_output(net, x, self.t_net(t_b), y, cfg_scale)[:, : x.shape[1]]
        return out, c

    def ode_drift(self, net: Net, y: Tensor, cfg_scale: float = 1.0):
        """dx/dt of the probability-flow ODE as f(t, x)."""

        def f(t: Tensor, x: Tensor) -> Tensor:
            out, c = self.predict(net, x, t, y, cfg_scale)
            return self.velocity(out, x, c)

        return f

    def sde_drift(self, net: Net, y: Tensor, cfg_scale: float = 1.0):
        """Reverse-SDE drift v - w/2 score as f(t, x)."""

        def f(t: Tensor, x: Tensor) -> Tensor:
            out, c = self.predict(net, x, t, y, cfg_scale)
            return self.velocity(out, x, c) - 0.5 * self.sde_w(t) * self.score(out, x, c)

        return f

    @torch.no_grad()
    def sample(self, net: Net, noise: Tensor, y: Tensor, *, sampler: str | None = None,
               num_steps: int | None = None, cfg_scale: float = 1.0, generator: torch.Generator | None = None,
               progress: bool = False) -> Tensor:
        """Integrate from x(1) = noise down to t_end with the chosen ODE solver or the reverse SDE."""
        name = self.resolve_sampler(sampler)
        n = self.resolve_num_steps(num_steps)
        if name == EulerMaruyama.name:
            return EulerMaruyama().integrate(
                self.sde_drift(net, y, cfg_scale),
                lambda t: self.sde_w(t).sqrt(),
                noise, 1.0, self.t_end, n,
                generator=generator,
                corrector=self.corrector(net, y, cfg_scale, generator),
                progress=progress,
            )
        solver = make_ode_solver(name, atol=self.atol, rtol=self.rtol)
        return solver.integrate(self.ode_drift(net, y, cfg_scale), noise, 1.0, self.t_end, n, progress=progress)

    def log_likelihood(self, net: Net, x0: Tensor, y: Tensor, *, exact_divergence: bool = False,
                       num_steps: int | None = None, generator: torch.Generator | None = None,
                       progress: bool = False) -> Tensor:
        """log p(x0 | y) in nats [B] from the PF-ODE integrated t_min -> 1 (configured likelihood_solver)."""
        n = self.likelihood_num_steps if num_steps is None else int(num_steps)
        solver = make_ode_solver(self.likelihood_solver, atol=self.atol, rtol=self.rtol)
        return ode_log_likelihood(
            self.ode_drift(net, y), x0, solver,
            t_start=self.t_min, t_end=1.0, num_steps=n,
            exact=exact_divergence, generator=generator, progress=progress,
        )


class LangevinCorrector:
    """Song et al.'s Langevin corrector: x += step * score + sqrt(2 step) z, step = 2 (snr |z| / |score|)^2.

    Song et al. also scale the step by the discrete alpha_i = 1 - beta_i; that factor (~1 - beta(t) / N) is omitted.
    """

    def __init__(self, score_fn, steps: int, snr: float, generator):
        self.score_fn, self.steps, self.snr, self.generator = score_fn, steps, snr, generator

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:
        for _ in range(self.steps):
            score = self.score_fn(t, x)
            z = randn_like(x, self.generator)
            # Batch-averaged norms (as Song et al.): per-sample ratios explode where |score| ~ 0 in low dims.
            ratio = z.flatten(1).norm(dim=1).mean() / score.flatten(1).norm(dim=1).mean().clamp_min(1e-12)
            step = 2.0 * (self.snr * ratio) ** 2
            x = x + step * score + (2.0 * step).sqrt() * z
        return x
