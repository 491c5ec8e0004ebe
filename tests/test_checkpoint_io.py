"""Checkpoints are written straight to disk: Lightning's own writer serialises the whole checkpoint into memory
first (weights + EMA + AdamW moments: +0.5 GiB peak RSS for DiT-S/2 when last.ckpt is written, ~11 GB for DiT-XL/2)."""

from __future__ import annotations

import tracemalloc

import torch
from conftest import ROOT, TINY
from hydra import compose, initialize_config_dir

from workflow.build import build_run


def test_train_py_writes_a_checkpoint_without_a_copy_of_it_in_memory(tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, "model.hidden_size=256", "model.depth=2", f"run_dir={tmp_path}",
                                          "logger=none", "trainer.max_steps=1", "trainer.val_check_interval=1000",
                                          "callbacks.sample_grid=null", "callbacks.model_checkpoint=null"])
    run = build_run(cfg)
    run.trainer.fit(run.module, datamodule=run.datamodule)  # writes last.ckpt at the end (through the same writer)
    path = tmp_path / "saved.ckpt"
    tracemalloc.start()
    try:
        run.trainer.save_checkpoint(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    size = path.stat().st_size
    assert size > 20e6 and peak < size / 10, f"{peak / 1e6:.1f} MB allocated to write {size / 1e6:.1f} MB"
    saved = torch.load(path, weights_only=False, map_location="cpu")
    assert saved["global_step"] == 1 and set(saved["ema"]) == set(run.module.ema.state_dict())
    for name, value in run.module.state_dict().items():
        assert torch.equal(saved["state_dict"][name], value), name
    assert sorted(p.name for p in tmp_path.rglob("*.ckpt*")) == ["last.ckpt", "saved.ckpt"]  # no tmp files left
