"""Train one objective on one backbone: `python train.py [group=option ...] [key=value ...]` (docs/WORKFLOW.md)."""

from __future__ import annotations

import os
import sys
import time
import traceback
from datetime import datetime

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from workflow.build import build_objective
from workflow.config import (
    CONFIG_ERROR_EXIT,
    ConfigError,
    check_machine,
    check_resolves,
    preflight,
    say,
    validate,
    validate_built,
)
from workflow.logs import one_line_per_message, register_resolvers
from workflow.sweep import FAILED_JOBS, swept_dirname, swept_keys, write_job_record

# torch/lightning are imported inside the functions that need them, so a config error fails in a second.
CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")
register_resolvers()
OmegaConf.register_new_resolver("swept", swept_dirname, replace=True)


class Preempted(SystemExit):
    """Training stopped on a signal after saving last.ckpt; the process exits with PREEMPTED_EXIT_CODE."""


def fit(cfg: DictConfig) -> dict:
    """Builds everything with workflow.build.build_run, fits (or resumes); returns the final metrics."""
    import lightning as L
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from workflow.build import build_run, last_ckpt_path
    from workflow.preemption import PREEMPTED_EXIT_CODE, Preemption

    one_line_per_message()
    run = build_run(cfg)
    say(OmegaConf.to_yaml(run.module.hparams["cfg"]))
    say(f"run folder: {run.run_dir}  (checkpoints/, samples/, logs; resume with run_name={cfg.run_name} "
        "ckpt_path=last)")
    if run.precision_note:
        say(run.precision_note)
    if run.ckpt_path:
        say(f"resuming from {run.ckpt_path}")
    trainer = run.trainer
    wandb_run = run.logger.experiment if isinstance(run.logger, L.pytorch.loggers.WandbLogger) and \
        trainer.is_global_zero and os.environ.get("WANDB_MODE", "").lower() != "disabled" else None
    try:
        trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=run.ckpt_path)
    except SIGTERMException:  # a stop signal: LastCheckpoint saved last.ckpt at an agreed step boundary
        preemption = next(c for c in run.callbacks if isinstance(c, Preemption))
        say(f"pre-empted by {preemption.signal_name()} at step {trainer.global_step}: saved "
            f"{last_ckpt_path(run.run_dir)}; exit code {PREEMPTED_EXIT_CODE}; resume with the same command and "
            f"run_name={cfg.run_name} ckpt_path=last")
        if wandb_run is not None:
            wandb_run.mark_preempting()  # the dashboard shows it pre-empted; the resumed job continues this run
            wandb_run.finish(exit_code=PREEMPTED_EXIT_CODE)
        preemption.run_deferred()  # submitit's requeue (hydra/launcher=slurm), after the checkpoint
        raise Preempted(PREEMPTED_EXIT_CODE) from None
    except BaseException:
        if wandb_run is not None:
            wandb_run.finish(exit_code=1)  # marked failed in the dashboard
        raise
    if wandb_run is not None:
        wandb_run.finish()  # the next job of a multirun starts its own W&B run
    grids = [c.last_path for c in run.callbacks if getattr(c, "last_path", None)]
    say(f"done at step {trainer.global_step}: run folder {run.run_dir}"
        + (f"\nsample grid: {os.path.abspath(grids[-1])}" if grids else ""))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
               if k in ("train/loss", "val/loss") or k.startswith("fid/")}
    for callback in run.callbacks:  # FIDCallback keeps its last evaluation in `last_metrics` (sent to the loggers)
        for key, value in (getattr(callback, "last_metrics", None) or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                metrics[f"fid/{key}"] = float(value)
    return {"step": trainer.global_step, "metrics": metrics}


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """One run; in a sweep (-m) one job, whose failure is recorded in job.json and does not stop the others."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    record = {"job": os.path.basename(os.path.abspath(cfg.run_dir)), "status": "completed",
              "overrides": " ".join(HydraConfig.get().overrides.task), "run_dir": os.path.abspath(cfg.run_dir)}
    start = time.time()
    try:
        validate(cfg)  # before torch is imported: milliseconds
        check_resolves(cfg)
        check_machine(cfg)
        validate_built(cfg, build_objective(cfg))  # imports torch, not lightning: seconds
        record.update(fit(cfg))
    except ConfigError as e:  # the message names the key and the choices; a traceback adds nothing
        print(f"config error: {e}", file=sys.stderr, flush=True)
        record.update(status="config error", error=str(e))
        if not multirun:
            raise SystemExit(CONFIG_ERROR_EXIT) from None
    except Preempted:
        record["status"] = "pre-empted"
        raise  # a signal stops the whole sweep
    except Exception as e:
        if not multirun:
            raise
        traceback.print_exc()
        record.update(status="failed", error=f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    finally:
        if multirun:
            write_job_record(cfg.run_dir, {**record, "seconds": round(time.time() - start, 1)})
    val = record.get("metrics", {}).get("val/loss")
    return float(val) if val is not None else None


def pinned_argv(argv: list[str]) -> list[str]:
    """The command line plus what must be fixed once at launch: run_name (a timestamp when not given, so
    requeued SLURM jobs and DDP ranks find the same folder) and, for a sweep, the swept keys (folder names)."""
    args = list(argv)
    is_override = [not a.startswith("-") and ("=" in a or a.startswith("~")) for a in args]  # not flags' values
    overrides = [a for a, o in zip(args, is_override) if o]
    pinned = []
    if not any(o.split("=", 1)[0].lstrip("+") == "run_name" for o in overrides):
        pinned.append(f"run_name={datetime.now():%Y-%m-%d_%H-%M-%S}")
    if ("-m" in args or "--multirun" in args) and not any(o.startswith("sweep_keys=") for o in overrides):
        try:
            keys = swept_keys(overrides)
        except Exception:
            keys = []  # a malformed override: preflight reports it
        pinned.append(f"sweep_keys=[{','.join(keys)}]")
    # right after the last override: argparse takes the overrides as one group (`<overrides> --cfg job` works)
    at = max((i + 1 for i, o in enumerate(is_override) if o), default=len(args))
    return args[:at] + pinned + args[at:]


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *pinned_argv(sys.argv[1:])]
    preflight(sys.argv[1:], CONF)
    main()
    if FAILED_JOBS:
        raise SystemExit(1)
