"""Shared benchmark plumbing: machine facts, atomic JSON, and a network-evaluation (NFE) counter."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "results"

if str(REPO_ROOT) not in sys.path:  # scripts run as `python benchmarks/x.py`; make `benchmarks.*` importable
    sys.path.insert(0, str(REPO_ROOT))

from evaluation.engine import CallCounter as CountingNet  # noqa: E402,F401  (the one NFE counter)
from workflow.hardware import cpu_has_native_bf16, relevant_cpu_flags  # noqa: E402

# Dense (no 2:4 sparsity) tensor-core peaks from NVIDIA's datasheets, FLOP/s, per exact device variant: the
# H100 SXM, PCIe and NVL differ by 30%. "tf32" is what fp32 training runs at on CUDA here (train.py turns TF32
# on); "fp32" is the plain CUDA-core rate. A device not listed has no peak: MFU is reported as unknown.
GPU_DATASHEET_PEAKS = {
    "H100 SXM": {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "H100 PCIe": {"bf16": 756.5e12, "tf32": 378.0e12, "fp32": 51.2e12},
    "H100 NVL": {"bf16": 835.5e12, "tf32": 417.5e12, "fp32": 60.0e12},
    "H200 SXM": {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "H200 NVL": {"bf16": 835.5e12, "tf32": 417.5e12, "fp32": 60.0e12},
    "GH200": {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "A100": {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12},  # SXM4 and PCIe, 40 and 80 GB alike
}
# torch.cuda.get_device_name -> datasheet entry; first match wins, so the NVL/PCIe variants come first.
# The H100 SXM5 reports "NVIDIA H100 80GB HBM3"; a bare "NVIDIA H100" is ambiguous and stays unknown.
GPU_NAME_RULES = (
    (r"\bGH200\b", "GH200"),
    (r"\bH200\b.*\bNVL\b", "H200 NVL"),
    (r"\bH200\b", "H200 SXM"),
    (r"\bH100\b.*\bNVL\b", "H100 NVL"),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe"),
    (r"\bH100\b.*(\bSXM|\bHBM3\b)", "H100 SXM"),
    (r"\bA100\b(?!X)", "A100"),
)


def datasheet_device(gpu_name: str) -> str | None:
    """The datasheet entry of an exact GPU name (e.g. 'NVIDIA H100 PCIe' -> 'H100 PCIe'); None when unknown."""
    for pattern, device in GPU_NAME_RULES:
        if re.search(pattern, gpu_name, flags=re.IGNORECASE):
            return device
    return None


def datasheet_peak(gpu_name: str, math_mode: str) -> tuple[float | None, str]:
    """(dense peak FLOP/s, source) for math_mode bf16 | tf32 | fp32; (None, 'unknown ...') for unlisted devices."""
    device = datasheet_device(gpu_name)
    if device is None:
        return None, f"unknown: {gpu_name!r} is not in benchmarks/common.py GPU_DATASHEET_PEAKS (MFU not computed)"
    return GPU_DATASHEET_PEAKS[device][math_mode], f"datasheet {device} {math_mode} dense"


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
    """HEAD commit and whether the code differs from it (a dirty tree means numbers may not reproduce).

    Result files (results/, docs/RESULTS.md) do not count: `make bench` rewrites them while it runs.
    """
    def run(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=20).stdout.strip()
    try:
        commit = run("rev-parse", "HEAD")
        if not commit:  # not a git checkout (e.g. an unpacked archive)
            return {"commit": "unknown", "dirty": None}
        return {"commit": commit,
                "dirty": bool(run("status", "--porcelain", "--untracked-files=no", "--", ".", ":!results",
                                  ":!docs/RESULTS.md"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def nvidia_driver() -> str | None:
    """The NVIDIA driver version nvidia-smi reports (torch knows only the CUDA API level)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else None


def gpu_info() -> dict | None:
    """Name, datasheet variant, memory, compute capability, driver and CUDA/cuDNN versions of GPU 0; None on CPU."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "datasheet_device": datasheet_device(props.name),
        "count": torch.cuda.device_count(),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "driver": nvidia_driver(),
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def command_line(script: str | None = None, argv: list[str] | None = None) -> str:
    """`python <script> <args>` of this run (default: this process's own), paths relative to the checkout."""
    if script is None:
        script, argv = (sys.argv[0], sys.argv[1:]) if sys.argv else ("", [])
    return "python " + shlex.join(str(a).replace(str(REPO_ROOT) + "/", "") for a in [script, *(argv or [])])


def machine_info(command: str | None = None) -> dict:
    """Everything a reader needs to know which machine and software produced a number."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None  # shared machines drift
    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": relevant_cpu_flags(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "torch_threads": torch.get_num_threads(),
        "omp": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
        "gpu": gpu_info(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_avg_1min": load[0] if load else None,
        "load_avg_1_5_15": list(load) if load else None,
        "command": command or command_line(),
        **{f"git_{k}": v for k, v in git_commit().items()},
    }
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
