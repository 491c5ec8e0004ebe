"""ODE and SDE integrators shared by the score and flow objectives.

An ODE right-hand side is `f(t, x) -> dx/dt` with t a 0-dim tensor and x any tensor; solvers integrate
from t_start to t_end (either direction) and return x(t_end). The SDE solver takes a drift and a scalar
diffusion g(t) and integrates backwards in time (reverse-time SDE, dt < 0).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .paths import check_choice

ODEFunc = Callable[[Tensor, Tensor], Tensor]


def time_grid(t_start: float, t_end: float, num_steps: int, like: Tensor) -> Tensor:
    """num_steps + 1 uniformly spaced times from t_start to t_end, in like's dtype/device."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.linspace(t_start, t_end, num_steps + 1, dtype=like.dtype, device=like.device)


class EulerSolver:
    """First-order fixed step: x += f(t, x) dt."""

    name = "euler"
    fixed_step = True

    def integrate(self, f: ODEFunc, x: Tensor, t_start: float, t_end: float, num_steps: int,
                  progress: bool = False) -> Tensor:
        ts = time_grid(t_start, t_end, num_steps, x)
        for k in tqdm(range(num_steps), disable=not progress, desc="euler"):
            x = x + f(ts[k], x) * (ts[k + 1] - ts[k])
        return x


class HeunSolver:
    """Second-order fixed step (explicit trapezoid): two function evaluations per step."""

    name = "heun"
    fixed_step = True

    def integrate(self, f: ODEFunc, x: Tensor, t_start: float, t_end: float, num_steps: int,
                  progress: bool = False) -> Tensor:
        ts = time_grid(t_start, t_end, num_steps, x)
        for k in tqdm(range(num_steps), disable=not progress, desc="heun"):
            dt = ts[k + 1] - ts[k]
            d0 = f(ts[k], x)
            x_euler = x + d0 * dt
            x = x + 0.5 * (d0 + f(ts[k + 1], x_euler)) * dt
        return x


class Dopri5Solver:
    """Adaptive Dormand-Prince 5(4) through torchdiffeq; num_steps is ignored, atol/rtol set the accuracy."""

    name = "dopri5"
    fixed_step = False

    def __init__(self, atol: float = 1e-5, rtol: float = 1e-5):
        self.atol = atol
        self.rtol = rtol

    def integrate(self, f: ODEFunc, x: Tensor, t_start: float, t_end: float, num_steps: int | None = None,
                  progress: bool = False) -> Tensor:
        from torchdiffeq import odeint

        bar = tqdm(desc="dopri5 (function evals)", disable=not progress)

        def counted(t: Tensor, x: Tensor) -> Tensor:
            bar.update(1)
            return f(t, x)

        ts = torch.tensor([t_start, t_end], dtype=x.dtype, device=x.device)
        # step_t makes the solver land exactly on t_end instead of stepping past it and interpolating back,
        # so f is never evaluated outside [t_end, t_start] (vp is undefined below t = 0).
        options = {"step_t": ts[1:]}
        try:
            return odeint(counted, x, ts, method="dopri5", atol=self.atol, rtol=self.rtol, options=options)[-1]
        finally:
            bar.close()


ODE_SOLVERS = {"euler": EulerSolver, "heun": HeunSolver, "dopri5": Dopri5Solver}


def make_ode_solver(name: str, atol: float = 1e-5, rtol: float = 1e-5):
    """ODE solver by name; only dopri5 uses atol/rtol."""
    check_choice("ode solver", name, ODE_SOLVERS)
    return Dopri5Solver(atol=atol, rtol=rtol) if name == "dopri5" else ODE_SOLVERS[name]()


class EulerMaruyama:
    """Reverse-time Euler-Maruyama: x += drift dt + g sqrt(|dt|) z, dt < 0; the last step adds no noise.

    `corrector` (optional) is called after each predictor step as corrector(t_next, x) -> x (PC sampling).
    """

    name = "euler_maruyama"

    def integrate(
        self,
        drift: ODEFunc,
        g: Callable[[Tensor], Tensor],
        x: Tensor,
        t_start: float,
        t_end: float,
        num_steps: int,
        *,
        generator: torch.Generator | None = None,
        corrector: Callable[[Tensor, Tensor], Tensor] | None = None,
        progress: bool = False,
    ) -> Tensor:
        ts = time_grid(t_start, t_end, num_steps, x)
        for k in tqdm(range(num_steps), disable=not progress, desc="euler_maruyama"):
            dt = ts[k + 1] - ts[k]
            x_mean = x + drift(ts[k], x) * dt
            if k == num_steps - 1:
                return x_mean
            x = x_mean + g(ts[k]) * dt.abs().sqrt() * randn_like(x, generator)
            if corrector is not None:
                x = corrector(ts[k + 1], x)
        return x


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal like x, drawn from `generator` (on its own device) when one is given."""
    if generator is None:
        return torch.randn_like(x)
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device)
    return z.to(x.device)


def rademacher_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Random +-1 entries like x (Hutchinson probes)."""
    device = generator.device if generator is not None else x.device
    bits = torch.randint(0, 2, x.shape, generator=generator, device=device)
    return (2 * bits - 1).to(dtype=x.dtype, device=x.device)
