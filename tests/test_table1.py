"""benchmarks/table1.py: the diffusion PF-ODE against a Gaussian oracle, and `--quick` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from oracles import (
    NUM_CLASSES,
    DiffusionOracle,
    class_stats_errors,
    exact_ode_map,
    gaussian_problem,
    pushforward_log_prob,
    single_thread,  # noqa: F401  (a fixture)
)

from benchmarks.table1 import DiscreteVPPath, diffusion_pf_ode_drift, heun_sample_fn, pf_ode_t_end
from benchmarks.table1 import main as table1_main
from gen_objectives.likelihood import ode_log_likelihood
from gen_objectives.objectives.diffusion import DiffusionObjective
from gen_objectives.solvers import HeunSolver

T = 1000


def knot_oracle(data, schedule):
    """The exact DDPM eps-net, queried only at integer step indices (it asserts so): a net trained on
    indices 0..T-1 sees nothing else when the ODE steps land on the schedule's knots."""
    oracle = DiffusionOracle(data, schedule, learn_sigma=False)

    def net(x, t_net, y):
        assert (t_net - t_net.round()).abs().max() < 1e-6, f"t_net {t_net[:3]} is off the step grid"
        return oracle(x, t_net.round(), y)

    return net


def test_discrete_vp_path_matches_the_schedule_and_its_derivatives():
    obj = DiffusionObjective(num_classes=2, learn_sigma=False)
    ac = obj.schedule.alphas_cumprod
    path = DiscreteVPPath(ac)
    i = torch.tensor([0, 1, 499, 998, 999])
    t = ((i + 1) / T).double()
    assert torch.allclose(path.alpha(t) ** 2, ac[i], rtol=1e-12)
    assert torch.allclose(path.alpha(t) ** 2 + path.sigma(t) ** 2, torch.ones_like(t))
    assert torch.equal(path.t_net(t).round(), i.double())
    # derivatives of the interpolant, checked by central differences inside segments
    tm = torch.tensor([0.00031, 0.2504, 0.7771, 0.9993], dtype=torch.float64)
    h = 1e-8
    for fn, d in ((path.alpha, path.d_alpha), (path.sigma, path.d_sigma)):
        fd = (fn(tm + h) - fn(tm - h)) / (2 * h)
        assert torch.allclose(d(tm), fd, rtol=1e-5)
    # its beta(t) = -d log abar / dt is the continuous VP beta(t) that the linear betas discretise (~1%)
    from gen_objectives.paths import VPPath

    inner = tm[1:]  # away from the spline's free end at t = 0
    beta = -2.0 * path.d_alpha(inner) / path.alpha(inner)
    assert torch.allclose(beta, VPPath(0.1, 20.0).beta(inner), rtol=0.02)


def test_diffusion_pf_ode_samples_and_likelihood_match_the_gaussian_oracle(single_thread):  # noqa: F811
    data, y, noise = gaussian_problem(400)
    obj = DiffusionObjective(num_classes=NUM_CLASSES, learn_sigma=False)
    path = DiscreteVPPath(obj.schedule.alphas_cumprod)
    net = knot_oracle(data, obj.schedule)
    steps = 333  # 999 / 333 = 3 knots per step: every evaluation lands on a training index
    x = heun_sample_fn(obj, steps)(net, noise, y, None)
    assert pf_ode_t_end(obj) == pytest.approx(1.0 / T)
    expected = exact_ode_map(data, path, noise, y, 1.0 / T)
    assert (x - expected).abs().max() < 2e-4  # Heun converges at second order (111 steps: 4e-4)
    mean_err, std_err = class_stats_errors(x, y, data)
    assert mean_err < 0.02 and std_err < 0.02

    x0 = data.sample(y[:64], generator=torch.Generator().manual_seed(1))
    ll = ode_log_likelihood(diffusion_pf_ode_drift(net, y[:64], path), x0, HeunSolver(), t_start=1.0 / T,
                            t_end=1.0, num_steps=steps, exact=True)
    exact = pushforward_log_prob(data, path, x0, y[:64], 1.0 / T)
    D = x0[0].numel()
    assert ((ll - exact).abs() / D).max() < 1e-3  # nats per dimension
    # a wrong time map (half a step off) is caught by the knot check
    bad = DiscreteVPPath(obj.schedule.alphas_cumprod)
    bad.t_net = lambda t: T * t - 0.5
    with pytest.raises(AssertionError, match="off the step grid"):
        HeunSolver().integrate(diffusion_pf_ode_drift(net, y, bad), noise, 1.0, 1.0 / T, steps)


def test_table1_quick_writes_table_json_and_figures(tmp_path):
    out_dir, workdir = tmp_path / "results", tmp_path / "work"
    table1_main(["--quick", "--out-dir", str(out_dir), "--workdir", str(workdir)])
    data = json.loads((out_dir / "table1.json").read_text())
    md = (out_dir / "table1.md").read_text()
    s = data["settings"]
    assert list(data["objectives"]) == ["diffusion", "score", "flow"] and len(s["seeds"]) >= 2
    assert data["machine"]["cpu_model"] and data["total_seconds"] > 0
    for name, entry in data["objectives"].items():
        assert f"| {name} |" in md
        assert (out_dir / f"table1_samples_{name}.png").is_file()
        assert (out_dir / f"table1_loss_vs_t_{name}.png").is_file()
        assert [r["seed"] for r in entry["runs"]] == list(s["seeds"])
        for r in entry["runs"]:
            for block in ("default", "ode_heun", "ode_first_order"):
                m = r[block]
                assert math.isfinite(m["fid"]) and m["fid"] >= 0.0
                assert 0.0 <= m["class_accuracy"] <= 1.0 and m["wall_s_per_sample"] > 0
            # equal budgets: default samplers at default_nfe, both ODE samplers at ode_nfe
            assert r["default"]["nfe"] == s["default_nfe"]
            assert r["ode_heun"]["nfe"] == r["ode_first_order"]["nfe"] == s["ode_nfe"]
            assert math.isfinite(r["nll_bpd"]) and r["train_seconds"] > 0
            assert len(r["loss_vs_t"]["loss"]) == s["loss_t_points"]
            assert all(math.isfinite(v) and v > 0 for v in r["loss_vs_t"]["loss"])
        summary = entry["summary"]
        assert summary["default.fid"]["std"] >= 0 and len(summary["default.fid"]["values"]) == len(s["seeds"])
    assert math.isfinite(data["objectives"]["diffusion"]["runs"][0]["elbo_bpd"])
    assert "elbo_bpd" not in data["objectives"]["flow"]["runs"][0]
    assert data["objectives"]["diffusion"]["first_order_sampler"] == "ddim"

    # --report-only rebuilds the same table from the runs' eval.json files, without training or sampling
    (out_dir / "table1.md").unlink()
    again = table1_main(["--report-only", "--out-dir", str(out_dir), "--workdir", str(workdir)])
    assert (out_dir / "table1.md").read_text() == md
    assert again["objectives"]["flow"]["summary"] == data["objectives"]["flow"]["summary"]
