"""ODE, SDE and exponential integrators shared by every objective, and the time grids they step on.

An ODE right-hand side is `f(t, x) -> dx/dt` with t a 0-dim tensor and x any tensor; fixed-step solvers walk a
grid of times (either direction: t_start -> t_end) and return x(t_end). The SDE solver takes a drift and a scalar
diffusion g(t) and integrates backwards in time (reverse-time SDE, dt < 0). The exponential integrators (DDIM,
DPM-Solver++(2M)) take a denoiser (t, x) -> (x0_hat, eps_hat) and the path, and step exactly in log-SNR time.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .paths import GaussianPath, check_choice

ODEFunc = Callable[[Tensor, Tensor], Tensor]
Denoiser = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor]"]


def time_grid(t_start: float, t_end: float, num_steps: int, like: Tensor) -> Tensor:
    """num_steps + 1 uniformly spaced times from t_start to t_end, in like's dtype/device."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.linspace(t_start, t_end, num_steps + 1, dtype=like.dtype, device=like.device)


class UniformGrid:
    """Uniform in t."""

    name = "uniform"

    def __call__(self, path: GaussianPath, t_start: float, t_end: float, num_steps: int, like: Tensor) -> Tensor:
        return time_grid(t_start, t_end, num_steps, like)


class LogSNRGrid:
    """Uniform in lambda = log SNR (the natural time of the exponential integrators)."""

    name = "log_snr"

    def __call__(self, path: GaussianPath, t_start: float, t_end: float, num_steps: int, like: Tensor) -> Tensor:
        ends = path.log_snr(torch.tensor([t_start, t_end], dtype=torch.float64))
        lam = torch.linspace(float(ends[0]), float(ends[1]), num_steps + 1, dtype=torch.float64)
        return snap_ends(path.t_from_log_snr(lam), t_start, t_end, like)


class EDMGrid:
    """Karras et al. (EDM): s_k = (s_max^(1/rho) + k/n (s_min^(1/rho) - s_max^(1/rho)))^rho on s = sigma / alpha."""

    name = "edm"

    def __init__(self, rho: float = 7.0):
        if not rho > 0:
            raise ValueError(f"grid_rho must be > 0, got {rho}")
        self.rho = float(rho)

    def __call__(self, path: GaussianPath, t_start: float, t_end: float, num_steps: int, like: Tensor) -> Tensor:
        ends = torch.exp(-0.5 * path.log_snr(torch.tensor([t_start, t_end], dtype=torch.float64)))
        s_max, s_min = ends[0] ** (1.0 / self.rho), ends[1] ** (1.0 / self.rho)
        k = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        s = (s_max + k * (s_min - s_max)) ** self.rho
        return snap_ends(path.t_from_log_snr(-2.0 * torch.log(s)), t_start, t_end, like)


def snap_ends(ts: Tensor, t_start: float, t_end: float, like: Tensor) -> Tensor:
    """The grid with its end points exactly t_start and t_end (no round trip through log-SNR), like's dtype."""
    ts = ts.clone()
    ts[0], ts[-1] = t_start, t_end
    return ts.to(dtype=like.dtype, device=like.device)


TIME_GRIDS = {"uniform": UniformGrid, "log_snr": LogSNRGrid, "edm": EDMGrid}


def make_time_grid(name: str, rho: float = 7.0):
    check_choice("time_grid", name, TIME_GRIDS)
    return EDMGrid(rho) if name == "edm" else TIME_GRIDS[name]()


class EulerSolver:
    """First-order fixed step: x += f(t, x) dt."""

    name = "euler"
    fixed_step = True

    def integrate(self, f: ODEFunc, x: Tensor, t_start: float, t_end: float, num_steps: int,
                  progress: bool = False, grid: Tensor | None = None) -> Tensor:
        ts = time_grid(t_start, t_end, num_steps, x) if grid is None else grid
        num_steps = len(ts) - 1
        for k in tqdm(range(num_steps), disable=not progress, desc="euler"):
            x = x + f(ts[k], x) * (ts[k + 1] - ts[k])
        return x


class HeunSolver:
    """Second-order fixed step (explicit trapezoid): two function evaluations per step."""

    name = "heun"
    fixed_step = True

    def integrate(self, f: ODEFunc, x: Tensor, t_start: float, t_end: float, num_steps: int,
                  progress: bool = False, grid: Tensor | None = None) -> Tensor:
        ts = time_grid(t_start, t_end, num_steps, x) if grid is None else grid
        num_steps = len(ts) - 1
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
                  progress: bool = False, grid: Tensor | None = None) -> Tensor:
        """grid is ignored: the step sizes are adaptive."""
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
        grid: Tensor | None = None,
    ) -> Tensor:
        ts = time_grid(t_start, t_end, num_steps, x) if grid is None else grid
        num_steps = len(ts) - 1
        for k in tqdm(range(num_steps), disable=not progress, desc="euler_maruyama"):
            dt = ts[k + 1] - ts[k]
            x_mean = x + drift(ts[k], x) * dt
            if k == num_steps - 1:
                return x_mean
            x = x_mean + g(ts[k]) * dt.abs().sqrt() * randn_like(x, generator)
            if corrector is not None:
                x = corrector(ts[k + 1], x)
        return x


def step_coefs(path: GaussianPath, t: Tensor, s: Tensor) -> tuple[float, float, float, float, float]:
    """alpha_s, sigma_s, sigma_s / sigma_t, exp(-h) = alpha_t sigma_s / (sigma_t alpha_s) and h = lambda_s/2 - lambda_t/2.

    Computed in float64 as Python floats; exp(-h) is 0 and h = inf where sigma_s = 0 (the data end of linear/gvp).
    """
    t64, s64 = t.to(torch.float64).reshape(1).cpu(), s.to(torch.float64).reshape(1).cpu()
    a_t, s_t, a_s, s_s = (float(f(u)) for f, u in ((path.alpha, t64), (path.sigma, t64), (path.alpha, s64),
                                                     (path.sigma, s64)))
    exp_neg_h = a_t * s_s / (s_t * a_s)
    h = math.inf if exp_neg_h == 0.0 else -math.log(exp_neg_h)
    return a_s, s_s, s_s / s_t, exp_neg_h, h


class DDIMSolver:
    """DDIM = the first-order exponential integrator: x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z.

    c = eta sigma_s sqrt(1 - e^(-2h)) (Song et al. 2021's sigma_t in any path's terms); eta = 0 is deterministic,
    the last step adds no noise. Exact for the linear part of the PF-ODE in log-SNR time whatever the grid.
    """

    name = "ddim"

    def __init__(self, eta: float = 0.0):
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = float(eta)

    def integrate(self, denoise: Denoiser, path: GaussianPath, x: Tensor, grid: Tensor, *,
                  generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
        n = len(grid) - 1
        for k in tqdm(range(n), disable=not progress, desc=self.name):
            x0, eps = denoise(grid[k], x)
            a_s, s_s, _, exp_neg_h, _ = step_coefs(path, grid[k], grid[k + 1])
            if self.eta == 0.0 or k == n - 1:
                x = a_s * x0 + s_s * eps
                continue
            c = self.eta * s_s * math.sqrt(max(0.0, 1.0 - exp_neg_h**2))
            x = a_s * x0 + math.sqrt(max(0.0, s_s**2 - c**2)) * eps + c * randn_like(x, generator)
        return x


class DPMSolverPP2M:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep second order on the data prediction.

    x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^(-h)) D, h = lambda_s/2 - lambda_t/2, with D = x0_hat on the
    first step (and on a step to sigma_s = 0, where h is infinite), else D = (1 + 1/(2r)) x0_k - 1/(2r) x0_{k-1},
    r = h_{k-1} / h_k. One network call per step.
    """

    name = "dpmpp_2m"

    def integrate(self, denoise: Denoiser, path: GaussianPath, x: Tensor, grid: Tensor, *,
                  generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
        prev_x0, prev_h = None, None
        for k in tqdm(range(len(grid) - 1), disable=not progress, desc=self.name):
            x0, _ = denoise(grid[k], x)
            a_s, _, ratio, exp_neg_h, h = step_coefs(path, grid[k], grid[k + 1])
            D = x0
            if prev_x0 is not None and math.isfinite(h):
                half_inv_r = 0.5 * h / prev_h  # 1 / (2 r); 0 after an infinite first step (alpha(1) = 0)
                D = (1.0 + half_inv_r) * x0 - half_inv_r * prev_x0
            x = ratio * x + a_s * (1.0 - exp_neg_h) * D
            prev_x0, prev_h = x0, h
        return x


EXPONENTIAL_SOLVERS = {"ddim": DDIMSolver, "dpmpp_2m": DPMSolverPP2M}


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
