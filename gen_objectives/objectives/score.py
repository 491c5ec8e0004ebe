"""Continuous VP-SDE score matching (Song et al.): the score corner of the objective grid.

Defaults: prediction=eps (score = -out / sigma_t), weighting=sigma2 (lambda = sigma^2 on the score, i.e. the
eps-MSE; likelihood: lambda = beta(t)), t ~ U[t_min, 1], path=vp, no learned variance. Sampling: the reverse SDE
dx = [-beta/2 x - beta score] dt + sqrt(beta) dw_bar (euler_maruyama with sde_diffusion=sbdm, optional Langevin
corrector), the PF-ODE dx = -beta/2 (x + score) dt (euler / heun / dopri5), or ddim / dpmpp_2m.
"""

from __future__ import annotations

from ..paths import make_path
from .continuous import ContinuousObjective, shared_keys


class ScoreObjective(ContinuousObjective):
    """VP-SDE score matching; t_net = 1000 t (every key is conf/objective/score.yaml's, see docs/ARCHITECTURE.md)."""

    default_sampler = "euler_maruyama"

    def __init__(
        self,
        path: str = "vp",
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        prediction: str = "eps",
        weighting: str = "sigma2",
        min_snr_gamma: float = 5.0,
        time_sampling: str = "uniform",
        logit_normal_mean: float = 0.0,
        logit_normal_std: float = 1.0,
        importance_sampling: bool = False,
        num_timesteps: int = 1000,
        t_min: float = 1e-5,
        t_max: float = 1.0,
        t_end: float = 1e-3,
        learn_sigma: bool = False,
        vlb_weight: float = 1.0,
        bin_width: float = 2.0 / 255.0,
        decoder_cdf: str = "exact",
        sampler: str = "euler_maruyama",
        num_steps: int = 1000,
        time_grid: str = "uniform",
        grid_rho: float = 7.0,
        denoise_final: bool = False,
        eta: float = 0.0,
        sde_diffusion: str = "sbdm",
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
        super().__init__(make_path(path, beta_min=beta_min, beta_max=beta_max), **shared_keys(locals()))
