"""The shared solvers and the PF-ODE likelihood on linear ODEs with closed-form answers."""

from __future__ import annotations

import math

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
