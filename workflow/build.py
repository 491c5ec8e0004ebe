"""build_run(cfg): every object train.py trains with, built from one composed config (benchmarks reuse it)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from workflow.config import GPU_ACCELERATORS, ConfigError, objective_choice, say, validate_built
from workflow.hardware import resolve_precision


@dataclass
class Run:
    """What `trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)` needs, plus its parts."""

    datamodule: Any
    net: Any
    objective: Any
    module: Any
    callbacks: list
    logger: Any
    trainer: Any
    ckpt_path: str | None = None
    run_dir: str = ""
    precision_note: str | None = None  # what trainer.precision=auto chose, and why


def build_objective(cfg: DictConfig):
    """Instantiates the objective, turning constructor errors into a ConfigError naming the config group."""
    from hydra.utils import instantiate

    try:
        return instantiate(cfg.objective)
    except Exception as e:  # hydra wraps the constructor's ValueError; show its own message
        cause = e.__cause__ or e
        raise ConfigError(f"invalid objective config (objective={objective_choice(cfg)}): {cause}") from e


def last_ckpt_path(run_dir: str) -> str:
    """The one resume point of a run folder (written only by callbacks.last_checkpoint.LastCheckpoint)."""
    return os.path.join(run_dir, "checkpoints", "last.ckpt")


def resolve_ckpt_path(ckpt_path: str | None, run_dir: str) -> str | None:
    """'last' -> <run_dir>/checkpoints/last.ckpt, or None (a fresh start, said) when there is none yet.

    A requeued SLURM job (SLURM_RESTART_COUNT > 0) resumes from it without being told.
    """
    if ckpt_path is None and int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:
        say("requeued SLURM job: resuming from this run's last checkpoint")
        ckpt_path = "last"
    if ckpt_path != "last":
        return ckpt_path
    path = last_ckpt_path(run_dir)
    if not os.path.isfile(path):
        say(f"ckpt_path=last: no checkpoint under {run_dir} yet; starting from scratch")
        return None
    return path


def build_run(cfg: DictConfig) -> Run:
    """Builds data, network, objective, module, callbacks, logger and trainer from a composed train config.

    Raises ConfigError (one line naming the key and the choices) for invalid values. `cfg.data.batch_size` is
    set from `global_batch_size` when that is given.
    """
    import lightning as L
    import torch
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from backbones.checkpoint import build_network
    from callbacks.last_checkpoint import LastCheckpoint
    from gen_objectives.module import GenerativeModule
    from workflow.checkpoint_io import StreamingCheckpointIO
    from workflow.loggers import build_logger
    from workflow.preemption import Preemption
    from workflow.slurm import slurm_plugins

    run_dir = os.path.abspath(cfg.run_dir)
    objective = build_objective(cfg)
    validate_built(cfg, objective)
    accelerator = str(cfg.trainer.accelerator)
    on_gpu = accelerator in GPU_ACCELERATORS or (accelerator == "auto" and torch.cuda.is_available())
    precision = resolve_precision(str(cfg.trainer.precision), on_gpu,
                                  gpu_has_bf16=not torch.cuda.is_available() or torch.cuda.is_bf16_supported())
    with open_dict(cfg):
        cfg.trainer.precision = precision.value
        if cfg.global_batch_size is not None:
            cfg.data.batch_size = cfg.global_batch_size // (cfg.trainer.devices * cfg.trainer.num_nodes)
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # same init on every rank; per-rank streams in the module
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
        torch.backends.cudnn.allow_tf32 = True

    datamodule = instantiate(cfg.data, shuffle_seed=cfg.seed)  # the same data order whatever the objective
    net = build_network(cfg.model, from_file=False)  # loads model.init_from before the EMA copy
    sample_shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    module = GenerativeModule(net, objective, **OmegaConf.to_container(cfg.module, resolve=True),
                              sample_shape=sample_shape, seed=cfg.seed, compile=cfg.compile, cfg=plain_cfg)
    # Always on, first (their end-of-fit work precedes sample grids and FID): last.ckpt and pre-emption.
    callbacks = [LastCheckpoint(os.path.dirname(last_ckpt_path(run_dir)), cfg.last_ckpt_every_n_steps),
                 Preemption(cfg.preempt_check_every_n_steps)]
    for name, c in (cfg.get("callbacks") or {}).items():
        if c is None:
            continue
        if "_target_" not in c:  # e.g. an experiment's settings for a callback another option left out
            say(f"callbacks.{name} has no _target_ (not part of the selected callbacks option): skipped")
            continue
        try:
            callbacks.append(instantiate(c))
        except InstantiationException as e:  # e.g. FID's Inception weights missing on an offline node
            cause = " ".join(line.strip() for line in str(e.__cause__ or e).splitlines() if line.strip())
            raise ConfigError(f"callbacks.{name} ({c._target_}): {cause}") from e
    if cfg.trainer.get("enable_progress_bar") is False:
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.ProgressBar)]
    logger = build_logger(cfg, run_dir)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger,
                          plugins=[*slurm_plugins(), StreamingCheckpointIO()])
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir)
    note = None if precision.reason == "as configured" else \
        f"trainer.precision=auto -> {precision.value} ({precision.reason})"
    return Run(datamodule=datamodule, net=net, objective=objective, module=module, callbacks=callbacks,
               logger=logger, trainer=trainer, ckpt_path=ckpt_path, run_dir=run_dir, precision_note=note)
