"""The progress bar: step k/max_steps and the last logged loss, without reading a device value every step."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Rich progress bar whose title is `Epoch N` (not `Epoch N/-2` when training is bounded by steps) and
    whose metrics are `step k/max_steps` and `train/loss` as last logged (read once per log_every_n_steps;
    a progress-bar tensor metric would be read back from the device after every step)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._loss: float | None = None
        self._loss_step = -1

    def _get_train_description(self, current_epoch: int) -> str:
        return f"Epoch {current_epoch}"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        if trainer.max_steps and trainer.max_steps > 0:
            items["step"] = f"{trainer.global_step}/{trainer.max_steps}"
        step, every = trainer.global_step, max(1, trainer.log_every_n_steps)
        if step % every == 0 and step != self._loss_step:  # one read per logging step
            loss = trainer.callback_metrics.get("train/loss")
            self._loss, self._loss_step = (None if loss is None else float(loss)), step
        if self._loss is not None:
            items["train/loss"] = round(self._loss, 4)
        return items
