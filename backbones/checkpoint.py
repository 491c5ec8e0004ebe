"""Load official DiT / SiT weight files into our DiT, safely (no arbitrary unpickling) and strictly."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

# entries tried in this order in a training checkpoint: EMA weights are the ones DiT/SiT sample with
STATE_DICT_ENTRIES = ("ema", "model", "state_dict")
# wrappers that prefix keys: DistributedDataParallel and torch.compile
KEY_PREFIXES = ("module.", "_orig_mod.")


def _read(path: Path) -> Mapping:
    """Tensors only: safetensors, or torch.load(weights_only=True) that also admits argparse.Namespace.

    Official DiT/SiT training checkpoints store their `args` as an argparse.Namespace, a plain attribute bag,
    which weights_only refuses unless it is allowed explicitly.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict or a dict of them, got {type(obj).__name__}")
    return obj


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in KEY_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def select_state_dict(obj: Mapping) -> tuple[dict[str, torch.Tensor], str]:
    """Pick the weights out of a loaded file: (state dict with wrapper prefixes removed, which entry it was)."""
    if _is_state_dict(obj):
        return _strip_prefixes(obj), "plain state dict"
    for entry in STATE_DICT_ENTRIES:
        if entry in obj and _is_state_dict(obj[entry]):
            return _strip_prefixes(obj[entry]), f"'{entry}' entry"
    raise ValueError(
        f"no weights found: expected a plain state dict or one of the entries {list(STATE_DICT_ENTRIES)}, "
        f"got top-level keys {sorted(map(str, obj))[:20]}"
    )


def load_dit_checkpoint(model: nn.Module, path: str | Path) -> str:
    """Load an official DiT or SiT file (plain, or with ema/model/state_dict) with strict=True; return what it did."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DiT checkpoint not found: {path}")
    state, entry = select_state_dict(_read(path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RuntimeError(f"{path} ({entry}) does not match the model strictly:\n{err}") from err
    message = f"loaded DiT weights from {path}: {entry}, {len(state)} tensors"
    log.info(message)
    return message
