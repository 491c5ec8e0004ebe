"""Keeps <run_dir>/checkpoints/last.ckpt current: written when training ends and when SIGTERM stops it."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class LastCheckpoint(L.Callback):
    """Saves `<dirpath>/last.ckpt` at the end of fit and on SIGTERM (SLURM pre-emption, scancel)."""

    # Lightning's ModelCheckpoint refreshes last.ckpt only together with a periodic checkpoint, so a run ending
    # between two of them would otherwise resume from an older step. Other exceptions (e.g. a non-finite loss)
    # write nothing, so the last good checkpoint stays as it was.

    def __init__(self, dirpath: str, filename: str = "last.ckpt"):
        self.path = os.path.join(dirpath, filename)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0:
            trainer.save_checkpoint(self.path, weights_only=False)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.global_step == 0:
            return
        trainer.save_checkpoint(self.path, weights_only=False)
        rank_zero_info(f"SIGTERM at step {trainer.global_step}: saved {self.path}; resume with ckpt_path=last")
