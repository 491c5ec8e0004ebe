"""2-process DDP on CPU (gloo) through train.py: it trains, reduces the t-bucket losses over ranks and writes one
checkpoint; a mid-epoch resume is bit-identical to the uninterrupted run; a NaN on one rank stops both ranks."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import ROOT, offline_env, run_train
from test_resume import assert_bit_identical

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32"]


def test_two_process_ddp_trains_and_checkpoints(tmp_path, tiny_args):
    run = tmp_path / "ddp"
    proc = run_train([*tiny_args, *DDP, "trainer.max_steps=3", "global_batch_size=32", f"hydra.run.dir={run}"],
                     timeout=600)
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
    logs = sorted(p.name for p in run.glob("*.log"))
    assert logs == ["train.log", "train_rank1.log"], logs  # one log file per rank, not both ranks in one


@pytest.mark.slow
def test_two_process_mid_epoch_resume_is_bit_identical(tmp_path, tiny_args):
    """Per rank: 808 digits, 64 per batch -> 12 batches per epoch; resumed from the step-7 checkpoint."""
    full, part = tmp_path / "full", tmp_path / "part"
    args = [*tiny_args, *DDP, "global_batch_size=128", "trainer.val_check_interval=8", "trainer.limit_val_batches=2",
            "callbacks.model_checkpoint.every_n_train_steps=7", "run_name=ddp"]
    run_train([*args, "trainer.max_steps=16", f"hydra.run.dir={full}"], timeout=600)
    run_train([*args, "trainer.max_steps=9", f"hydra.run.dir={part}"], timeout=600)
    step7 = part / "checkpoints" / "step=0000007.ckpt"
    run_train([*args, "trainer.max_steps=16", f"ckpt_path='{step7}'", f"hydra.run.dir={part}"], timeout=600)
    diffs = assert_bit_identical(full / "checkpoints" / "last.ckpt", part / "checkpoints" / "last.ckpt")
    print("max |diff| after a mid-epoch resume (2 processes, gloo):", diffs)


def test_nan_on_one_rank_stops_every_rank_and_keeps_the_last_good_checkpoint(tmp_path, tiny_args):
    run = tmp_path / "nan"
    env = offline_env(PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    proc = run_train([*tiny_args, *DDP, "global_batch_size=32", "trainer.max_steps=50", "last_ckpt_every_n_steps=2",
                      "module.nonfinite_check_every_n_steps=4", "+callbacks.nan={_target_:probes.NaNOnRank,"
                      "rank:1,step:3}", f"hydra.run.dir={run}"], env=env, check=False, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "non-finite training loss at step 3" in out, out[-3000:]
    assert out.count("NonFiniteLossError") >= 2, out[-3000:]  # both ranks stopped (rank 1 did not wait on gloo)
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2  # step 4's save ran the check first and wrote nothing
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
