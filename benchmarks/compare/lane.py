"""A training lane: train.py's own entry point for each run of a list, in one process (start-up paid once).

    python -m benchmarks.compare.lane lane.json    # {"runs": [...]}, written by runs.train_all

Each run is exactly `python train.py <argv>`; afterwards only the budgets' checkpoints are kept and train.json
(command, checkpoints, CPU seconds of this run alone) is written atomically beside them.
"""

from __future__ import annotations

import json
import resource
import runpy
import shutil
import sys
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT, write_json
from benchmarks.compare.runs import checkpoint_path


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def train_one(job: dict) -> dict:
    """Run train.py with the job's overrides in this process; keep the budgets' checkpoints; record it."""
    run_dir = Path(job["run_dir"])
    if run_dir.exists():
        shutil.rmtree(run_dir)  # never mix checkpoints of two trainings
    command = "python train.py " + " ".join(job["argv"])
    print(f"[lane] {job['run_id']}: {command}", flush=True)
    sys.argv = [str(REPO_ROOT / "train.py"), *job["argv"]]
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    try:
        runpy.run_path(str(REPO_ROOT / "train.py"), run_name="__main__")
    except SystemExit as stop:  # Hydra reports a bad config this way
        if stop.code not in (None, 0):
            raise RuntimeError(f"{job['run_id']}: train.py exited with {stop.code}") from None
    cpu, wall = cpu_seconds() - cpu0, time.perf_counter() - wall0
    checkpoints = {}
    for budget in job["budgets"]:
        path = checkpoint_path(run_dir, budget)
        if not path.is_file():
            raise FileNotFoundError(f"{job['run_id']}: no checkpoint at step {budget} ({path})")
        checkpoints[str(budget)] = str(path)
    for path in (run_dir / "checkpoints").glob("*.ckpt"):  # only the budgets' weights are kept (disk)
        if str(path) not in checkpoints.values():
            path.unlink()
    steps = max(job["budgets"])
    record = {**job, "command": command, "checkpoints": checkpoints, "steps": steps, "cpu_seconds": cpu,
              "wall_seconds": wall, "cpu_seconds_per_step": cpu / steps}
    write_json(run_dir / "train.json", record)
    print(f"[lane] {job['run_id']}: {steps} steps, {wall:.0f}s wall, {cpu / steps:.3f} CPU-s/step", flush=True)
    return record


def main(path: str) -> None:
    jobs = json.loads(Path(path).read_text())["runs"]
    for k, job in enumerate(jobs, 1):
        train_one(job)
        print(f"[lane] {k}/{len(jobs)} runs done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
