"""Config checks that name the key and the allowed values: one `config error: ...` line, exit code 2.

`preflight(argv)` runs before Hydra's own start and before torch is imported: it composes the config of every
job (Hydra's composition errors get the same one-line format), checks values, and checks that this machine has
what the run needs (GPUs, the latent cache), naming what is missing and the next command to run.
"""

from __future__ import annotations

import os
import sys

from omegaconf import DictConfig, OmegaConf

CONFIG_ERROR_EXIT = 2
PRECISIONS = ("auto", "32", "32-true", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64", "64-true")
GPU_ACCELERATORS = ("gpu", "cuda")
ACCELERATORS = ("gpu", "cuda", "cpu", "mps", "auto")


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


def validate(cfg: DictConfig) -> None:
    """Checks enumerated and derived keys without torch (milliseconds)."""
    precision = str(cfg.trainer.precision)
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r}; choose one of {', '.join(PRECISIONS)}")
    accelerator = str(cfg.trainer.accelerator)
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator={accelerator!r}; choose one of {', '.join(ACCELERATORS)}")
    ckpt = cfg.ckpt_path
    if ckpt not in (None, "last") and not os.path.isfile(str(ckpt)):
        raise ConfigError(f"ckpt_path={ckpt!r}: no such file (use null, 'last' or a .ckpt path; quote a path "
                          "with '=': \"ckpt_path='.../step=0010000.ckpt'\")")
    devices, nodes = cfg.trainer.devices, cfg.trainer.num_nodes
    if cfg.global_batch_size is not None:
        if not isinstance(devices, int) or devices < 1:
            raise ConfigError(f"global_batch_size needs an integer trainer.devices, got {devices!r}")
        world = devices * nodes
        if cfg.global_batch_size % world:
            raise ConfigError(f"global_batch_size={cfg.global_batch_size} is not divisible by "
                              f"trainer.devices*trainer.num_nodes={world}")
    for key in ("last_ckpt_every_n_steps", "preempt_check_every_n_steps"):
        if not isinstance(cfg.get(key), int) or cfg.get(key) < (0 if key.startswith("last") else 1):
            raise ConfigError(f"{key}={cfg.get(key)!r} must be an integer >= {0 if key.startswith('last') else 1}")


def check_resolves(cfg: DictConfig) -> None:
    """Every ${...} resolves (a callback option may need keys another data option lacks)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from None


def check_machine(cfg: DictConfig) -> None:
    """Fails at once when this machine lacks what the run needs: GPUs, the latent cache, the data folder."""
    from workflow.hardware import visible_gpu_count

    accelerator, devices = str(cfg.trainer.accelerator), cfg.trainer.devices
    gpus = visible_gpu_count()
    launched = any(k in os.environ for k in ("LOCAL_RANK", "SLURM_PROCID"))  # one process per GPU, maybe 1 visible
    wanted = 1 if launched or not isinstance(devices, int) else devices
    if accelerator in GPU_ACCELERATORS and gpus is not None and gpus < wanted:
        raise ConfigError(
            f"trainer.accelerator={accelerator} trainer.devices={devices}: this machine has {gpus} NVIDIA GPU(s). "
            "Next: `make demo` (the digits demo on CPU), or add trainer.accelerator=cpu to run this config on the "
            "CPU (one process per trainer.devices)")
    if accelerator == "auto" and gpus == 0 and isinstance(devices, int) and devices > 1:
        raise ConfigError(
            f"trainer.accelerator=auto trainer.devices={devices} on a machine without GPUs would start {devices} CPU "
            "processes; say trainer.accelerator=cpu if you mean that, or trainer.devices=1")
    data = cfg.data
    cache_dir = data.get("cache_dir")
    if cache_dir is not None and not os.path.isfile(os.path.join(str(cache_dir), "metadata.json")):
        root = data.get("root")
        where = (f"data.root={root} does not exist" if root and not os.path.isdir(str(root)) else
                 f"data.root={root}" if root else "set data.root to the ImageNet folder holding train/<wnid>/*.JPEG")
        raise ConfigError(
            f"data.cache_dir={cache_dir}: no latent cache there (no metadata.json); {where}. Next: "
            f"`make latents ARGS=\"data.root=<ImageNet folder> data.cache_dir={cache_dir}\"` to build it, or "
            "`make demo` for the digits demo that needs no data")


def validate_built(cfg: DictConfig, objective) -> None:
    """Checks the keys whose choices the built objective knows (its samplers)."""
    samplers = tuple(objective.samplers)
    if objective.default_sampler not in samplers:
        raise ConfigError(f"objective.sampler={objective.default_sampler!r}; choose one of {samplers}")
    for name, cb in (cfg.get("callbacks") or {}).items():
        sampler = cb.get("sampler") if isinstance(cb, DictConfig) else None
        if sampler is not None and sampler not in samplers:
            raise ConfigError(f"callbacks.{name}.sampler={sampler!r}; choose one of {samplers}")


def composition_error(error: Exception, overrides: list[str], config_dir: str) -> str:
    """Hydra's multi-line composition error as one line naming the key and the choices."""
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(error)
    if isinstance(error, MissingConfigException) and error.options:
        group = os.path.dirname(error.missing_cfg_file or "") or "?"
        name = os.path.basename(error.missing_cfg_file or "?")
        return f"{group}={name} is not an option of {group}; choose one of {', '.join(sorted(error.options))}"
    if isinstance(error, OverrideParseException):
        return f"cannot parse the override: {text.splitlines()[0]}"
    if "Could not override '" in text or "Could not append to config. An item is already at '" in text:
        key = text.split("'")[1]
        parent, _, leaf = key.rpartition(".")
        others = [o for o in overrides if key not in o]
        keys = _keys_without(parent, others, config_dir)
        if keys is not None:
            if not parent:
                return f"{key} is not a config key (add a new one with +{key}=...); the keys: {', '.join(keys)}"
            choice = _group_choice(parent, others, config_dir)
            owner = f"{parent}={choice}" if choice else parent
            return f"{key} is not a key of {owner}; its keys: {', '.join(k for k in keys if k != '_target_')}"
    return " ".join(line.strip() for line in text.splitlines()[:2] if line.strip())


def _compose(overrides: list[str], config_dir: str, hydra: bool = False) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra)


def _keys_without(parent: str, overrides: list[str], config_dir: str) -> list[str] | None:
    try:
        node = OmegaConf.select(_compose(overrides, config_dir), parent) if parent else _compose(overrides, config_dir)
    except Exception:
        return None
    return sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else None


def _group_choice(group: str, overrides: list[str], config_dir: str) -> str | None:
    """The option chosen for a config group (`flow` for objective), None when `group` is not a group."""
    try:
        return _compose(overrides, config_dir, hydra=True).hydra.runtime.choices.get(group)
    except Exception:
        return None


def job_overrides(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override list of every job (a single run: one)."""
    if not multirun:
        return [overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def fail(message: str) -> None:
    """Prints the one-line config error and exits with CONFIG_ERROR_EXIT."""
    print(f"config error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(CONFIG_ERROR_EXIT)


def preflight(argv: list[str], config_dir: str) -> None:
    """Before Hydra starts (and before torch): every job's config composes; a single run's values and this
    machine are checked. A sweep's jobs check their values themselves, so one bad job fails alone."""
    from hydra._internal.utils import get_args_parser
    from hydra.errors import HydraException

    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:
        return  # argparse's usage error: Hydra prints it
    if args.help or args.hydra_help or args.info or args.shell_completion or args.config_name or args.config_path:
        return
    for overrides in job_overrides(args.overrides, args.multirun):
        try:
            cfg = _compose(overrides, config_dir, hydra=True)
        except (HydraException, ValueError) as e:  # composition and override-grammar errors
            fail(composition_error(e, overrides, config_dir))
        if args.multirun or args.cfg:
            continue
        try:
            validate(cfg)
            check_machine(cfg)
        except ConfigError as e:
            fail(str(e))
        except Exception as e:  # e.g. an interpolation that does not resolve
            fail(f"{e.__class__.__name__}: {str(e).splitlines()[0]}")
