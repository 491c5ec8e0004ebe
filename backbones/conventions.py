"""Time conventions of published flow networks, as wrappers that present them in the project's network contract.

The project's score/flow objectives call net(x_t, t_net, y) with t_net = 1000 t, t = 0 data, t = 1 noise, and a flow
net returns the velocity d x_t / d t (docs/ARCHITECTURE.md). A network trained elsewhere keeps its own convention
inside the wrapper, so its weights load unchanged and samples are those of its own sampler.
"""

from __future__ import annotations

import torch
from torch import nn

PROJECT_T_NET_SCALE = 1000.0  # t_net = 1000 t for the score and flow objectives


class SiTTime(nn.Module):
    """SiT and LightningDiT: the net sees s = 1 - t in [0, 1] (s = 1 is data) and returns dx/ds = -dx/dt.

    SiT's linear path x_s = s x0 + (1 - s) eps is the project's x_t = (1 - t) x0 + t eps at s = 1 - t, so the
    velocity toward data is minus the project's velocity toward noise (SiT transport/path.py ICPlan).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t_net: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        s = 1.0 - t_net / PROJECT_T_NET_SCALE  # [B]
        return -self.net(x, s, y, **kwargs)


class REPATime(nn.Module):
    """REPA: t = 0 data, t = 1 noise and velocity d x_t / d t as here, but the net sees t itself, not 1000 t."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t_net: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.net(x, t_net / PROJECT_T_NET_SCALE, y, **kwargs)


# model.time_convention: project (no wrapper: DiT, diffusers DiT, the project's own runs) | sit | repa
TIME_CONVENTIONS: dict[str, type[nn.Module] | None] = {"project": None, "sit": SiTTime, "repa": REPATime}


def check_time_convention(name: str) -> None:
    if name not in TIME_CONVENTIONS:
        raise ValueError(f"model.time_convention={name!r}; choose one of {tuple(TIME_CONVENTIONS)}")


def apply_time_convention(net: nn.Module, name: str) -> nn.Module:
    """`net` wrapped so that it follows the project's contract (unchanged for `project`)."""
    check_time_convention(name)
    wrapper = TIME_CONVENTIONS[name]
    return net if wrapper is None else wrapper(net)


def unwrap(net: nn.Module) -> nn.Module:
    """The network inside a time-convention wrapper (the one whose state_dict has the published keys)."""
    return net.net if isinstance(net, (SiTTime, REPATime)) else net
