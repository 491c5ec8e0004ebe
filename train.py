"""Train one objective on one backbone: `python train.py [group=option ...] [key=value ...]` (docs/WORKFLOW.md)."""

from __future__ import annotations

import glob
import hashlib
import netrc
import os
import signal
import socket
import sys
from urllib.parse import urlparse

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

# torch/lightning are imported inside the functions that need them, so a config error fails in a second.
PRECISIONS = ("32", "32-true", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64", "64-true")
REQUEUE_SIGNAL = signal.SIGUSR2  # submitit's pre-timeout signal; plain sbatch: #SBATCH --signal=USR2@120


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


def build_objective(cfg: DictConfig):
    """Instantiates the objective, turning constructor errors into a message naming the config group."""
    choice = HydraConfig.get().runtime.choices.get("objective", "?")
    try:
        return instantiate(cfg.objective)
    except Exception as e:  # hydra wraps the constructor's ValueError; show its own message
        cause = e.__cause__ or e
        raise ConfigError(f"invalid objective config (objective={choice}): {cause}") from e


def validate(cfg: DictConfig, objective) -> None:
    """Checks enumerated and derived keys before anything heavy starts."""
    precision = str(cfg.trainer.precision)
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r}; choose one of {PRECISIONS}")
    samplers = tuple(objective.samplers)
    if objective.default_sampler not in samplers:
        raise ConfigError(f"objective.sampler={objective.default_sampler!r}; choose one of {samplers}")
    for name, cb in (cfg.get("callbacks") or {}).items():
        sampler = cb.get("sampler") if cb is not None else None
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


def resolve_ckpt_path(ckpt_path: str | None, run_dir: str) -> str | None:
    """'last' -> the newest of <run_dir>/checkpoints/last*.ckpt and SLURM's hpc_ckpt_*.ckpt, else None."""
    if ckpt_path is None and int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:
        say("requeued SLURM job: resuming from this run's last checkpoint")
        ckpt_path = "last"
    if ckpt_path != "last":
        return ckpt_path
    found = glob.glob(os.path.join(run_dir, "checkpoints", "last*.ckpt")) + \
        glob.glob(os.path.join(run_dir, "hpc_ckpt_*.ckpt"))
    if not found:
        say(f"ckpt_path=last: no checkpoint under {run_dir} yet; starting from scratch")
        return None
    return max(found, key=os.path.getmtime)


def wandb_offline_reason() -> str | None:
    """Why W&B cannot log online (no key, no network), or None when it can."""
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    host = urlparse(base).hostname or "api.wandb.ai"
    if not os.environ.get("WANDB_API_KEY"):
        try:
            has_key = netrc.netrc().authenticators(host) is not None
        except (OSError, netrc.NetrcParseError):
            has_key = False
        if not has_key:
            return "no W&B API key (set WANDB_API_KEY or run `wandb login`)"
    try:
        socket.create_connection((host, urlparse(base).port or 443), timeout=3).close()
    except OSError as e:
        return f"cannot reach {host} ({e.__class__.__name__})"
    return None


def build_logger(cfg: DictConfig, run_dir: str):
    """The configured logger; W&B falls back to offline mode (and says so) without a key or network."""
    if not cfg.get("logger") or "_target_" not in cfg.logger:
        return False
    if not cfg.logger._target_.endswith("WandbLogger"):
        return instantiate(cfg.logger)
    extra = {}
    if cfg.logger.get("id") is None:  # the same run folder continues the same W&B run
        extra = {"id": "run-" + hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:12],
                 "resume": "allow"}
    group = cfg.logger.get("group")
    if group and len(group) > 128:  # W&B's limit; long override lists get a stable hash suffix
        extra["group"] = group[:115] + "-" + hashlib.sha1(group.encode()).hexdigest()[:12]
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        say(f"W&B: WANDB_MODE={mode}")
    elif not cfg.logger.get("offline"):
        reason = wandb_offline_reason() if global_rank() == 0 else None
        if reason:
            say(f"W&B: {reason} -> logging OFFLINE to {run_dir}/wandb; upload later with "
                f"`wandb sync {run_dir}/wandb/offline-run-*`")
            extra["offline"] = True
    logger = instantiate(cfg.logger, **extra)
    if global_rank() != 0 or mode == "disabled":
        return logger
    try:
        _ = logger.experiment  # starts the W&B run now, so a failure cannot stop training later
    except Exception as e:  # e.g. a rejected key or a server error
        say(f"W&B could not start ({e.__class__.__name__}: {e}) -> logging OFFLINE to {run_dir}/wandb")
        logger = instantiate(cfg.logger, **{**extra, "offline": True})
        _ = logger.experiment
    return logger


def slurm_plugins() -> list:
    """Under SLURM: Lightning saves an hpc checkpoint and requeues the job on REQUEUE_SIGNAL."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return []
    signal.signal(REQUEUE_SIGNAL, signal.SIG_DFL)  # let Lightning's handler replace submitit's own
    return [SLURMEnvironment(auto_requeue=True, requeue_signal=REQUEUE_SIGNAL)]


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Builds data, network, objective, module and trainer from `cfg`, then fits (or resumes)."""
    import lightning as L
    import torch

    from backbones.checkpoint import build_network
    from gen_objectives.module import GenerativeModule

    run_dir = os.path.abspath(cfg.run_dir)
    try:
        objective = build_objective(cfg)
        validate(cfg, objective)
    except ConfigError as e:  # the message names the key and the choices; a traceback adds nothing
        print(f"config error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if cfg.global_batch_size is not None:
        with open_dict(cfg):
            cfg.data.batch_size = cfg.global_batch_size // (cfg.trainer.devices * cfg.trainer.num_nodes)
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    say(OmegaConf.to_yaml(plain_cfg))
    say(f"run folder: {run_dir}  (checkpoints/, samples/, logs; resume with run_name={cfg.run_name} ckpt_path=last)")

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    L.seed_everything(cfg.seed, workers=True)  # same init on every rank; per-rank streams in the module
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
        torch.backends.cudnn.allow_tf32 = True

    datamodule = instantiate(cfg.data)
    net = build_network(cfg.model, from_file=False)  # loads model.init_from before the EMA copy
    sample_shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    module = GenerativeModule(net, objective, **OmegaConf.to_container(cfg.module, resolve=True),
                              sample_shape=sample_shape, seed=cfg.seed, compile=cfg.compile, cfg=plain_cfg)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if cfg.trainer.get("enable_progress_bar") is False:
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.ProgressBar)]
    logger = build_logger(cfg, run_dir)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, plugins=slurm_plugins())
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir)
    if ckpt_path:
        say(f"resuming from {ckpt_path}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if isinstance(logger, L.pytorch.loggers.WandbLogger) and trainer.is_global_zero:
        logger.experiment.finish()  # the next job of a multirun starts its own W&B run
    grids = [c.last_path for c in callbacks if getattr(c, "last_path", None)]
    say(f"done at step {trainer.global_step}: run folder {run_dir}"
        + (f"\nsample grid: {os.path.abspath(grids[-1])}" if grids else ""))
    val = trainer.callback_metrics.get("val/loss")
    return float(val) if val is not None else None


if __name__ == "__main__":
    main()
