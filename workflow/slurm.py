"""SLURM: who requeues, and Lightning's cluster environment."""

from __future__ import annotations

import signal

REQUEUE_SIGNAL = signal.SIGUSR2  # submitit's pre-timeout signal; plain sbatch: #SBATCH --signal=USR2@120


def slurm_plugins() -> list:
    """Under SLURM: Lightning saves an hpc checkpoint and requeues the job on REQUEUE_SIGNAL."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return []
    signal.signal(REQUEUE_SIGNAL, signal.SIG_DFL)  # let Lightning's handler replace submitit's own
    return [SLURMEnvironment(auto_requeue=True, requeue_signal=REQUEUE_SIGNAL)]
