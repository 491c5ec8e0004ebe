"""Continuous VP-SDE score matching (Song et al.): eps- or score-parameterised, sigma^2 or likelihood weighting.

Loss: lambda(t) |s_theta - grad log p_t(x_t | x0)|^2 with grad log p_t(x_t | x0) = -eps / sigma_t, written in
eps space as (lambda / sigma^2) |eps_hat - eps|^2 (mean over dims): lambda = sigma^2 is the eps-MSE,
lambda = beta(t) the likelihood weighting.
Sampling: reverse SDE dx = [-beta/2 x - beta score] dt + sqrt(beta) dw_bar (Euler-Maruyama, optional
Langevin corrector), or the PF-ODE dx = -beta/2 (x + score) dt (euler / heun / dopri5).
"""

from __future__ import annotations

from torch import Tensor

from ..conversions import eps_from_score, score_from_eps, velocity_from_score
from ..paths import PathCoefs, VPPath, check_choice
from .base import mean_flat
from .continuous import ContinuousObjective, LangevinCorrector


class EpsParameterization:
    """The net predicts eps; score = -eps / sigma."""

    name = "eps"

    def eps(self, out: Tensor, c: PathCoefs) -> Tensor:
        return out

    def score(self, out: Tensor, c: PathCoefs) -> Tensor:
        return score_from_eps(out, c)


class ScoreParameterization:
    """The net predicts the score directly; eps = -sigma * score."""

    name = "score"

    def eps(self, out: Tensor, c: PathCoefs) -> Tensor:
        return eps_from_score(out, c)

    def score(self, out: Tensor, c: PathCoefs) -> Tensor:
        return out


class Sigma2Weighting:
    """lambda(t) = sigma_t^2: the score loss equals the plain eps-MSE."""

    name = "sigma2"

    def eps_weight(self, path: VPPath, t: Tensor, c: PathCoefs) -> Tensor:
        return t.new_ones(t.shape)


class LikelihoodWeighting:
    """lambda(t) = g(t)^2 = beta(t) (Song et al. 2021: the loss bounds the negative log-likelihood)."""

    name = "likelihood"

    def eps_weight(self, path: VPPath, t: Tensor, c: PathCoefs) -> Tensor:
        return path.beta(t) / c.sigma.flatten() ** 2


PARAMETERIZATIONS = {"eps": EpsParameterization, "score": ScoreParameterization}
WEIGHTINGS = {"sigma2": Sigma2Weighting, "likelihood": LikelihoodWeighting}


class ScoreObjective(ContinuousObjective):
    """VP-SDE score matching with t ~ U[t_min, 1], t_net = 1000 t (all keys are conf/objective/score.yaml's)."""

    default_sampler = "euler_maruyama"
    learn_sigma = False

    def __init__(
        self,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        parameterization: str = "eps",
        weighting: str = "sigma2",
        t_min: float = 1e-5,
        t_max: float = 1.0,
        t_end: float = 1e-3,
        sampler: str = "euler_maruyama",
        num_steps: int = 1000,
        corrector_steps: int = 0,
        snr: float = 0.16,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        likelihood_solver: str = "dopri5",
        likelihood_num_steps: int = 100,
        learn_sigma: bool = False,
        num_classes: int | None = None,
        guidance_channels: int | None = None,
    ):
        check_choice("parameterization", parameterization, PARAMETERIZATIONS)
        check_choice("weighting", weighting, WEIGHTINGS)
        if learn_sigma:
            raise ValueError("learn_sigma must be false for the score objective (it has no learned variance)")
        if corrector_steps < 0:
            raise ValueError(f"corrector_steps must be >= 0, got {corrector_steps}")
        super().__init__(
            VPPath(beta_min=beta_min, beta_max=beta_max),
            t_min=t_min, t_max=t_max, t_end=t_end, sampler=sampler, num_steps=num_steps,
            atol=atol, rtol=rtol, likelihood_solver=likelihood_solver,
            likelihood_num_steps=likelihood_num_steps, num_classes=num_classes,
            guidance_channels=guidance_channels,
        )
        self.parameterization = PARAMETERIZATIONS[parameterization]()
        self.weighting = WEIGHTINGS[weighting]()
        self.corrector_steps = int(corrector_steps)
        self.snr = float(snr)

    def score(self, out: Tensor, x_t: Tensor, c: PathCoefs) -> Tensor:
        return self.parameterization.score(out, c)

    def velocity(self, out: Tensor, x_t: Tensor, c: PathCoefs) -> Tensor:
        """PF-ODE drift -beta/2 (x + score), written for the general path."""
        return velocity_from_score(x_t, self.score(out, x_t, c), c)

    def sde_w(self, t: Tensor) -> Tensor:
        return self.path.beta(t)

    def per_sample_loss(self, out: Tensor, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor,
                        c: PathCoefs) -> Tensor:
        eps_hat = self.parameterization.eps(out, c)
        return self.weighting.eps_weight(self.path, t, c) * mean_flat((eps_hat - eps) ** 2)

    def corrector(self, net, y, cfg_scale, generator):
        if self.corrector_steps == 0:
            return None

        def score_fn(t: Tensor, x: Tensor) -> Tensor:
            out, c = self.predict(net, x, t, y, cfg_scale)
            return self.score(out, x, c)

        return LangevinCorrector(score_fn, self.corrector_steps, self.snr, generator)
