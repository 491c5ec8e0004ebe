"""Load published weights into the project's DiT, safely (tensors only, no arbitrary unpickling) and strictly.

Sources: official DiT files (plain state dict), SiT / REPA training files (`ema`/`model`/`opt`/`args`), diffusers
DiTTransformer2DModel folders or safetensors (fp32 or the fp16 variant), and the project's own Lightning checkpoints
(`net.`-prefixed `state_dict`, and `ema`). The format is read from the content, never from the file name.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from backbones.conventions import apply_time_convention, check_time_convention
from backbones.diffusers_dit import diffusers_to_dit, is_diffusers_layout

log = logging.getLogger(__name__)

# entries of a training checkpoint, tried in this order by entry=auto: EMA weights are the ones DiT/SiT sample with
STATE_DICT_ENTRIES = ("ema", "model", "state_dict")
ENTRIES = ("auto", *STATE_DICT_ENTRIES)
# wrappers that prefix keys: DistributedDataParallel, torch.compile, GenerativeModule (and a time-convention wrapper)
KEY_PREFIXES = ("module.", "_orig_mod.", "net.")
# extra weights some published files carry next to the DiT, dropped by name and listed in the load message
IGNORED_EXTRAS = {"projectors.": "REPA's representation-alignment projectors (used only by its training loss)"}
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
PICKLE_PROTO = b"\x80"  # torch.save's legacy format starts with a pickle protocol >= 2 header
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"


# ---- reading files --------------------------------------------------------------------------------------------
def is_safetensors(path: Path) -> bool:
    """True for a safetensors file: an 8-byte little-endian header length, then a JSON header starting with '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def _torch_load(path: Path) -> Mapping:
    """torch.load(weights_only=True) that also admits argparse.Namespace (DiT/SiT/REPA store their `args` as one)."""
    try:  # a file object: torch.load would pick its own reader by the suffix of a path
        with torch.serialization.safe_globals([argparse.Namespace]), open(path, "rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise  # weights_only refused an object (its message names it): nothing was executed
    except Exception as err:
        raise ValueError(f"{path}: neither a torch checkpoint nor a safetensors file ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict or a dict of them, got {type(obj).__name__}")
    return obj


def _read_file(path: Path) -> Mapping:
    if is_safetensors(path):
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != ZIP_MAGIC and head[:1] != PICKLE_PROTO:
        raise ValueError(f"{path}: neither a torch checkpoint nor a safetensors file (starts with {head!r})")
    return _torch_load(path)


def diffusers_weight_files(folder: Path) -> list[Path]:
    """The weight file(s) of a diffusers model folder (a pipeline's transformer/ or the model folder itself).

    fp32 first, then the fp16 variant; a sharded checkpoint's index lists its shards.
    """
    root = folder / "transformer" if (folder / "transformer").is_dir() else folder
    for variant in ("", ".fp16"):
        single = root / f"{DIFFUSERS_WEIGHTS}{variant}.safetensors"
        if single.is_file():
            return [single]
        index = root / f"{DIFFUSERS_WEIGHTS}.safetensors.index{variant}.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [root / s for s in shards]
        binary = root / f"{DIFFUSERS_WEIGHTS}{variant}.bin"
        if binary.is_file():
            return [binary]
    raise FileNotFoundError(f"{folder}: a folder, but no diffusers weights ({DIFFUSERS_WEIGHTS}[.fp16].safetensors "
                            "or .bin) in it or in its transformer/ subfolder")


def read_weights(path: str | os.PathLike) -> tuple[Mapping, str]:
    """(the loaded object, what it was) for a file of any supported format or a diffusers folder."""
    path = Path(path)
    if path.is_dir():
        files = diffusers_weight_files(path)
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(_read_file(f))
        return state, f"diffusers folder {', '.join(str(f.relative_to(path)) for f in files)}"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return _read_file(path), ("safetensors" if is_safetensors(path) else "torch file")


def is_project_checkpoint(path: str | os.PathLike) -> bool:
    """True for a GenerativeModule checkpoint (hyper_parameters + state_dict + ema), read lazily (mmap): rebuild
    those with GenerativeModule.from_checkpoint; anything else loads into a configured net with load_network."""
    path = Path(path)
    if not path.is_file() or is_safetensors(path):
        return False
    with open(path, "rb") as f:
        if f.read(4) != ZIP_MAGIC:
            return False
    with torch.serialization.safe_globals([argparse.Namespace]):
        if path.suffix == ".safetensors":  # torch.load would choose its safetensors reader by this suffix
            with open(path, "rb") as f:
                obj = torch.load(f, map_location="cpu", weights_only=True)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return isinstance(obj, Mapping) and {"hyper_parameters", "state_dict", "ema"} <= set(obj)


# ---- choosing and cleaning the state dict ---------------------------------------------------------------------
def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        while key.startswith(KEY_PREFIXES):
            key = key[len(next(p for p in KEY_PREFIXES if key.startswith(p))):]
        out[key] = value
    return out


def select_state_dict(obj: Mapping, entry: str = "auto") -> tuple[dict[str, torch.Tensor], str]:
    """The weights in a loaded file, wrapper prefixes removed, and which entry they came from.

    entry: auto (a plain state dict, else the first of ema, model, state_dict) | ema | model | state_dict
    (a Lightning checkpoint's raw, non-EMA weights).
    """
    if entry not in ENTRIES:
        raise ValueError(f"model.init_entry={entry!r}; choose one of {ENTRIES}")
    if _is_state_dict(obj):
        if entry != "auto":
            raise ValueError(f"entry={entry!r}, but the file is a plain state dict with no entries; use entry=auto")
        return _strip_prefixes(obj), "plain state dict"
    names = STATE_DICT_ENTRIES if entry == "auto" else (entry,)
    for name in names:
        if name in obj and _is_state_dict(obj[name]):
            return _strip_prefixes(obj[name]), f"'{name}' entry"
    raise ValueError(
        f"no weights found for entry={entry}: expected a plain state dict or one of the entries "
        f"{list(names)}, got top-level keys {sorted(map(str, obj))[:20]}"
    )


def drop_extras(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(state without the IGNORED_EXTRAS, a description per ignored group with its tensor count)."""
    kept, notes = dict(state), []
    for prefix, why in IGNORED_EXTRAS.items():
        dropped = [k for k in kept if k.startswith(prefix)]
        for k in dropped:
            del kept[k]
        if dropped:
            notes.append(f"{len(dropped)} '{prefix}*' tensors ({why})")
    return kept, notes


# ---- explaining mismatches ------------------------------------------------------------------------------------
class WeightsMismatchError(ValueError, RuntimeError):
    """The file's weights do not fit the network; a RuntimeError too, as torch's strict load_state_dict raises."""


def _hint_pos_embed(file_shape, net: nn.Module) -> str:
    side = math.isqrt(file_shape[1])
    return (f"the file has {file_shape[1]} = {side}x{side} patches: set the image size so that "
            f"data.image_size / model.patch_size = {side} (model.input_size = {side * net.patch_size} with "
            f"patch {net.patch_size})")


def _hint_final_linear(file_shape, net: nn.Module) -> str:
    per_pixel = file_shape[0] / net.patch_size**2
    return (f"the file predicts {file_shape[0]} values per patch ({per_pixel:g} channels at patch "
            f"{net.patch_size}): change model.learn_sigma (2x data.channels outputs; flow/score use the first "
            "half), model.patch_size or data.channels")


def _hint_embedding_table(file_shape, net: nn.Module) -> str:
    rows = file_shape[0]
    return (f"the file has {rows} class rows: data.num_classes={rows - 1} with a null class "
            f"(model.class_dropout_prob > 0), or data.num_classes={rows} with class_dropout_prob=0")


def _hint_patch_embed(file_shape, net: nn.Module) -> str:
    return (f"the file's patch embedding is {tuple(file_shape)} = (hidden, channels, patch, patch): set "
            f"data.channels={file_shape[1]} / model.patch_size={file_shape[2]}")


SIZE_HINTS = {  # key -> which config key to change, given the file's shape
    "pos_embed": _hint_pos_embed,
    "final_layer.linear.weight": _hint_final_linear,
    "y_embedder.embedding_table.weight": _hint_embedding_table,
    "x_embedder.proj.weight": _hint_patch_embed,
}
SIZE_FALLBACK = "a different model size: model=dit_s|dit_b|dit_l|dit_xl (hidden_size, depth, num_heads, mlp_ratio)"


def check_fits(net: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """One-line WeightsMismatchError naming the config key to change when `state` does not fit `net`."""
    own = net.state_dict()
    problems = []
    patch = state.get("x_embedder.proj.weight")
    if patch is not None and patch.shape[0] != own["x_embedder.proj.weight"].shape[0]:
        problems.append(f"the file's hidden size is {patch.shape[0]}, the model's "
                        f"{own['x_embedder.proj.weight'].shape[0]}: {SIZE_FALLBACK}")
    else:
        wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
        for k in wrong:
            hint = SIZE_HINTS.get(k, lambda *_: SIZE_FALLBACK)
            problems.append(f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}: {hint(state[k].shape, net)}")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        blocks_file = {k.split(".")[1] for k in state if k.startswith("blocks.")}
        blocks_net = {k.split(".")[1] for k in own if k.startswith("blocks.")}
        depth = (f" (the file has {len(blocks_file)} blocks, the model {len(blocks_net)}: model.depth)"
                 if blocks_file != blocks_net else "")
        problems.append(f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                        f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}{depth}")
    if problems:
        raise WeightsMismatchError(f"{source} does not fit the model strictly: " + "; ".join(problems[:4])
                                   + (f"; and {len(problems) - 4} more" if len(problems) > 4 else ""))


# ---- loading --------------------------------------------------------------------------------------------------
def load_weights(net: nn.Module, path: str | os.PathLike, *, entry: str = "auto") -> str:
    """Loads a file or diffusers folder into `net` (a DiT) strictly and returns a one-line account of what it did."""
    obj, fmt = read_weights(path)
    state, what = select_state_dict(obj, entry)
    notes = [fmt, what]
    if is_diffusers_layout(state):
        state = diffusers_to_dit(state, net.grid_size)
        notes.append("diffusers keys mapped to DiT's, pos_embed recomputed")
    state, ignored = drop_extras(state)
    source = f"{path} ({', '.join(notes)})"
    check_fits(net, state, source)
    net.load_state_dict(state, strict=True)  # copies cast an fp16 file to the net's dtype
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values()})
    message = f"loaded {len(state)} tensors ({'/'.join(dtypes)}) into {type(net).__name__} from {source}"
    if ignored:
        message += "; ignored " + ", ".join(ignored)
    log.info(message)
    return message


def load_dit_checkpoint(model: nn.Module, path: str | Path) -> str:
    """Loads an official DiT or SiT file (plain, or with ema/model/state_dict) strictly; kept for older callers."""
    return load_weights(model, path)


def _plain(cfg) -> dict:
    from omegaconf import DictConfig, OmegaConf

    return dict(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg)


def build_network(model_cfg, *, load_init: bool = True, from_file: bool = True) -> nn.Module:
    """The network a model config describes: built, `init_from` weights loaded before anything copies it (so an
    EMA starts equal), then wrapped in its `time_convention`.

    Model-config keys besides the constructor's: init_from (a file or diffusers folder; null: none), init_entry
    (auto | ema | model | state_dict), time_convention (project | sit | repa). from_file=True (a config read from
    a checkpoint) builds only the project's own classes (workflow.config_guard); from_file=False (composed from
    conf/ and the command line, as train.py does) uses Hydra. load_init=False skips init_from, for rebuilding a
    run whose checkpoint holds the weights anyway.
    """
    cfg = _plain(model_cfg)
    init_from = cfg.pop("init_from", None)
    entry = cfg.pop("init_entry", "auto")
    convention = cfg.pop("time_convention", "project")
    if entry not in ENTRIES:
        raise ValueError(f"model.init_entry={entry!r}; choose one of {ENTRIES}")
    check_time_convention(convention)  # fails before the network is built
    if from_file:
        from workflow.config_guard import instantiate_trusted

        net = instantiate_trusted(cfg, "model")
    else:
        from hydra.utils import instantiate

        net = instantiate(cfg)
    if init_from and load_init:
        log.info("model.init_from: %s", load_weights(net, init_from, entry=entry))
    return apply_time_convention(net, convention)


def load_network(path: str | os.PathLike, model_cfg, *, entry: str = "auto") -> nn.Module:
    """The network of `model_cfg` holding the weights of `path` (any supported format), in its time convention."""
    return build_network({**_plain(model_cfg), "init_from": str(path), "init_entry": entry})
