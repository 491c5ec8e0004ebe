"""The one place that turns `ckpt` into what evaluation samples with: (network, objective, fingerprint, step).

Published DiT/SiT/diffusers weights plug in here (issue #14); today it reads the project's own Lightning
checkpoints, validated first so that anything else fails with one line, then rebuilt with
`GenerativeModule.from_checkpoint`. The fingerprint hashes the weights that sample (the EMA copy), so an
overwritten last.ckpt is never mistaken for the one whose samples are on disk.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


class NotACheckpointError(ValueError):
    """The file is not a checkpoint evaluate.py can read; the message is one line naming the file."""


@dataclass
class EvalModel:
    network: nn.Module      # the weights samples come from (the EMA copy), eval mode, on the CPU
    objective: nn.Module    # its objective (sample(), default sampler and steps)
    fingerprint: str        # 16 hex digits of sha256 over the network's tensors (names, dtypes, shapes, bytes)
    step: int | None        # training step of the weights (None when the file does not say)
    run_cfg: dict | None    # the training config stored in the file (data settings, for decode/reference)


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's tensors in key order: equal iff the weights are bit-identical."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _check_project_checkpoint(path: Path) -> dict:
    """The checkpoint's dict, or a one-line NotACheckpointError saying what it is instead."""
    hint = ("evaluate.py takes checkpoints written by train.py (outputs/<name>/<objective>/<run>/checkpoints/"
            "*.ckpt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # random bytes, a truncated file, a pickle with code in it
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise NotACheckpointError(f"ckpt={path} is not a checkpoint written by train.py: torch.load cannot read it "
                                  f"({type(err).__name__}: {reason}); {hint}") from None
    if not isinstance(ckpt, dict):
        raise NotACheckpointError(f"ckpt={path} is not a checkpoint written by train.py (it holds a "
                                  f"{type(ckpt).__name__}); {hint}")
    missing = [k for k in ("state_dict", "hyper_parameters", "ema") if k not in ckpt]
    if missing:
        what = "a plain state dict" if all(isinstance(v, torch.Tensor) for v in ckpt.values()) else "a dict"
        raise NotACheckpointError(f"ckpt={path} is not a checkpoint written by train.py: it is {what} without "
                                  f"{', '.join(repr(k) for k in missing)}; {hint}")
    cfg = (ckpt["hyper_parameters"] or {}).get("cfg")
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("model", "objective", "data")):
        raise NotACheckpointError(f"ckpt={path} is not a checkpoint written by train.py: hyper_parameters['cfg'] "
                                  f"lacks the model/objective/data config; {hint}")
    return ckpt


def load_eval_model(path: str | Path, map_location: str | torch.device = "cpu", *, weights_cfg=None) -> EvalModel:
    """ckpt path -> EvalModel. A project checkpoint rebuilds from its own stored config; any other weights (official
    DiT/SiT/REPA .pt, .safetensors, a diffusers folder) load into the network `weights_cfg.model` describes, when
    `weights_cfg` (model, objective, data, entry: evaluate.py's composed config) is given. Fails with one line for a
    missing path or a file that is neither."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ckpt={str(path)!r} is not a file; usage: make eval CKPT=path/to/last.ckpt "
                                "(or python evaluate.py ckpt=path/to/last.ckpt)")
    from backbones.checkpoint import is_project_checkpoint

    if weights_cfg is not None and (path.is_dir() or not _readable_project_checkpoint(path, is_project_checkpoint)):
        return load_weights_model(path, weights_cfg)
    if path.is_dir():
        raise NotACheckpointError(f"ckpt={path} is a folder, not a checkpoint written by train.py")
    ckpt = _check_project_checkpoint(path)
    from gen_objectives.module import GenerativeModule

    module = GenerativeModule.from_checkpoint(str(path), map_location=map_location)
    network = module.ema.net.eval()
    step = ckpt.get("global_step")
    return EvalModel(network=network, objective=module.objective, fingerprint=weights_fingerprint(network.state_dict()),
                     step=int(step) if step is not None else None, run_cfg=module.hparams["cfg"])


def _readable_project_checkpoint(path: Path, is_project_checkpoint) -> bool:
    """is_project_checkpoint, with an unreadable file counted as 'not one' (the weights loader then names it)."""
    try:
        return is_project_checkpoint(path)
    except Exception:  # a corrupt zip, a pickle weights_only refuses
        return False


def load_weights_model(path: Path, weights_cfg) -> EvalModel:
    """Published weights in the network of weights_cfg.model, sampled with weights_cfg.objective; step unknown."""
    import pickle

    from omegaconf import OmegaConf

    from backbones.checkpoint import is_diffusers_layout, load_network, read_weights, select_state_dict
    from workflow.config_guard import instantiate_trusted

    entry = str(weights_cfg.get("entry", "auto"))
    try:  # look before building: a large network takes seconds and GBs
        obj, _ = read_weights(path)
        state, _ = select_state_dict(obj, entry)
    except (ValueError, pickle.UnpicklingError, FileNotFoundError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise NotACheckpointError(f"ckpt={path} is not a checkpoint written by train.py, nor weights this project "
                                  f"loads ({reason})") from None
    if "x_embedder.proj.weight" not in state and not is_diffusers_layout(state):
        raise NotACheckpointError(f"ckpt={path} is not a checkpoint written by train.py, nor DiT/SiT/diffusers weights "
                                  f"(no x_embedder / pos_embed keys among {len(state)} tensors)")
    del obj, state
    network = load_network(path, weights_cfg.model, entry=entry).eval()
    objective = instantiate_trusted(weights_cfg.objective, "objective")
    data_cfg = OmegaConf.to_container(weights_cfg.data, resolve=True)
    return EvalModel(network=network, objective=objective, fingerprint=weights_fingerprint(network.state_dict()),
                     step=None, run_cfg={"data": data_cfg, "model": OmegaConf.to_container(weights_cfg.model,
                                                                                            resolve=True)})
