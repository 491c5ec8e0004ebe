"""Facts about this machine's CPU that decide precision and that benchmarks record (no torch import)."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# The instruction-set flags that change what is fast on a CPU: fp32 AVX-512, native bf16 dot products, AMX tiles.
RELEVANT_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_int8")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """All flags /proc/cpuinfo lists for the first CPU (empty where there is no /proc, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):  # x86 | aarch64
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def relevant_cpu_flags() -> dict[str, bool]:
    """{flag: present} for the flags that matter to training speed, for benchmark provenance."""
    flags = cpu_flags()
    return {f: f in flags for f in RELEVANT_CPU_FLAGS}


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX-512 BF16 or AMX), so bf16 autocast is faster than fp32.

    Without it PyTorch emulates bf16 matmuls and bf16-mixed is ~26x slower than fp32 (measured here).
    On aarch64 the `bf16` feature flag (ARMv8.6 BF16) plays the same role.
    """
    flags = cpu_flags()
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def visible_gpu_count() -> int | None:
    """How many NVIDIA GPUs this process may use, without importing torch; None when it cannot tell (ROCm,
    macOS), so the caller leaves the question to torch."""
    import os
    import re

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v for v in visible.replace(" ", "").split(",") if v]
        if not ids or ids[0] == "-1":
            return 0
        nvidia = _nvidia_gpus()
        return len(ids) if nvidia is None else min(len(ids), nvidia)
    nvidia = _nvidia_gpus()
    if nvidia is not None:
        return nvidia
    if platform.system() != "Linux" or Path("/dev/kfd").exists():  # macOS (MPS) or ROCm: ask torch
        return None
    return 0 if not any(re.fullmatch(r"nvidia\d+", p.name) for p in Path("/dev").glob("nvidia*")) else None


def _nvidia_gpus() -> int | None:
    """GPUs the NVIDIA driver lists (/proc/driver/nvidia/gpus), or None without the driver's /proc entry."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else None


@dataclass(frozen=True)
class PrecisionChoice:
    """What `trainer.precision=auto` resolved to, and why (printed at start-up)."""

    value: str
    reason: str


def resolve_precision(precision: str, on_gpu: bool, gpu_has_bf16: bool = True) -> PrecisionChoice:
    """`auto` -> bf16-mixed on a GPU with bf16 (16-mixed on older ones); on a CPU bf16-mixed only where the CPU
    computes bf16 natively (cpu_has_native_bf16), else 32-true. Any other value is kept as given."""
    if precision != "auto":
        return PrecisionChoice(precision, "as configured")
    if on_gpu:
        if gpu_has_bf16:
            return PrecisionChoice("bf16-mixed", "GPU with bf16")
        return PrecisionChoice("16-mixed", "GPU without bf16 (pre-Ampere)")
    flags = sorted({"avx512_bf16", "amx_bf16", "bf16"} & cpu_flags())
    if cpu_has_native_bf16():
        return PrecisionChoice("bf16-mixed", f"CPU with native bf16 ({', '.join(flags)})")
    return PrecisionChoice("32-true", "CPU without native bf16 (no avx512_bf16/amx_bf16): bf16 would be emulated")
