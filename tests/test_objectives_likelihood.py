"""The shared solvers and the PF-ODE likelihood on linear ODEs with closed-form answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from oracles import single_thread

from gen_objectives.likelihood import exact_divergence, hutchinson_divergence, ode_log_likelihood
from gen_objectives.solvers import EulerMaruyama, make_ode_solver, rademacher_like

pytestmark = pytest.mark.usefixtures("single_thread")
assert single_thread  # imported so pytest finds the fixture in this module

# A non-symmetric, non-diagonal drift matrix: divergence = trace(A) = -0.7, Hutchinson is only unbiased.
A = torch.tensor([[-0.5, 0.8], [-0.3, -0.2]], dtype=torch.float64)


def linear_drift(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dx/dt = A x on x [B, 2, 1, 1]."""
    return torch.einsum("ij,bjhw->bihw", A, x)


def exact_log_likelihood(x0: torch.Tensor) -> torch.Tensor:
    """x(1) = expm(A) x0, so log p0(x0) = log N(expm(A) x0; 0, I) + trace(A)."""
    x1 = torch.einsum("ij,bjhw->bihw", torch.linalg.matrix_exp(A), x0)
    return -0.5 * x1.flatten(1).pow(2).sum(1) - math.log(2 * math.pi) + torch.trace(A)


@pytest.mark.parametrize("solver,steps,tol", [("euler", 400, 5e-3), ("heun", 50, 1e-4), ("dopri5", None, 1e-6)])
def test_ode_solvers_on_a_linear_system(solver, steps, tol):
    x0 = torch.randn(16, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = make_ode_solver(solver, atol=1e-9, rtol=1e-9)
    backward = s.integrate(linear_drift, x0, 1.0, 0.2, steps)
    expected = torch.einsum("ij,bjhw->bihw", torch.linalg.matrix_exp(-0.8 * A), x0)
    assert (backward - expected).abs().max() < tol


def test_exact_likelihood_on_a_linear_flow():
    x0 = torch.randn(32, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ll = ode_log_likelihood(linear_drift, x0, make_ode_solver("dopri5", atol=1e-9, rtol=1e-9),
                            t_start=0.0, exact=True)
    assert torch.allclose(ll, exact_log_likelihood(x0), atol=1e-6)


def test_hutchinson_is_unbiased_with_rademacher_probes():
    """Per sample it is off by the off-diagonal terms z_i A_ij z_j; on average it equals the trace."""
    x = torch.randn(20000, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x.requires_grad_(True)
    f_x = linear_drift(torch.tensor(0.0), x)
    probe = rademacher_like(x, torch.Generator().manual_seed(3))
    assert set(probe.unique().tolist()) == {-1.0, 1.0}
    assert torch.allclose(exact_divergence(f_x, x), torch.full((20000,), -0.7, dtype=torch.float64))
    est = hutchinson_divergence(f_x, x, probe)
    assert est.std() > 0.4 and abs(est.mean().item() + 0.7) < 0.03  # std = |A12 + A21| = 0.5
    x0 = torch.randn(8, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).repeat(500, 1, 1, 1)
    ll = ode_log_likelihood(linear_drift, x0, make_ode_solver("heun"), t_start=0.0, num_steps=20,
                            generator=torch.Generator().manual_seed(5))
    gap = (ll - exact_log_likelihood(x0)).reshape(500, 8).mean(0)
    assert gap.abs().max() < 0.1


def test_euler_maruyama_on_ornstein_uhlenbeck():
    """Reverse-time OU dx = -x dt + sqrt(2) dw from t = 1 to 0 keeps N(0, 1) stationary; last step noise-free."""
    x1 = torch.randn(20000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    x = EulerMaruyama().integrate(lambda t, x: x, lambda t: math.sqrt(2.0) * torch.ones_like(t), x1, 1.0, 0.0,
                                  200, generator=torch.Generator().manual_seed(7))
    # The reverse drift of a stationary OU with score -x is f - g^2 score = -x + 2x = x.
    assert abs(x.mean().item()) < 0.03 and abs(x.std().item() - 1) < 0.03


# ---- converged likelihoods and the discrete bits/dim (issue #10 item 3) ------------------------------------------
LEVELS, WIDTH = 17, 0.125  # digits: 17 grey levels k/8 - 1 in [-1, 1], bins of width 2/16


def lattice_data(n: int, seed: int):
    """(x0 on the 17-level lattice [n,2,1,1], y) from the shared Gaussian problem, rounded to the grid."""
    from oracles import gaussian_problem

    data, y, _ = gaussian_problem(n, seed=seed)
    x = data.sample(y, torch.Generator().manual_seed(seed + 1)).clamp(-1.0, 1.0)
    return data, ((x + 1.0) / WIDTH).round() * WIDTH - 1.0, y


def test_dequantized_bits_per_dim_is_exact_for_a_density_constant_on_the_bins():
    """If p is P(bin)/width on each bin, -E log p(x + u) - D log width is exactly -log P(bin), for any u."""
    from gen_objectives.likelihood import dequantize, dequantized_bits_per_dim

    g = torch.Generator().manual_seed(0)
    mass = torch.rand(LEVELS, generator=g, dtype=torch.float64)
    mass = mass / mass.sum()
    k = torch.randint(0, LEVELS, (50, 3, 2, 2), generator=g)
    x0 = k * WIDTH - 1.0
    x_deq = dequantize(x0, WIDTH, g)
    assert ((x_deq - x0).abs() <= WIDTH / 2).all() and (x_deq - x0).std() > 0.03
    k_back = ((x_deq + 1.0) / WIDTH).round().long()  # the bin each dequantised point lies in
    log_p = (mass[k_back].log() - math.log(WIDTH)).flatten(1).sum(1)
    exact = -(mass[k].log2()).flatten(1).mean(1)
    torch.testing.assert_close(dequantized_bits_per_dim(log_p, x0, WIDTH), exact, rtol=1e-12, atol=1e-12)


def test_dequantized_ode_bits_per_dim_bounds_the_exact_lattice_probability():
    """A Gaussian model (the flow oracle, dopri5 with the exact divergence) on lattice data: the dequantised
    bits/dim match the model's exact density at the same points and sit just above -log2 P(bin) (Jensen)."""
    from functools import partial

    from oracles import ContinuousOracle, pushforward_log_prob
    from scipy.stats import norm

    from gen_objectives.likelihood import convergence_table, dequantize, dequantized_bits_per_dim
    from gen_objectives.objectives import FlowObjective

    data, x0, y = lattice_data(400, seed=3)
    obj = FlowObjective(num_classes=2, bin_width=WIDTH)
    net = ContinuousOracle(data, obj.path, "velocity")
    bpd = obj.discrete_bits_per_dim(net, x0, y, generator=torch.Generator().manual_seed(4))
    x_deq = dequantize(x0, WIDTH, torch.Generator().manual_seed(4))  # the same draws
    analytic = dequantized_bits_per_dim(pushforward_log_prob(data, obj.path, x_deq, y, obj.t_min), x0, WIDTH)
    assert (bpd - analytic).abs().max() < 1e-3
    # the model at t_min is Gaussian: x = a0 m + std0 (z - a1 m) / std1, z ~ N(0, I)
    one, t0 = torch.ones(1, dtype=torch.float64), torch.full((1,), obj.t_min, dtype=torch.float64)
    a1, s1, a0, s0 = obj.path.alpha(one), obj.path.sigma(one), obj.path.alpha(t0), obj.path.sigma(t0)
    std1, std0 = (a1**2 * data.s**2 + s1**2).sqrt(), (a0**2 * data.s**2 + s0**2).sqrt()
    mu, sd = (a0 * data.means[y] - std0 * a1 * data.means[y] / std1).numpy(), (std0 / std1).item()
    xs = x0.numpy()  # bins of equal width (dequantisation does not know open-ended edge bins)
    exact = -np.log2(norm.cdf(xs + WIDTH / 2, mu, sd) - norm.cdf(xs - WIDTH / 2, mu, sd)).reshape(len(y), -1).mean(1)
    jensen = WIDTH**2 / (24 * sd**2) / math.log(2)  # E_u of the curvature term, per dimension
    per_sample = bpd.numpy() - exact
    diff, sem = per_sample.mean(), per_sample.std() / math.sqrt(len(per_sample))
    assert -4 * sem < diff < jensen + 4 * sem and sem < 0.01, (diff, sem, jensen)
    # the convergence helper: dopri5 is the reference, Heun converges to it at second order
    rows = convergence_table(partial(obj.log_likelihood, net, x_deq[:64], y[:64], exact_divergence=True),
                             x_deq[:64], steps=(4, 16, 64))
    assert [r["num_steps"] for r in rows] == [None, 4, 16, 64] and rows[0]["solver"] == "dopri5"
    errs = [abs(r["diff_vs_reference"]) for r in rows[1:]]
    assert errs[0] > errs[1] > errs[2] and errs[1] / errs[2] > 8 and errs[2] < 3e-3


def test_dit_tanh_decoder_cdf_is_the_published_approximation():
    """decoder_cdf=dit_tanh: DiT/IDDPM's tanh CDF (within 3e-4 of the normal CDF); exact by default."""
    from scipy.stats import norm

    from gen_objectives.objectives import DiffusionObjective
    from gen_objectives.vlb import NORMAL_CDFS, discretized_gaussian_log_likelihood

    z = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    approx = NORMAL_CDFS["dit_tanh"]().cdf(z)
    err = (approx - torch.from_numpy(norm.cdf(z.numpy()))).abs().max().item()
    assert 1e-5 < err < 3e-4
    x = torch.linspace(-1, 1, 255, dtype=torch.float64)
    mean, log_scale = x + 0.003, torch.full_like(x, math.log(0.01))
    exact = discretized_gaussian_log_likelihood(x, mean, log_scale)
    tanh = discretized_gaussian_log_likelihood(x, mean, log_scale, cdf=NORMAL_CDFS["dit_tanh"]())
    assert 0 < (exact - tanh).abs().max() < 0.05
    assert DiffusionObjective().decoder_cdf == "exact" and DiffusionObjective(decoder_cdf="dit_tanh").decoder_cdf == "dit_tanh"
