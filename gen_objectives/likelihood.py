"""Log-likelihood through the probability-flow ODE (seed eq. 25, instantaneous change of variables).

Along dx/dt = f(x, t), d/dt log p_t(x_t) = -div f. Integrating data -> noise with the augmented state
(x, delta), d delta/dt = div f, gives log p_0(x0) = log N(x(1); 0, I) + delta(1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .solvers import rademacher_like


def standard_normal_logpdf(x: Tensor) -> Tensor:
    """log N(x; 0, I) summed over non-batch dims -> [B]."""
    D = x[0].numel()
    return -0.5 * x.flatten(1).pow(2).sum(1) - 0.5 * D * math.log(2 * math.pi)


def exact_divergence(f_x: Tensor, x: Tensor) -> Tensor:
    """Trace of df/dx by one backward pass per dimension -> [B]; f_x = f(x) with x requiring grad."""
    f_flat = f_x.flatten(1)  # [B, D]
    div = torch.zeros(f_flat.shape[0], dtype=f_flat.dtype, device=f_flat.device)
    for i in range(f_flat.shape[1]):
        (grad,) = torch.autograd.grad(f_flat[:, i].sum(), x, retain_graph=True)
        div = div + grad.flatten(1)[:, i]
    return div


def hutchinson_divergence(f_x: Tensor, x: Tensor, probe: Tensor) -> Tensor:
    """Unbiased estimate z^T (df/dx) z with a Rademacher probe z -> [B]."""
    (grad,) = torch.autograd.grad((f_x * probe).sum(), x)
    return (grad * probe).flatten(1).sum(1)


def ode_log_likelihood(
    drift: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    solver,
    *,
    t_start: float,
    t_end: float = 1.0,
    num_steps: int | None = None,
    exact: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """log p_0(x0) in nats [B] by integrating drift(t, x) from t_start (data) to t_end (noise).

    The probe for the Hutchinson estimate is drawn once and held fixed along the trajectory (FFJORD).
    """
    shape = x0.shape  # [B, C, H, W]
    D = x0[0].numel()
    probe = None if exact else rademacher_like(x0, generator)

    def augmented(t: Tensor, state: Tensor) -> Tensor:
        # state [B, D + 1] = (x flattened, accumulated divergence)
        with torch.enable_grad():
            x = state[:, :D].reshape(shape).detach().requires_grad_(True)
            f_x = drift(t, x)
            div = exact_divergence(f_x, x) if exact else hutchinson_divergence(f_x, x, probe)
        return torch.cat([f_x.detach().flatten(1), div.detach()[:, None]], dim=1)

    state0 = torch.cat([x0.flatten(1), torch.zeros_like(x0.flatten(1)[:, :1])], dim=1)
    state1 = solver.integrate(augmented, state0, t_start, t_end, num_steps, progress=progress)
    x1, delta = state1[:, :D].reshape(shape), state1[:, D]
    return standard_normal_logpdf(x1) + delta
