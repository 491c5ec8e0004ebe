"""What every objective on a Gaussian path shares: the factor keys, the loss, the samplers and the ODE likelihood.

The net's first C output channels are read through `prediction` (eps | velocity | x0 | score) and turned into
whatever a sampler needs; with learn_sigma the next C channels are the variance interpolation v of the hybrid
VLB term. Samplers integrate from t_max (the noise end) down to t_end on a `time_grid`:
  PF-ODE       dx/dt = v(x, t)                                           euler | heun | dopri5
  reverse SDE  dx = [v(x, t) - w(t)/2 score(x, t)] dt + sqrt(w(t)) dw_bar  euler_maruyama (any w >= 0 keeps the
                                                                         marginals)
  exponential  x_s = alpha_s x0_hat + sigma_s eps_hat (+ 2nd order)      ddim | dpmpp_2m
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import Tensor

from ..factors import (
    PREDICTIONS,
    TIME_SAMPLINGS,
    WEIGHTINGS,
    LikelihoodImportanceTimes,
    MinSNRWeighting,
    loss_weight,
    regression_loss,
)
from ..likelihood import dequantize, dequantized_bits_per_dim, ode_log_likelihood
from ..paths import GaussianPath, PathCoefs, check_choice, check_time_on_path
from ..solvers import (
    EXPONENTIAL_SOLVERS,
    ODE_SOLVERS,
    DDIMSolver,
    DPMSolverPP2M,
    EulerMaruyama,
    make_ode_solver,
    make_time_grid,
    randn_like,
)
from ..vlb import NORMAL_CDFS, Decoder, path_vlb_bits
from .base import Net, Objective

T_NET_SCALE = 1000.0  # t_net = 1000 t for score and flow (docs/ARCHITECTURE.md)
# Fixed-step samplers in t below this many steps are smoke tests, not samplers (see warn_few_steps).
MIN_T_STEPS = 3


class SigmaDiffusion:
    """w(t) = norm * sigma_t: vanishes at the data end, bounded everywhere (SiT's "sigma" form, whose
    sqrt(2 D) dW with D = N sigma makes SiT's --diffusion-norm N equal to norm = 2N here)."""

    name = "sigma"

    def __call__(self, path: GaussianPath, t: Tensor, norm: float) -> Tensor:
        return norm * path.sigma(t)


class SBDMDiffusion:
    """w(t) = norm * g(t)^2 of the path's own forward SDE (beta(t) on vp: Song et al.'s reverse SDE at norm 1;
    SiT's "SBDM" form with the same norm, since SiT's D = N beta / 2)."""

    name = "sbdm"

    def __call__(self, path: GaussianPath, t: Tensor, norm: float) -> Tensor:
        return norm * path.sde_g2(t)


class ConstantDiffusion:
    """w(t) = norm."""

    name = "constant"

    def __call__(self, path: GaussianPath, t: Tensor, norm: float) -> Tensor:
        return norm * t.new_ones(t.shape)


SDE_DIFFUSIONS = {"sigma": SigmaDiffusion, "sbdm": SBDMDiffusion, "constant": ConstantDiffusion}
CONTINUOUS_SAMPLERS = ("euler_maruyama", *ODE_SOLVERS, *EXPONENTIAL_SOLVERS)


def warn_few_steps(sampler: str, num_steps: int) -> None:
    """1-2 steps of Euler/Heun/Euler-Maruyama in t return (nearly) the noise: say so instead of staying silent."""
    if sampler in ("euler", "heun", "euler_maruyama") and num_steps < MIN_T_STEPS:
        warnings.warn(
            f"sampler={sampler} with num_steps={num_steps}: steps of ~{1 / num_steps:.1f} in t do not resolve the "
            "stiff drift near the data end (on the vp Gaussian oracle 1-2 Euler steps end 1.5-3.5 data std from "
            "the exact ODE map, about as far as the starting noise): a smoke test, not a sample; few-step "
            "sampling is what sampler=ddim and dpmpp_2m are for",
            UserWarning, stacklevel=3)


def shared_keys(given: dict) -> dict:
    """The ContinuousObjective keys out of a subclass constructor's locals() (each subclass lists them all)."""
    return {k: given[k] for k in SHARED_KEYS}


def _f64(t: float) -> Tensor:
    return torch.tensor([float(t)], dtype=torch.float64)


class ContinuousObjective(Objective):
    """An objective on a Gaussian path: factor keys, regression (+ VLB) loss, every continuous sampler, ODE NLL."""

    samplers = CONTINUOUS_SAMPLERS

    def __init__(
        self,
        path: GaussianPath,
        *,
        prediction: str,
        weighting: str,
        min_snr_gamma: float,
        time_sampling: str,
        logit_normal_mean: float,
        logit_normal_std: float,
        importance_sampling: bool,
        num_timesteps: int,
        t_min: float,
        t_max: float,
        t_end: float,
        learn_sigma: bool,
        vlb_weight: float,
        bin_width: float,
        decoder_cdf: str,
        sampler: str,
        num_steps: int,
        time_grid: str,
        grid_rho: float,
        denoise_final: bool,
        eta: float,
        sde_diffusion: str,
        sde_diffusion_norm: float,
        corrector_steps: int,
        snr: float,
        atol: float,
        rtol: float,
        likelihood_solver: str,
        likelihood_num_steps: int,
        likelihood_exact_max_dim: int,
        num_classes: int | None,
        guidance_channels: int | None,
    ):
        super().__init__(num_classes=num_classes, guidance_channels=guidance_channels)
        for key, value, choices in (("prediction", prediction, PREDICTIONS), ("weighting", weighting, WEIGHTINGS),
                                    ("time_sampling", time_sampling, TIME_SAMPLINGS),
                                    ("sde_diffusion", sde_diffusion, SDE_DIFFUSIONS),
                                    ("decoder_cdf", decoder_cdf, NORMAL_CDFS)):
            check_choice(key, value, choices)
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        if not 0.0 <= t_end < t_max:
            raise ValueError(f"t_end must lie in [0, t_max={t_max}), got t_end={t_end}")
        check_time_on_path(path, "t_min", t_min)
        check_time_on_path(path, "t_end", t_end)
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
        for key, value in (("vlb_weight", vlb_weight), ("sde_diffusion_norm", sde_diffusion_norm),
                           ("corrector_steps", corrector_steps), ("eta", eta)):
            if value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        if not bin_width > 0:
            raise ValueError(f"bin_width must be > 0, got {bin_width}")
        self.path = path
        self.t_min, self.t_max, self.t_end = float(t_min), float(t_max), float(t_end)
        self.num_timesteps = int(num_timesteps)
        self.prediction = PREDICTIONS[prediction]()
        self.weighting = MinSNRWeighting(min_snr_gamma) if weighting == "min_snr" else WEIGHTINGS[weighting]()
        self.time_sampling = time_sampling
        if importance_sampling and (weighting != "likelihood" or time_sampling != "uniform"):
            raise ValueError("importance_sampling=true needs weighting=likelihood and time_sampling=uniform "
                             f"(got weighting={weighting}, time_sampling={time_sampling})")
        if importance_sampling:
            self.times = LikelihoodImportanceTimes(path, self.t_min, self.t_max)
        elif time_sampling == "logit_normal":
            self.times = TIME_SAMPLINGS[time_sampling](self.num_timesteps, self.t_min, self.t_max,
                                                       logit_normal_mean, logit_normal_std)
        else:
            self.times = TIME_SAMPLINGS[time_sampling](self.num_timesteps, self.t_min, self.t_max)
        self.learn_sigma = bool(learn_sigma)
        self.vlb_weight = float(vlb_weight)
        self.bin_width = float(bin_width)
        self.decoder_cdf = decoder_cdf
        self.default_sampler = self.resolve_sampler(sampler)
        self.default_num_steps = int(num_steps)
        self.resolve_num_steps(None)
        self.time_grid_name = time_grid
        self.time_grid = make_time_grid(time_grid, grid_rho)
        self.denoise_final = bool(denoise_final)
        self.eta = float(eta)
        self.sde_diffusion = SDE_DIFFUSIONS[sde_diffusion]()
        self.sde_diffusion_norm = float(sde_diffusion_norm)
        self.corrector_steps, self.snr = int(corrector_steps), float(snr)
        self.atol, self.rtol = float(atol), float(rtol)
        make_ode_solver(likelihood_solver)  # validate the name at start-up
        self.likelihood_solver = likelihood_solver
        self.likelihood_num_steps = int(likelihood_num_steps)
        self.likelihood_exact_max_dim = int(likelihood_exact_max_dim)
        self.check_finite()

    # ---- validation: a combination singular on its own time range fails here, naming the keys --------------
    def training_times(self) -> list[float]:
        """The extreme training times (where a loss weight or target could blow up)."""
        if self.time_sampling == "discrete":
            return [1.0 / self.num_timesteps, 1.0]
        return [self.t_min, self.t_max]

    def check_finite(self) -> None:
        """Evaluate the loss weight and the sampler's conversions at the ends of their ranges in float64."""
        p, one = self.prediction, torch.ones(1, 1, dtype=torch.float64)
        for t in self.training_times():
            c = self.path.coefs(_f64(t), 2)
            w = loss_weight(p, self.weighting, self.path, _f64(t), c)
            target = p.target(one, one, c)
            if not (torch.isfinite(w).all() and torch.isfinite(target).all()):
                raise ValueError(
                    f"prediction={p.name} with weighting={self.weighting.name} on path={self.path.name} has an "
                    f"infinite loss weight or target at t={t:g} (time_sampling={self.time_sampling}, t_min="
                    f"{self.t_min:g}, t_max={self.t_max:g}); narrow t_min/t_max or pick another prediction/weighting")
        for key, t in (("t_max", self.t_max), ("t_end", self.t_end)):
            c = self.path.coefs(_f64(t), 2)
            values = [p.velocity(one, one, c), p.x0(one, one, c)]
            if not all(torch.isfinite(v).all() for v in values):
                raise ValueError(
                    f"prediction={p.name} on path={self.path.name} cannot be sampled at {key}={t:g}: its velocity / x0 "
                    f"is infinite there (e.g. x0 = (x - sigma eps) / alpha with alpha(1) = 0); set {key} inside "
                    "the path (SiT uses 1 - 1e-3) or use prediction=velocity|x0")
        w_end = self.sde_w(_f64(self.t_max))
        if not torch.isfinite(w_end).all():
            raise ValueError(f"sde_diffusion={self.sde_diffusion.name} is infinite at t_max={self.t_max:g} on "
                             f"path={self.path.name} (g(t)^2 of the path); use sde_diffusion=sigma or constant, "
                             "or path=vp")
        if self.time_grid_name != "uniform":
            lam = self.path.log_snr(torch.tensor([self.t_max, self.t_end], dtype=torch.float64))
            if torch.isinf(lam[0]) or (self.time_grid_name == "log_snr" and torch.isinf(lam[1])):
                raise ValueError(f"time_grid={self.time_grid_name} needs a finite log-SNR at t_max={self.t_max:g}"
                                 f" and t_end={self.t_end:g} on path={self.path.name}; use time_grid=uniform")

    # ---- time ----------------------------------------------------------------------------------------------
    def sample_t(self, batch_size: int, device, generator: torch.Generator | None = None) -> Tensor:
        """Training times t [B] float32 (discrete: t = (i + 1) / T)."""
        t = self.times.sample(batch_size, device, generator)
        return (t + 1).float() / self.num_timesteps if self.time_sampling == "discrete" else t

    def unit_time(self, t: Tensor) -> Tensor:
        return t.float()

    def t_net(self, t: Tensor) -> Tensor:
        return T_NET_SCALE * t

    # ---- the loss ----------------------------------------------------------------------------------------
    def output_channels(self, C: int) -> tuple[int, ...]:
        """2C with learn_sigma; otherwise C, or 2C from a learn_sigma network whose extra channels are ignored."""
        return (2 * C,) if self.learn_sigma else (C, 2 * C)

    def noised(self, x0: Tensor, t: Tensor, eps: Tensor) -> tuple[Tensor, PathCoefs, Tensor, Tensor]:
        """x_t = alpha x0 + sigma eps, its coefficients, t as a float tensor and the net's time input."""
        t = t.to(device=x0.device, dtype=x0.dtype)
        c = self.path.coefs(t, x0.ndim)
        return c.alpha * x0 + c.sigma * eps, c, t, self.t_net(t)

    def vlb_bits(self, x0: Tensor, x_t: Tensor, t: Tensor, native_t: Tensor, c: PathCoefs, out: Tensor,
                 v: Tensor) -> Tensor:
        """The hybrid loss's VLB term [B] in bits/dim on a chain of step 1/T along the path; out is detached."""
        decoder = Decoder(True, self.bin_width, self.decoder_cdf)
        x0_hat = self.prediction.x0(out, x_t, c)
        return path_vlb_bits(self.path, t, 1.0 / self.num_timesteps, x0, x_t, x0_hat, v, decoder)

    def loss_terms(self, net: Net, x0: Tensor, y: Tensor, *, t: Tensor | None = None,
                   noise: Tensor | None = None) -> dict[str, Tensor]:
        """Per-sample weighted regression loss "mse" and (learn_sigma) the VLB term "vb" in bits/dim, each [B],
        and "ratio": the importance-sampling weight p(t) / q(t) (None for the nominal time distributions)."""
        t = self.sample_t(x0.shape[0], x0.device) if t is None else t
        eps = torch.randn_like(x0) if noise is None else noise
        x_t, c, t_f, t_net = self.noised(x0, t, eps)
        out = self.net_output(net, x_t, t_net, y)
        C = x0.shape[1]
        terms = {"mse": regression_loss(self.prediction, self.weighting, self.path, out[:, :C], x0, eps, t_f, c)}
        if self.learn_sigma:  # the VLB trains only the variance: the mean comes from a detached prediction
            terms["vb"] = self.vlb_bits(x0, x_t, t_f, t, c, out[:, :C].detach(), out[:, C:])
        terms["ratio"] = self.times.density_ratio(t_f)
        return terms

    def loss(self, net: Net, x0: Tensor, y: Tensor, *, t: Tensor | None = None,
             noise: Tensor | None = None) -> Tensor:
        """Per-sample weighted regression loss [B] (+ vlb_weight x the VLB term when learn_sigma), times p/q."""
        terms = self.loss_terms(net, x0, y, t=t, noise=noise)
        loss = terms["mse"] + self.vlb_weight * terms["vb"] if self.learn_sigma else terms["mse"]
        return loss if terms["ratio"] is None else loss * terms["ratio"]

    # ---- sampling ----------------------------------------------------------------------------------------
    def predict(self, net: Net, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float = 1.0):
        """Net output (first C channels) and path coefficients at a 0-dim time t for the whole batch."""
        t_b = t.to(x.dtype).expand(x.shape[0])
        c = self.path.coefs(t_b, x.ndim)
        out = self.net_output(net, x, self.t_net(t_b), y, cfg_scale)[:, : x.shape[1]]
        return out, c

    def velocity(self, out: Tensor, x_t: Tensor, c: PathCoefs) -> Tensor:
        """PF-ODE velocity from the net output (first C channels)."""
        return self.prediction.velocity(out, x_t, c)

    def score(self, out: Tensor, x_t: Tensor, c: PathCoefs) -> Tensor:
        """grad log p_t(x_t) from the net output (first C channels)."""
        return self.prediction.score(out, x_t, c)

    def sde_w(self, t: Tensor) -> Tensor:
        """Reverse-SDE diffusion w(t) = g(t)^2 of the chosen form."""
        return self.sde_diffusion(self.path, t, self.sde_diffusion_norm)

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

    def denoiser(self, net: Net, y: Tensor, cfg_scale: float = 1.0):
        """(t, x) -> (x0_hat, eps_hat): Tweedie's E[x0 | x_t] and its noise, for the exponential integrators."""

        def d(t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
            out, c = self.predict(net, x, t, y, cfg_scale)
            return self.prediction.x0(out, x, c), self.prediction.eps(out, x, c)

        return d

    def corrector(self, net: Net, y: Tensor, cfg_scale: float, generator):
        """Langevin corrector after each reverse-SDE step (None with corrector_steps = 0)."""
        if self.corrector_steps == 0:
            return None

        def score_fn(t: Tensor, x: Tensor) -> Tensor:
            out, c = self.predict(net, x, t, y, cfg_scale)
            return self.score(out, x, c)

        return LangevinCorrector(score_fn, self.corrector_steps, self.snr, generator)

    def grid(self, num_steps: int, like: Tensor) -> Tensor:
        """The sampler's times t_max -> t_end (num_steps + 1 of them) on the configured time_grid."""
        return self.time_grid(self.path, self.t_max, self.t_end, num_steps, like)

    @torch.no_grad()
    def sample(self, net: Net, noise: Tensor, y: Tensor, *, sampler: str | None = None,
               num_steps: int | None = None, cfg_scale: float = 1.0, generator: torch.Generator | None = None,
               progress: bool = False) -> Tensor:
        """Integrate from x(t_max) = noise down to t_end; then x0_hat(x(t_end)) if denoise_final."""
        name = self.resolve_sampler(sampler)
        n = self.resolve_num_steps(num_steps)
        warn_few_steps(name, n)
        grid = self.grid(n, noise)
        if name == EulerMaruyama.name:
            x = EulerMaruyama().integrate(
                self.sde_drift(net, y, cfg_scale), lambda t: self.sde_w(t).sqrt(), noise, self.t_max, self.t_end, n,
                generator=generator, corrector=self.corrector(net, y, cfg_scale, generator), progress=progress,
                grid=grid)
        elif name in EXPONENTIAL_SOLVERS:
            solver = DDIMSolver(self.eta) if name == DDIMSolver.name else DPMSolverPP2M()
            x = solver.integrate(self.denoiser(net, y, cfg_scale), self.path, noise, grid, generator=generator,
                                 progress=progress)
        else:
            solver = make_ode_solver(name, atol=self.atol, rtol=self.rtol)
            x = solver.integrate(self.ode_drift(net, y, cfg_scale), noise, self.t_max, self.t_end, n,
                                 progress=progress, grid=grid)
        if self.denoise_final:
            x = self.denoiser(net, y, cfg_scale)(grid[-1], x)[0]
        return x

    # ---- likelihood --------------------------------------------------------------------------------------
    def use_exact_divergence(self, exact_divergence: bool | None, x0: Tensor) -> bool:
        """None: exact up to likelihood_exact_max_dim dimensions, Hutchinson above."""
        return x0[0].numel() <= self.likelihood_exact_max_dim if exact_divergence is None else bool(exact_divergence)

    def log_likelihood(self, net: Net, x0: Tensor, y: Tensor, *, exact_divergence: bool | None = None,
                       num_steps: int | None = None, generator: torch.Generator | None = None,
                       progress: bool = False, solver: str | None = None) -> Tensor:
        """log p(x0 | y) in nats [B] from the PF-ODE integrated t_min -> t_max (the likelihood_solver by default)."""
        name = self.likelihood_solver if solver is None else solver
        n = self.likelihood_num_steps if num_steps is None else int(num_steps)
        with torch.inference_mode(False):  # labels made under inference_mode cannot enter an autograd graph
            y = y.clone()
        return ode_log_likelihood(
            self.ode_drift(net, y), x0, make_ode_solver(name, atol=self.atol, rtol=self.rtol),
            t_start=self.t_min, t_end=self.t_max, num_steps=n,
            exact=self.use_exact_divergence(exact_divergence, x0), generator=generator, progress=progress,
        )

    def discrete_bits_per_dim(self, net: Net, x0: Tensor, y: Tensor, *, bin_width: float | None = None,
                              generator: torch.Generator | None = None, **likelihood_kw) -> Tensor:
        """NLL of the quantised data in bits/dim [B]: the density at x0 + uniform noise over its bin, minus
        log(bin_width) per dimension (an upper bound on -log2 P(bin), comparable with published bits/dim)."""
        width = self.bin_width if bin_width is None else float(bin_width)
        x_deq = dequantize(x0, width, generator)
        nats = self.log_likelihood(net, x_deq, y, generator=generator, **likelihood_kw)
        return dequantized_bits_per_dim(nats, x0, width)


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




SHARED_KEYS = [k for k in inspect.signature(ContinuousObjective.__init__).parameters if k not in ("self", "path")]
