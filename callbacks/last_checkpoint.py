"""The one writer of <run_dir>/checkpoints/last.ckpt, the state `ckpt_path=last` resumes from."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException


class LastCheckpoint(L.Callback):
    """Writes `<dirpath>/last.ckpt` every `every_n_train_steps` optimizer steps, at the end of fit and when a
    pre-emption stops training (workflow/preemption.py), atomically (tmp file + rename).

    It is the only writer of last.ckpt (ModelCheckpoint keeps `save_last: false`), so last.ckpt is always the
    newest state and no `last-v1.ckpt` appears. A non-finite loss or any other error writes nothing: the last
    good checkpoint stays as it was.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 1000, filename: str = "last.ckpt"):
        if every_n_train_steps < 0:
            raise ValueError(f"last_ckpt_every_n_steps={every_n_train_steps} must be >= 0 (0: only at the end "
                             "and on pre-emption)")
        self.path = os.path.join(dirpath, filename)
        self.every_n_train_steps = every_n_train_steps
        self.saved_step: int | None = None

    def save(self, trainer: L.Trainer) -> None:
        """All ranks call it (the module's checks are collective); rank 0 writes, then renames into place."""
        tmp = self.path + ".tmp"
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        trainer.strategy.barrier("last_checkpoint")
        self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if (self.every_n_train_steps and step % self.every_n_train_steps == 0 and step != self.saved_step
                and not trainer.fit_loop._should_accumulate()):
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0 and trainer.global_step != self.saved_step:
            self.save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.global_step not in (0, self.saved_step):
            self.save(trainer)
