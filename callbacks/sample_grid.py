"""Sample grids from the EMA weights with fixed noise and labels, as PNG files and to the logger."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torchvision.utils import make_grid, save_image


class SampleGrid(L.Callback):
    """Every `every_n_steps` and at the end of training: one row per class, `per_class` samples per row."""

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int = 10000,
        classes: Sequence[int] | None = None,
        num_rows: int = 10,
        per_class: int = 10,
        seed: int = 0,
        sampler: str | None = None,
        num_steps: int | None = None,
        cfg_scale: float = 1.0,
        min_pixels: int = 32,
        at_train_end: bool = True,
    ):
        if every_n_steps < 0 or per_class < 1 or num_rows < 1:
            raise ValueError(f"sample_grid: every_n_steps={every_n_steps} must be >= 0 (0: only at the end), "
                             f"per_class={per_class} and num_rows={num_rows} >= 1")
        self.dirpath = dirpath
        self.every_n_steps = every_n_steps
        self.classes = list(classes) if classes is not None else None
        self.num_rows = num_rows
        self.per_class = per_class
        self.seed = seed
        self.sampler_kw = {"sampler": sampler, "num_steps": num_steps, "cfg_scale": cfg_scale}
        self.min_pixels = min_pixels
        self.at_train_end = at_train_end
        self.last_path: str | None = None
        self.drawn_steps: list[int] = []  # the optimizer steps a grid was sampled at (one grid per step at most)

    def labels(self, num_classes: int) -> torch.Tensor:
        """Fixed labels: each chosen class repeated `per_class` times (one grid row per class)."""
        classes = self.classes
        if classes is None:
            rows = min(self.num_rows, num_classes)
            classes = [round(i * num_classes / rows) for i in range(rows)]
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"sample_grid.classes {bad} out of range 0..{num_classes - 1}")
        return torch.tensor(classes, dtype=torch.long).repeat_interleave(self.per_class)

    def noise(self, n: int, shape: Sequence[int]) -> torch.Tensor:
        """Fixed noise from `seed` (drawn on CPU, so identical on every device)."""
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randn((n, *shape), generator=gen)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        objective = pl_module.objective
        sampler = self.sampler_kw["sampler"]
        if sampler is not None and sampler not in objective.samplers:
            raise ValueError(f"callbacks.sample_grid.sampler={sampler!r} is not a sampler of "
                             f"{type(objective).__name__}; choose one of {tuple(objective.samplers)}")
        if pl_module.sample_shape is None:
            raise ValueError("SampleGrid needs GenerativeModule(sample_shape=(C, H, W))")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """After an optimizer step (not after each micro-batch of gradient accumulation), once per step."""
        step = trainer.global_step
        if (self.every_n_steps and step % self.every_n_steps == 0 and step > 0 and step not in self.drawn_steps
                and not trainer.fit_loop._should_accumulate()):
            self.write(trainer, pl_module, f"step_{step:07d}.png")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.at_train_end or not trainer.is_global_zero:
            return
        final = os.path.join(self.dirpath, "final.png")
        if self.drawn_steps and self.drawn_steps[-1] == trainer.global_step and self.last_path:
            shutil.copyfile(self.last_path, final)  # the same weights were just sampled: no second draw
            self.last_path = final
        else:
            self.write(trainer, pl_module, "final.png")
        print(f"sample grid ({self.grid_desc(pl_module)}): {os.path.abspath(final)}", flush=True)

    def grid_desc(self, pl_module: L.LightningModule) -> str:
        """E.g. '10 classes x 10 samples, EMA weights, heun 50 steps'."""
        obj = pl_module.objective
        rows = len(self.labels(obj.num_classes)) // self.per_class
        sampler = self.sampler_kw["sampler"] or obj.default_sampler
        steps = self.sampler_kw["num_steps"] or obj.default_num_steps
        return f"{rows} classes x {self.per_class} samples, EMA weights, {sampler} {steps} steps"

    @rank_zero_only
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, filename: str) -> str | None:
        """Samples, decodes, saves `<dirpath>/<filename>` and sends the grid to the logger."""
        y = self.labels(pl_module.objective.num_classes)
        noise = self.noise(len(y), pl_module.sample_shape)
        gen = torch.Generator(device=pl_module.device).manual_seed(self.seed + 1)
        was_training = pl_module.training
        x = pl_module.generate(noise, y, generator=gen, **self.sampler_kw)
        decode = getattr(trainer.datamodule, "decode", None) if trainer.datamodule is not None else None
        with torch.no_grad():
            images = decode(x) if decode is not None else x
        images = ((images.float().clamp(-1, 1) + 1) / 2).cpu()
        if images.shape[-1] < self.min_pixels:
            images = F.interpolate(images, scale_factor=-(-self.min_pixels // images.shape[-1]), mode="nearest")
        grid = make_grid(images, nrow=self.per_class, padding=2, pad_value=1.0)
        os.makedirs(self.dirpath, exist_ok=True)
        path = os.path.join(self.dirpath, filename)
        save_image(grid, path)
        self.last_path = path
        self.drawn_steps.append(trainer.global_step)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[grid.permute(1, 2, 0).numpy()],
                                 step=trainer.global_step, caption=[self.grid_desc(pl_module)])
            elif hasattr(getattr(logger, "experiment", None), "add_image"):
                logger.experiment.add_image("samples", grid, trainer.global_step)
        pl_module.train(was_training)
        return path
