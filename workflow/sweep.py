"""Sweeps (`train.py -m`): every job records its outcome in <job folder>/job.json, a failed job does not stop the
others, and the sweep folder gets summary.csv and summary.md (one row per job). Job folders are named by the
swept values: `<job number>_objective=score,objective.beta_max=10`."""

from __future__ import annotations

import csv
import glob
import json
import os
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

JOB_RECORD = "job.json"
FAILED_JOBS: list[str] = []  # filled by SweepSummary in the launching process; train.py exits 1 when not empty


def swept_keys(overrides: list[str]) -> list[str]:
    """The keys a command line sweeps (`objective=score,flow` -> objective)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [o.key_or_group for o in OverridesParser.create().parse_overrides(overrides) if o.is_sweep_override()]


def swept_dirname(task_overrides: list[str], keys: list[str]) -> str:
    """`k=v,k2=v2` for the swept keys of a job (a Hydra resolver for hydra.sweep.subdir); '/' becomes '_'."""
    wanted = set(keys or [])
    items = [o.lstrip("+~") for o in task_overrides]
    items = [o for o in items if o.split("=", 1)[0].split("@", 1)[0] in wanted]
    return ",".join(items).replace("/", "_")[:200] or "job"


def write_job_record(run_dir: str, record: dict[str, Any]) -> None:
    """<run_dir>/job.json, atomically."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, JOB_RECORD)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def summary_rows(sweep_dir: str) -> list[dict[str, Any]]:
    """One row per job folder of the sweep, in job order; a job that wrote no record is 'not finished'."""
    rows = []
    for job_dir in sorted(glob.glob(os.path.join(sweep_dir, "*", "")), key=_job_number):
        path = os.path.join(job_dir, JOB_RECORD)
        if os.path.isfile(path):
            with open(path) as f:
                record = json.load(f)
        elif os.path.isdir(os.path.join(job_dir, ".hydra")):
            record = {"status": "not finished", "job": os.path.basename(job_dir.rstrip("/"))}
        else:
            continue
        metrics = record.pop("metrics", {}) or {}
        rows.append({**{k: v for k, v in record.items() if k != "run_dir"}, **metrics})
    return rows


def _job_number(job_dir: str) -> int:
    head = os.path.basename(job_dir.rstrip("/")).split("_", 1)[0]
    return int(head) if head.isdigit() else 1 << 30


def write_summary(sweep_dir: str) -> tuple[str, list[dict[str, Any]]]:
    """summary.csv and summary.md in the sweep folder; returns the markdown path and the rows."""
    rows = summary_rows(sweep_dir)
    first = ["job", "status", "overrides", "step"]
    keys = first + sorted({k for r in rows for k in r} - set(first) - {"error"}) + ["error"]
    with open(os.path.join(sweep_dir, "summary.csv.tmp"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(os.path.join(sweep_dir, "summary.csv.tmp"), os.path.join(sweep_dir, "summary.csv"))
    md = os.path.join(sweep_dir, "summary.md")
    with open(md + ".tmp", "w") as f:
        f.write("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n")
        for r in rows:
            f.write("| " + " | ".join(_cell(r.get(k)) for k in keys) + " |\n")
    os.replace(md + ".tmp", md)
    return md, rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


class SweepSummary(Callback):
    """Hydra callback (conf/train.yaml hydra.callbacks): the summary table when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = str(config.hydra.sweep.dir)
        md, rows = write_summary(sweep_dir)
        failed = [f"{r.get('job')} ({r.get('status')})" for r in rows if r.get("status") != "completed"]
        FAILED_JOBS.extend(failed)
        print(f"sweep: {len(rows) - len(failed)} of {len(rows)} jobs completed; summary: {md} (and summary.csv)"
              + (f"; not completed: {', '.join(failed)}" if failed else ""), flush=True)
