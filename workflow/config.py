"""Config checks that name the key and the allowed values; one `config error: ...` line, exit code 2."""

from __future__ import annotations

import os

from omegaconf import DictConfig

CONFIG_ERROR_EXIT = 2
PRECISIONS = ("32", "32-true", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64", "64-true")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the allowed values."""


def global_rank() -> int:
    """This process's global rank from the launcher's environment (0 when not distributed)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def say(msg: str) -> None:
    """Prints once (global rank 0)."""
    if global_rank() == 0:
        print(msg, flush=True)


def objective_choice(cfg: DictConfig) -> str:
    """The objective group option (`flow`), from Hydra when it runs, else from the objective's class name."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return HydraConfig.get().runtime.choices.get("objective", "?")
    target = str(cfg.objective.get("_target_", "?"))
    return target.rsplit(".", 1)[-1].replace("Objective", "").lower()


def validate_built(cfg: DictConfig, objective) -> None:
    """Checks enumerated and derived keys before anything heavy starts (needs the built objective)."""
    precision = str(cfg.trainer.precision)
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r}; choose one of {PRECISIONS}")
    samplers = tuple(objective.samplers)
    if objective.default_sampler not in samplers:
        raise ConfigError(f"objective.sampler={objective.default_sampler!r}; choose one of {samplers}")
    for name, cb in (cfg.get("callbacks") or {}).items():
        sampler = cb.get("sampler") if isinstance(cb, DictConfig) else None
        if sampler is not None and sampler not in samplers:
            raise ConfigError(f"callbacks.{name}.sampler={sampler!r}; choose one of {samplers}")
    ckpt = cfg.ckpt_path
    if ckpt not in (None, "last") and not os.path.isfile(str(ckpt)):
        raise ConfigError(f"ckpt_path={ckpt!r}: no such file (use null, 'last' or a .ckpt path)")
    if cfg.global_batch_size is not None:
        devices, nodes = cfg.trainer.devices, cfg.trainer.num_nodes
        if not isinstance(devices, int) or devices < 1:
            raise ConfigError(f"global_batch_size needs an integer trainer.devices, got {devices!r}")
        world = devices * nodes
        if cfg.global_batch_size % world:
            raise ConfigError(f"global_batch_size={cfg.global_batch_size} is not divisible by "
                              f"trainer.devices*trainer.num_nodes={world}")
