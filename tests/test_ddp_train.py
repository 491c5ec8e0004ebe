"""A 2-process DDP run on CPU (gloo) through train.py: it trains, reduces the t-bucket losses over ranks,
and writes one checkpoint with the EMA and the config."""

from __future__ import annotations

import csv

import torch
from conftest import run_train


def test_two_process_ddp_trains_and_checkpoints(tmp_path, tiny_args):
    run = tmp_path / "ddp"
    proc = run_train([*tiny_args, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                      "trainer.precision=32", "trainer.max_steps=3", "global_batch_size=32",
                      f"hydra.run.dir={run}"], timeout=600)
    assert proc.stdout.count("run folder:") == 1  # the config and run folder are printed by rank 0 only
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    cfg = ckpt["hyper_parameters"]["cfg"]
    assert cfg["trainer"]["strategy"] == "ddp" and cfg["trainer"]["devices"] == 2
    assert cfg["data"]["batch_size"] == 16  # global_batch_size split over the two ranks
    assert all(torch.isfinite(v).all() for v in ckpt["ema"].values() if v.is_floating_point())
    with open(run / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("loss_t/0.5-0.6")]
    assert len(rows) == 3
    assert (run / "samples" / "final.png").is_file()
