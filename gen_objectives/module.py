"""GenerativeModule: the one LightningModule, composing a network, an objective and an EMA of the weights."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from .ema import EMA

OPTIM_DEFAULTS = {"lr": 1e-4, "weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8, "warmup_steps": 0,
                  "fused": None}
EMA_DEFAULTS = {"decay": 0.9999, "start_step": 0, "warmup": False}


class NonFiniteLossError(RuntimeError):
    """Raised on every rank when a training loss was NaN/inf; no checkpoint is written after it."""


class NonFiniteWeightsError(RuntimeError):
    """Raised instead of writing a checkpoint whose weights or EMA contain NaN/inf."""


def _merge(name: str, defaults: dict, given: dict | None) -> dict:
    """defaults updated with `given`; unknown keys fail naming the valid ones."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in module.{name}; valid keys: {sorted(defaults)}")
    return {**defaults, **given}


def _mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (seed, rank, step)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def fused_adamw_supported(params: Sequence[Tensor]) -> bool:
    """torch has fused AdamW kernels for these parameters: floating point, on a device type in torch's own list
    (cuda, cpu, mps, xpu, ...; the list its fused=True check uses)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    return bool(params) and all(p.device.type in devices and p.is_floating_point() for p in params)


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    """True when every floating-point tensor is finite (one host sync)."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point() and t.numel()]
    return bool(torch.stack(flags).all()) if flags else True


class GenerativeModule(L.LightningModule):
    """Trains `net` with `objective` (AdamW + EMA), logs loss per time bucket, samples with the EMA weights."""

    def __init__(
        self,
        net: nn.Module,
        objective: nn.Module,
        *,
        optim: dict | None = None,
        ema: dict | None = None,
        sample_shape: Sequence[int] | None = None,
        seed: int = 0,
        t_buckets: int = 10,
        t_bucket_every_n_steps: int = 100,
        nonfinite_check_every_n_steps: int = 100,
        compile: bool = False,
        cfg: dict | None = None,
    ):
        super().__init__()
        if t_buckets < 1 or t_bucket_every_n_steps < 1 or nonfinite_check_every_n_steps < 1:
            raise ValueError(f"module.t_buckets={t_buckets}, module.t_bucket_every_n_steps={t_bucket_every_n_steps} "
                             f"and module.nonfinite_check_every_n_steps={nonfinite_check_every_n_steps} must be >= 1")
        self.optim = _merge("optim", OPTIM_DEFAULTS, optim)
        ema_kw = _merge("ema", EMA_DEFAULTS, ema)
        # Plain types only: the checkpoint stays loadable with torch.load(weights_only=True).
        self.save_hyperparameters({"cfg": cfg, "optim": {**self.optim, "betas": list(self.optim["betas"])},
                                   "ema": ema_kw, "sample_shape": list(sample_shape) if sample_shape else None,
                                   "seed": seed, "t_buckets": t_buckets,
                                   "t_bucket_every_n_steps": t_bucket_every_n_steps,
                                   "nonfinite_check_every_n_steps": nonfinite_check_every_n_steps,
                                   "compile": compile})
        self.net = net
        self.objective = objective
        self.ema = EMA(net, **ema_kw)  # deep copy before any compile; not a registered submodule
        if compile:
            self.net.compile()
        self.sample_shape = tuple(sample_shape) if sample_shape else None
        self.seed = int(seed)
        self.t_buckets = int(t_buckets)
        self.t_bucket_every_n_steps = int(t_bucket_every_n_steps)
        self.nonfinite_check_every_n_steps = int(nonfinite_check_every_n_steps)
        self.register_buffer("_bucket_sum", torch.zeros(t_buckets, dtype=torch.float64), persistent=False)
        self.register_buffer("_bucket_count", torch.zeros(t_buckets, dtype=torch.float64), persistent=False)
        # Non-finite guard, on the device (no host sync per step): the first step whose loss was NaN/inf (-1: none)
        # and, for fused AdamW, this optimizer step's found_inf (1.0 skips the update on the device).
        self.register_buffer("_first_bad_step", torch.tensor(-1, dtype=torch.long), persistent=False)
        self.register_buffer("_found_inf", torch.zeros((), dtype=torch.float32), persistent=False)
        self._generator: torch.Generator | None = None

    # ---- construction from a checkpoint -------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str, map_location: Any = "cpu") -> GenerativeModule:
        """Rebuilds net + objective from the checkpoint's stored Hydra config and loads weights and EMA.

        The stored config is data the file's author chose: its model, objective and data sections must name only
        the project's own classes (workflow.config_guard), checked before anything is built.
        """
        from backbones.checkpoint import build_network
        from workflow.config_guard import check_trusted, instantiate_trusted

        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(ckpt, dict) or not {"hyper_parameters", "state_dict", "ema"} <= set(ckpt):
            raise ValueError(f"{path} is not a GenerativeModule checkpoint (no hyper_parameters/state_dict/ema); "
                             "published weights load with backbones.checkpoint.load_network")
        hp = ckpt["hyper_parameters"]
        cfg = hp.get("cfg")
        if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict) or not isinstance(
                cfg.get("objective"), dict):
            raise ValueError(f"{path} carries no model/objective config (hyper_parameters['cfg'])")
        for section in ("model", "objective", "data"):
            check_trusted(cfg.get(section), f"{path}: {section}")
        net = build_network(cfg["model"], load_init=False)  # the weights come from this file, not init_from
        module = cls(net, instantiate_trusted(cfg["objective"], f"{path}: objective"), optim=hp["optim"],
                     ema=hp["ema"], sample_shape=hp["sample_shape"], seed=hp["seed"], t_buckets=hp["t_buckets"],
                     t_bucket_every_n_steps=hp["t_bucket_every_n_steps"], cfg=cfg)
        module.load_state_dict(ckpt["state_dict"])
        module.ema.load_state_dict(ckpt["ema"])
        return module

    # ---- training -----------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Keeps the EMA on the training device."""
        self.ema.to(self.device)

    def _step_generator(self, device: torch.device) -> torch.Generator:
        """The generator for t and noise, seeded from (seed, rank, step): exact across resumes, no state."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        self._generator.manual_seed(_mix_seed(self.seed, self.global_rank, self.global_step))
        return self._generator

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, y = batch
        # The global RNG (label dropout) is a function of (seed, rank, step) too: a resume needs no RNG state.
        self._reseed_global(_mix_seed(self.seed, self.global_rank, self.global_step, 2))
        gen = self._step_generator(x0.device)
        t = self.objective.sample_t(x0.shape[0], x0.device, generator=gen)
        noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
        per_sample = self.objective.loss(self.net, x0, y, t=t, noise=noise)
        if per_sample.shape != (x0.shape[0],):
            raise ValueError(f"objective.loss must return per-sample losses [B]={x0.shape[0]}, "
                             f"got {tuple(per_sample.shape)}")
        loss = per_sample.mean()
        self._flag_nonfinite(loss.detach())
        self._accumulate_buckets(t, per_sample.detach())
        # Not prog_bar: Lightning reads progress-bar tensors back to the host after every step.
        self.log("train/loss", loss, batch_size=x0.shape[0])
        if self._logging_step():  # a float becomes a device tensor (a host-to-device copy): only when written
            self.log("train/lr", float(self.trainer.optimizers[0].param_groups[0]["lr"]), batch_size=x0.shape[0])
        if (self.global_step + 1) % self.t_bucket_every_n_steps == 0 and not self._accumulating():
            self._log_buckets()
        return loss

    def _logging_step(self) -> bool:
        """True on the steps Lightning writes to the loggers (every trainer.log_every_n_steps)."""
        if self._trainer is None or not self.trainer.optimizers:
            return False
        return (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0

    def _accumulating(self) -> bool:
        """True on a micro-batch that is not the last of a gradient-accumulation group."""
        return self._trainer is not None and self.trainer.fit_loop._should_accumulate()

    def _flag_nonfinite(self, loss: Tensor) -> None:
        """Records a NaN/inf loss on the device: the step (first one only) and this optimizer step's found_inf."""
        bad = ~torch.isfinite(loss)
        self._first_bad_step.masked_fill_(bad & (self._first_bad_step < 0), self.global_step)
        self._found_inf.masked_fill_(bad, 1.0)

    def check_finite(self) -> None:
        """One host sync: raises NonFiniteLossError on every rank when any rank saw a non-finite loss."""
        first_bad = self._first_bad_step.clone()
        if self._trainer is not None and self.trainer.world_size > 1:
            first_bad = self.trainer.strategy.reduce(first_bad, reduce_op="max")
        step = int(first_bad)
        if step >= 0:
            raise NonFiniteLossError(
                f"non-finite training loss at step {step} (found at step {self.global_step}, epoch "
                f"{self.current_epoch}); stopping every rank without writing a checkpoint, so the last checkpoint "
                "on disk holds the last good weights")

    def _accumulate_buckets(self, t: Tensor, per_sample: Tensor) -> None:
        """Adds losses into per-t-bucket sums on the device (no host sync)."""
        u = self.objective.unit_time(t).to(torch.float64)
        idx = (u * self.t_buckets).long().clamp_(0, self.t_buckets - 1)
        self._bucket_sum.index_add_(0, idx, per_sample.to(torch.float64))
        self._bucket_count.index_add_(0, idx, torch.ones_like(u))

    def _log_buckets(self) -> None:
        """Sends the mean loss per bucket since the last call (summed over ranks) to the loggers, once, at this
        step (self.log would repeat the value at every later logging step), then resets the sums."""
        sums = self.trainer.strategy.reduce(self._bucket_sum.clone(), reduce_op="sum")
        counts = self.trainer.strategy.reduce(self._bucket_count.clone(), reduce_op="sum")
        self._bucket_sum.zero_()
        self._bucket_count.zero_()
        if self.global_rank != 0 or not self.loggers:
            return
        means = (sums / counts).float().tolist()  # NaN for an empty bucket; one host sync per bucket log
        k = self.t_buckets
        metrics = {f"loss_t/{i / k:.1f}-{(i + 1) / k:.1f}": means[i] for i in range(k)}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Every `nonfinite_check_every_n_steps` optimizer steps: the non-finite check (one sync, all ranks)."""
        if not self._accumulating() and self.global_step % self.nonfinite_check_every_n_steps == 0:
            self.check_finite()

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The optimizer step (skipped on the device by fused AdamW after a non-finite loss), then the EMA update
        (before any callback can checkpoint this step)."""
        inner = getattr(optimizer, "optimizer", optimizer)  # Lightning's LightningOptimizer wraps it
        if inner.defaults.get("fused"):
            inner.found_inf = self._found_inf
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._found_inf.zero_()
        self.ema.update(self.net, self.global_step)

    def _clips_under_mixed_precision(self) -> bool:
        """Gradient clipping under 16/bf16-mixed: Lightning refuses it with an optimizer that unscales internally
        (fused AdamW), so fused: null falls back to foreach AdamW there."""
        if self._trainer is None:
            return False
        from lightning.pytorch.plugins.precision import MixedPrecision

        return bool(self.trainer.gradient_clip_val) and isinstance(self.trainer.precision_plugin, MixedPrecision)

    def configure_optimizers(self):
        o = self.optim
        params = [p for p in self.net.parameters() if p.requires_grad]
        clipping = self._clips_under_mixed_precision()
        if o["fused"] is True and clipping:
            raise ValueError(f"module.optim.fused=true cannot be combined with trainer.gradient_clip_val="
                             f"{self.trainer.gradient_clip_val} under trainer.precision={self.trainer.precision} "
                             "(Lightning refuses gradient clipping with a fused optimizer there); set "
                             "module.optim.fused=null or false")
        fused = (fused_adamw_supported(params) and not clipping) if o["fused"] is None else bool(o["fused"])
        opt = torch.optim.AdamW(params, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
                                weight_decay=o["weight_decay"], fused=fused)
        warmup = int(o["warmup_steps"])
        if warmup <= 0:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- validation and sampling with the EMA weights -----------------------------------------------
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x0, y = batch
        gen = torch.Generator(device=x0.device)
        gen.manual_seed(_mix_seed(self.seed, 1, self.global_rank, batch_idx))  # same t/noise every evaluation
        t = self.objective.sample_t(x0.shape[0], x0.device, generator=gen)
        noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
        loss = self.objective.loss(self.ema_net(), x0, y, t=t, noise=noise).mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=x0.shape[0])

    def ema_net(self) -> nn.Module:
        """The EMA network (eval mode, fp32) on this module's device."""
        if self.ema.device != self.device:
            self.ema.to(self.device)
        return self.ema.net

    @torch.no_grad()
    def generate(self, noise_or_n: Tensor | int, y: Tensor, *, generator: torch.Generator | None = None,
                 **sampler_kw: Any) -> Tensor:
        """Samples x0 [B,C,H,W] in model space with the EMA weights; `sampler_kw` go to objective.sample."""
        net = self.ema_net()
        if isinstance(noise_or_n, int):
            if self.sample_shape is None:
                raise ValueError("generate(n, ...) needs sample_shape (C, H, W); pass a noise tensor instead")
            noise = torch.randn((noise_or_n, *self.sample_shape), generator=generator,
                                device=generator.device if generator is not None else self.device)
        else:
            noise = noise_or_n
        noise = noise.to(self.device, torch.float32)
        return self.objective.sample(net, noise, y.to(self.device), generator=generator, **sampler_kw)

    # ---- checkpoint ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Adds the EMA weights; refuses to write after a non-finite loss (all ranks) or with non-finite weights."""
        if self._trainer is not None and self.trainer.training:
            self.check_finite()
        ema_state = self.ema.state_dict()
        if not _all_finite(list(checkpoint["state_dict"].values()) + list(ema_state.values())):
            raise NonFiniteWeightsError(f"weights or EMA are non-finite at step {self.global_step}; "
                                        "not writing a checkpoint (the previous one stays intact)")
        checkpoint["ema"] = ema_state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restores the EMA (the RNG streams are functions of (seed, rank, step): nothing else to restore)."""
        if "ema" not in checkpoint:
            raise KeyError("checkpoint has no 'ema' entry: it was not written by GenerativeModule")
        self.ema.load_state_dict(checkpoint["ema"])

    @staticmethod
    def _reseed_global(seed: int) -> None:
        """Seeds torch (all devices), numpy and random from one integer."""
        torch.manual_seed(seed)
        np.random.seed(seed % (1 << 32))
        random.seed(seed)
