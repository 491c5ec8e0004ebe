"""Saves last.ckpt when the run is stopped by SIGTERM (SLURM pre-emption, scancel, timeouts)."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM (never on other errors, e.g. a non-finite loss) writes `<dirpath>/last.ckpt` for resume."""

    def __init__(self, dirpath: str, filename: str = "last.ckpt"):
        self.path = os.path.join(dirpath, filename)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.global_step == 0:
            return
        trainer.save_checkpoint(self.path)
        rank_zero_info(f"SIGTERM at step {trainer.global_step}: saved {self.path}; resume with ckpt_path=last")
