"""Discrete DDPM (Ho et al.) with DiT/IDDPM's learned variance: the diffusion corner of the objective grid.

Step index i in {0..T-1}; x_i = sqrt(abar_i) x0 + sqrt(1 - abar_i) eps and the net sees i (as a float). The same
schedule is a continuous VP path (paths.DiscreteVPPath: log abar a C2 spline through the knots t_i = (i+1)/T,
t_net = T t - 1), on which every continuous sampler (euler, heun, dopri5, euler_maruyama, ddim, dpmpp_2m) and
the PF-ODE likelihood run unchanged. With learn_sigma the net returns [eps, v] (2C channels) and the reverse
variance is
  log var = frac log beta_i + (1 - frac) log beta-tilde_i,  frac = (v + 1) / 2   (IDDPM "learned range").
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..paths import DiscreteVPPath, PathCoefs, append_dims, check_choice
from ..schedules import DiscreteSchedule
from ..solvers import randn_like
from ..vlb import LOG2, Decoder, discretized_gaussian_log_likelihood, gaussian_log_likelihood, normal_kl
from .base import Net, mean_flat
from .continuous import CONTINUOUS_SAMPLERS, ContinuousObjective, shared_keys

__all__ = ["DiffusionObjective", "discretized_gaussian_log_likelihood", "gaussian_log_likelihood", "normal_kl"]


class LearnedRangeVariance:
    """DiT/IDDPM: the net's v in [-1, 1] interpolates log variance between beta-tilde_i and beta_i."""

    name = "learned"

    def log_variance(self, sched: DiscreteSchedule, k: Tensor, v: Tensor | None, x: Tensor) -> Tensor:
        log_min = sched.extract("posterior_log_variance_clipped", k, x.ndim, x)
        log_max = sched.extract("log_betas", k, x.ndim, x)
        frac = (v + 1.0) / 2.0
        return frac * log_max + (1.0 - frac) * log_min


class FixedLargeVariance:
    """Fixed variance beta_i (with beta-tilde_1 at i = 0), IDDPM's default without learn_sigma."""

    name = "large"

    def log_variance(self, sched: DiscreteSchedule, k: Tensor, v: Tensor | None, x: Tensor) -> Tensor:
        return sched.extract("fixed_large_variance", k, x.ndim, x).log().expand_as(x)


class FixedSmallVariance:
    """Fixed variance beta-tilde_i (clipped at i = 0)."""

    name = "small"

    def log_variance(self, sched: DiscreteSchedule, k: Tensor, v: Tensor | None, x: Tensor) -> Tensor:
        return sched.extract("posterior_log_variance_clipped", k, x.ndim, x).expand_as(x)


FIXED_VARIANCES = {"large": FixedLargeVariance, "small": FixedSmallVariance}
SPACINGS = ("even", "ddim")
DECODERS = ("gaussian", "discretized")
LIKELIHOODS = ("elbo", "ode")
DISCRETE_SAMPLERS = ("ddpm", "ddim")  # on the (respaced) discrete chain; ddim here is DiT's DDIM


class DiffusionObjective(ContinuousObjective):
    """Discrete DDPM, t ~ U{0..T-1} and t_net = i by default (keys: conf/objective/diffusion.yaml)."""

    samplers = ("ddpm", *CONTINUOUS_SAMPLERS)

    def __init__(
        self,
        num_timesteps: int = 1000,
        schedule: str = "linear",
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        path: str = "vp",
        prediction: str = "eps",
        weighting: str = "sigma2",
        min_snr_gamma: float = 5.0,
        time_sampling: str = "discrete",
        logit_normal_mean: float = 0.0,
        logit_normal_std: float = 1.0,
        importance_sampling: bool = False,
        t_min: float = 1e-3,
        t_max: float = 1.0,
        t_end: float = 1e-3,
        learn_sigma: bool = True,
        fixed_variance: str = "large",
        vlb_weight: float = 1.0,
        bin_width: float = 2.0 / 255.0,
        decoder_cdf: str = "exact",
        sampler: str = "ddpm",
        num_steps: int = 250,
        spacing: str = "even",
        time_grid: str = "uniform",
        grid_rho: float = 7.0,
        denoise_final: bool = False,
        eta: float = 0.0,
        clip_denoised: bool = False,
        sde_diffusion: str = "sbdm",
        sde_diffusion_norm: float = 1.0,
        corrector_steps: int = 0,
        snr: float = 0.16,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        likelihood: str = "elbo",
        likelihood_decoder: str = "gaussian",
        likelihood_solver: str = "dopri5",
        likelihood_num_steps: int = 100,
        likelihood_exact_max_dim: int = 64,
        num_classes: int | None = None,
        guidance_channels: int | None = None,
    ):
        if path != "vp":
            raise ValueError(f"path={path!r} with objective=diffusion: its discrete DDPM chain is a vp path (the "
                             "schedule key picks linear or cosine betas); valid choices: vp. Use objective=score "
                             "or flow for path=linear|gvp")
        check_choice("fixed_variance", fixed_variance, FIXED_VARIANCES)
        check_choice("spacing", spacing, SPACINGS)
        check_choice("likelihood", likelihood, LIKELIHOODS)
        check_choice("likelihood_decoder", likelihood_decoder, DECODERS)
        discrete = DiscreteSchedule(num_timesteps, schedule, beta_min, beta_max)
        keys = shared_keys(locals())
        keys["num_timesteps"] = discrete.num_timesteps
        super().__init__(DiscreteVPPath(discrete.alphas_cumprod), **keys)
        self.schedule = discrete
        self.variance = LearnedRangeVariance() if self.learn_sigma else FIXED_VARIANCES[fixed_variance]()
        self.spacing = spacing
        self._respaced: dict[str, DiscreteSchedule] = {}
        if self.default_sampler in DISCRETE_SAMPLERS:
            self.respaced(self.default_num_steps)  # fail at start-up if the default spacing is impossible
        self.clip_denoised = bool(clip_denoised)
        self.likelihood = likelihood
        self.likelihood_decoder = likelihood_decoder

    # ---- schedule plumbing ---------------------------------------------------------------------------------
    def respaced(self, num_steps: int) -> DiscreteSchedule:
        """The sampling chain with num_steps kept steps (cached); the full chain when num_steps == T."""
        if num_steps < 2:
            # A 1-step chain keeps only step 0 (alpha_bar ~ 1): there is no noise level to start from.
            raise ValueError(f"diffusion samplers need num_steps >= 2, got num_steps={num_steps}")
        spec = f"ddim{num_steps}" if self.spacing == "ddim" else str(num_steps)
        if spec not in self._respaced:
            self._respaced[spec] = self.schedule.respace(spec)
        return self._respaced[spec]

    def output_channels(self, C: int) -> tuple[int, ...]:
        return (2 * C,) if self.learn_sigma else (C,)

    def index_coefs(self, i: Tensor, like: Tensor) -> PathCoefs:
        """Path coefficients at original step indices i [B]: alpha, sigma from the float64 table (cast, then sqrt,
        as q_sample always did) and the derivatives of the spline at the knot t_i = (i+1)/T."""
        ac = self.schedule.extract("alphas_cumprod", i, like.ndim, like)
        t = ((i.to(torch.float64) + 1.0) / self.num_timesteps).to(like.device)
        return PathCoefs(alpha=ac.sqrt(), sigma=(1.0 - ac).sqrt(),
                         d_alpha=append_dims(self.path.d_alpha(t).to(like.dtype), like.ndim),
                         d_sigma=append_dims(self.path.d_sigma(t).to(like.dtype), like.ndim))

    def eps_at(self, out: Tensor, x: Tensor, i: Tensor) -> Tensor:
        """eps_hat from the first C output channels at original step indices i [B]."""
        if self.prediction.name == "eps":
            return out
        return self.prediction.eps(out, x, self.index_coefs(i, x))

    def split(self, out: Tensor, C: int) -> tuple[Tensor, Tensor | None]:
        """(first C channels [B,C,..], v [B,C,..] or None)."""
        return out[:, :C], (out[:, C:] if self.learn_sigma else None)

    def q_sample(self, x0: Tensor, i: Tensor, eps: Tensor) -> Tensor:
        """x_i = sqrt(abar_i) x0 + sqrt(1 - abar_i) eps."""
        ac = self.schedule.extract("alphas_cumprod", i, x0.ndim, x0)
        return ac.sqrt() * x0 + (1.0 - ac).sqrt() * eps

    def q_posterior(self, sched: DiscreteSchedule, x0: Tensor, x_t: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and clipped log variance of q(x_{k-1} | x_k, x0)."""
        mean = (sched.extract("posterior_mean_coef1", k, x_t.ndim, x_t) * x0
                + sched.extract("posterior_mean_coef2", k, x_t.ndim, x_t) * x_t)
        return mean, sched.extract("posterior_log_variance_clipped", k, x_t.ndim, x_t).expand_as(x_t)

    def predict_x0(self, sched: DiscreteSchedule, x_t: Tensor, eps: Tensor, k: Tensor) -> Tensor:
        """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar), optionally clipped to [-1, 1]."""
        ac = sched.extract("alphas_cumprod", k, x_t.ndim, x_t)
        x0 = (x_t - (1.0 - ac).sqrt() * eps) / ac.sqrt()
        return x0.clamp(-1.0, 1.0) if self.clip_denoised else x0

    def p_mean_log_variance(self, sched: DiscreteSchedule, eps: Tensor, v: Tensor | None, x_t: Tensor,
                            k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Reverse kernel p(x_{k-1} | x_k): mean (posterior mean at the predicted x0), log variance, x0."""
        x0 = self.predict_x0(sched, x_t, eps, k)
        mean, _ = self.q_posterior(sched, x0, x_t, k)
        return mean, self.variance.log_variance(sched, k, v, x_t), x0

    # ---- time ----------------------------------------------------------------------------------------------
    def sample_t(self, batch_size: int, device, generator: torch.Generator | None = None) -> Tensor:
        """i ~ U{0..T-1}, long [B] (time_sampling=discrete); otherwise a continuous t [B] on the spline path."""
        return self.times.sample(batch_size, device, generator)

    def unit_time(self, t: Tensor) -> Tensor:
        """i / (T - 1) for step indices (the continuous time whose beta(t)/T gives beta_i); t itself otherwise."""
        if t.is_floating_point():
            return t.float()
        return t.float() / (self.num_timesteps - 1)

    def t_net(self, t: Tensor) -> Tensor:
        """The step index the net was trained on: T t - 1 (exactly i at the knots)."""
        return self.path.t_net(t)

    # ---- the loss ------------------------------------------------------------------------------------------
    def noised(self, x0: Tensor, t: Tensor, eps: Tensor) -> tuple[Tensor, PathCoefs, Tensor, Tensor]:
        """Step indices: x_i from the table and t_net = i (DiT, bit for bit); continuous t: the spline path."""
        if t.is_floating_point():
            return super().noised(x0, t, eps)
        i = t.to(x0.device).long()
        c = self.index_coefs(i, x0)
        t_f = ((i.to(torch.float64) + 1.0) / self.num_timesteps).to(x0.dtype)
        return c.alpha * x0 + c.sigma * eps, c, t_f, i.to(x0.dtype)

    def vlb_bits(self, x0: Tensor, x_t: Tensor, t: Tensor, native_t: Tensor, c: PathCoefs, out: Tensor,
                 v: Tensor) -> Tensor:
        """DiT's L_i on the discrete table at step indices (discretised decoder at i = 0); the path chain else."""
        if native_t.is_floating_point():
            return super().vlb_bits(x0, x_t, t, native_t, c, out, v)
        i = native_t.to(x0.device).long()
        return self.vlb_term(self.schedule, self.eps_at(out, x_t, i), v, x0, x_t, i, decoder="discretized")

    def vlb_term(self, sched: DiscreteSchedule, eps: Tensor, v: Tensor | None, x0: Tensor, x_t: Tensor,
                 k: Tensor, decoder: str) -> Tensor:
        """L_k in bits per dim [B]: KL(q(x_{k-1}|x_k,x0) || p(x_{k-1}|x_k)) for k > 0, decoder NLL at k = 0."""
        true_mean, true_log_var = self.q_posterior(sched, x0, x_t, k)
        mean, log_var, _ = self.p_mean_log_variance(sched, eps, v, x_t, k)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / LOG2
        nll = -Decoder(decoder == "discretized", self.bin_width, self.decoder_cdf).log_prob(x0, mean, log_var)
        return torch.where(k == 0, mean_flat(nll) / LOG2, kl)

    # ---- sampling ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, net: Net, noise: Tensor, y: Tensor, *, sampler: str | None = None,
               num_steps: int | None = None, cfg_scale: float = 1.0, generator: torch.Generator | None = None,
               progress: bool = False) -> Tensor:
        """Ancestral DDPM or DDIM over the respaced chain from x_T = noise (the net sees original indices), or
        any continuous sampler on the schedule's VP path."""
        name = self.resolve_sampler(sampler)
        if name not in DISCRETE_SAMPLERS:
            return super().sample(net, noise, y, sampler=name, num_steps=num_steps, cfg_scale=cfg_scale,
                                  generator=generator, progress=progress)
        from tqdm.auto import tqdm

        sched = self.respaced(self.resolve_num_steps(num_steps))
        step = self.ddpm_step if name == "ddpm" else self.ddim_step
        x = noise
        B, C = x.shape[0], x.shape[1]
        for k in tqdm(reversed(range(sched.num_timesteps)), total=sched.num_timesteps, disable=not progress,
                      desc=name):
            k_b = torch.full((B,), k, dtype=torch.long, device=x.device)
            i = sched.timestep_map[k]
            t_net = torch.full((B,), float(i), dtype=x.dtype, device=x.device)
            out, v = self.split(self.net_output(net, x, t_net, y, cfg_scale), C)
            eps = self.eps_at(out, x, torch.full((B,), i, dtype=torch.long, device=x.device))
            x = step(sched, eps, v, x, k_b, last=(k == 0), generator=generator)
        return x

    def ddpm_step(self, sched, eps, v, x, k, *, last: bool, generator) -> Tensor:
        """x_{k-1} = mean + exp(log_var / 2) z, no noise at the last step."""
        mean, log_var, _ = self.p_mean_log_variance(sched, eps, v, x, k)
        return mean if last else mean + torch.exp(0.5 * log_var) * randn_like(x, generator)

    def ddim_step(self, sched, eps, v, x, k, *, last: bool, generator) -> Tensor:
        """x_{k-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps + s z, s = eta * DDIM sigma."""
        x0 = self.predict_x0(sched, x, eps, k)
        ac = sched.extract("alphas_cumprod", k, x.ndim, x)
        ac_prev = sched.extract("alphas_cumprod_prev", k, x.ndim, x)
        eps = (x - ac.sqrt() * x0) / (1.0 - ac).sqrt()  # consistent with a clipped x0
        s = self.eta * ((1.0 - ac_prev) / (1.0 - ac) * (1.0 - ac / ac_prev)).sqrt()
        mean = ac_prev.sqrt() * x0 + (1.0 - ac_prev - s**2).clamp_min(0.0).sqrt() * eps
        return mean if last or self.eta == 0 else mean + s * randn_like(x, generator)

    # ---- likelihood ----------------------------------------------------------------------------------------
    def log_likelihood(self, net: Net, x0: Tensor, y: Tensor, *, exact_divergence: bool | None = None,
                       num_steps: int | None = None, generator: torch.Generator | None = None,
                       progress: bool = False, solver: str | None = None) -> Tensor:
        """likelihood=elbo: the DDPM variational bound on log p(x0 | y) in nats [B]; likelihood=ode: the PF-ODE
        density of the eps-net on the schedule's VP path from t_min (= step 0 by default) to t_max."""
        if self.likelihood == "ode":
            return super().log_likelihood(net, x0, y, exact_divergence=exact_divergence, num_steps=num_steps,
                                          generator=generator, progress=progress, solver=solver)
        return self.elbo(net, x0, y, num_steps=num_steps, generator=generator, progress=progress)

    @torch.no_grad()
    def elbo(self, net: Net, x0: Tensor, y: Tensor, *, num_steps: int | None = None,
             generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
        """The DDPM variational bound (ELBO) on log p(x0 | y) in nats [B] -- a lower bound, not an exact density.

        ELBO = -[KL(q(x_T|x0) || N(0,I)) + sum_{i>0} E KL(q(x_{i-1}|x_i,x0) || p(x_{i-1}|x_i)) - E log p(x0|x_1)],
        each term with one draw of x_i. The decoder is `likelihood_decoder` (gaussian: a continuous density,
        comparable with score/flow; discretized: bins of bin_width). num_steps=None sums all T terms;
        num_steps=K estimates the KL sum without bias from one random step per sample in each of K strata.
        """
        from tqdm.auto import tqdm

        B, D = x0.shape[0], x0[0].numel()
        total = self.prior_kl_nats(x0)
        strata = self.elbo_strata(num_steps)
        for lo, hi in tqdm(strata, disable=not progress, desc="elbo"):
            # One step per sample drawn uniformly from the stratum [lo, hi), weighted by its size.
            device = generator.device if generator is not None else x0.device
            i_b = torch.randint(lo, hi, (B,), generator=generator, device=device).to(x0.device)
            x_t = self.q_sample(x0, i_b, randn_like(x0, generator))
            out, v = self.split(self.net_output(net, x_t, i_b.to(x0.dtype), y), x0.shape[1])
            eps = self.eps_at(out, x_t, i_b)
            term_bits = self.vlb_term(self.schedule, eps, v, x0, x_t, i_b, decoder=self.likelihood_decoder)
            total = total + (hi - lo) * term_bits * LOG2 * D
        return -total

    def elbo_strata(self, num_steps: int | None) -> list[tuple[int, int]]:
        """[lo, hi) step ranges of the ELBO sum: every step alone, or {0} plus num_steps strata of 1..T-1."""
        T = self.num_timesteps
        if num_steps is None or num_steps >= T - 1:
            return [(i, i + 1) for i in range(T)]
        edges = sorted(set(torch.linspace(1, T, int(num_steps) + 1).round().long().tolist()))
        return [(0, 1)] + list(zip(edges[:-1], edges[1:]))

    def prior_kl_nats(self, x0: Tensor) -> Tensor:
        """KL(q(x_T | x0) || N(0, I)) summed over dims [B]."""
        last = torch.full((x0.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x0.device)
        ac = self.schedule.extract("alphas_cumprod", last, x0.ndim, x0)
        kl = normal_kl(ac.sqrt() * x0, (1.0 - ac).log().expand_as(x0), torch.zeros_like(x0), torch.zeros_like(x0))
        return kl.flatten(1).sum(1)

    def discrete_bits_per_dim(self, net: Net, x0: Tensor, y: Tensor, *, bin_width: float | None = None,
                              generator: torch.Generator | None = None, **likelihood_kw) -> Tensor:
        """With the ELBO's discretised decoder the bound is already on P(bin): no dequantisation; else as base."""
        if self.likelihood == "elbo" and self.likelihood_decoder == "discretized":
            if bin_width is not None and float(bin_width) != self.bin_width:
                raise ValueError(f"bin_width={bin_width} differs from the objective's bin_width={self.bin_width} "
                                 "that its discretised decoder uses; set objective.bin_width instead")
            return self.bits_per_dim(self.log_likelihood(net, x0, y, generator=generator, **likelihood_kw), x0)
        return super().discrete_bits_per_dim(net, x0, y, bin_width=bin_width, generator=generator, **likelihood_kw)
