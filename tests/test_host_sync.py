"""#15 item 2: the training loop reads nothing back from the device between its scheduled points (logging, the
non-finite check, bucket losses). On CPU: count the tensor methods that would sync a GPU, per step, over what
train.py builds (workflow.build.build_run). On CUDA: torch.cuda.set_sync_debug_mode("error") over the same."""

from __future__ import annotations

import collections

import lightning as L
import pytest
import torch
from conftest import ROOT, TINY
from hydra import compose, initialize_config_dir

from workflow.build import build_run

SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")  # device -> host reads
EVERY = 5  # trainer.log_every_n_steps = module.t_bucket_every_n_steps = module.nonfinite_check_every_n_steps


def build(tmp_path, *overrides: str):
    """The train.py objects for digits with a tiny DiT; fused AdamW as on CUDA (its step counters stay on the
    device; the unfused CPU optimizer keeps them on the host and reads them each step, which is not a sync)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            *TINY, "trainer.enable_progress_bar=true", "callbacks.rich_progress_bar={_target_:"
            "workflow.progress.StepProgressBar}", f"run_dir={tmp_path}", "data.batch_size=16", "logger=csv",
            "trainer.max_steps=16", f"trainer.log_every_n_steps={EVERY}", f"module.t_bucket_every_n_steps={EVERY}",
            f"module.nonfinite_check_every_n_steps={EVERY}", "trainer.val_check_interval=1000",
            "last_ckpt_every_n_steps=0", "module.optim.fused=true", *overrides])
    return build_run(cfg)


class CountSyncs(L.Callback):
    """Counts calls of SYNCING tensor methods during training, by the optimizer step they happen in."""

    def __init__(self):
        self.per_step: collections.Counter = collections.Counter()
        self.originals: dict = {}

    def on_train_start(self, trainer, pl_module):
        for name in SYNCING:
            original = self.originals[name] = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.per_step[trainer.global_step] += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)

    def restore(self):
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)

    def on_train_end(self, trainer, pl_module):
        self.restore()

    def on_exception(self, trainer, pl_module, exception):
        self.restore()


def test_no_host_sync_between_the_scheduled_steps(tmp_path):
    run = build(tmp_path)
    counter = CountSyncs()
    run.trainer.callbacks.append(counter)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    # In step s the bucket losses and Lightning's logging run when (s + 1) % EVERY == 0, and after its optimizer
    # step (global_step s + 1 then) the non-finite check and the progress bar's loss read when (s + 1) % EVERY == 0.
    # Step 0 starts the epoch (the data order is drawn on the host) and the last step saves the checkpoint.
    scheduled = {s for s in range(17) if s % EVERY in (0, EVERY - 1)} | {0, 16}
    unscheduled = {s: n for s, n in counter.per_step.items() if s not in scheduled}
    assert unscheduled == {}, f"host syncs outside the scheduled steps: {dict(counter.per_step)}"
    per_window = [counter.per_step[s - 1] + counter.per_step[s] for s in (EVERY, 2 * EVERY, 3 * EVERY)]
    assert max(per_window) <= 8, dict(counter.per_step)  # a few reads per EVERY steps, not one per step
    print(f"host syncs per step over 16 steps (check/log every {EVERY}): {dict(sorted(counter.per_step.items()))}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.set_sync_debug_mode)")
def test_no_cuda_sync_between_the_scheduled_steps(tmp_path):
    """On a GPU: any synchronizing CUDA call in an unscheduled step raises (sync debug mode 'error')."""

    class SyncDebug(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            s = trainer.global_step
            if s not in (0, 16) and s % EVERY not in (0, EVERY - 1):
                torch.cuda.set_sync_debug_mode("error")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            torch.cuda.set_sync_debug_mode(0)

    run = build(tmp_path, "trainer.accelerator=gpu", "trainer.precision=bf16-mixed")
    run.trainer.callbacks.insert(0, SyncDebug())  # first: the mode is off before other callbacks' end hooks
    try:
        run.trainer.fit(run.module, datamodule=run.datamodule)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert run.trainer.global_step == 16
