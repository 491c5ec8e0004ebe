"""Resume: a run stopped in the middle of an epoch and resumed with ckpt_path=last ends bit-identical (weights, EMA,
optimizer state) to the uninterrupted run and logs the same losses; one last.ckpt, the whole metrics history."""

from __future__ import annotations

import csv
import os

import torch
from conftest import run_train

# 8x8 digits, batch 128: 12 batches per epoch. The 20-step runs cross the epoch boundary at step 12. The resumed
# run is stopped twice in the middle of an epoch: it resumes from the periodic step-7 checkpoint written after
# that step (a crash at step 9), then from the end-of-fit last.ckpt at step 15.
ARGS = ["data.batch_size=128", "trainer.val_check_interval=8", "trainer.limit_val_batches=2", "run_name=resume",
        "callbacks.model_checkpoint.every_n_train_steps=7"]


def metric_rows(run) -> dict[int, dict[str, str]]:
    """step -> its logged values. Not `epoch`: Lightning counts an epoch stopped by max_steps as finished, so its
    counter runs ahead after such a resume (the data order follows the loader's own pass count)."""
    with open(run / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len({r["step"] for r in rows}) == len(rows), "one row per step"
    return {int(r["step"]): {k: v for k, v in r.items() if v != "" and k != "epoch"} for r in rows}


def assert_bit_identical(a_path, b_path) -> dict[str, float]:
    """Equal weights, EMA and AdamW state (exact); returns the max |difference| per part (all 0)."""
    a, b = (torch.load(p, weights_only=True) for p in (a_path, b_path))
    assert a["global_step"] == b["global_step"]
    diffs = {}
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    parts = {"weights": (a["state_dict"], b["state_dict"]), "ema": (a["ema"], b["ema"]),
             "optimizer": ({f"{i}.{n}": opt_a[i][n] for i in opt_a for n in ("exp_avg", "exp_avg_sq", "step")},
                           {f"{i}.{n}": opt_b[i][n] for i in opt_b for n in ("exp_avg", "exp_avg_sq", "step")})}
    for part, (x, y) in parts.items():
        assert x.keys() == y.keys(), part
        diffs[part] = max(float((x[k].double() - y[k].double()).abs().max()) for k in x)
        assert diffs[part] == 0.0, (part, diffs)
    return diffs


def test_mid_epoch_resume_is_bit_identical_and_keeps_one_last_ckpt_and_the_history(tmp_path, tiny_args):
    full, part = tmp_path / "full", tmp_path / "part"
    args = [*tiny_args, *ARGS]
    run_train([*args, "trainer.max_steps=20", f"hydra.run.dir={full}"])
    run_train([*args, "trainer.max_steps=9", f"hydra.run.dir={part}"])
    step7 = part / "checkpoints" / "step=0000007.ckpt"
    run_train([*args, "trainer.max_steps=15", f"ckpt_path='{step7}'", f"hydra.run.dir={part}"])
    proc = run_train([*args, "trainer.max_steps=20", "ckpt_path=last", f"hydra.run.dir={part}"])
    assert f"resuming from {part / 'checkpoints' / 'last.ckpt'}" in proc.stdout

    diffs = assert_bit_identical(full / "checkpoints" / "last.ckpt", part / "checkpoints" / "last.ckpt")
    print("max |diff| after two mid-epoch resumes (1 process):", diffs)
    assert sorted(os.listdir(part / "checkpoints")) == ["last.ckpt", "step=0000007.ckpt", "step=0000014.ckpt"]

    expected, resumed = metric_rows(full), metric_rows(part)  # three segments, one file
    assert sorted(k for k, r in expected.items() if "train/loss" in r) == list(range(20))
    assert resumed == expected  # train/loss, loss_t/*, train/lr, val/loss: the same values at the same steps
