"""benchmarks/table1.py and ablation.py: KID against independent implementations, the bootstrap, the ablation's
cells against the real objective configs and its analysis on known effects, and `table1.py --tiny` end to end."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from benchmarks.compare import ablation_report
from benchmarks.compare.design import CORNERS, FACTORS, ablation_cells
from benchmarks.compare.metrics import (
    Reference,
    SamplerSpec,
    frechet_distance,
    image_metrics,
    polynomial_kernel,
)
from benchmarks.compare.report import results_sections
from benchmarks.compare.runs import RunSpec, train_all
from benchmarks.compare.stats import fit_main_effects
from evaluation.kid import kid as kid_torch


def kid(a, b) -> float:
    """The evaluation engine's KID (the one the harness's bootstrap must agree with) on numpy features."""
    return kid_torch(torch.as_tensor(a), torch.as_tensor(b))[0]


def test_kid_matches_torch_fidelity_and_the_unbiased_u_statistic():
    from torch_fidelity.metric_kid import kernel_poly, mmd2

    rng = np.random.default_rng(0)
    a, b = rng.normal(0.0, 1.0, (60, 8)), rng.normal(0.3, 1.2, (60, 8))
    ref = mmd2(kernel_poly(a, a, kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1),
               kernel_poly(a, b, kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1),
               kernel_poly(b, b, kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1))
    assert kid(a, b) == pytest.approx(ref, rel=1e-10)
    # unequal sizes: the textbook U-statistic, written out pair by pair
    x, y = a[:7], b[:11]

    def k(u, v):
        return (u @ v / u.size + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(11) for j in range(11) if i != j) / (11 * 10)
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(11)) / (7 * 11)
    assert kid(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    assert polynomial_kernel(x, y).shape == (7, 11)


def test_image_metrics_agree_with_direct_formulas_and_bootstrap_spread_shrinks_with_samples():
    rng = np.random.default_rng(1)
    ref = Reference.from_features(rng.normal(0.0, 3.0, (500, 6)))
    small, large = rng.normal(0.6, 3.0, (100, 6)), rng.normal(0.6, 3.0, (1600, 6))
    correct = rng.random(1600) < 0.7
    m = image_metrics(large, correct, ref, bootstrap=40, seed=0)
    assert m["fid"] == pytest.approx(frechet_distance(large.mean(0), np.cov(large, rowvar=False), ref.mu, ref.sigma))
    assert m["kid"] == pytest.approx(kid(ref.kid_scale * large, ref.kid_scale * ref.features), rel=1e-9)
    assert ((ref.kid_scale * ref.features) ** 2).mean() == pytest.approx(1.0)
    assert m["class_accuracy"] == pytest.approx(correct.mean())
    s = image_metrics(small, correct[:100], ref, bootstrap=40, seed=0)
    for key in ("fid_boot_sd", "kid_boot_sd", "class_accuracy_boot_sd"):
        assert 0.0 < m[key] < s[key]  # sampling noise falls with the number of samples
    assert m["class_accuracy_boot_sd"] == pytest.approx(math.sqrt(0.7 * 0.3 / 1600), rel=0.35)


def test_sampler_spec_budget_and_keys():
    heun = SamplerSpec("heun", 50, "uniform")
    assert heun.num_steps() == 25 and heun.key == "heun@50/time_grid=uniform"
    em = SamplerSpec("euler_maruyama", 250, "uniform", "sbdm")
    assert em.num_steps() == 250 and em.keys() == {"time_grid": "uniform", "sde_diffusion": "sbdm"}
    own = SamplerSpec(None)
    assert own.key == "own_default" and own.num_steps() is None and own.keys() == {}


def test_every_ablation_cell_is_accepted_by_the_objectives():
    from benchmarks.ablation import check_cells

    valid, refused = check_cells(ablation_cells(), ())
    assert {c["name"] for c in valid} >= set(CORNERS) and len(valid) >= 17
    for cell in refused:  # only where discrete times reach alpha(1) = 0 of the linear path with a weight infinite there
        levels = cell["levels"]
        assert (levels["path"], levels["time_sampling"]) == ("linear", "discrete") and levels["weighting"] != "sigma2"
        assert "weighting" in cell["error"]
    rows = [{**c["levels"], "seed": s, "y": float(k)} for k, c in enumerate(valid) for s in range(2)]
    fit_main_effects(rows, FACTORS, "y")  # every main effect still estimable


def test_ablation_analysis_recovers_known_effects_and_splits_the_gaps():
    truth = {("prediction", "velocity"): -6.0, ("weighting", "velocity"): -0.5, ("time_sampling", "discrete"): 0.3,
             ("learn_sigma", True): 4.0, ("path", "linear"): 2.0, ("prediction", "x0"): 1.0}
    rng = np.random.default_rng(2)
    cells = ablation_cells()
    runs, evals = [], []
    for seed in range(3):
        for c in cells:
            run_id = f"{c['name']}_seed{seed}"
            fid = 30.0 + seed + sum(v for (f, lvl), v in truth.items() if c["levels"][f] == lvl) + rng.normal(0, 0.1)
            runs.append({"run_id": run_id, "name": c["name"], "seed": seed, "cpu_seconds": 1.0,
                         "cpu_seconds_per_step": 0.1})
            evals.append({"run_id": run_id, "fid": fid, "kid": fid / 1e3, "class_accuracy": 0.5, "cpu_seconds": 1.0})
    payload = {"variant": "quick", "factors": FACTORS, "cells": cells, "refused_cells": [], "training": runs,
               "evaluations": evals, "model": "DiT test", "data": "digits 8x8",
               "settings": {"seeds": [0, 1, 2], "steps": 10, "num_samples": 10, "sampler": ["dpmpp_2m", 20, "log_snr"],
                            "responses": ["fid", "kid", "class_accuracy"]},
               "command": "test", "total_seconds": 1.0,
               "machine": {"cpu_model": "cpu", "cpu_count": 2, "torch": torch.__version__, "git_commit": "0" * 40,
                           "date_utc": "now"}}
    a = ablation_report.analyse(payload)["responses"]["fid"]
    effects = {(e["factor"], e["level"]): e for e in a["effects"]}
    for key, value in truth.items():
        assert effects[key]["estimate"] == pytest.approx(value, abs=0.25) and effects[key]["excludes_zero"]
    assert not effects[("weighting", "min_snr")]["excludes_zero"]  # a true zero stays undistinguished
    gaps = {(g["a"], g["b"]): g for g in a["gaps"]}
    flow_score = gaps[("flow", "score")]
    assert {p["factor"] for p in flow_score["parts"]} == {"prediction", "weighting"}
    assert flow_score["observed"]["estimate"] == pytest.approx(-6.5, abs=0.3)
    assert flow_score["model"]["estimate"] == pytest.approx(-6.5, abs=0.3)
    assert {p["factor"] for p in gaps[("diffusion", "score")]["parts"]} == {"time_sampling", "learn_sigma"}
    assert all(abs(r) < 0.3 for r in a["corner_residuals"].values())
    payload["analysis"] = ablation_report.analyse(payload)
    text = "\n".join(ablation_report.conclusions(payload))
    assert "Effects distinguishable from zero: prediction (velocity vs eps" in text and "flow − score" in text
    assert "come from: learn_sigma, prediction, time_sampling, weighting;" in text and "path linear vs vp" in text


def test_table1_tiny_end_to_end(tmp_path):
    from benchmarks.sampling import checkpoints_from_table1
    from benchmarks.table1 import main

    out_dir, workdir = tmp_path / "results", tmp_path / "work"
    data = main(["--tiny", "--out-dir", str(out_dir), "--workdir", str(workdir)])
    s = data["settings"]
    saved = json.loads((out_dir / "table1_tiny.json").read_text())
    assert saved["analysis"]["tables"].keys() == data["analysis"]["tables"].keys()
    assert [r["run_id"] for r in data["training"]] == [f"{o}_seed{k}" for k in s["seeds"] for o in s["objectives"]]
    for r in data["training"]:  # checkpoints kept at every budget, nothing else
        assert sorted(int(b) for b in r["checkpoints"]) == sorted(s["budgets"])
        assert len(list((workdir / "runs" / r["run_id"] / "checkpoints").glob("*.ckpt"))) == len(s["budgets"])
    assert len(data["curves"]["points"]) == len(data["training"]) * len(s["budgets"])
    assert data["headline_budget"]["budget"] in s["budgets"]
    headline = str(data["headline_budget"]["budget"])
    assert checkpoints_from_table1(out_dir / "table1_tiny.json", seed=0) == [  # what make bench samples
        r["checkpoints"][headline] for r in data["training"] if r["seed"] == 0]
    own = {"diffusion": 250, "score": 1000, "flow": 100}  # each default as it ships (heun: 2 NFE per step)
    for e in data["evaluations"]:
        name = e["run_id"].rsplit("_seed", 1)[0]
        if e["kind"] == "sample":  # matched samplers spend exactly their NFE budget
            assert e["nfe"] == (own[name] if e["key"] == "own_default" else e["spec"]["nfe"])
            assert math.isfinite(e["fid"]) and math.isfinite(e["kid"]) and e["fid_boot_sd"] >= 0
        else:  # a discrete bits/dim bound is never negative; dopri5 converged with its NFE recorded
            assert e["dopri5"]["bpd"] > 0 and e["dopri5"]["nfe"] > 0
            assert bool(e["fixed"]) == e["run_id"].endswith("_seed0")
            assert ("elbo_discrete_bpd" in e) == (name == "diffusion")
    tables = data["analysis"]["tables"]
    assert len(tables) == (len(s["matched"]) + 1) * 3 + 1
    for t in tables.values():
        assert len(t["pairs"]) == 3 and t["ranking"].count(" ") >= 4
    md = (out_dir / "table1_tiny.md").read_text()
    assert "TINY variant" in md and "Headline budget" in md and "| flow |" in md and "Command:" in md
    for f in data["figures"]:
        assert (out_dir / f.split("/")[-1]).is_file()
    # RESULTS.md shows every smaller variant, labelled by its JSON, when no full report exists; else the full one
    shutil.copy(out_dir / "table1_tiny.md", out_dir / "table1_quick.md")
    (out_dir / "table1_quick.json").write_text(json.dumps({**saved, "variant": "quick"}))
    section = "\n".join(results_sections(out_dir))
    assert "QUICK variant" in section and "TINY variant (fewer" in section and "Headline budget" in section
    assert section.count("## Table 1 on digits") == 2 and "(data: `results/table1_quick.json`)" in section
    shutil.copy(out_dir / "table1_tiny.md", out_dir / "table1.md")
    (out_dir / "table1.json").write_text(json.dumps({**saved, "variant": "full"}))
    section = "\n".join(results_sections(out_dir))
    assert section.count("## Table 1 on digits") == 1 and "variant (fewer" not in section.split("\n")[0]
    # resuming reuses every finished run without training again
    logs = []
    specs = [RunSpec(o, o, seed) for seed in s["seeds"] for o in s["objectives"]]
    again = train_all(specs, s["budgets"], workdir, jobs=1, base_overrides=tuple(s["train_overrides"]),
                      threads=s["threads"], resume=True, log=logs.append)
    assert [r["cpu_seconds"] for r in again] == [r["cpu_seconds"] for r in data["training"]]
    assert sum("reusing" in line for line in logs) == len(specs)


def test_objective_rebuilt_from_a_checkpoint_config_builds_only_project_classes(tmp_path):
    """The harness rebuilds a checkpoint's objective with other sampler keys: a foreign _target_ in the stored config
    is refused before anything runs (issue #14 item 6 applies to every config read from a file)."""
    from types import SimpleNamespace

    from benchmarks.compare.metrics import objective_with

    src, dst = tmp_path / "secret", tmp_path / "copy"
    src.write_text("x")
    crafted = SimpleNamespace(hparams={"cfg": {"objective": {"_target_": "shutil.copyfile", "src": str(src),
                                                             "dst": str(dst)}}}, objective=None)
    with pytest.raises(ValueError):
        objective_with(crafted, time_grid="log_snr")
    assert not dst.exists()
    ok = SimpleNamespace(hparams={"cfg": {"objective": {"_target_": "gen_objectives.objectives.flow.FlowObjective"}}})
    from gen_objectives.solvers import LogSNRGrid

    assert isinstance(objective_with(ok, time_grid="log_snr").time_grid, LogSNRGrid)
