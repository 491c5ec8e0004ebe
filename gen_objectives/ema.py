"""Exponential moving average (EMA) of a network's weights, in fp32, updated with multi-tensor ops."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """An fp32 shadow copy of `net` whose floating-point state follows `net` as an exponential average."""

    # The shadow is a separate module: not registered in the LightningModule, so it is neither trained, nor
    # wrapped by DDP, nor duplicated in the checkpoint's state_dict. Its state_dict() has exactly the network's
    # keys, so `net.load_state_dict(ckpt["ema"])` works as for the official DiT files.

    def __init__(self, net: nn.Module, decay: float = 0.9999, start_step: int = 0, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay={decay} must be in [0, 1)")
        if start_step < 0:
            raise ValueError(f"ema.start_step={start_step} must be >= 0")
        self.decay = float(decay)
        self.start_step = int(start_step)
        self.warmup = bool(warmup)
        self.net = copy.deepcopy(net).float().eval().requires_grad_(False)
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None = None
        self._source_id: int | None = None

    def decay_at(self, step: int) -> float:
        """The decay used for the update after optimizer step `step` (0 copies the weights)."""
        if step < self.start_step:
            return 0.0
        if self.warmup:
            n = step - self.start_step
            return min(self.decay, (1.0 + n) / (10.0 + n))
        return self.decay

    def _match(self, net: nn.Module):
        """Pairs (shadow, source) tensors by state_dict key: floats to average, the rest to copy."""
        src = net.state_dict(keep_vars=True)
        dst = self.net.state_dict(keep_vars=True)
        if src.keys() != dst.keys():
            missing = sorted(set(dst) ^ set(src))[:5]
            raise ValueError(f"EMA and network state_dict keys differ (e.g. {missing})")
        f_dst, f_src, o_dst, o_src = [], [], [], []
        for key, d in dst.items():
            s = src[key]
            if d.is_floating_point():
                f_dst.append(d.data)
                f_src.append(s.data)
            else:
                o_dst.append(d.data)
                o_src.append(s.data)
        return f_dst, f_src, o_dst, o_src

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> None:
        """One EMA step towards `net` (call after each optimizer step; `step` counts optimizer steps)."""
        if self._pairs is None or self._source_id != id(net):
            self._pairs = self._match(net)
            self._source_id = id(net)
        f_dst, f_src, o_dst, o_src = self._pairs
        if f_dst and f_dst[0].device != f_src[0].device:
            self.to(f_src[0].device)
            f_dst, f_src, o_dst, o_src = self._pairs = self._match(net)
        src = [s if s.dtype == torch.float32 else s.float() for s in f_src]
        decay = self.decay_at(step)
        if decay == 0.0:
            torch._foreach_copy_(f_dst, src)
        else:
            torch._foreach_lerp_(f_dst, src, 1.0 - decay)
        for d, s in zip(o_dst, o_src):
            d.copy_(s)

    def to(self, device: torch.device | str) -> EMA:
        """Moves the shadow weights (kept in fp32) to `device`."""
        self.net.to(device)
        self._pairs = None
        return self

    @property
    def device(self) -> torch.device:
        """Where the shadow weights live."""
        return next(self.net.parameters()).device

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights under the network's own state_dict keys (fp32)."""
        return self.net.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Loads averaged weights saved by `state_dict` (strict: keys must match the network)."""
        self.net.load_state_dict(state, strict=True)
        self._pairs = None
