"""ScoreObjective (VP-SDE) against analytic Gaussian oracles: reverse SDE, PF-ODE, likelihood, weighting."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from oracles import (
    NUM_CLASSES,
    ContinuousOracle,
    class_stats_errors,
    exact_ode_map,
    gaussian_problem,
    pushforward_log_prob,
    single_thread,
)

from gen_objectives.objectives import ScoreObjective

pytestmark = pytest.mark.usefixtures("single_thread")
assert single_thread  # imported so pytest finds the fixture in this module

CONF = Path(__file__).resolve().parents[1] / "conf" / "objective" / "score.yaml"


def score_obj(**kw) -> ScoreObjective:
    return ScoreObjective(num_classes=NUM_CLASSES, **kw)


def oracle(obj: ScoreObjective, data, **kw) -> ContinuousOracle:
    return ContinuousOracle(data, obj.path, obj.prediction.name, **kw)


@pytest.mark.parametrize("parameterization", ["eps", "score"])
@pytest.mark.parametrize("sampler,steps,tol", [("euler", 50, 0.06), ("heun", 50, 0.006), ("dopri5", None, 1e-3)])
def test_pf_ode_follows_exact_flow_map(parameterization, sampler, steps, tol):
    """dx = -beta/2 (x + score) dt lands where the exact PF-ODE sends the same noise, per sample."""
    data, y, noise = gaussian_problem(1000)
    obj = score_obj(prediction=parameterization)
    x = obj.sample(oracle(obj, data), noise, y, sampler=sampler, num_steps=steps)
    assert (x - exact_ode_map(data, obj.path, noise, y, obj.t_end)).abs().max() < tol


def test_reverse_sde_is_default_and_reproduces_class_conditionals():
    data, y, noise = gaussian_problem(4000)
    obj = score_obj()
    assert obj.default_sampler == "euler_maruyama" and obj.default_num_steps == 1000
    x = obj.sample(oracle(obj, data), noise, y, num_steps=500, generator=torch.Generator().manual_seed(1))
    mean_err, std_err = class_stats_errors(x, y, data)
    assert mean_err < 0.04 and std_err < 0.03


def test_predictor_corrector_and_score_parameterization():
    data, y, noise = gaussian_problem(4000)
    obj = score_obj(prediction="score", corrector_steps=1, snr=0.1)
    net = oracle(obj, data)
    x = obj.sample(net, noise, y, num_steps=200, generator=torch.Generator().manual_seed(2))
    assert net.calls == 200 + 199  # one corrector call after every noisy predictor step
    mean_err, std_err = class_stats_errors(x, y, data)
    assert mean_err < 0.04 and std_err < 0.03


def test_wrong_score_sign_would_fail():
    """Sanity of the oracle tests themselves: flipping the score breaks the reverse SDE."""
    data, y, noise = gaussian_problem(2000)
    obj = score_obj()

    def flipped(x, t_net, y):
        return -oracle(obj, data)(x, t_net, y)

    x = obj.sample(flipped, noise, y, num_steps=100, generator=torch.Generator().manual_seed(3))
    mean_err, std_err = class_stats_errors(x, y, data)
    assert mean_err > 0.1 or std_err > 0.1


def test_cfg_and_extra_channels():
    data, y, noise = gaussian_problem(500)
    obj = score_obj()
    x = obj.sample(oracle(obj, data, extra_channels=True), noise, y, sampler="dopri5", cfg_scale=2.0)
    m_null = data.means[NUM_CLASSES]
    guided = m_null + 2.0 * (data.means[y] - m_null)
    assert (x - exact_ode_map(data, obj.path, noise, y, obj.t_end, means=guided)).abs().max() < 1e-3


@pytest.mark.parametrize("parameterization", ["eps", "score"])
def test_exact_likelihood(parameterization):
    data, y, _ = gaussian_problem(200)
    x0 = data.sample(y, torch.Generator().manual_seed(4))
    obj = score_obj(prediction=parameterization)
    ll = obj.log_likelihood(oracle(obj, data), x0, y, exact_divergence=True)
    assert (ll - pushforward_log_prob(data, obj.path, x0, y, obj.t_min)).abs().max() < 1e-3
    assert (ll - data.log_prob(x0, y)).abs().max() < 0.06  # the vp prior bias (alpha(1) = 6.6e-3)


@pytest.mark.parametrize("weighting", ["sigma2", "likelihood"])
@pytest.mark.parametrize("parameterization", ["eps", "score"])
def test_oracle_loss_is_the_weighted_irreducible_minimum(weighting, parameterization):
    """lambda |s - s*|^2 = (lambda / sigma^2) |eps_hat - eps|^2, minimum (lambda / sigma^2) alpha^2 s^2 / (alpha^2 s^2 + sigma^2)."""
    data, y, noise = gaussian_problem(20000)
    x0 = data.sample(y, torch.Generator().manual_seed(5))
    obj = score_obj(weighting=weighting, prediction=parameterization)
    t = torch.full((len(y),), 0.2, dtype=torch.float64)
    loss = obj.loss(oracle(obj, data), x0, y, t=t, noise=noise)
    alpha, sigma = obj.path.alpha(t[:1]), obj.path.sigma(t[:1])
    weight = 1.0 if weighting == "sigma2" else obj.path.beta(t[:1]) / sigma**2
    expected = weight * data.min_eps_mse(alpha, sigma)
    assert loss.shape == (len(y),) and abs(loss.mean().item() / float(expected) - 1) < 0.03
    worse = obj.loss(oracle(obj, data, perturb=0.2), x0, y, t=t, noise=noise)
    assert worse.mean() > loss.mean() * 1.02


def test_sample_t_range_and_t_net():
    obj = score_obj()
    t = obj.sample_t(10000, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.min() >= 1e-5 and t.max() <= 1.0 and t.mean().item() == pytest.approx(0.5, abs=0.02)
    assert torch.equal(obj.t_net(torch.tensor([0.25])), torch.tensor([250.0]))


def test_config_keys_are_the_constructor_keys():
    raw = OmegaConf.load(CONF)
    assert set(raw.keys()) - {"_target_"} == set(inspect.signature(ScoreObjective.__init__).parameters) - {"self"}
    obj = instantiate(OmegaConf.create({"data": {"num_classes": 10}, "objective": raw}).objective)
    assert isinstance(obj, ScoreObjective) and obj.learn_sigma is False and obj.num_classes == 10


def test_bad_inputs_fail_clearly():
    data, y, noise = gaussian_problem(4)
    with pytest.raises(ValueError, match="prediction 'v'; valid choices: eps, score, velocity, x0"):
        score_obj(prediction="v")
    with pytest.raises(ValueError, match="weighting 'uniform'; valid choices: likelihood, min_snr, sigma2, velocity"):
        score_obj(weighting="uniform")
    with pytest.raises(ValueError, match="ddim, dopri5, dpmpp_2m, euler, euler_maruyama, heun"):
        score_obj(sampler="ddpm")
    with pytest.raises(ValueError, match="beta_min"):
        score_obj(beta_min=30.0)
    with pytest.raises(ValueError, match="prediction=eps on path=linear cannot be sampled at t_max=1"):
        score_obj(path="linear")  # x0 = (x - sigma eps) / alpha with alpha(1) = 0
    assert score_obj(path="linear", t_max=0.999, sde_diffusion="sigma").t_max == 0.999
    with pytest.raises(ValueError, match="t_min"):
        score_obj(t_min=0.5, t_max=0.2)
    obj = score_obj()
    with pytest.raises(ValueError, match=r"\(4, 2, 2, 2\).*\(4, 2, 1, 1\)"):
        obj.sample(lambda x, t, y: torch.zeros(4, 2, 2, 2, dtype=x.dtype), noise, y, num_steps=2)
