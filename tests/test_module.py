"""GenerativeModule with the real DiT, objectives and digits: a training step per objective, EMA sampling,
the non-finite-loss stop, and checkpoints that never hold NaN weights."""

from __future__ import annotations

import csv
import math
import os

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader, TensorDataset

from datamodules.digits import load_digits_tensors
from gen_objectives.module import GenerativeModule, NonFiniteLossError, NonFiniteWeightsError
from workflow.loggers import HistoryCSVLogger

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
OBJECTIVES = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "objective")) if f.endswith(".yaml"))


def build(objective: str = "flow", **module_kw) -> GenerativeModule:
    """A 1-block DiT + the configured objective, composed from conf/ like train.py does."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"objective={objective}", "experiment=digits", "model.hidden_size=32",
                                          "model.depth=1", "model.num_heads=2"])
    torch.manual_seed(0)
    kw = {"t_bucket_every_n_steps": 1, "sample_shape": (1, 8, 8), **module_kw}
    return GenerativeModule(instantiate(cfg.model), instantiate(cfg.objective), **kw)


def loader(n: int = 64, batch_size: int = 16, nan_batch: int | None = None) -> DataLoader:
    x, y = load_digits_tensors(8)
    x, y = x[:n].clone(), y[:n]
    if nan_batch is not None:
        x[nan_batch * batch_size] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def logged_rows(logger: HistoryCSVLogger) -> list[dict]:
    logger.save()
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        return [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def trainer(tmp_path, max_steps: int, **kw) -> L.Trainer:
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    kw.setdefault("log_every_n_steps", 1)
    return L.Trainer(accelerator="cpu", max_steps=max_steps, limit_val_batches=0,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kw)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_one_training_step(objective, tmp_path):
    module = build(objective)
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    ema_before = {k: v.clone() for k, v in module.ema.state_dict().items()}
    logger = HistoryCSVLogger(tmp_path)
    tr = trainer(tmp_path, max_steps=1, logger=logger)
    tr.fit(module, train_dataloaders=loader())
    assert tr.global_step == 1
    loss = tr.callback_metrics["train/loss"]
    assert math.isfinite(float(loss)) and float(loss) > 0
    (row,) = logged_rows(logger)
    buckets = [k for k in row if k.startswith("loss_t/")]
    assert len(buckets) == 10 and "loss_t/0.0-0.1" in buckets and "train/lr" in row
    changed = [k for k, v in module.net.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "the optimizer step changed no weight"
    ema_changed = [k for k, v in module.ema.state_dict().items() if not torch.equal(v, ema_before[k])]
    assert ema_changed, "the EMA was not updated"


def test_bucket_losses_are_means_of_the_per_sample_losses():
    module = build("flow")
    t = torch.tensor([0.05, 0.07, 0.55, 0.99])
    losses = torch.tensor([1.0, 3.0, 10.0, 7.0])
    module._accumulate_buckets(t, losses)
    means = module._bucket_sum / module._bucket_count
    assert means[0] == 2.0 and means[5] == 10.0 and means[9] == 7.0
    assert torch.isnan(means[1])  # empty bucket


def test_generate_uses_the_ema_weights(tmp_path):
    module = build("flow", ema={"decay": 0.9999})
    trainer(tmp_path, max_steps=3).fit(module, train_dataloaders=loader())
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(4)
    out = module.generate(noise, y, num_steps=2)
    with torch.no_grad():
        ema_out = module.objective.sample(module.ema.net, noise, y, num_steps=2)
        raw_out = module.objective.sample(module.net.eval(), noise, y, num_steps=2)
    torch.testing.assert_close(out, ema_out)
    assert not torch.allclose(out, raw_out, atol=1e-4)
    assert module.generate(5, torch.zeros(5, dtype=torch.long), num_steps=1).shape == (5, 1, 8, 8)


def test_buckets_and_lr_are_logged_once_at_their_step(tmp_path):
    """#11: per-bucket losses and train/lr were written again, stale, at every later logging step."""
    module = build("flow", t_bucket_every_n_steps=4, optim={"lr": 1e-3, "warmup_steps": 10})
    logger = HistoryCSVLogger(tmp_path)
    trainer(tmp_path, max_steps=12, logger=logger, log_every_n_steps=2).fit(module, train_dataloaders=loader(n=256))
    rows = {int(r["step"]): r for r in logged_rows(logger)}
    assert sorted(rows) == list(range(1, 12, 2))  # one row per logging step (step + 1 divisible by 2)
    assert [s for s, r in rows.items() if "loss_t/0.9-1.0" in r] == [3, 7, 11]  # every 4th step only
    for step, row in rows.items():  # lr of the step the row describes (linear warmup: (step + 1) / 10 * lr)
        assert float(row["train/lr"]) == pytest.approx(1e-3 * min(1.0, (step + 1) / 10), rel=1e-6)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    module = build("flow", nonfinite_check_every_n_steps=1)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    tr = trainer(tmp_path, max_steps=10, callbacks=[ckpt], enable_checkpointing=True)
    with pytest.raises(NonFiniteLossError, match="at step 2 "):
        tr.fit(module, train_dataloaders=loader(nan_batch=2))
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2
    for name, tensors in (("weights", saved["state_dict"]), ("ema", saved["ema"])):
        assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point()), name


def test_fused_adamw_skips_the_non_finite_step_on_the_device_and_the_check_stops_later(tmp_path):
    """#15 item 2: no per-step host sync; fused AdamW's found_inf skips the step, the check every N steps (or
    before a save) stops the run naming the first bad step, and the last good checkpoint stays."""
    module = build("flow", nonfinite_check_every_n_steps=5, optim={"fused": True})
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True)
    tr = trainer(tmp_path, max_steps=10, callbacks=[ckpt], enable_checkpointing=True)
    with pytest.raises(NonFiniteLossError, match="at step 2 "):
        tr.fit(module, train_dataloaders=loader(nan_batch=2))
    assert tr.global_step == 4  # the save at step 4 ran the check (before the periodic one at step 5)
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert all(torch.isfinite(p).all() for p in module.net.parameters()), "the NaN step reached the weights"
    assert int(tr.optimizers[0].state[next(p for p in module.net.parameters() if p.requires_grad)]["step"]) == 3  # 4 steps, one skipped


def test_fused_adamw_is_the_default_wherever_torch_has_it(tmp_path):
    """module.optim.fused: null means fused AdamW for parameters on any device torch has fused kernels for (CPU
    too), so the default run skips a non-finite step on the device; false keeps the foreach AdamW."""
    def optimizer(**optim):
        opt = build("flow", optim=optim).configure_optimizers()
        return opt["optimizer"] if isinstance(opt, dict) else opt

    assert optimizer().defaults["fused"] is True
    assert optimizer(fused=False).defaults["fused"] is False
    assert optimizer(warmup_steps=3).defaults["fused"] is True
    module = build("flow", nonfinite_check_every_n_steps=3)
    tr = trainer(tmp_path, max_steps=4)
    with pytest.raises(NonFiniteLossError, match="at step 2 "):
        tr.fit(module, train_dataloaders=loader(nan_batch=2))
    assert tr.global_step == 3  # the check at step 3 stopped the run
    assert all(torch.isfinite(p).all() for p in module.net.parameters()), "the NaN step reached the weights"


def test_gradient_clipping_under_mixed_precision_keeps_foreach_adamw(tmp_path):
    """Lightning refuses gradient clipping with an optimizer that unscales internally (fused) under bf16/16-mixed:
    fused: null then picks foreach AdamW (training runs), and fused: true fails at start naming the keys."""
    module = build("flow")
    tr = trainer(tmp_path, max_steps=2, precision="bf16-mixed", gradient_clip_val=1.0)
    tr.fit(module, train_dataloaders=loader())
    assert tr.global_step == 2 and tr.optimizers[0].defaults["fused"] is False
    with pytest.raises(ValueError, match="module.optim.fused=true.*trainer.gradient_clip_val.*bf16-mixed"):
        trainer(tmp_path, max_steps=2, precision="bf16-mixed", gradient_clip_val=1.0).fit(
            build("flow", optim={"fused": True}), train_dataloaders=loader())


def test_refuses_to_write_a_checkpoint_with_nan_weights(tmp_path):
    module = build("flow")
    tr = trainer(tmp_path, max_steps=1)
    tr.fit(module, train_dataloaders=loader())
    with torch.no_grad():
        next(module.net.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteWeightsError, match="non-finite"):
        tr.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


def test_unknown_optim_key_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"module.optim.*valid keys.*'lr'"):
        build("flow", optim={"learning_rate": 1e-3})


def test_sample_grid_is_drawn_once_per_step_not_per_micro_batch_nor_again_at_the_end(tmp_path):
    """#11: with accumulate_grad_batches=2 the grid was sampled after each micro-batch, and when max_steps is a
    multiple of every_n_steps the final grid sampled the same weights a second time."""
    from callbacks.sample_grid import SampleGrid

    module = build("flow")
    draws = []
    generate = module.generate
    module.generate = lambda *a, **kw: draws.append(module.global_step) or generate(*a, **kw)
    grid = SampleGrid(str(tmp_path / "samples"), every_n_steps=2, per_class=1, num_steps=1)
    trainer(tmp_path, max_steps=4, callbacks=[grid], accumulate_grad_batches=2).fit(
        module, train_dataloaders=loader(n=160))
    assert draws == [2, 4]
    final, last = tmp_path / "samples" / "final.png", tmp_path / "samples" / "step_0000004.png"
    assert final.read_bytes() == last.read_bytes()
