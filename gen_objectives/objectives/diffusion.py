"""Discrete DDPM (Ho et al.) with DiT/IDDPM's learned variance: eps-MSE + hybrid VLB, DDPM and DDIM samplers.

Step index i in {0..T-1}; x_i = sqrt(abar_i) x0 + sqrt(1 - abar_i) eps and the net sees i (as a float).
With learn_sigma the net returns [eps_hat, v] (2C channels) and the reverse variance is
  log var = frac log beta_i + (1 - frac) log beta-tilde_i,  frac = (v + 1) / 2   (IDDPM "learned range").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..paths import check_choice
from ..schedules import DiscreteSchedule
from ..solvers import randn_like
from .base import Net, Objective, mean_flat

LOG2 = math.log(2.0)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def gaussian_log_likelihood(x: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """log N(x; mean, e^log_var) elementwise, in nats (continuous decoder)."""
    return -0.5 * (math.log(2 * math.pi) + log_var + (x - mean) ** 2 * torch.exp(-log_var))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(bin of x) for data on a 256-level grid in [-1, 1] under N(mean, e^(2 log_scale)), elementwise nats.

    The outermost bins extend to -inf / +inf (IDDPM's decoder semantics).
    """
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + 1.0 / 255.0)
    lower = inv_std * (x - mean - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    bin_mass = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp_min(1e-12)
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, bin_mass.log()))


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


class DiffusionObjective(Objective):
    """Discrete DDPM with t ~ U{0..T-1} and t_net = i (keys are conf/objective/diffusion.yaml's)."""

    samplers = ("ddpm", "ddim")

    def __init__(
        self,
        num_timesteps: int = 1000,
        schedule: str = "linear",
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        learn_sigma: bool = True,
        fixed_variance: str = "large",
        vlb_weight: float = 1.0,
        sampler: str = "ddpm",
        num_steps: int = 250,
        spacing: str = "even",
        eta: float = 0.0,
        clip_denoised: bool = False,
        likelihood_decoder: str = "gaussian",
        num_classes: int | None = None,
        guidance_channels: int | None = None,
    ):
        super().__init__(num_classes=num_classes, guidance_channels=guidance_channels)
        check_choice("fixed_variance", fixed_variance, FIXED_VARIANCES)
        check_choice("spacing", spacing, SPACINGS)
        check_choice("likelihood_decoder", likelihood_decoder, DECODERS)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.schedule = DiscreteSchedule(num_timesteps, schedule, beta_min, beta_max)
        self.num_timesteps = self.schedule.num_timesteps
        self.learn_sigma = bool(learn_sigma)
        self.variance = LearnedRangeVariance() if self.learn_sigma else FIXED_VARIANCES[fixed_variance]()
        self.vlb_weight = float(vlb_weight)
        self.default_sampler = self.resolve_sampler(sampler)
        self.default_num_steps = int(num_steps)
        self.spacing = spacing
        self._respaced: dict[str, DiscreteSchedule] = {}
        self.resolve_num_steps(None)
        self.respaced(self.default_num_steps)  # fail at start-up if the default spacing is impossible
        self.eta = float(eta)
        self.clip_denoised = bool(clip_denoised)
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

    def split(self, out: Tensor, C: int) -> tuple[Tensor, Tensor | None]:
        """(eps_hat [B,C,..], v [B,C,..] or None)."""
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

    # ---- the interface ---------------------------------------------------------------------------------
    def sample_t(self, batch_size: int, device, generator: torch.Generator | None = None) -> Tensor:
        """i ~ U{0..T-1}, long [B]."""
        gen_device = generator.device if generator is not None else device
        i = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=gen_device)
        return i.to(device)

    def unit_time(self, t: Tensor) -> Tensor:
        """i / (T - 1), the continuous time whose beta(t)/T gives beta_i."""
        return t.float() / (self.num_timesteps - 1)

    def loss_terms(self, net: Net, x0: Tensor, y: Tensor, *, t: Tensor | None = None,
                   noise: Tensor | None = None) -> dict[str, Tensor]:
        """Per-sample eps-MSE and (learn_sigma) the VLB term in bits with the mean held fixed (stop-grad)."""
        i = self.sample_t(x0.shape[0], x0.device) if t is None else t.to(x0.device).long()
        eps = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, i, eps)
        out = self.net_output(net, x_t, i.to(x0.dtype), y)
        eps_hat, v = self.split(out, x0.shape[1])
        terms = {"mse": mean_flat((eps - eps_hat) ** 2)}
        if self.learn_sigma:
            # The VLB trains only the variance: the mean comes from a detached eps_hat (DiT/IDDPM hybrid loss).
            terms["vb"] = self.vlb_term(self.schedule, eps_hat.detach(), v, x0, x_t, i, decoder="discretized")
        return terms

    def loss(self, net: Net, x0: Tensor, y: Tensor, *, t: Tensor | None = None,
             noise: Tensor | None = None) -> Tensor:
        """eps-MSE (seed eq. 8), plus vlb_weight * VLB term (bits/dim) when learn_sigma -> [B]."""
        terms = self.loss_terms(net, x0, y, t=t, noise=noise)
        return terms["mse"] + self.vlb_weight * terms["vb"] if self.learn_sigma else terms["mse"]

    def vlb_term(self, sched: DiscreteSchedule, eps: Tensor, v: Tensor | None, x0: Tensor, x_t: Tensor,
                 k: Tensor, decoder: str) -> Tensor:
        """L_k in bits per dim [B]: KL(q(x_{k-1}|x_k,x0) || p(x_{k-1}|x_k)) for k > 0, decoder NLL at k = 0."""
        true_mean, true_log_var = self.q_posterior(sched, x0, x_t, k)
        mean, log_var, _ = self.p_mean_log_variance(sched, eps, v, x_t, k)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / LOG2
        if decoder == "discretized":
            nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
        else:
            nll = -gaussian_log_likelihood(x0, mean, log_var)
        return torch.where(k == 0, mean_flat(nll) / LOG2, kl)

    @torch.no_grad()
    def sample(self, net: Net, noise: Tensor, y: Tensor, *, sampler: str | None = None,
               num_steps: int | None = None, cfg_scale: float = 1.0, generator: torch.Generator | None = None,
               progress: bool = False) -> Tensor:
        """Ancestral DDPM or DDIM over the respaced chain from x_T = noise; the net sees original indices."""
        from tqdm.auto import tqdm

        name = self.resolve_sampler(sampler)
        sched = self.respaced(self.resolve_num_steps(num_steps))
        step = self.ddpm_step if name == "ddpm" else self.ddim_step
        x = noise
        B, C = x.shape[0], x.shape[1]
        for k in tqdm(reversed(range(sched.num_timesteps)), total=sched.num_timesteps, disable=not progress,
                      desc=name):
            k_b = torch.full((B,), k, dtype=torch.long, device=x.device)
            t_net = torch.full((B,), float(sched.timestep_map[k]), dtype=x.dtype, device=x.device)
            eps, v = self.split(self.net_output(net, x, t_net, y, cfg_scale), C)
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

    @torch.no_grad()
    def log_likelihood(self, net: Net, x0: Tensor, y: Tensor, *, exact_divergence: bool = False,
                       num_steps: int | None = None, generator: torch.Generator | None = None,
                       progress: bool = False) -> Tensor:
        """The DDPM variational bound (ELBO) on log p(x0 | y) in nats [B] -- a lower bound, not an exact density.

        ELBO = -[KL(q(x_T|x0) || N(0,I)) + sum_{i>0} E KL(q(x_{i-1}|x_i,x0) || p(x_{i-1}|x_i)) - E log p(x0|x_1)],
        each term with one draw of x_i. The decoder is `likelihood_decoder` (gaussian: a continuous density,
        comparable with score/flow; discretized: DiT's 8-bit bins). num_steps=None sums all T terms;
        num_steps=K estimates the KL sum without bias from one random step per sample in each of K strata.
        exact_divergence does not apply (there is no ODE).
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
            eps, v = self.split(self.net_output(net, x_t, i_b.to(x0.dtype), y), x0.shape[1])
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
