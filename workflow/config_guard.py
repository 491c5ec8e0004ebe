"""Build objects from configs read from files (checkpoints, settings) without letting the file choose the code.

A Hydra config stored in a checkpoint is data an attacker can write. `hydra.utils.instantiate` would call any
importable callable it names (`shutil.copyfile`, or `gen_objectives.module.torch.save` reached by attribute access
through an allowed-looking prefix), so configs read from files are checked against an exact allowlist of the
project's own classes, recursively and before anything is constructed, and then built here without Hydra (no
`_args_`, `_partial_`, interpolation or resolver ever runs). Adding a class of your own: add its full name below.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

# Fully qualified names, compared as whole strings: a module prefix would admit `backbones.dit.torch.save`.
TRUSTED_TARGETS = frozenset({
    "backbones.dit.DiT",
    "gen_objectives.objectives.diffusion.DiffusionObjective",
    "gen_objectives.objectives.score.ScoreObjective",
    "gen_objectives.objectives.flow.FlowObjective",
    "datamodules.digits.DigitsDataModule",
    "datamodules.latent_imagenet.LatentImageNetDataModule",
})


class UntrustedConfigError(ValueError):
    """A config read from a file names code outside TRUSTED_TARGETS (or a Hydra control key); nothing was built."""


def _is_control_key(key: Any) -> bool:
    return isinstance(key, str) and len(key) > 2 and key.startswith("_") and key.endswith("_")


def check_trusted(cfg: Any, where: str) -> None:
    """Raises UntrustedConfigError unless every `_target_` in `cfg` (nested anywhere) is in TRUSTED_TARGETS and no
    other Hydra control key (`_args_`, `_partial_`, `_convert_`, `_recursive_`, `_call_`, ...) appears."""
    if isinstance(cfg, Mapping):
        for key, value in cfg.items():
            path = f"{where}.{key}"
            if key == "_target_":
                if not isinstance(value, str) or value not in TRUSTED_TARGETS:
                    raise UntrustedConfigError(
                        f"{path}={value!r} is not one of the project's own classes "
                        f"({', '.join(sorted(TRUSTED_TARGETS))}); refusing to build a config that chooses its own code")
            elif _is_control_key(key):
                raise UntrustedConfigError(f"{path}: the key {key!r} is not allowed in a config read from a file "
                                           "(only _target_ and keyword arguments); nothing was built")
            else:
                check_trusted(value, path)
    elif isinstance(cfg, (list, tuple)):
        for i, value in enumerate(cfg):
            check_trusted(value, f"{where}[{i}]")


def _plain(cfg: Any) -> Any:
    """DictConfig/ListConfig -> dict/list (resolved); anything else unchanged."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _build(cfg: Any) -> Any:
    """Constructs checked configs: dicts with `_target_` become objects (children first), the rest stays data."""
    if isinstance(cfg, Mapping):
        kwargs = {k: _build(v) for k, v in cfg.items() if k != "_target_"}
        if "_target_" not in cfg:
            return kwargs
        module, _, name = cfg["_target_"].rpartition(".")
        return getattr(importlib.import_module(module), name)(**kwargs)
    if isinstance(cfg, (list, tuple)):
        return [_build(v) for v in cfg]
    return cfg


def instantiate_trusted(cfg: Any, where: str) -> Any:
    """The object a config read from a file describes, built only if `check_trusted` passes (`where` names it)."""
    cfg = _plain(cfg)
    check_trusted(cfg, where)
    return _build(cfg)
