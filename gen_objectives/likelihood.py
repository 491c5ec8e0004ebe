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
    if probe is not None and probe.is_inference():
        with torch.inference_mode(False):
            probe = probe.clone()

    def augmented(t: Tensor, state: Tensor) -> Tensor:
        # state [B, D + 1] = (x flattened, accumulated divergence). The divergence needs autograd even when the
        # caller runs under torch.inference_mode (Lightning's validate/test/predict): leave it for this call and
        # clone, since an inference tensor can never require grad.
        with torch.inference_mode(False), torch.enable_grad():
            x = state[:, :D].reshape(shape).clone().requires_grad_(True)
            f_x = drift(t.clone(), x)
            div = exact_divergence(f_x, x) if exact else hutchinson_divergence(f_x, x, probe)
        return torch.cat([f_x.detach().flatten(1), div.detach()[:, None]], dim=1)

    state0 = torch.cat([x0.flatten(1), torch.zeros_like(x0.flatten(1)[:, :1])], dim=1)
    state1 = solver.integrate(augmented, state0, t_start, t_end, num_steps, progress=progress)
    x1, delta = state1[:, :D].reshape(shape), state1[:, D]
    return standard_normal_logpdf(x1) + delta


def dequantize(x0: Tensor, bin_width: float, generator: torch.Generator | None = None) -> Tensor:
    """x0 + (u - 1/2) bin_width, u ~ U[0, 1)^D: uniform over the quantisation bin centred on each data level."""
    device = generator.device if generator is not None else x0.device
    u = torch.rand(x0.shape, generator=generator, device=device, dtype=x0.dtype).to(x0.device)
    return x0 + (u - 0.5) * bin_width


def dequantized_bits_per_dim(log_p: Tensor, x0: Tensor, bin_width: float) -> Tensor:
    """Discrete NLL bound in bits/dim [B] from a density log p(x0 + u bin_width) at dequantised data (Theis et al.).

    -log P(bin) <= -E_u log p(x + u) - D log(bin_width) (Jensen): the figure published bits/dim report, comparable
    with a discretised decoder's ELBO on the same bins. bin_width is in model space (8-bit [-1, 1]: 2/255).
    """
    D = x0[0].numel()
    return (-log_p - D * math.log(bin_width)) / (D * math.log(2.0))


def convergence_table(log_likelihood, x0: Tensor, *, fixed_solver: str = "heun", steps=(16, 64, 256),
                      reference: str = "dopri5") -> list[dict]:
    """Mean NLL (bits/dim) of `fixed_solver` at each step count against the adaptive `reference`.

    log_likelihood(solver=..., num_steps=...) -> nats [B] (an objective's log_likelihood with net, data and
    generator bound, e.g. functools.partial). Rows: solver, num_steps, bits_per_dim, diff_vs_reference.
    """
    D = x0[0].numel()

    def bpd(nats: Tensor) -> float:
        return float((-nats / (D * math.log(2.0))).mean())

    ref = bpd(log_likelihood(solver=reference, num_steps=None))
    rows = [{"solver": reference, "num_steps": None, "bits_per_dim": ref, "diff_vs_reference": 0.0}]
    for n in steps:
        value = bpd(log_likelihood(solver=fixed_solver, num_steps=int(n)))
        rows.append({"solver": fixed_solver, "num_steps": int(n), "bits_per_dim": value,
                     "diff_vs_reference": value - ref})
    return rows
