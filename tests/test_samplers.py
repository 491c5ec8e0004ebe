"""Every sampler for every objective (issue #10 item 1) against the Gaussian oracle: time grids, DDIM and
DPM-Solver++(2M) for all three, diffusion's PF-ODE / reverse SDE / ODE likelihood on its own VP path, the final
denoising step, SiT's SDE normalisation, the few-step warning and guidance without a null class."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from oracles import (
    NUM_CLASSES,
    ContinuousOracle,
    class_stats_errors,
    exact_ode_map,
    gaussian_problem,
    pushforward_log_prob,
    single_thread,
)

from gen_objectives.objectives import DiffusionObjective, FlowObjective, ScoreObjective
from gen_objectives.paths import DiscreteVPPath, LinearPath, VPPath
from gen_objectives.schedules import DiscreteSchedule
from gen_objectives.solvers import make_time_grid, randn_like

pytestmark = pytest.mark.usefixtures("single_thread")
assert single_thread  # imported so pytest finds the fixture in this module


def corner(name: str, **kw):
    """(objective, oracle) for a corner of the grid; diffusion's oracle reads t = (t_net + 1) / T."""
    if name == "diffusion":
        obj = DiffusionObjective(num_classes=NUM_CLASSES, learn_sigma=False, **kw)
        return obj, lambda data: ContinuousOracle(data, obj.path, "eps", net_time="index")
    if name == "score":
        obj = ScoreObjective(num_classes=NUM_CLASSES, **kw)
        return obj, lambda data: ContinuousOracle(data, obj.path, "eps")
    obj = FlowObjective(num_classes=NUM_CLASSES, path="linear", t_end=1e-3, t_max=0.999, **kw)
    return obj, lambda data: ContinuousOracle(data, obj.path, "velocity")


def sampler_error(obj, oracle, data, y, noise, **kw) -> float:
    x = obj.sample(oracle(data), noise, y, **kw)
    ref = exact_ode_map(data, obj.path, noise, y, obj.t_end, t_start=obj.t_max)
    return (x - ref).abs().max().item()


# ---- time grids ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [VPPath(), DiscreteVPPath(DiscreteSchedule().alphas_cumprod), LinearPath()])
def test_time_grids(path):
    like = torch.zeros(1, dtype=torch.float64)
    t0, t1 = 0.999, 1e-3
    uni = make_time_grid("uniform")(path, t0, t1, 10, like)
    assert torch.equal(uni, torch.linspace(t0, t1, 11, dtype=torch.float64))
    lam = path.log_snr(make_time_grid("log_snr")(path, t0, t1, 10, like))
    assert torch.allclose(lam[1:] - lam[:-1], (lam[-1] - lam[0]) / 10 * torch.ones(10, dtype=torch.float64), rtol=1e-6)
    edm = make_time_grid("edm", rho=7.0)(path, t0, t1, 10, like)
    s = torch.exp(-0.5 * path.log_snr(edm)) ** (1 / 7)  # sigma/alpha^(1/rho) is linear in the step index
    assert torch.allclose(s[1:] - s[:-1], (s[-1] - s[0]) / 10 * torch.ones(10, dtype=torch.float64), rtol=1e-6)
    for grid in (uni, edm):
        assert grid[0] == t0 and grid[-1] == t1 and (grid[1:] < grid[:-1]).all()


# ---- the exponential integrators and the ODE solvers on every corner --------------------------------------------
@pytest.mark.parametrize("name", ["diffusion", "score", "flow"])
@pytest.mark.parametrize("sampler,order", [("ddim", 1), ("dpmpp_2m", 2)])
def test_exponential_integrators_converge_at_their_order(name, sampler, order):
    """On a log-SNR grid the error falls ~2^order per halving of the step (DDIM first, DPM-Solver++(2M) second).

    diffusion's ddim is DiT's DDIM on the respaced discrete chain (the same integrator on the knots; no grid)."""
    data, y, noise = gaussian_problem(400)
    obj, oracle = corner(name, time_grid="log_snr")
    errs = [sampler_error(obj, oracle, data, y, noise, sampler=sampler, num_steps=n) for n in (20, 40, 80)]
    assert errs[-1] < (0.08 if order == 1 else 4e-3)
    for a, b in zip(errs, errs[1:]):
        assert a / b > 2 ** order * 0.8


@pytest.mark.parametrize("sampler,steps,tol", [("euler", 200, 0.02), ("heun", 50, 6e-3), ("dopri5", None, 1e-3)])
def test_diffusion_pf_ode_on_its_own_vp_path(sampler, steps, tol):
    """Diffusion's eps-net drives the PF-ODE of the spline VP path through its schedule (t_net = T t - 1)."""
    data, y, noise = gaussian_problem(400)
    obj, oracle = corner("diffusion")
    assert obj.path.T == 1000 and obj.t_end == pytest.approx(1e-3) and obj.default_sampler == "ddpm"
    assert sampler_error(obj, oracle, data, y, noise, sampler=sampler, num_steps=steps) < tol


def test_diffusion_reverse_sde_and_continuous_ddim_with_noise_reproduce_the_data():
    data, y, noise = gaussian_problem(4000)
    obj, oracle = corner("diffusion")
    x = obj.sample(oracle(data), noise, y, sampler="euler_maruyama", num_steps=500,
                   generator=torch.Generator().manual_seed(1))
    mean_err, std_err = class_stats_errors(x, y, data)
    assert mean_err < 0.04 and std_err < 0.03
    score, score_oracle = corner("score", eta=1.0, time_grid="log_snr")
    x = score.sample(score_oracle(data), noise, y, sampler="ddim", num_steps=200,
                     generator=torch.Generator().manual_seed(2))
    mean_err, std_err = class_stats_errors(x, y, data)
    assert mean_err < 0.04 and std_err < 0.04


def test_diffusion_ode_likelihood_is_the_pushforward_density():
    data, y, _ = gaussian_problem(64)
    x0 = data.sample(y, torch.Generator().manual_seed(3))
    obj, oracle = corner("diffusion", likelihood="ode")
    ll = obj.log_likelihood(oracle(data), x0, y)  # dopri5, exact divergence (2 dims <= likelihood_exact_max_dim)
    exact = pushforward_log_prob(data, obj.path, x0, y, obj.t_min)
    assert obj.t_min == pytest.approx(1e-3) and (ll - exact).abs().max() < 1e-3


def test_denoise_final_returns_tweedie_at_t_end():
    data, y, noise = gaussian_problem(400)
    obj, oracle = corner("score", denoise_final=True, t_end=0.05)
    x = obj.sample(oracle(data), noise, y, sampler="dopri5")
    x_end = exact_ode_map(data, obj.path, noise, y, obj.t_end)
    c = obj.path.coefs(torch.full((1,), obj.t_end, dtype=torch.float64), x.ndim)
    tweedie = data.posterior(x_end, y, c.alpha, c.sigma)[0]
    assert (x - tweedie).abs().max() < 1e-3 and (x - x_end).abs().max() > 1e-3


def test_sit_diffusion_norm_is_half_of_ours():
    """SiT's Euler-Maruyama in its time s = 1 - t: x += (v_s + D score) ds + sqrt(2 D ds) z, D = N sigma.
    With the same draws it equals ours with sde_diffusion=sigma, sde_diffusion_norm = 2 N."""
    data, y, noise = gaussian_problem(64)
    N, n = 1.0, 25
    obj = FlowObjective(num_classes=NUM_CLASSES, path="linear", sde_diffusion="sigma", sde_diffusion_norm=2 * N,
                        t_end=0.04)
    net = ContinuousOracle(data, obj.path, "velocity")
    ours = obj.sample(net, noise, y, sampler="euler_maruyama", num_steps=n, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    x, ts = noise.clone(), torch.linspace(1.0, 0.04, n + 1, dtype=torch.float64)
    for k in range(n):
        t, ds = ts[k], ts[k] - ts[k + 1]
        out, c = obj.predict(net, x, t, y)
        v_sit, D = -out, N * obj.path.sigma(t)  # SiT's velocity points towards data, its time runs 0 -> 1
        x = x + (v_sit + D * obj.score(out, x, c)) * ds
        if k < n - 1:
            x = x + torch.sqrt(2 * D * ds) * randn_like(x, g)
    assert torch.allclose(ours, x, atol=1e-12)


def test_few_step_t_samplers_say_they_are_smoke_tests():
    data, y, noise = gaussian_problem(8)
    obj, oracle = corner("score")
    for sampler in ("euler", "heun", "euler_maruyama"):
        with pytest.warns(UserWarning, match=f"sampler={sampler} with num_steps=2"):
            obj.sample(oracle(data), noise, y, sampler=sampler, num_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for sampler in ("ddim", "dpmpp_2m"):  # exponential integrators are exact on the linear part: few steps are fine
            obj.sample(oracle(data), noise, y, sampler=sampler, num_steps=1)
        obj.sample(oracle(data), noise, y, sampler="euler", num_steps=3)


def test_guidance_without_a_null_class_says_so():
    """Any net whose label embedding has no null row: a clear message instead of a bare IndexError."""
    emb = torch.nn.Embedding(NUM_CLASSES, 2, dtype=torch.float64)

    def net(x, t_net, y):
        return x + emb(y)[:, :, None, None]

    data, y, noise = gaussian_problem(4)
    obj, _ = corner("score")
    with pytest.raises(ValueError, match=r"cfg_scale=2.0 needs the null class \(label 2\).*no null class"):
        obj.sample(net, noise, y, sampler="ddim", num_steps=3, cfg_scale=2.0)


@pytest.mark.parametrize("name", ["diffusion", "score", "flow"])
def test_every_sampler_name_is_accepted_by_every_objective(name):
    obj, oracle = corner(name)
    data, y, noise = gaussian_problem(8)
    shared = {"euler", "heun", "dopri5", "euler_maruyama", "ddim", "dpmpp_2m"}
    assert shared <= set(obj.samplers) and (("ddpm" in obj.samplers) == (name == "diffusion"))
    for sampler in sorted(shared - {"dopri5"}):
        x = obj.sample(oracle(data), noise, y, sampler=sampler, num_steps=4, generator=torch.Generator().manual_seed(0))
        assert x.shape == noise.shape and torch.isfinite(x).all()
    assert math.isfinite(obj.t_end)
