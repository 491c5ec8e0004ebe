"""The one fp32 matmul precision evaluation runs under, whatever the training script set.

TF32 (or bf16 on CPUs with `medium`) matmuls change samples and features enough to move FID in the
third digit, so the callback and evaluate.py run sampling, decoding and feature extraction inside
`matmul_precision(...)`, which sets the precision and restores the caller's on exit. Default `highest`:
full fp32, as the reference statistics are computed.
"""

from __future__ import annotations

import contextlib

import torch

MATMUL_PRECISIONS = ("highest", "high", "medium")
DEFAULT_MATMUL_PRECISION = "highest"


def check_matmul_precision(value: str, key: str = "matmul_precision") -> str:
    if value not in MATMUL_PRECISIONS:
        raise ValueError(f"{key}={value!r}; choose one of {MATMUL_PRECISIONS}")
    return value


@contextlib.contextmanager
def matmul_precision(value: str = DEFAULT_MATMUL_PRECISION):
    """torch.set_float32_matmul_precision(value) and cuDNN TF32 to match, restored on exit."""
    check_matmul_precision(value)
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision(value)
    torch.backends.cudnn.allow_tf32 = value != "highest"
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]
