"""Stochastic-interpolant velocity matching (seed eqs. 26-27): the flow corner of the objective grid.

Defaults: prediction=velocity, weighting=velocity, i.e. |v_theta(x_t, t) - (d_alpha x0 + d_sigma eps)|^2,
t ~ U[t_min, 1], path=vp (or linear / gvp), no learned variance. Sampling: the PF-ODE dx/dt = v from t = 1 to
t_end (euler / heun / dopri5), ddim / dpmpp_2m, or the reverse SDE with score = -eps(v) / sigma and a chosen
diffusion w(t) (euler_maruyama; w = sde_diffusion_norm * sigma_t by default; SiT's default is norm 2.0 here).
"""

from __future__ import annotations

from ..paths import make_path
from .continuous import SDE_DIFFUSIONS, ContinuousObjective, shared_keys

__all__ = ["SDE_DIFFUSIONS", "FlowObjective"]


class FlowObjective(ContinuousObjective):
    """Velocity matching on a vp | linear | gvp path; t_net = 1000 t (keys: conf/objective/flow.yaml)."""

    default_sampler = "heun"

    def __init__(
        self,
        path: str = "vp",
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        prediction: str = "velocity",
        weighting: str = "velocity",
        min_snr_gamma: float = 5.0,
        time_sampling: str = "uniform",
        logit_normal_mean: float = 0.0,
        logit_normal_std: float = 1.0,
        importance_sampling: bool = False,
        num_timesteps: int = 1000,
        t_min: float = 1e-5,
        t_max: float = 1.0,
        t_end: float | None = None,
        learn_sigma: bool = False,
        vlb_weight: float = 1.0,
        bin_width: float = 2.0 / 255.0,
        decoder_cdf: str = "exact",
        sampler: str = "heun",
        num_steps: int = 50,
        time_grid: str = "uniform",
        grid_rho: float = 7.0,
        denoise_final: bool = False,
        eta: float = 0.0,
        sde_diffusion: str = "sigma",
        sde_diffusion_norm: float = 1.0,
        corrector_steps: int = 0,
        snr: float = 0.16,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        likelihood_solver: str = "dopri5",
        likelihood_num_steps: int = 100,
        likelihood_exact_max_dim: int = 64,
        num_classes: int | None = None,
        guidance_channels: int | None = None,
    ):
        gaussian_path = make_path(path, beta_min=beta_min, beta_max=beta_max)
        keys = shared_keys(locals())
        keys["t_end"] = gaussian_path.default_t_end if t_end is None else t_end
        super().__init__(gaussian_path, **keys)
