"""`make table1`: the seed's Table 1 on digits -- diffusion vs score vs flow, same DiT, data, seeds and noise.

    python benchmarks/table1.py            # the full run: 5 seeds x 3 objectives x 8K steps (hours on 2 cores)
    python benchmarks/table1.py --quick    # the same code path, fewer seeds, steps and samples (< ~30 min)
    python benchmarks/table1.py --tiny     # seconds, for the tests

1. Train every (objective, seed) with train.py to the largest budget, keeping a checkpoint at every budget.
   Same seed => same initial weights, data order and training noise (the runs are paired).
2. Curves: every checkpoint is scored with one shared sampler; the headline budget is the first from which
   every curve is flat (benchmarks.compare.stats.headline_budget states the rule).
3. At the headline budget: each matched sampler (the same solver, time grid and NFE for all three) and each
   objective's own default, labelled as such; digits-FID, KID and class accuracy with bootstrap spreads; the
   converged NLL (dopri5, exact divergence) in dequantised discrete bits/dim with fixed-step solvers beside it.
4. Paired 95% t-intervals over seeds; a ranking only where an interval excludes zero.
Writes results/table1{,_quick}.{json,md} and figures; every number in them comes from the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO_ROOT, machine_info  # noqa: E402
from benchmarks.compare import cli, report, table1_report  # noqa: E402
from benchmarks.compare.metrics import SamplerSpec, evaluate_task, real_image_metrics  # noqa: E402
from benchmarks.compare.runs import RunSpec, parallel_map, train_all  # noqa: E402
from benchmarks.compare.stats import headline_budget  # noqa: E402

TINY_MODEL = ("model.hidden_size=32", "model.depth=1", "model.num_heads=2", "data.batch_size=16",
              "trainer.log_every_n_steps=1", "module.t_bucket_every_n_steps=1", "trainer.num_sanity_val_steps=0",
              "trainer.enable_model_summary=false", "objective.atol=1e-3", "objective.rtol=1e-3")


@dataclass(frozen=True)
class Settings:
    """Everything that defines a table1 run; stored in its JSON."""

    variant: str = "full"
    objectives: tuple = ("diffusion", "score", "flow")
    seeds: tuple = (0, 1, 2, 3, 4)
    budgets: tuple = (1000, 2000, 4000, 8000)     # training steps with a checkpoint; the curves' x axis
    train_overrides: tuple = ()                     # extra train.py overrides, the same for every run
    num_samples: int = 2000                         # samples per digits-FID / KID
    batch_size: int = 500
    bootstrap: int = 100                            # resamples for each metric's sampling spread
    curve_sampler: tuple = ("dpmpp_2m", 20, "log_snr")
    # (sampler, NFE, time grid[, reverse-SDE w(t)]): the same solver and keys for all three objectives
    matched: tuple = (("dpmpp_2m", 20, "log_snr"), ("ddim", 20, "uniform"), ("heun", 50, "uniform"),
                      ("euler_maruyama", 250, "uniform", "sbdm"))
    own_default: bool = True                        # also each objective's own default sampler as it ships
    flatten_tol: float = 0.10                       # headline budget rule (relative change per budget step)
    nll_images: int = 64                            # held-out images for the likelihoods
    nll_fixed_solver: str = "heun"
    nll_fixed_steps: tuple = (16, 64, 256)          # convergence table beside dopri5
    convergence_seeds: tuple = (0,)                 # runs that also get the fixed-step NLLs (costly)
    bin_width: float = 0.125                        # digits: 17 levels on [-1, 1]
    sample_seed: int = 0
    jobs: int = 2                                   # parallel processes (training and evaluation)
    threads: int = 1                                # torch threads per process


PRESETS = {
    "full": {},
    "quick": dict(variant="quick", seeds=(0, 1, 2), budgets=(200, 400, 800), num_samples=400, bootstrap=50,
                  nll_images=8, nll_fixed_steps=(16, 64)),
    "tiny": dict(variant="tiny", seeds=(0, 1), budgets=(2, 4), train_overrides=TINY_MODEL, num_samples=40,
                 batch_size=40, bootstrap=5, curve_sampler=("dpmpp_2m", 4, "log_snr"),
                 matched=(("dpmpp_2m", 4, "log_snr"), ("euler_maruyama", 4, "uniform", "sbdm")), nll_images=2,
                 nll_fixed_steps=(2,), jobs=1, threads=1),
}


def spec(entry) -> SamplerSpec:
    """(sampler, NFE, time grid) -> SamplerSpec; None -> the objective's own default."""
    return SamplerSpec(None) if entry is None else SamplerSpec(*entry)


def compose_data(s: Settings):
    """The digits datamodule train.py builds for these overrides (the same split for every run)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=["experiment=digits", *s.train_overrides])
    return cfg, instantiate(cfg.data)


def sample_task(run: dict, budget: int, sp: SamplerSpec, s: Settings, keep: int = 0) -> dict:
    return {"kind": "sample", "ckpt": run["checkpoints"][str(budget)], "run_id": run["run_id"], "budget": budget,
            "spec": asdict(sp), "num_samples": s.num_samples, "batch_size": s.batch_size, "seed": s.sample_seed,
            "bootstrap": s.bootstrap, "keep": keep}


def likelihood_task(run: dict, budget: int, s: Settings) -> dict:
    fixed = s.nll_fixed_steps if run["seed"] in s.convergence_seeds else ()
    return {"kind": "likelihood", "ckpt": run["checkpoints"][str(budget)], "run_id": run["run_id"],
            "budget": budget, "nll_images": s.nll_images, "bin_width": s.bin_width, "fixed_steps": list(fixed),
            "fixed_solver": s.nll_fixed_solver, "seed": s.sample_seed}


def run_table1(s: Settings, workdir: Path, out_dir: Path, command: str, resume: bool = False, log=print) -> dict:
    """Train, score the curves, pick the headline budget, score it fully, write the reports."""
    t_start = time.time()
    cfg, dm = compose_data(s)
    floor = real_image_metrics(dm, s.bootstrap)  # also builds the digits CNN cache before the workers start
    specs = [RunSpec(o, o, seed) for seed in s.seeds for o in s.objectives]
    runs = train_all(specs, s.budgets, workdir, jobs=s.jobs, base_overrides=s.train_overrides, threads=s.threads,
                     resume=resume, log=log)

    curve = spec(s.curve_sampler)
    tasks = [sample_task(r, b, curve, s) for r in runs for b in s.budgets]
    log(f"[table1] curves: {len(tasks)} checkpoints x {s.num_samples} samples with {curve.key}")
    curve_points = parallel_map(evaluate_task, tasks, jobs=s.jobs, threads=s.threads, log=log, label="curves")
    curves = report.group_by_objective(curve_points, runs, "fid", by_budget=True)
    means = {o: {b: sum(v.values()) / len(v) for b, v in per_budget.items()} for o, per_budget in curves.items()}
    headline = headline_budget(means, s.flatten_tol)
    budget = headline["budget"]
    log(f"[table1] headline budget {budget} steps ({'flattened' if headline['flattened'] else 'NOT flattened'})")

    samplers = [spec(m) for m in s.matched] + ([SamplerSpec(None)] if s.own_default else [])
    first_seed = min(s.seeds)
    tasks = [sample_task(r, budget, sp, s, keep=100 if sp.sampler is None and r["seed"] == first_seed else 0)
             for r in runs for sp in samplers]
    tasks += [likelihood_task(r, budget, s) for r in runs]
    log(f"[table1] headline: {len(tasks)} evaluations at {budget} steps")
    results = parallel_map(evaluate_task, tasks, jobs=s.jobs, threads=s.threads, log=log, label="headline")

    payload = {
        "benchmark": "table1", "variant": s.variant, "settings": asdict(s),
        "model": report.model_line(cfg), "data": f"digits {dm.image_size}x{dm.image_size}",
        "metric_note": "digits-FID / digits-KID: features of a small digits CNN classifier, NOT Inception",
        "data_floor": floor, "training": runs,
        "curves": {"sampler": curve.key, "points": curve_points, "seed_means": means},
        "headline_budget": headline,
        "evaluations": results,
        "command": command, "machine": machine_info(),
    }
    payload["total_seconds"] = time.time() - t_start
    return table1_report.write(payload, out_dir)


def settings_from_args(a) -> Settings:
    s = replace(Settings(), **PRESETS["tiny" if a.tiny else "quick" if a.quick else "full"])
    for item in a.set:  # values are JSON (numbers, lists, true/false, null), else plain strings
        key, _, value = item.partition("=")
        if key not in Settings.__dataclass_fields__:
            raise SystemExit(f"--set {key}: unknown; valid: {sorted(Settings.__dataclass_fields__)}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        if isinstance(parsed, list):
            parsed = tuple(tuple(v) if isinstance(v, list) else v for v in parsed)
        s = replace(s, **{key: parsed})
    if a.seeds:
        s = replace(s, seeds=tuple(int(v) for v in a.seeds.split(",")))
    if a.budgets:
        s = replace(s, budgets=tuple(int(v) for v in a.budgets.split(",")))
    for key in ("jobs", "threads", "num_samples"):
        if getattr(a, key) is not None:
            s = replace(s, **{key: getattr(a, key)})
    if a.train_override:
        s = replace(s, train_overrides=(*s.train_overrides, *a.train_override))
    return s


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="3 seeds, budgets 200/400/800, 400 samples (< ~30 min on 2 idle cores)")
    size.add_argument("--tiny", action="store_true", help="a tiny DiT and a few steps: the test's end-to-end run")
    p.add_argument("--seeds", default=None, help="comma list (default 0,1,2,3,4)")
    p.add_argument("--budgets", default=None, help="comma list of training steps (default 1000,2000,4000,8000)")
    p.add_argument("--set", action="append", default=[], help="any Settings field, e.g. --set nll_images=32")
    cli.add_run_arguments(p, "table1")
    a = p.parse_args(argv)
    if a.report_only:
        return cli.rewrite_report(a, table1_report.write, "table1")
    s = settings_from_args(a)
    workdir, command = cli.workdir_and_command(a, s.variant, "table1", argv)
    results = run_table1(s, workdir, Path(a.out_dir), command, resume=a.resume)
    cli.announce(results, Path(a.out_dir), "table1")
    return results


if __name__ == "__main__":
    main()
