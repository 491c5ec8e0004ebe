"""Checkpoint files written straight to disk, not first serialised into memory as Lightning's writer does."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO


class StreamingCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file beside the target, then rename: atomic, and no second copy of the
    checkpoint in host memory (Lightning's TorchCheckpointIO builds the whole file in a BytesIO first: weights,
    EMA and AdamW moments again, +0.5 GiB for DiT-S/2 and ~11 GB for DiT-XL/2 on rank 0 at every save).
    Other filesystems (s3://, gs://, ...) and storage_options go through Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = os.fspath(path)
        if storage_options is not None or "://" in path or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
