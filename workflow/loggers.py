"""The configured logger; W&B resumes the run folder's run and falls back to offline mode without key/network."""

from __future__ import annotations

import csv
import hashlib
import netrc
import os
import socket
from typing import Any
from urllib.parse import urlparse

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only
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



class HistoryWriter(ExperimentWriter):
    """metrics.csv that keeps the history of every earlier segment of a resumed run.

    The first step logged by a segment, S, starts it: rows of earlier segments at steps >= S (logged after the
    checkpoint this segment resumed from) are dropped. Rows of one step are merged into one row. Every save
    rewrites the file atomically (tmp + rename); a few MB at most.
    """

    def __init__(self, log_dir: str):
        super().__init__(log_dir)
        self.segment_start: int | None = None
        self.trimmed = False  # earlier segments' rows at steps >= segment_start dropped already

    def _check_log_dir_exists(self) -> None:
        """Lightning deletes an existing metrics.csv here; the history is kept instead."""

    def log_metrics(self, metrics_dict: dict, step: int | None = None) -> None:
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics_dict.items()}
        row["step"] = len(self.metrics) if step is None else int(step)
        if self.segment_start is None:
            self.segment_start = row["step"]
        if self.metrics and self.metrics[-1]["step"] == row["step"]:
            self.metrics[-1].update(row)
        else:
            self.metrics.append(row)

    def save(self) -> None:
        if not self.metrics:
            return
        rows = []
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                rows = [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
            if not self.trimmed:
                rows = [r for r in rows if int(r["step"]) < self.segment_start]
        for row in self.metrics:  # one row per step (Lightning logs a step's train and val metrics separately)
            if rows and int(rows[-1]["step"]) == row["step"]:
                rows[-1].update(row)
            else:
                rows.append(row)
        tmp = self.metrics_file_path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=sorted(set().union(*rows)))
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.metrics_file_path)
        self.metrics = []
        self.trimmed = True


class HistoryCSVLogger(CSVLogger):
    """Lightning's CSVLogger at <save_dir>/<name>/metrics.csv, keeping the whole history over resumes."""

    def __init__(self, save_dir: str, name: str = "csv", flush_logs_every_n_steps: int = 100):
        super().__init__(save_dir, name=name, version="", flush_logs_every_n_steps=flush_logs_every_n_steps)

    @property
    def log_dir(self) -> str:
        return os.path.join(self.save_dir, self.name)

    @property
    @rank_zero_experiment
    def experiment(self) -> HistoryWriter:
        if self._experiment is None:
            self._experiment = HistoryWriter(self.log_dir)
        return self._experiment


def flat_config(params: dict, prefix: str = "") -> dict:
    """{'objective': {'beta_max': 20}} -> {'objective.beta_max': 20} (W&B filters and groups by such keys)."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_config(value, name + "."))
        else:
            flat[name] = value
    return flat


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger with the run config as flat keys (`objective.beta_max`, `model.depth`, ...):
    the composed Hydra config the module stores as hparams['cfg'], not one nested 'cfg' entry."""

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        params = dict(params)
        cfg = params.pop("cfg", None) or {}
        super().log_hyperparams(flat_config({**cfg, **({"module_hparams": params} if not cfg else {})}))
