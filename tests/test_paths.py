"""Gaussian paths (alpha, sigma and derivatives) and the discrete DDPM schedule against DiT's numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gen_objectives.paths import PATHS, GaussianPath, GVPPath, LinearPath, VPPath, make_path
from gen_objectives.schedules import DiscreteSchedule, cosine_betas, space_timesteps

FACTS = json.loads((Path(__file__).parent / "data" / "ddpm_facts.json").read_text())
T_GRID = torch.linspace(1e-3, 1.0, 101, dtype=torch.float64)


@pytest.mark.parametrize("name", list(PATHS))
def test_derivatives_match_autograd(name):
    path = make_path(name)
    t = T_GRID.clone().requires_grad_(True)
    for value, derivative in ((path.alpha, path.d_alpha), (path.sigma, path.d_sigma)):
        (grad,) = torch.autograd.grad(value(t).sum(), t)
        assert torch.allclose(derivative(t.detach()), grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(PATHS))
def test_boundary_values_and_float64(name):
    path = make_path(name)
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    assert path.alpha(zero).item() == 1.0 and path.sigma(zero).item() == 0.0
    assert path.alpha(T_GRID).dtype == torch.float64 and path.d_sigma(T_GRID).dtype == torch.float64
    if name == "vp":
        assert path.alpha(one).item() == pytest.approx(math.exp(-0.5 * (0.5 * 19.9 + 0.1)), rel=1e-14)
    else:
        assert abs(path.alpha(one).item()) < 1e-15 and path.sigma(one).item() == pytest.approx(1.0)


def test_vp_is_the_seed_equations_28_29():
    """alpha = exp(-t^2 (bmax - bmin)/4 - t bmin/2), sigma = sqrt(1 - exp(-t^2 (bmax - bmin)/2 - t bmin))."""
    path = VPPath(beta_min=0.3, beta_max=12.0)
    t = T_GRID
    alpha = torch.exp(-0.25 * t**2 * (12.0 - 0.3) - 0.5 * t * 0.3)
    sigma = torch.sqrt(1 - torch.exp(-0.5 * t**2 * (12.0 - 0.3) - t * 0.3))
    assert torch.allclose(path.alpha(t), alpha, rtol=1e-13) and torch.allclose(path.sigma(t), sigma, rtol=1e-13)
    assert torch.allclose(path.alpha(t) ** 2 + path.sigma(t) ** 2, torch.ones_like(t), atol=1e-14)
    tt = t.clone().requires_grad_(True)
    (dB,) = torch.autograd.grad(path.B(tt).sum(), tt)
    assert torch.allclose(dB, path.beta(t), rtol=1e-13)
    # sigma keeps full relative precision at tiny t (sqrt(1 - exp(-B)) ~ sqrt(B)).
    tiny = torch.tensor([1e-12], dtype=torch.float64)
    assert path.sigma(tiny).item() == pytest.approx(math.sqrt(0.3e-12), rel=1e-6)


@pytest.mark.parametrize("name", list(PATHS))
def test_forward_sde_diffusion(name):
    """g^2 = d(sigma^2)/dt - 2 (d_alpha / alpha) sigma^2; for vp this is beta(t)."""
    path = make_path(name)
    t = T_GRID[:-1]
    g2 = GaussianPath.sde_g2(path, t)
    tt = t.clone().requires_grad_(True)
    (dvar,) = torch.autograd.grad((path.sigma(tt) ** 2).sum(), tt)
    assert torch.allclose(g2, dvar - 2 * path.d_alpha(t) / path.alpha(t) * path.sigma(t) ** 2, rtol=1e-10)
    if name == "vp":
        assert torch.allclose(path.sde_g2(t), path.beta(t), rtol=1e-12)
        assert torch.allclose(g2, path.beta(t), rtol=1e-10)


def test_linear_and_gvp_formulas():
    t = T_GRID
    assert torch.allclose(LinearPath().alpha(t), 1 - t) and torch.allclose(LinearPath().sigma(t), t)
    assert torch.allclose(GVPPath().alpha(t), torch.cos(math.pi * t / 2))
    assert torch.allclose(GVPPath().sigma(t), torch.sin(math.pi * t / 2))


def test_bad_path_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="beta_min.*beta_max"):
        VPPath(beta_min=20.0, beta_max=0.1)
    with pytest.raises(ValueError, match="beta_min.*beta_max"):
        VPPath(beta_min=-0.1, beta_max=20.0)
    with pytest.raises(ValueError, match="gvp, linear, vp"):
        make_path("cosine")
    with pytest.raises(ValueError, match="beta_min"):
        DiscreteSchedule(beta_min=1.0, beta_max=1.0)


# ---- the discrete schedule ---------------------------------------------------------------------------------


def test_linear_betas_are_ddpm_and_the_discretised_vp_path():
    sched = DiscreteSchedule()
    assert np.array_equal(sched.np["betas"], np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    vp = VPPath()
    t_i = torch.linspace(0, 1, 1000, dtype=torch.float64)
    assert torch.allclose(sched.betas, vp.beta(t_i) / 1000, rtol=1e-12)
    # The same keys scale with T as DDPM does (beta_start = 0.1 / T, beta_end = 20 / T).
    assert np.allclose(DiscreteSchedule(500).np["betas"], np.linspace(2e-4, 0.04, 500), rtol=1e-14)
    # log abar at the last step ~ -B(1) (differs by sum beta^2 / 2 ~ 0.7%).
    assert math.log(sched.np["alphas_cumprod"][-1]) == pytest.approx(-vp.B(torch.tensor(1.0)).item(), rel=0.01)


@pytest.mark.parametrize("i", sorted(FACTS["alphas_cumprod_at"], key=int))
def test_alphas_cumprod_and_posterior_log_variance_match_dit(i):
    sched = DiscreteSchedule()
    assert sched.np["alphas_cumprod"][int(i)] == pytest.approx(FACTS["alphas_cumprod_at"][i], rel=1e-13)
    got = sched.np["posterior_log_variance_clipped"][int(i)]
    assert got == pytest.approx(FACTS["posterior_log_variance_clipped_at"][i], rel=1e-12)


def test_respacing_matches_dit():
    sched = DiscreteSchedule()
    r250 = sched.respace("250")
    assert r250.num_timesteps == FACTS["respaced_250_count"]
    assert r250.timestep_map[:10] == FACTS["respaced_250_timesteps_first10"]
    assert r250.timestep_map[-5:] == FACTS["respaced_250_timesteps_last5"]
    np.testing.assert_allclose(r250.np["betas"][:5], FACTS["respaced_250_betas_first5"], rtol=1e-12)
    np.testing.assert_allclose(r250.np["betas"][-3:], FACTS["respaced_250_betas_last3"], rtol=1e-12)
    ddim50 = space_timesteps(1000, "ddim50")
    assert ddim50[:10] == FACTS["respaced_ddim50_timesteps_first10"]
    assert ddim50[-5:] == FACTS["respaced_ddim50_timesteps_last5"] and len(ddim50) == 50
    # The shorter chain keeps the marginals: abar'_k = abar[i_k].
    assert np.allclose(r250.np["alphas_cumprod"], sched.np["alphas_cumprod"][r250.timestep_map], rtol=1e-12)
    assert space_timesteps(1000, "1000") == list(range(1000))


def test_sectioned_respacing():
    kept = space_timesteps(100, "10,5")
    assert len(kept) == 15 and kept[0] == 0 and kept[9] == 49 and kept[10] == 50 and kept[-1] == 99
    with pytest.raises(ValueError):
        space_timesteps(100, "ddim30")  # no stride gives exactly 30 steps


def test_posterior_coefficients_are_gaussian_conditioning():
    """q(x_{i-1} | x_i, x0) from the joint Gaussian of (x_{i-1}, x_i) given x0."""
    sched = DiscreteSchedule()
    ac, ac_prev, alphas = (sched.np["alphas_cumprod"], sched.np["alphas_cumprod_prev"],
                           1 - sched.np["betas"])
    for i in (1, 10, 500, 999):
        cov = math.sqrt(alphas[i]) * (1 - ac_prev[i])  # Cov(x_{i-1}, x_i | x0)
        gain = cov / (1 - ac[i])
        assert sched.np["posterior_mean_coef2"][i] == pytest.approx(gain, rel=1e-12)
        assert sched.np["posterior_mean_coef1"][i] == pytest.approx(
            math.sqrt(ac_prev[i]) - gain * math.sqrt(ac[i]), rel=1e-9)
        assert sched.np["posterior_variance"][i] == pytest.approx((1 - ac_prev[i]) - gain * cov, rel=1e-9)


def test_cosine_schedule():
    sched = DiscreteSchedule(schedule="cosine")
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for i in (0, 100, 500, 900):
        assert sched.np["alphas_cumprod"][i] == pytest.approx(f((i + 1) / 1000) / f(0), rel=1e-10)
    assert cosine_betas(1000).max() == 0.999
