"""Log lines: one per message, one file per rank (conf/hydra/job_logging/train.yaml)."""

from __future__ import annotations

import logging

from omegaconf import OmegaConf

from workflow.config import global_rank


def rank_suffix() -> str:
    """'' on global rank 0, '_rank<N>' elsewhere: the log file name's suffix."""
    rank = global_rank()
    return "" if rank == 0 else f"_rank{rank}"


def register_resolvers() -> None:
    """${rank_suffix:} for the Hydra logging config (call before Hydra composes)."""
    OmegaConf.register_new_resolver("rank_suffix", rank_suffix, replace=True)


def one_line_per_message() -> None:
    """`import lightning` adds its own console handler to the 'lightning' logger, which also propagates to the
    root logger Hydra configured: every message was printed twice. Keep the root's handlers only."""
    if logging.getLogger().handlers:
        logging.getLogger("lightning").handlers.clear()
