"""`make ablation`: what separates diffusion, score and flow? A fractional factorial over the objectives' keys.

    python benchmarks/ablation.py            # 18 cells x 3 seeds x 4000 steps on digits (hours on 2 cores)
    python benchmarks/ablation.py --quick    # the same code path: 2 seeds, 800 steps, 400 samples
    python benchmarks/ablation.py --tiny     # seconds, for the tests

prediction (eps | velocity | x0 | score) x weighting (sigma2 | velocity | likelihood | min_snr) x time_sampling
(uniform | discrete | logit_normal) x path (vp | linear) x learn_sigma: the 16 cells of an orthogonal array
(benchmarks/compare/design.py) plus the three objectives' own corners, each trained with every seed (same seed
=> same initial weights and data order) and scored with one shared sampler. An additive model with seed blocks
gives each factor's main effect with a 95% interval, and splits each gap between two objectives into the
factors in which their corners differ. Writes results/ablation{,_quick}.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO_ROOT, machine_info  # noqa: E402
from benchmarks.compare import ablation_report, cli  # noqa: E402
from benchmarks.compare.design import FACTORS, LEVEL_KEYS, ablation_cells, cell_overrides  # noqa: E402
from benchmarks.compare.metrics import SamplerSpec, evaluate_task, real_image_metrics  # noqa: E402
from benchmarks.compare.report import model_line  # noqa: E402
from benchmarks.compare.runs import RunSpec, parallel_map, train_all  # noqa: E402
from benchmarks.table1 import TINY_MODEL, compose_data  # noqa: E402


@dataclass(frozen=True)
class Settings:
    """Everything that defines an ablation run; stored in its JSON."""

    variant: str = "full"
    seeds: tuple = (0, 1, 2)
    steps: int = 4000
    train_overrides: tuple = ()
    num_samples: int = 2000
    batch_size: int = 500
    bootstrap: int = 50
    sampler: tuple = ("dpmpp_2m", 20, "log_snr")   # (sampler, NFE, time grid): the same for every cell
    responses: tuple = ("fid", "kid", "class_accuracy")
    sample_seed: int = 0
    jobs: int = 2
    threads: int = 1


PRESETS = {
    "full": {},
    "quick": dict(variant="quick", seeds=(0, 1), steps=800, num_samples=400, bootstrap=20),
    "tiny": dict(variant="tiny", seeds=(0, 1), steps=2, train_overrides=TINY_MODEL, num_samples=40, batch_size=40,
                 bootstrap=0, sampler=("dpmpp_2m", 4, "log_snr"), jobs=1, threads=1),
}


def check_cells(cells: list[dict], train_overrides) -> tuple[list[dict], list[dict]]:
    """Build each cell's objective from its composed config: (valid cells, invalid ones with their error)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    valid, invalid = [], []
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        for cell in cells:
            try:
                cfg = compose("train", overrides=["experiment=digits", f"objective={cell['objective']}",
                                                  *train_overrides, *cell_overrides(cell["levels"])])
                instantiate(cfg.objective)
                valid.append(cell)
            except Exception as err:  # noqa: BLE001 -- any refusal is reported, with its message
                root = err.__cause__ or err  # Hydra wraps the objective's own ValueError
                invalid.append({**cell, "error": f"{type(root).__name__}: {root}"})
    return valid, invalid


def run_ablation(s: Settings, workdir: Path, out_dir: Path, command: str, resume: bool = False, log=print) -> dict:
    t_start = time.time()
    cells, invalid = check_cells(ablation_cells(), s.train_overrides)
    for bad in invalid:
        log(f"[ablation] {bad['name']} {bad['levels']} is refused: {bad['error']}")
    corners = {c["name"] for c in cells if c["name"] == c["objective"]}
    if len(corners) < 3:
        raise SystemExit(f"[ablation] the objectives' corners must all be valid; refused: "
                         f"{[(b['name'], b['error']) for b in invalid if b['name'] == b['objective']]}")
    cfg, dm = compose_data(s)
    floor = real_image_metrics(dm, s.bootstrap)  # builds the digits CNN cache before the workers start
    specs = [RunSpec(c["name"], c["objective"], seed, cell_overrides(c["levels"])) for seed in s.seeds for c in cells]
    runs = train_all(specs, (s.steps,), workdir, jobs=s.jobs, base_overrides=s.train_overrides, threads=s.threads,
                     resume=resume, log=log)
    sampler = SamplerSpec(*s.sampler)
    tasks = [{"kind": "sample", "ckpt": r["checkpoints"][str(s.steps)], "run_id": r["run_id"], "budget": s.steps,
              "spec": asdict(sampler), "num_samples": s.num_samples, "batch_size": s.batch_size,
              "seed": s.sample_seed, "bootstrap": s.bootstrap} for r in runs]
    log(f"[ablation] scoring {len(tasks)} runs with {sampler.key}, {s.num_samples} samples each")
    results = parallel_map(evaluate_task, tasks, jobs=s.jobs, threads=s.threads, log=log, label="ablation")
    payload = {
        "benchmark": "ablation", "variant": s.variant, "settings": asdict(s), "factors": FACTORS,
        "level_keys": [{"factor": f, "level": lvl, "keys": keys} for (f, lvl), keys in LEVEL_KEYS.items()],
        "cells": cells, "refused_cells": invalid, "model": model_line(cfg),
        "data": f"digits {dm.image_size}x{dm.image_size}", "data_floor": floor, "training": runs,
        "evaluations": results, "command": command, "machine": machine_info(),
    }
    payload["total_seconds"] = time.time() - t_start
    return ablation_report.write(payload, out_dir)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="2 seeds, 800 steps, 400 samples (~40 min on 2 idle cores)")
    size.add_argument("--tiny", action="store_true", help="a tiny DiT and 2 steps: the test's end-to-end run")
    p.add_argument("--seeds", default=None, help="comma list (default 0,1,2)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 4000)")
    cli.add_run_arguments(p, "ablation")
    a = p.parse_args(argv)
    if a.report_only:
        return cli.rewrite_report(a, ablation_report.write, "ablation")
    s = replace(Settings(), **PRESETS["tiny" if a.tiny else "quick" if a.quick else "full"])
    if a.seeds:
        s = replace(s, seeds=tuple(int(v) for v in a.seeds.split(",")))
    for key in ("steps", "num_samples", "jobs", "threads"):
        if getattr(a, key) is not None:
            s = replace(s, **{key: getattr(a, key)})
    if a.train_override:
        s = replace(s, train_overrides=(*s.train_overrides, *a.train_override))
    workdir, command = cli.workdir_and_command(a, s.variant, "ablation", argv)
    results = run_ablation(s, workdir, Path(a.out_dir), command, resume=a.resume)
    cli.announce(results, Path(a.out_dir), "ablation")
    return results


if __name__ == "__main__":
    main()
