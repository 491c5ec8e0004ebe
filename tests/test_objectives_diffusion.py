"""DiffusionObjective against analytic Gaussian oracles: DDPM/DDIM, guidance, ELBO, hybrid loss, config, errors."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from oracles import NUM_CLASSES, DiffusionOracle, class_stats_errors, gaussian_problem, single_thread
from scipy.stats import norm

from gen_objectives.objectives import DiffusionObjective
from gen_objectives.objectives.diffusion import discretized_gaussian_log_likelihood

pytestmark = pytest.mark.usefixtures("single_thread")
assert single_thread  # imported so pytest finds the fixture in this module

CONF = Path(__file__).resolve().parents[1] / "conf" / "objective" / "diffusion.yaml"


def diffusion(**kw) -> DiffusionObjective:
    return DiffusionObjective(num_classes=NUM_CLASSES, **kw)


def exact_ddim_target(data, obj, noise, y, means=None):
    """Where the exact PF-ODE carries x_T = noise to step 0, then E[x0 | x_0]: DDIM's limit as steps grow."""
    ac = obj.schedule.alphas_cumprod
    m = data.means[y] if means is None else means
    aT, a0, s2 = ac[-1].sqrt(), ac[0].sqrt(), data.s**2
    z = (noise - aT * m) / (aT**2 * s2 + 1 - ac[-1]).sqrt()
    x_first = a0 * m + (a0**2 * s2 + 1 - ac[0]).sqrt() * z
    return m + a0 * s2 * (x_first - a0 * m) / (a0**2 * s2 + 1 - ac[0])


@pytest.mark.parametrize("num_steps", [250, 50])
@pytest.mark.parametrize("knows_respacing", [True, False])
def test_ddpm_reproduces_class_conditionals(num_steps, knows_respacing):
    """Ancestral DDPM with the oracle's exact reverse variance (or the full-chain one, as a trained net) gives N(m_y, s^2)."""
    data, y, noise = gaussian_problem(4000)
    obj = diffusion()
    var_chain = obj.respaced(num_steps) if knows_respacing else None
    net = DiffusionOracle(data, obj.schedule, learn_sigma=True, variance_schedule=var_chain)
    x = obj.sample(net, noise, y, num_steps=num_steps, generator=torch.Generator().manual_seed(1))
    mean_err, std_err = class_stats_errors(x, y, data)
    assert mean_err < 0.05 and std_err < 0.035


def test_ddpm_fixed_variance_without_learn_sigma():
    data, y, noise = gaussian_problem(4000)
    obj = diffusion(learn_sigma=False, fixed_variance="large")
    x = obj.sample(DiffusionOracle(data, obj.schedule, learn_sigma=False), noise, y,
                   generator=torch.Generator().manual_seed(2))
    mean_err, std_err = class_stats_errors(x, y, data)
    assert mean_err < 0.05 and std_err < 0.035


def test_ddim_converges_to_the_exact_flow_map_at_first_order():
    """Deterministic DDIM (eta = 0) approaches the exact PF-ODE map per sample; error ~ 1/steps."""
    data, y, noise = gaussian_problem(500)
    obj = diffusion(learn_sigma=False, sampler="ddim")
    ref = exact_ddim_target(data, obj, noise, y)
    errs = {n: (obj.sample(DiffusionOracle(data, obj.schedule, False), noise, y, num_steps=n) - ref).abs().max().item()
            for n in (50, 250)}
    assert errs[250] < 0.03
    assert 3.5 < errs[50] / errs[250] < 6.5


def test_ddim_eta_one_is_ddpm_with_posterior_variance():
    """DDIM with eta = 1 on "ddimN" spacing is exactly ancestral DDPM with variance beta-tilde (same draws)."""
    data, y, noise = gaussian_problem(4000)
    ddim = diffusion(learn_sigma=False, sampler="ddim", spacing="ddim", eta=1.0)
    ddpm = diffusion(learn_sigma=False, fixed_variance="small", spacing="ddim")
    assert ddim.respaced(100).timestep_map[:3] == [0, 10, 20]
    net = DiffusionOracle(data, ddim.schedule, False)
    x = ddim.sample(net, noise, y, num_steps=100, generator=torch.Generator().manual_seed(3))
    x_ref = ddpm.sample(net, noise, y, num_steps=100, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(x, x_ref, atol=1e-10)
    # beta-tilde is slightly too small at 100 steps: std ~0.034 low (measured with 40k samples).
    mean_err, std_err = class_stats_errors(x, y, data)
    assert mean_err < 0.05 and std_err < 0.06


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_cfg_guides_eps_and_keeps_conditional_variance(scale):
    """Guided eps of same-s Gaussians is the oracle for m_null + w (m_y - m_null); w = 1 is the class-conditional."""
    data, y, noise = gaussian_problem(500)
    obj = diffusion(sampler="ddim")
    x = obj.sample(DiffusionOracle(data, obj.schedule, True), noise, y, cfg_scale=scale)
    m_null = data.means[NUM_CLASSES]
    guided = m_null + scale * (data.means[y] - m_null)
    assert (x - exact_ddim_target(data, obj, noise, y, means=guided)).abs().max() < 0.03


def test_elbo_matches_gaussian_log_likelihood():
    """With the exact mean and variance the DDPM bound is tight: E[ELBO] = log N(x0; m_y, s^2) (up to the prior)."""
    data, y, _ = gaussian_problem(2000)
    x0 = data.sample(y, torch.Generator().manual_seed(4))
    obj = diffusion()
    net = DiffusionOracle(data, obj.schedule, True)
    ll = obj.log_likelihood(net, x0, y, generator=torch.Generator().manual_seed(5))
    gap = ll - data.log_prob(x0, y)
    assert ll.shape == (2000,)
    assert abs(gap.mean().item()) < 4 * gap.std().item() / math.sqrt(2000) + 0.01
    strat = obj.log_likelihood(net, x0, y, num_steps=100, generator=torch.Generator().manual_seed(6))
    gap = strat - data.log_prob(x0, y)
    assert abs(gap.mean().item()) < 4 * gap.std().item() / math.sqrt(2000) + 0.01
    # A wrong variance loosens the bound by a clear margin.
    loose = obj.log_likelihood(DiffusionOracle(data, obj.schedule, True, perturb_v=-1.0), x0, y,
                               num_steps=100, generator=torch.Generator().manual_seed(6))
    assert (strat - loose).mean() > 0.15  # measured 0.29


def test_hybrid_loss_terms_equal_their_analytic_minimum():
    """At fixed i: eps-MSE = abar s^2 / (abar s^2 + 1 - abar); VB = log(var_true / beta-tilde) / 2 bits... per dim."""
    data, y, noise = gaussian_problem(20000)
    x0 = data.sample(y, torch.Generator().manual_seed(7))
    obj = diffusion()
    i = 100
    t = torch.full((len(y),), i, dtype=torch.long)
    terms = obj.loss_terms(DiffusionOracle(data, obj.schedule, True), x0, y, t=t, noise=noise)
    sch = obj.schedule
    ac = sch.alphas_cumprod[i]
    expected_mse = data.min_eps_mse(ac.sqrt(), (1 - ac).sqrt())
    assert abs(terms["mse"].mean().item() / expected_mse.item() - 1) < 0.03
    var_x0 = data.s**2 * (1 - ac) / (ac * data.s**2 + 1 - ac)
    true_var = sch.posterior_variance[i] + sch.posterior_mean_coef1[i] ** 2 * var_x0
    expected_vb = 0.5 * torch.log(true_var / sch.posterior_variance[i]) / math.log(2)
    assert abs(terms["vb"].mean().item() / expected_vb.item() - 1) < 0.03
    loss = obj.loss(DiffusionOracle(data, obj.schedule, True), x0, y, t=t, noise=noise)
    assert torch.allclose(loss, terms["mse"] + terms["vb"])
    worse_eps = obj.loss_terms(DiffusionOracle(data, obj.schedule, True, perturb_eps=0.1), x0, y, t=t, noise=noise)
    worse_v = obj.loss_terms(DiffusionOracle(data, obj.schedule, True, perturb_v=1.0), x0, y, t=t, noise=noise)
    assert worse_eps["mse"].mean() > terms["mse"].mean() + 0.005
    assert worse_v["vb"].mean() > terms["vb"].mean() + 1e-5  # beta and beta-tilde are close at i = 100


def test_vb_term_does_not_train_the_mean():
    """The VLB gradient reaches only the variance channels (stop-grad on eps, as DiT)."""
    data, y, noise = gaussian_problem(64)
    x0 = data.sample(y)
    obj = diffusion()
    out = torch.zeros(64, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    terms = obj.loss_terms(lambda x, t, y: out * 1.0, x0, y, noise=noise)
    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert grad_vb[:, :2].abs().max() == 0 and grad_vb[:, 2:].abs().max() > 0
    assert grad_mse[:, 2:].abs().max() == 0 and grad_mse[:, :2].abs().max() > 0


def test_discretized_decoder_matches_scipy():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.3, 1.0], dtype=torch.float64)
    mean = torch.tensor([-0.9, -0.4, 0.1, 0.3, 0.95], dtype=torch.float64)
    log_scale = torch.log(torch.tensor([0.1, 0.05, 0.2, 0.01, 0.1], dtype=torch.float64))
    got = discretized_gaussian_log_likelihood(x, mean, log_scale).numpy()
    sd, mu, xs = log_scale.exp().numpy(), mean.numpy(), x.numpy()
    ref = np.log(norm.cdf(xs + 1 / 255, mu, sd) - norm.cdf(xs - 1 / 255, mu, sd))
    ref[0] = np.log(norm.cdf(xs[0] + 1 / 255, mu[0], sd[0]))  # lowest bin reaches -inf
    ref[-1] = np.log(norm.sf(xs[-1] - 1 / 255, mu[-1], sd[-1]))  # highest bin reaches +inf
    np.testing.assert_allclose(got, ref, rtol=1e-10)


def test_time_convention_and_sample_t():
    obj = diffusion()
    t = obj.sample_t(10000, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 999
    assert torch.allclose(obj.unit_time(torch.tensor([0, 999])), torch.tensor([0.0, 1.0]))
    seen = []
    obj.sample(lambda x, t_net, y: seen.append(t_net) or torch.zeros(x.shape[0], 4, 1, 1, dtype=x.dtype),
               torch.zeros(2, 2, 1, 1), torch.zeros(2, dtype=torch.long), num_steps=250)
    assert seen[0].tolist() == [999.0, 999.0] and seen[-1].tolist() == [0.0, 0.0] and len(seen) == 250
    assert [s[0].item() for s in seen[-3:]] == [8.0, 4.0, 0.0]


def test_config_keys_are_the_constructor_keys():
    raw = OmegaConf.load(CONF)
    keys = set(raw.keys()) - {"_target_"}
    assert keys == set(inspect.signature(DiffusionObjective.__init__).parameters) - {"self"}
    obj = instantiate(OmegaConf.create({"data": {"num_classes": 1000}, "objective": raw}).objective)
    assert isinstance(obj, DiffusionObjective) and obj.learn_sigma is True and obj.num_classes == 1000
    assert obj.default_sampler == "ddpm" and obj.default_num_steps == 250


def test_bad_inputs_fail_clearly():
    data, y, noise = gaussian_problem(4)
    obj = diffusion()
    with pytest.raises(ValueError, match="ddim, ddpm"):
        obj.sample(DiffusionOracle(data, obj.schedule, True), noise, y, sampler="plms")
    with pytest.raises(ValueError, match="cosine, linear"):
        diffusion(schedule="sigmoid")
    with pytest.raises(ValueError, match="beta_min"):
        diffusion(beta_min=0.5, beta_max=0.5)
    with pytest.raises(ValueError, match="beta_min"):
        diffusion(beta_min=-1.0)
    with pytest.raises(ValueError, match="even"):
        diffusion(spacing="quadratic")
    # learn_sigma needs 2C channels: a C-channel net fails naming both shapes.
    with pytest.raises(ValueError, match=r"\(4, 2, 1, 1\).*\(4, 2, 1, 1\).*\(4,\)"):
        obj.loss(DiffusionOracle(data, obj.schedule, False), data.sample(y), y)


def test_progress_bar(capsys):
    data, y, noise = gaussian_problem(8)
    obj = diffusion()
    obj.sample(DiffusionOracle(data, obj.schedule, True), noise, y, num_steps=5, progress=True)
    assert "5/5" in capsys.readouterr().err


def test_discretized_decoder_elbo_is_the_bin_probability():
    """With DiT's 8-bit decoder the bound is on P(bin) ~ density * (2/255)^D: the same draws differ by D log(2/255)."""
    data, y, _ = gaussian_problem(2000)
    x0 = data.sample(y, torch.Generator().manual_seed(1)).clamp(-0.99, 0.99)  # away from the open-ended bins
    lls = {}
    for decoder in ("gaussian", "discretized"):
        obj = diffusion(likelihood_decoder=decoder)
        lls[decoder] = obj.log_likelihood(DiffusionOracle(data, obj.schedule, True), x0, y, num_steps=20,
                                          generator=torch.Generator().manual_seed(2))
    gap = (lls["discretized"] - lls["gaussian"]).mean().item()
    assert gap == pytest.approx(2 * math.log(2 / 255), abs=0.05)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_one_step_chain_is_refused_with_the_key_named(sampler):
    obj = DiffusionObjective(num_classes=NUM_CLASSES, learn_sigma=False)
    net = lambda x, t, y: torch.zeros_like(x)
    noise = torch.randn(2, 1, 2, 2)
    with pytest.raises(ValueError, match="num_steps >= 2, got num_steps=1"):
        obj.sample(net, noise, torch.zeros(2, dtype=torch.long), sampler=sampler, num_steps=1)
    assert obj.sample(net, noise, torch.zeros(2, dtype=torch.long), sampler=sampler, num_steps=2).shape == noise.shape
