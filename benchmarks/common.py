"""Shared benchmark plumbing: machine facts, atomic JSON, and a network-evaluation (NFE) counter."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "results"

if str(REPO_ROOT) not in sys.path:  # scripts run as `python benchmarks/x.py`; make `benchmarks.*` importable
    sys.path.insert(0, str(REPO_ROOT))


def cpu_model() -> str:
    """The CPU model name as lscpu reports it, so numbers can be traced to the hardware."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.strip().startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> dict:
    """HEAD commit and whether the work tree differs from it (a dirty tree means numbers may not reproduce)."""
    def run(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=20).stdout.strip()
    try:
        return {"commit": run("rev-parse", "HEAD") or "unknown",
                "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def machine_info() -> dict:
    """Everything a reader needs to know which machine and software produced a number."""
    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # shared machines drift
        **{f"git_{k}": v for k, v in git_commit().items()},
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _jsonable(obj):
    """Turn numpy/torch scalars and non-finite floats into strict JSON values (NaN/inf -> None)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item) and not isinstance(obj, (str, bytes)):
        try:
            return _jsonable(obj.item())
        except (TypeError, ValueError):
            pass
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Write JSON atomically (tmp + rename) so a killed run never leaves a half-written result file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(_jsonable(payload), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


class CountingNet(nn.Module):
    """Wraps a network and counts its calls: one call = one NFE, however large the (CFG-doubled) batch."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)

    def reset(self) -> None:
        self.calls = 0

    def __getattr__(self, name: str):
        """Expose the wrapped network's attributes (e.g. learn_sigma) to code that reads them."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("net"), name)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for a single value) of finite values; NaN when there are none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1)
    return m, math.sqrt(var)
