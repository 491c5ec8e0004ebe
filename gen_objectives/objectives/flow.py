"""Stochastic-interpolant velocity matching (seed eqs. 26-27): |v_theta(x_t, t) - (d_alpha x0 + d_sigma eps)|^2.

Sampling: PF-ODE dx/dt = v from t = 1 to t_end (euler / heun / dopri5), or the reverse SDE with
score = -eps(v) / sigma and a chosen diffusion w(t) (euler_maruyama).
"""

from __future__ import annotations

from torch import Tensor

from ..conversions import score_from_velocity
from ..paths import GaussianPath, PathCoefs, check_choice, make_path
from .base import mean_flat
from .continuous import ContinuousObjective


class SigmaDiffusion:
    """w(t) = norm * sigma_t: vanishes at the data end, bounded everywhere (SiT's default form)."""

    name = "sigma"

    def __call__(self, path: GaussianPath, t: Tensor, norm: float) -> Tensor:
        return norm * path.sigma(t)


class SBDMDiffusion:
    """w(t) = norm * g(t)^2 of the path's own forward SDE (beta(t) for vp; singular at t = 1 for linear)."""

    name = "sbdm"

    def __call__(self, path: GaussianPath, t: Tensor, norm: float) -> Tensor:
        return norm * path.sde_g2(t)


class ConstantDiffusion:
    """w(t) = norm."""

    name = "constant"

    def __call__(self, path: GaussianPath, t: Tensor, norm: float) -> Tensor:
        return norm * t.new_ones(t.shape)


SDE_DIFFUSIONS = {"sigma": SigmaDiffusion, "sbdm": SBDMDiffusion, "constant": ConstantDiffusion}


class FlowObjective(ContinuousObjective):
    """Velocity matching on a vp | linear | gvp path; t_net = 1000 t (keys are conf/objective/flow.yaml's)."""

    default_sampler = "heun"
    learn_sigma = False

    def __init__(
        self,
        path: str = "vp",
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        t_min: float = 1e-5,
        t_max: float = 1.0,
        t_end: float | None = None,
        sampler: str = "heun",
        num_steps: int = 50,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        sde_diffusion: str = "sigma",
        sde_diffusion_norm: float = 1.0,
        likelihood_solver: str = "dopri5",
        likelihood_num_steps: int = 100,
        learn_sigma: bool = False,
        num_classes: int | None = None,
        guidance_channels: int | None = None,
    ):
        check_choice("sde_diffusion", sde_diffusion, SDE_DIFFUSIONS)
        if sde_diffusion_norm < 0:
            raise ValueError(f"sde_diffusion_norm must be >= 0, got {sde_diffusion_norm}")
        if learn_sigma:
            raise ValueError("learn_sigma must be false for the flow objective (it has no learned variance)")
        gaussian_path = make_path(path, beta_min=beta_min, beta_max=beta_max)
        if sde_diffusion == "sbdm" and path != "vp":
            raise ValueError(f"sde_diffusion=sbdm is singular at t = 1 on path={path} (alpha(1) = 0); "
                             "use sde_diffusion=sigma or constant, or path=vp")
        super().__init__(
            gaussian_path,
            t_min=t_min, t_max=t_max,
            t_end=gaussian_path.default_t_end if t_end is None else t_end,
            sampler=sampler, num_steps=num_steps, atol=atol, rtol=rtol,
            likelihood_solver=likelihood_solver, likelihood_num_steps=likelihood_num_steps,
            num_classes=num_classes, guidance_channels=guidance_channels,
        )
        self.sde_diffusion = SDE_DIFFUSIONS[sde_diffusion]()
        self.sde_diffusion_norm = float(sde_diffusion_norm)

    def velocity(self, out: Tensor, x_t: Tensor, c: PathCoefs) -> Tensor:
        return out

    def score(self, out: Tensor, x_t: Tensor, c: PathCoefs) -> Tensor:
        return score_from_velocity(x_t, out, c)

    def sde_w(self, t: Tensor) -> Tensor:
        return self.sde_diffusion(self.path, t, self.sde_diffusion_norm)

    def per_sample_loss(self, out: Tensor, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor,
                        c: PathCoefs) -> Tensor:
        target = c.d_alpha * x0 + c.d_sigma * eps  # d/dt x_t
        return mean_flat((out - target) ** 2)
