"""The configured logger; W&B resumes the run folder's run and falls back to offline mode without key/network."""

from __future__ import annotations

import hashlib
import netrc
import os
import socket
from urllib.parse import urlparse

from omegaconf import DictConfig

from workflow.config import global_rank, say


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
    from hydra.utils import instantiate

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
