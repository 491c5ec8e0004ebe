"""The math defects issue #10 lists, each pinned by a test that failed on main (579fa4d)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from oracles import NUM_CLASSES, ContinuousOracle, gaussian_problem, single_thread

from gen_objectives.objectives import FlowObjective, ScoreObjective
from gen_objectives.schedules import space_timesteps

pytestmark = pytest.mark.usefixtures("single_thread")
assert single_thread  # imported so pytest finds the fixture in this module


@pytest.mark.parametrize("cls", [ScoreObjective, FlowObjective])
@pytest.mark.parametrize("key", ["t_min", "t_end"])
def test_vp_refuses_zero_times_naming_the_key(cls, key):
    """d_sigma (and the score) are infinite at t = 0 on vp: t_min = 0 gave inf losses, t_end = 0 inf samples."""
    with pytest.raises(ValueError, match=rf"{key}=0.0 .*path=vp"):
        cls(num_classes=NUM_CLASSES, **{key: 0.0})


@pytest.mark.parametrize("cls,predict", [(ScoreObjective, "eps"), (FlowObjective, "velocity")])
def test_likelihood_runs_under_inference_mode(cls, predict):
    """Lightning validates/tests/predicts under torch.inference_mode; the divergence needs autograd there too."""
    data, y, _ = gaussian_problem(8)
    obj = cls(num_classes=NUM_CLASSES, likelihood_solver="heun", likelihood_num_steps=8)
    net = ContinuousOracle(data, obj.path, predict)
    x0 = data.sample(y, torch.Generator().manual_seed(0))
    expected = obj.log_likelihood(net, x0, y, exact_divergence=True)
    with torch.inference_mode():
        got = obj.log_likelihood(net, x0.clone(), y.clone(), exact_divergence=True)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)


def iddpm_rule(T: int, count: int) -> list[int]:
    """IDDPM/DiT's respacing of one section: a fractional index accumulated step by step, each rounded half-even."""
    stride = 1.0 if count <= 1 else (T - 1) / (count - 1)
    positions = np.cumsum([0.0] + [stride] * (count - 1))  # sequential float64 additions, as IDDPM's loop
    return sorted({int(round(p)) for p in positions})


def test_respacing_accumulates_the_fractional_index_as_iddpm_for_every_count():
    differ = [n for n in range(1, 1001) if space_timesteps(1000, str(n)) != iddpm_rule(1000, n)]
    assert differ == [], f"{len(differ)} of the counts 1..1000 pick other steps than IDDPM, e.g. {differ[:5]}"


def test_score_likelihood_weighting_importance_sampling_is_unbiased_and_tames_the_weights():
    """Song et al.: t with density proportional to beta / sigma^2 (uniform in log-SNR), loss times p / q."""
    data, y, noise = gaussian_problem(20000)
    x0 = data.sample(y, torch.Generator().manual_seed(1))
    uniform = ScoreObjective(num_classes=NUM_CLASSES, weighting="likelihood")
    weighted = ScoreObjective(num_classes=NUM_CLASSES, weighting="likelihood", importance_sampling=True)
    net = ContinuousOracle(data, uniform.path, "eps")
    # the expected loss under t ~ U[t_min, 1]: quadrature of w(t) * E|eps_hat - eps|^2 on a log grid (float64)
    t = torch.logspace(math.log10(uniform.t_min), 0.0, 200001, dtype=torch.float64)
    a, s = uniform.path.alpha(t), uniform.path.sigma(t)
    integrand = uniform.path.beta(t) / s**2 * data.min_eps_mse(a, s)
    expected = float(torch.trapezoid(integrand, t)) / (1.0 - uniform.t_min)
    stats = {}
    for name, obj in (("uniform", uniform), ("importance", weighted)):
        g = torch.Generator().manual_seed(2)
        t_draw = obj.sample_t(len(y), "cpu", generator=g).double()
        loss = obj.loss(net, x0, y, t=t_draw, noise=noise)
        stats[name] = (loss.mean().item(), loss.std().item() / math.sqrt(len(y)))
    mean, se = stats["importance"]
    assert abs(mean - expected) < 4 * se, (stats, expected)
    assert se < stats["uniform"][1] / 5  # the heavy tail (E[w^2] ~ 1e5) is gone
