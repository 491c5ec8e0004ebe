"""eps <-> x0 <-> score <-> velocity on every Gaussian path, in float64."""

from __future__ import annotations

import pytest
import torch

from gen_objectives import conversions as cv
from gen_objectives.paths import PATHS, make_path

B = 64


def setup(name: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    path = make_path(name)
    t = 0.01 + 0.98 * torch.rand(B, generator=g, dtype=torch.float64)
    x0 = torch.randn(B, 3, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(B, 3, 2, 2, generator=g, dtype=torch.float64)
    c = path.coefs(t, x0.ndim)
    return path, t, x0, eps, c, c.alpha * x0 + c.sigma * eps


@pytest.mark.parametrize("name", list(PATHS))
def test_round_trips(name):
    path, t, x0, eps, c, x_t = setup(name)
    assert torch.allclose(cv.x0_from_eps(x_t, eps, c), x0, atol=1e-10)
    assert torch.allclose(cv.eps_from_x0(x_t, x0, c), eps, atol=1e-10)
    assert torch.allclose(cv.eps_from_score(cv.score_from_eps(eps, c), c), eps, atol=1e-12)
    v = cv.velocity_from_x0_eps(x0, eps, c)
    assert torch.allclose(cv.velocity_from_eps(x_t, eps, c), v, atol=1e-9)
    assert torch.allclose(cv.velocity_from_x0(x_t, x0, c), v, atol=1e-9)
    assert torch.allclose(cv.eps_from_velocity(x_t, v, c), eps, atol=1e-10)
    assert torch.allclose(cv.x0_from_velocity(x_t, v, c), x0, atol=1e-10)
    score = cv.score_from_eps(eps, c)
    assert torch.allclose(cv.score_from_velocity(x_t, v, c), score, atol=1e-8)
    # velocity_from_score is the PF-ODE drift; with the *conditional* score it returns the conditional v.
    assert torch.allclose(cv.velocity_from_score(x_t, score, c), v, atol=1e-9)


@pytest.mark.parametrize("name", list(PATHS))
def test_velocity_is_the_time_derivative_of_x_t(name):
    """v = d/dt (alpha x0 + sigma eps), checked with autograd through the path."""
    path, t, x0, eps, c, x_t = setup(name, seed=1)
    tt = t.clone().requires_grad_(True)
    cc = path.coefs(tt, x0.ndim)
    (dxdt,) = torch.autograd.grad((cc.alpha * x0 + cc.sigma * eps).sum(), tt)
    v = cv.velocity_from_x0_eps(x0, eps, c)
    assert torch.allclose(v.sum(dim=(1, 2, 3)), dxdt, atol=1e-10)


@pytest.mark.parametrize("name", list(PATHS))
def test_score_is_the_gradient_of_the_marginal_log_density(name):
    """For x0 ~ N(m, s^2 I): -E[eps | x_t] / sigma equals grad log N(x_t; alpha m, alpha^2 s^2 + sigma^2)."""
    path, t, _, _, c, x_t = setup(name, seed=2)
    m, s = 0.7, 0.4
    var = c.alpha**2 * s**2 + c.sigma**2
    x = x_t.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((-0.5 * (x - c.alpha * m) ** 2 / var).sum(), x)
    eps_posterior = c.sigma * (x_t - c.alpha * m) / var
    assert torch.allclose(cv.score_from_eps(eps_posterior, c), grad, atol=1e-10)


def test_endpoints_stay_finite():
    """eps from v needs no division by alpha or sigma: fine at t = 1 on linear/gvp and t = 0 on linear."""
    for name, t_val in (("linear", 1.0), ("gvp", 1.0), ("linear", 0.0)):
        path = make_path(name)
        c = path.coefs(torch.full((4,), t_val, dtype=torch.float64), 4)
        x_t, v = torch.randn(4, 2, 1, 1, dtype=torch.float64), torch.randn(4, 2, 1, 1, dtype=torch.float64)
        assert torch.isfinite(cv.eps_from_velocity(x_t, v, c)).all()
        assert torch.isfinite(cv.x0_from_velocity(x_t, v, c)).all()
