"""The Objective interface every objective implements, plus classifier-free guidance and output checks.

See docs/ARCHITECTURE.md for the binding contract. Objectives hold no trainable parameters and no buffers;
they are nn.Modules only so that a LightningModule can hold one as a child without special cases.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..factors import mean_flat
from ..paths import check_choice

__all__ = ["Net", "Objective", "check_output", "mean_flat"]

Net = Callable[[Tensor, Tensor, Tensor], Tensor]


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # older torch: no device argument
        return torch.is_autocast_enabled()


def check_output(out: Tensor, x_t: Tensor, channels: tuple[int, ...]) -> Tensor:
    """Validate net(x_t, ...) against x_t: same batch/spatial shape, channels in `channels`, same dtype.

    Under autocast a lower-precision output is upcast to x_t's dtype instead of failing.
    """
    ok_shape = (
        isinstance(out, Tensor)
        and out.ndim == x_t.ndim
        and out.shape[0] == x_t.shape[0]
        and out.shape[2:] == x_t.shape[2:]
        and out.shape[1] in channels
    )
    if not ok_shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"net output shape {got} does not match x_t shape {tuple(x_t.shape)}: "
            f"expected [B, C', ...] with C' in {channels} for x_t [B, C, ...]"
        )
    if out.dtype != x_t.dtype:
        if out.is_floating_point() and _autocast_on(x_t.device.type):
            return out.to(x_t.dtype)
        raise ValueError(
            f"net output dtype {out.dtype} (shape {tuple(out.shape)}) does not match x_t dtype {x_t.dtype} "
            f"(shape {tuple(x_t.shape)})"
        )
    return out


class Objective(nn.Module, metaclass=abc.ABCMeta):
    """One generative objective: training loss, samplers and likelihood behind a single interface."""

    samplers: tuple[str, ...] = ()
    default_sampler: str = ""
    default_num_steps: int = 0
    learn_sigma: bool = False

    def __init__(self, num_classes: int | None = None, guidance_channels: int | None = None):
        super().__init__()
        self.num_classes = num_classes
        if guidance_channels is not None and guidance_channels < 1:
            raise ValueError(f"guidance_channels must be >= 1 or null, got {guidance_channels}")
        self.guidance_channels = guidance_channels

    # ---- the interface -------------------------------------------------------------------------------
    @abc.abstractmethod
    def sample_t(self, batch_size: int, device, generator: torch.Generator | None = None) -> Tensor:
        """Training times in the objective's native units [B] (diffusion: step indices)."""

    @abc.abstractmethod
    def unit_time(self, t: Tensor) -> Tensor:
        """Native time mapped to [0, 1] (0 = data) for the loss-vs-t buckets."""

    @abc.abstractmethod
    def loss(self, net: Net, x0: Tensor, y: Tensor, *, t: Tensor | None = None,
             noise: Tensor | None = None) -> Tensor:
        """Per-sample weighted training loss [B]; t and noise are drawn when None."""

    @abc.abstractmethod
    def sample(self, net: Net, noise: Tensor, y: Tensor, *, sampler: str | None = None,
               num_steps: int | None = None, cfg_scale: float = 1.0, generator: torch.Generator | None = None,
               progress: bool = False) -> Tensor:
        """x0 samples from noise [B,C,H,W]; sampler=None is the configured default."""

    @abc.abstractmethod
    def log_likelihood(self, net: Net, x0: Tensor, y: Tensor, *, exact_divergence: bool = False,
                       num_steps: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """log p(x0) in nats per sample [B] (diffusion: its variational bound)."""

    def bits_per_dim(self, nats: Tensor, x0: Tensor) -> Tensor:
        """Negative log-likelihood in bits per dimension of x0 (model space) from log-likelihood nats [B]."""
        return -nats / (x0[0].numel() * math.log(2.0))

    # ---- helpers for subclasses ------------------------------------------------------------------------
    def output_channels(self, C: int) -> tuple[int, ...]:
        """Channel counts this objective accepts from a net fed C-channel x_t."""
        return (C,)

    def resolve_sampler(self, sampler: str | None) -> str:
        name = self.default_sampler if sampler is None else sampler
        check_choice("sampler", name, self.samplers)
        return name

    def resolve_num_steps(self, num_steps: int | None) -> int:
        n = self.default_num_steps if num_steps is None else int(num_steps)
        if n < 1:
            raise ValueError(f"num_steps must be >= 1, got {n}")
        return n

    def net_output(self, net: Net, x_t: Tensor, t_net: Tensor, y: Tensor, cfg_scale: float = 1.0) -> Tensor:
        """net(x_t, t_net, y), checked; with cfg_scale != 1 one doubled batch (y, null class) is guided.

        Guidance acts on the first C channels (all of x's channels), or the first `guidance_channels`
        (DiT's 3-channel quirk) when set; further channels (learned variance) come from the conditional half.
        """
        channels = self.output_channels(x_t.shape[1])
        if cfg_scale == 1.0:
            return check_output(net(x_t, t_net, y), x_t, channels)
        if self.num_classes is None:
            raise ValueError("cfg_scale != 1 needs num_classes (the null class index) on the objective")
        null = torch.full_like(y, self.num_classes)
        try:
            out = net(torch.cat([x_t, x_t]), torch.cat([t_net, t_net]), torch.cat([y, null]))
        except IndexError as err:  # an embedding without the null row (a net trained without label dropout)
            raise ValueError(f"cfg_scale={cfg_scale} needs the null class (label {self.num_classes}), but the network "
                             "has no null class (trained with class_dropout_prob=0?): sample with cfg_scale=1 or "
                             "use a model trained with label dropout") from err
        out = check_output(out, torch.cat([x_t, x_t]), channels)
        cond, uncond = out.chunk(2)
        k = x_t.shape[1] if self.guidance_channels is None else min(self.guidance_channels, x_t.shape[1])
        guided = uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1)
