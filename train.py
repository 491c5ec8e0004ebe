"""Train one objective on one backbone: `python train.py [group=option ...] [key=value ...]` (docs/WORKFLOW.md)."""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from workflow.config import CONFIG_ERROR_EXIT, ConfigError, say
from workflow.logs import one_line_per_message, register_resolvers

# torch/lightning are imported inside the functions that need them, so a config error fails in a second.
register_resolvers()


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Builds everything with workflow.build.build_run, then fits (or resumes)."""
    import lightning as L
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from workflow.build import build_run, last_ckpt_path
    from workflow.preemption import PREEMPTED_EXIT_CODE, Preemption

    one_line_per_message()
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
    try:
        trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=run.ckpt_path)
    except SIGTERMException:  # a stop signal: LastCheckpoint saved last.ckpt at an agreed step boundary
        preemption = next(c for c in run.callbacks if isinstance(c, Preemption))
        say(f"pre-empted by {preemption.signal_name()} at step {trainer.global_step}: saved "
            f"{last_ckpt_path(run.run_dir)}; exit code {PREEMPTED_EXIT_CODE}; resume with the same command and "
            f"run_name={cfg.run_name} ckpt_path=last")
        preemption.run_deferred()  # submitit's requeue (hydra/launcher=slurm), after the checkpoint
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    if isinstance(run.logger, L.pytorch.loggers.WandbLogger) and trainer.is_global_zero:
        run.logger.experiment.finish()  # the next job of a multirun starts its own W&B run
    grids = [c.last_path for c in run.callbacks if getattr(c, "last_path", None)]
    say(f"done at step {trainer.global_step}: run folder {run.run_dir}"
        + (f"\nsample grid: {os.path.abspath(grids[-1])}" if grids else ""))
    val = trainer.callback_metrics.get("val/loss")
    return float(val) if val is not None else None


if __name__ == "__main__":
    main()
