"""Train one objective on one backbone: `python train.py [group=option ...] [key=value ...]` (docs/WORKFLOW.md)."""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from workflow.config import CONFIG_ERROR_EXIT, ConfigError, say

# torch/lightning are imported inside the functions that need them, so a config error fails in a second.


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Builds everything with workflow.build.build_run, then fits (or resumes)."""
    import lightning as L

    from workflow.build import build_run

    try:
        run = build_run(cfg)
    except ConfigError as e:  # the message names the key and the choices; a traceback adds nothing
        print(f"config error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(CONFIG_ERROR_EXIT) from None
    say(OmegaConf.to_yaml(run.module.hparams["cfg"]))
    say(f"run folder: {run.run_dir}  (checkpoints/, samples/, logs; resume with run_name={cfg.run_name} "
        "ckpt_path=last)")
    if run.ckpt_path:
        say(f"resuming from {run.ckpt_path}")
    trainer = run.trainer
    trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=run.ckpt_path)
    if isinstance(run.logger, L.pytorch.loggers.WandbLogger) and trainer.is_global_zero:
        run.logger.experiment.finish()  # the next job of a multirun starts its own W&B run
    grids = [c.last_path for c in run.callbacks if getattr(c, "last_path", None)]
    say(f"done at step {trainer.global_step}: run folder {run.run_dir}"
        + (f"\nsample grid: {os.path.abspath(grids[-1])}" if grids else ""))
    val = trainer.callback_metrics.get("val/loss")
    return float(val) if val is not None else None


if __name__ == "__main__":
    main()
