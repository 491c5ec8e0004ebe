"""Training runs for a comparison: train.py's own entry point once per (cell, seed) -- the overrides a user
would type -- keeping a checkpoint at every training budget; and a process pool for the evaluations after.

Runs are dealt to `jobs` lanes; a lane is one Python process (benchmarks/compare/lane.py) that executes
train.py for each of its runs in turn, so the interpreter and library start-up is paid once per lane, not per
run. A run's folder is <workdir>/runs/<name>_seed<seed>/ (Hydra's run dir); its train.json, written last and
atomically, marks it finished. With resume=True a finished run whose command is unchanged is reused, so a long
comparison that died can be restarted where it stopped.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import REPO_ROOT, write_json


@dataclass(frozen=True)
class RunSpec:
    """One training run: an objective config (plus key overrides) at one seed."""

    name: str                       # table1: the objective; ablation: the cell
    objective: str                  # conf/objective/<objective>.yaml
    seed: int
    overrides: tuple[str, ...] = ()

    @property
    def run_id(self) -> str:
        return f"{self.name}_seed{self.seed}"


def checkpoint_every(budgets) -> int:
    """The checkpoint interval that lands on every budget."""
    return math.gcd(*budgets)


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """Where ModelCheckpoint (conf/callbacks/default.yaml: step={step:07d}) saves the weights of `step`."""
    return Path(run_dir) / "checkpoints" / f"step={step:07d}.ckpt"


def train_overrides(spec: RunSpec, budgets, run_dir: Path, base_overrides, threads: int) -> list[str]:
    """train.py's overrides for one run: the digits experiment, checkpoints at every budget, nothing else."""
    return ["experiment=digits", f"objective={spec.objective}", f"seed={spec.seed}",
            f"trainer.max_steps={max(budgets)}", f"hydra.run.dir={run_dir}", "name=compare",
            f"callbacks.model_checkpoint.every_n_train_steps={checkpoint_every(budgets)}",
            "callbacks.model_checkpoint.save_top_k=-1", "callbacks.sample_grid=null",
            "callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false", f"threads={threads}",
            *base_overrides, *spec.overrides]


def run_job(spec: RunSpec, budgets, workdir: Path, base_overrides=(), threads: int = 1) -> dict:
    """What a lane needs to train one run and to record it."""
    run_dir = Path(workdir) / "runs" / spec.run_id
    return {"run_id": spec.run_id, "name": spec.name, "objective": spec.objective, "seed": spec.seed,
            "overrides": list(spec.overrides), "run_dir": str(run_dir), "budgets": sorted(budgets),
            "argv": train_overrides(spec, budgets, run_dir, base_overrides, threads)}


def finished(job: dict) -> dict | None:
    """The run's train.json if it finished with the same command and its checkpoints are on disk."""
    done = Path(job["run_dir"]) / "train.json"
    if not done.is_file():
        return None
    record = json.loads(done.read_text())
    ok = record["argv"] == job["argv"] and all(Path(p).is_file() for p in record["checkpoints"].values())
    return record if ok else None


def train_all(specs: list[RunSpec], budgets, workdir: Path, *, jobs: int, base_overrides=(), threads: int = 1,
              resume: bool = False, log: Callable[[str], None] = print) -> list[dict]:
    """Train every run in `jobs` lanes (reusing finished ones when resuming); records in the order of specs."""
    workdir = Path(workdir)
    all_jobs = [run_job(s, budgets, workdir, base_overrides, threads) for s in specs]
    todo = [j for j in all_jobs if not (resume and finished(j))]
    for j in all_jobs:
        if j not in todo:
            log(f"[runs] {j['run_id']}: reusing the finished run in {j['run_dir']}")
    lanes = [todo[k::max(1, jobs)] for k in range(max(1, jobs))]
    lanes = [lane for lane in lanes if lane]
    if lanes:
        log(f"[runs] training {len(todo)} runs to {max(budgets)} steps in {len(lanes)} lanes; logs: "
            f"{workdir}/runs/lane*.log")
    with cf.ThreadPoolExecutor(max_workers=max(1, len(lanes))) as pool:
        list(pool.map(lambda kl: run_lane(kl[1], workdir / "runs" / f"lane{kl[0]}", threads), enumerate(lanes)))
    records = []
    for j in all_jobs:
        record = finished(j)
        if record is None:
            raise RuntimeError(f"{j['run_id']} did not finish; see {workdir}/runs/lane*.log")
        records.append(record)
    return records


def run_lane(lane: list[dict], stem: Path, threads: int) -> None:
    """One lane process over its runs; its output in <stem>.log; fails with the log's tail."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_json(stem.with_suffix(".json"), {"runs": lane})
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "benchmarks.compare.lane", str(stem.with_suffix(".json"))]
    log_path = stem.with_suffix(".log")
    with open(log_path, "w") as out:
        rc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"training lane failed (exit {rc}): {' '.join(cmd)}\n--- {log_path} (tail) ---\n{tail}")


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def parallel_map(fn: Callable, tasks: list, *, jobs: int, threads: int = 1, log: Callable[[str], None] = print,
                 label: str = "eval") -> list:
    """fn(task) for every task, in `jobs` fresh processes (spawned: no forked torch state) or in this one when
    jobs == 1; results in task order, progress logged as tasks finish."""
    if jobs <= 1 or len(tasks) <= 1:
        _worker_init(threads)
        out = []
        for k, task in enumerate(tasks):
            out.append(fn(task))
            log(f"[{label}] {k + 1}/{len(tasks)} done")
        return out
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init,
                                initargs=(threads,)) as pool:
        futures = {pool.submit(fn, task): k for k, task in enumerate(tasks)}
        out = [None] * len(tasks)
        for n, fut in enumerate(cf.as_completed(futures), 1):
            out[futures[fut]] = fut.result()
            log(f"[{label}] {n}/{len(tasks)} done")
        return out
