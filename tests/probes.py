"""Test callbacks added to real train.py runs with `+callbacks.<name>={_target_:probes.<Class>,...}`
(PYTHONPATH must include tests/): a fault injected into one rank, and a record of the batches seen."""

from __future__ import annotations

import json

import lightning as L


class NaNOnRank(L.Callback):
    """Fills the input batch with NaN on global rank `rank` at optimizer step `step`."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            batch[0].fill_(float("nan"))


class RecordBatches(L.Callback):
    """Writes, per step, the labels and the input sum of the batch trained on (JSON) to `path` at the end."""

    def __init__(self, path: str):
        self.path, self.batches = path, []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        x, y = batch
        self.batches.append({"step": trainer.global_step, "y": y.tolist(), "x_sum": float(x.double().sum())})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with open(self.path, "w") as f:
            json.dump(self.batches, f)


def wandb_records(path: str):
    """The protobuf records of a W&B run file (run-<id>.wandb, the offline transaction log): a 7-byte header,
    then 32 KiB blocks of records [crc32 (4), length (2), type (1: full, 2: first, 3: middle, 4: last), data]."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, i, parts = open(path, "rb").read(), 32768, 7, b""
    while i + 7 <= len(data):
        left = block - i % block
        if left < 7:  # a block's tail too short for a header is padding
            i += left
            continue
        _, length, kind = struct.unpack("<IHB", data[i:i + 7])
        if length == 0 and kind == 0:
            i += left
            continue
        chunk, i = data[i + 7:i + 7 + length], i + 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def fake_submitit_requeue(signum, frame) -> None:
    """Stands in for submitit's USR2 handler (checkpoint_and_try_requeue): records what it found on disk when it
    ran (the run's last.ckpt step) in $FAKE_REQUEUE_LOG, then exits like submitit does after requeueing."""
    import os
    import sys

    import torch

    log = os.environ["FAKE_REQUEUE_LOG"]
    last = os.path.join(os.environ["FAKE_RUN_DIR"], "checkpoints", "last.ckpt")
    step = torch.load(last, weights_only=True)["global_step"] if os.path.exists(last) else None
    with open(log, "w") as f:
        json.dump({"signal": int(signum), "last_ckpt_step": step}, f)
    sys.exit(-1)
