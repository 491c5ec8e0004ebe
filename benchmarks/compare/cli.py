"""The command line shared by `make table1` and `make ablation`: run-size flags, where runs and reports go, and the
last lines that say where the report is."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from benchmarks.common import REPO_ROOT, RESULTS_DIR


def add_run_arguments(p: argparse.ArgumentParser, name: str) -> None:
    """Flags both drivers take (their size presets and per-driver flags are added by the caller)."""
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--jobs", type=int, default=None, help="parallel processes")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--train-override", action="append", default=[], help="extra train.py override (repeatable)")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--workdir", default=None, help=f"runs and logs (default outputs/{name}[_quick])")
    p.add_argument("--resume", action="store_true", help="reuse finished runs of an earlier, unchanged command")
    p.add_argument("--report-only", metavar="JSON", help="rewrite a report (md, figures) from its JSON, no runs")


def rewrite_report(a: argparse.Namespace, writer, name: str) -> dict:
    """--report-only: the report from its JSON alone (no training, no sampling)."""
    results = writer(json.loads(Path(a.report_only).read_text()), Path(a.report_only).parent)
    print(f"[{name}] rewrote {results['report_md']} from {a.report_only}")
    return results


def workdir_and_command(a: argparse.Namespace, variant: str, name: str, argv: list[str] | None) -> tuple[Path, str]:
    """outputs/<name>[_variant] unless --workdir, and the command line as the report records it."""
    suffix = "" if variant == "full" else f"_{variant}"
    workdir = Path(a.workdir or REPO_ROOT / "outputs" / f"{name}{suffix}")
    command = f"python benchmarks/{name}.py " + shlex.join(sys.argv[1:] if argv is None else argv)  # re-runnable
    return workdir, command.strip()


def announce(results: dict, out_dir: Path, name: str) -> None:
    """Refresh docs/RESULTS.md when the report went to the project's results/, then say where everything is."""
    if Path(out_dir).resolve() == RESULTS_DIR.resolve():
        from benchmarks.run_all import write_results_md

        print(f"[{name}] refreshed {write_results_md()}")
    figures = results.get("figures")
    print(f"[{name}] done in {results['total_seconds'] / 60:.1f} min. Report: {results['report_md']} "
          f"(data: {results['report_json']}" + (f"; figures: {', '.join(figures)})" if figures else ")"))
