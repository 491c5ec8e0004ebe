"""Resume: a run that crashed after its step-12 checkpoint and was resumed with ckpt_path=last logs the same
losses afterwards, and ends with the same weights, EMA and optimizer state, as a run never interrupted."""

from __future__ import annotations

import csv
import shutil

import torch
from conftest import run_train

# 8x8 digits, batch 128: 12 batches per epoch, so the step-12 checkpoint is at an epoch boundary (see
# docs/WORKFLOW.md on mid-epoch resumes). Validation (EMA weights) runs at step 8 in every run.
ARGS = ["data.batch_size=128", "trainer.val_check_interval=8", "trainer.limit_val_batches=2",
        "callbacks.model_checkpoint.every_n_train_steps=12", "run_name=resume"]


def losses(metrics_csv) -> dict[int, float]:
    with open(metrics_csv) as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_interrupted_and_resumed_run_matches_the_uninterrupted_one(tmp_path, tiny_args):
    full, part = tmp_path / "full", tmp_path / "part"
    args = [*tiny_args, *ARGS]
    run_train([*args, "trainer.max_steps=16", f"hydra.run.dir={full}"])
    run_train([*args, "trainer.max_steps=14", f"hydra.run.dir={part}"])
    first = {k: v for k, v in losses(part / "csv" / "metrics.csv").items() if k < 12}
    # A crash during step 13: last.ckpt is still the periodic step-12 checkpoint (the end-of-fit save never ran).
    shutil.copy(part / "checkpoints" / "step=0000012.ckpt", part / "checkpoints" / "last.ckpt")
    proc = run_train([*args, "trainer.max_steps=16", "ckpt_path=last", f"hydra.run.dir={part}"])
    assert f"resuming from {part / 'checkpoints' / 'last.ckpt'}" in proc.stdout

    expected = losses(full / "csv" / "metrics.csv")
    resumed = {**first, **losses(part / "csv" / "metrics.csv")}
    assert sorted(expected) == list(range(16)) and sorted(resumed) == list(range(16))
    for step in range(12, 16):
        assert abs(resumed[step] - expected[step]) <= 1e-6 * abs(expected[step]), (step, resumed, expected)

    a = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 16
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=1e-5, atol=1e-6)
    for key in a["ema"]:
        torch.testing.assert_close(a["ema"][key], b["ema"][key], rtol=1e-5, atol=1e-6)
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for idx in opt_a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt_a[idx][name], opt_b[idx][name], rtol=1e-5, atol=1e-7)
