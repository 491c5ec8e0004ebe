"""Shared fixtures: an offline environment and a helper that runs train.py with tiny settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A seconds-long digits run: 1-block DiT, 8x8 images, no progress bar, grids with 2 sampler steps.
TINY = [
    "experiment=digits", "model.hidden_size=32", "model.depth=1", "model.num_heads=2",
    "data.batch_size=32", "trainer.log_every_n_steps=1", "module.t_bucket_every_n_steps=1",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "callbacks.rich_progress_bar=null",
    "callbacks.sample_grid.num_steps=2", "callbacks.sample_grid.every_n_steps=0", "trainer.num_sanity_val_steps=0",
]


def offline_env(**extra: str) -> dict[str, str]:
    """The environment for subprocesses: nothing reaches the network, one thread each (shared CPUs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SLURM_"))}
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               HYDRA_FULL_ERROR="0")
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def run_train(args: list[str], env: dict[str, str] | None = None, check: bool = True,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `python train.py *args` from the repo root; with check, fails the test showing its output."""
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env or offline_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"train.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-5000:]}")
    return proc


@pytest.fixture
def tiny_args() -> list[str]:
    """The TINY overrides (a fresh list per test)."""
    return list(TINY)
