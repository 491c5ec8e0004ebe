"""SLURM: Lightning reads ranks from the SLURM environment but never requeues (see workflow/preemption.py)."""

from __future__ import annotations


def slurm_plugins() -> list:
    """Under SLURM: the cluster environment with auto_requeue off (submitit and SLURM's --requeue own requeue)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return []
    return [SLURMEnvironment(auto_requeue=False)]
