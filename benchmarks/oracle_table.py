"""Oracle accuracy table: objective x sampler x steps -> sample mean/std error and log-likelihood error.

Every objective is fed its analytic optimum for x0 | y ~ N(m_y, s^2 I) (tests/oracles.py), so what remains is
the sampler's own error (and Monte Carlo noise for stochastic samplers). Float64, CPU, a few minutes.

    python benchmarks/oracle_table.py [--n 20000] [--n-ll 500] [--out results/oracle_table.json]

Columns: mean_err = max_{y,dim} |sample mean - m_y|; std_err = max_{y,dim} |sample std - s|; map_err (new
samplers, deterministic) = max |x - the exact PF-ODE map of the same noise|;
ll_err = mean |log_likelihood - log N(x0; m_y, s^2)| / D in nats per dim (ODE samplers: the same solver and step
count integrate the likelihood, exact divergence; diffusion: the ELBO, where the signed mean gap is reported).
The initial noise is standardised per class, so deterministic samplers show only their bias.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import RESULTS_DIR, machine_info, write_json  # noqa: E402
from oracles import (  # noqa: E402
    NUM_CLASSES,
    ContinuousOracle,
    DiffusionOracle,
    class_stats_errors,
    exact_ode_map,
    gaussian_problem,
)

from gen_objectives.objectives import DiffusionObjective, FlowObjective, ScoreObjective  # noqa: E402

ODE = ("euler", "heun", "dopri5")


def continuous_rows(label: str, obj, predict: str, settings, n: int, n_ll: int) -> list[dict]:
    data, y, noise = gaussian_problem(n)
    _, y_ll, _ = gaussian_problem(n_ll, seed=1)
    x0_ll = data.sample(y_ll, torch.Generator().manual_seed(2))
    rows = []
    for sampler, steps, extra in settings:
        for key, value in extra.items():
            setattr(obj, key, value)
        net = ContinuousOracle(data, obj.path, predict)
        start = time.perf_counter()
        x = obj.sample(net, noise, y, sampler=sampler, num_steps=steps, generator=torch.Generator().manual_seed(3))
        mean_err, std_err = class_stats_errors(x, y, data)
        row = {"objective": label, "sampler": sampler + ("+corrector" if extra else ""), "steps": steps,
               "nfe": net.calls, "mean_err": mean_err, "std_err": std_err, "ll_err_nats_per_dim": None,
               "seconds": time.perf_counter() - start}
        if sampler in ODE:
            obj.likelihood_solver, obj.likelihood_num_steps = sampler, steps or 0
            ll = obj.log_likelihood(ContinuousOracle(data, obj.path, predict), x0_ll, y_ll, exact_divergence=True)
            row["ll_err_nats_per_dim"] = ((ll - data.log_prob(x0_ll, y_ll)).abs().mean() / x0_ll[0].numel()).item()
        for key in extra:
            setattr(obj, key, 0)
        rows.append(row)
    return rows


def diffusion_rows(n: int, n_ll: int) -> list[dict]:
    data, y, noise = gaussian_problem(n)
    rows = []
    for learn_sigma, sampler, steps in [(True, "ddpm", 50), (True, "ddpm", 250), (True, "ddpm", 1000),
                                        (False, "ddpm", 250), (True, "ddim", 50), (True, "ddim", 250)]:
        obj = DiffusionObjective(num_classes=NUM_CLASSES, learn_sigma=learn_sigma)
        # The oracle's v is exact for the full chain, as a perfectly trained network's would be.
        net = DiffusionOracle(data, obj.schedule, learn_sigma)
        start = time.perf_counter()
        x = obj.sample(net, noise, y, sampler=sampler, num_steps=steps, generator=torch.Generator().manual_seed(3))
        mean_err, std_err = class_stats_errors(x, y, data)
        rows.append({"objective": "diffusion" + ("" if learn_sigma else " (fixed large var)"), "sampler": sampler,
                     "steps": steps, "nfe": steps, "mean_err": mean_err, "std_err": std_err,
                     "ll_err_nats_per_dim": None, "seconds": time.perf_counter() - start})
    obj = DiffusionObjective(num_classes=NUM_CLASSES)
    n_elbo = 10 * n_ll  # one draw of x_i per term: the ELBO is noisy per sample (~1.4 nats here)
    _, y_ll, _ = gaussian_problem(n_elbo, seed=1)
    x0 = data.sample(y_ll, torch.Generator().manual_seed(2))
    start = time.perf_counter()
    ll = obj.log_likelihood(DiffusionOracle(data, obj.schedule, True), x0, y_ll,
                            generator=torch.Generator().manual_seed(4))
    gap = (ll - data.log_prob(x0, y_ll)) / x0[0].numel()
    rows.append({"objective": "diffusion", "sampler": f"elbo (all 1000 terms, signed mean gap, n={n_elbo})",
                 "steps": 1000, "nfe": 1000,
                 "mean_err": None, "std_err": None, "ll_err_nats_per_dim": gap.mean().item(),
                 "ll_gap_sem_nats_per_dim": (gap.std() / len(gap) ** 0.5).item(),
                 "seconds": time.perf_counter() - start})
    return rows


def new_sampler_rows(n: int, n_ll: int) -> list[dict]:
    """Issue #10's samplers: diffusion on its own VP path (PF-ODE, reverse SDE, ODE likelihood) and DDIM /
    DPM-Solver++(2M) for all three. map_err = max |x - exact PF-ODE map of the same noise| (deterministic only)."""
    data, y, noise = gaussian_problem(n)
    _, y_ll, _ = gaussian_problem(n_ll, seed=1)
    x0_ll = data.sample(y_ll, torch.Generator().manual_seed(2))

    def diffusion(**kw):
        obj = DiffusionObjective(num_classes=NUM_CLASSES, learn_sigma=False, **kw)
        return obj, ContinuousOracle(data, obj.path, "eps", net_time="index")

    def score(**kw):
        obj = ScoreObjective(num_classes=NUM_CLASSES, **kw)
        return obj, ContinuousOracle(data, obj.path, "eps")

    def flow(path, **kw):
        obj = FlowObjective(num_classes=NUM_CLASSES, path=path, **kw)
        return obj, ContinuousOracle(data, obj.path, "velocity")

    runs = [("diffusion (VP path)", diffusion, {}, s, steps) for s, steps in
            [("euler", 250), ("heun", 50), ("dopri5", None), ("euler_maruyama", 500)]]
    runs += [("diffusion (discrete chain, no grid)", diffusion, {}, "ddim", steps) for steps in (10, 20, 50)]
    for grid in ("log_snr", "uniform"):
        for sampler in ("ddim", "dpmpp_2m"):
            for steps in (10, 20, 50):
                if sampler == "dpmpp_2m":
                    runs.append(("diffusion (VP path)", diffusion, {"time_grid": grid}, sampler, steps))
                runs.append(("score", score, {"time_grid": grid}, sampler, steps))
                runs.append(("flow/vp", lambda **kw: flow("vp", **kw), {"time_grid": grid}, sampler, steps))
                runs.append(("flow/linear (t_max 0.999)", lambda **kw: flow("linear", t_max=0.999, t_end=1e-3, **kw),
                             {"time_grid": grid}, sampler, steps))
    runs.append(("score", score, {"denoise_final": True}, "dopri5", None))
    rows = []
    for label, make, kw, sampler, steps in runs:
        obj, net = make(**kw)
        start = time.perf_counter()
        x = obj.sample(net, noise, y, sampler=sampler, num_steps=steps, generator=torch.Generator().manual_seed(3))
        mean_err, std_err = class_stats_errors(x, y, data)
        row = {"objective": label, "sampler": sampler + "".join(f" {k}={v}" for k, v in kw.items()), "steps": steps,
               "nfe": net.calls, "mean_err": mean_err, "std_err": std_err, "map_err": None,
               "ll_err_nats_per_dim": None, "seconds": time.perf_counter() - start}
        if sampler != "euler_maruyama" and not kw.get("denoise_final"):
            ref = exact_ode_map(data, obj.path, noise, y, obj.t_end, t_start=obj.t_max)
            row["map_err"] = (x - ref).abs().max().item()
        rows.append(row)
    obj, net = diffusion(likelihood="ode")
    start = time.perf_counter()
    ll = obj.log_likelihood(net, x0_ll, y_ll)  # dopri5, exact divergence
    rows.append({"objective": "diffusion (VP path)", "sampler": "likelihood=ode (dopri5, exact div.)", "steps": None,
                 "nfe": net.calls, "mean_err": None, "std_err": None, "map_err": None,
                 "ll_err_nats_per_dim": ((ll - data.log_prob(x0_ll, y_ll)).abs().mean() / x0_ll[0].numel()).item(),
                 "seconds": time.perf_counter() - start})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="samples per sampler run")
    parser.add_argument("--n-ll", type=int, default=500, help="data points for the likelihood")
    parser.add_argument("--out", default=str(RESULTS_DIR / "oracle_table.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows = diffusion_rows(args.n, args.n_ll)
    score = ScoreObjective(num_classes=NUM_CLASSES)
    score_settings = [("euler_maruyama", 100, {}), ("euler_maruyama", 1000, {}),
                      ("euler_maruyama", 200, {"corrector_steps": 1}),
                      ("euler", 50, {}), ("euler", 250, {}), ("heun", 20, {}), ("heun", 50, {}), ("dopri5", None, {})]
    rows += continuous_rows("score", score, "eps", score_settings, args.n, args.n_ll)
    flow_settings = [("euler", 50, {}), ("heun", 20, {}), ("heun", 50, {}), ("dopri5", None, {}),
                     ("euler_maruyama", 250, {})]
    for path in ("vp", "linear", "gvp"):
        flow = FlowObjective(path=path, num_classes=NUM_CLASSES)
        rows += continuous_rows(f"flow/{path}", flow, "velocity", flow_settings, args.n, args.n_ll)
    rows += new_sampler_rows(args.n, args.n_ll)

    def fmt(v, spec=".4f"):
        return "-" if v is None else format(v, spec)

    print("| objective | sampler | steps | NFE | mean err | std err | map err | ll err (nats/dim) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['objective']} | {r['sampler']} | {r['steps'] or 'adaptive'} | {r['nfe']} | "
              f"{fmt(r['mean_err'])} | {fmt(r['std_err'])} | {fmt(r.get('map_err'), '.2e')} | "
              f"{fmt(r['ll_err_nats_per_dim'], '.2e')} |")
    payload = {"machine": machine_info(), "problem": {"dims": [2, 1, 1], "s": 0.5, "classes": NUM_CLASSES,
                                                      "n": args.n, "n_ll": args.n_ll}, "rows": rows}
    print("wrote", write_json(args.out, payload))


if __name__ == "__main__":
    main()
