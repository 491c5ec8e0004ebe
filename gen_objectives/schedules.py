"""Discrete DDPM schedule (float64) and DiT/IDDPM-style timestep respacing.

Step index i in {0..T-1} is DiT's convention: x_i = sqrt(alphas_cumprod[i]) x0 + sqrt(1 - alphas_cumprod[i]) eps,
so i = 0 is the first (least) noised level and the network sees i as its time input.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .paths import append_dims, check_betas, check_choice


def linear_betas(num_timesteps: int, beta_min: float, beta_max: float) -> np.ndarray:
    """beta_i = beta(t_i) / T with t_i = i / (T - 1): 0.1/20 and T = 1000 give linspace(1e-4, 0.02) (DDPM)."""
    return np.linspace(beta_min / num_timesteps, beta_max / num_timesteps, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine alpha-bar, turned into betas and capped at max_beta."""
    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    T = num_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return np.array(betas, dtype=np.float64)


class LinearBetas:
    """The DDPM linear schedule, driven by the same beta_min/beta_max keys as the VP path."""

    name = "linear"

    def __call__(self, num_timesteps: int, beta_min: float, beta_max: float) -> np.ndarray:
        return linear_betas(num_timesteps, beta_min, beta_max)


class CosineBetas:
    """IDDPM's cosine schedule (beta_min/beta_max do not apply)."""

    name = "cosine"

    def __call__(self, num_timesteps: int, beta_min: float, beta_max: float) -> np.ndarray:
        return cosine_betas(num_timesteps)


BETA_SCHEDULES = {"linear": LinearBetas, "cosine": CosineBetas}


def space_timesteps(num_timesteps: int, spacing: str | int) -> list[int]:
    """Kept step indices: "ddimN" = every T//N-th step from 0; "N" or "a,b,c" = N evenly spread per section.

    Matches the semantics of IDDPM/DiT's respacing so official checkpoints sample as published.
    """
    spacing = str(spacing)
    T = num_timesteps
    if spacing.startswith("ddim"):
        count = int(spacing[len("ddim"):])
        for stride in range(1, T):
            kept = list(range(0, T, stride))
            if len(kept) == count:
                return kept
        raise ValueError(f"cannot make {count} equally strided steps out of {T}")
    counts = [int(c) for c in spacing.split(",")]
    size, extra = divmod(T, len(counts))
    kept: list[int] = []
    start = 0
    for k, count in enumerate(counts):
        section = size + (1 if k < extra else 0)
        if count > section:
            raise ValueError(f"cannot take {count} steps out of a section of {section}")
        stride = 1.0 if count <= 1 else (section - 1) / (count - 1)
        position = 0.0  # accumulated, not j * stride: IDDPM's float sums round differently for 278 of 1..1000
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += section
    return sorted(set(kept))


class DiscreteSchedule:
    """Betas and every derived DDPM quantity in float64; `timestep_map[i]` is the index the network sees."""

    def __init__(
        self,
        num_timesteps: int = 1000,
        schedule: str = "linear",
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        *,
        betas: np.ndarray | None = None,
        timestep_map: list[int] | None = None,
    ):
        if betas is None:
            check_choice("schedule", schedule, BETA_SCHEDULES)
            check_betas(beta_min, beta_max)
            if num_timesteps < 2:
                raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
            betas = BETA_SCHEDULES[schedule]()(num_timesteps, beta_min, beta_max)
        betas = np.asarray(betas, dtype=np.float64)
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]; check beta_min/beta_max against num_timesteps")
        self.num_timesteps = len(betas)
        self.timestep_map = list(range(self.num_timesteps)) if timestep_map is None else list(timestep_map)

        alphas = 1.0 - betas
        ac = np.cumprod(alphas)  # alphas_cumprod[i] = prod_{j<=i} (1 - beta_j)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)  # beta-tilde_i; 0 at i = 0
        self.np = {
            "betas": betas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "posterior_variance": post_var,
            # log beta-tilde with the i = 0 zero replaced by beta-tilde_1 (IDDPM).
            "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:])),
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),  # multiplies x0
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),  # multiplies x_t
            "log_betas": np.log(betas),
            # IDDPM's "fixed large" variance: beta_i, with beta-tilde_1 at i = 0.
            "fixed_large_variance": np.append(post_var[1], betas[1:]),
        }
        # The same arrays as float64 CPU tensors, also reachable as attributes (schedule.alphas_cumprod).
        self._tensors: dict[str, Tensor] = {k: torch.from_numpy(v) for k, v in self.np.items()}
        for name, tensor in self._tensors.items():
            setattr(self, name, tensor)
        self._tensors["timestep_map"] = torch.tensor(self.timestep_map, dtype=torch.float64)

    def extract(self, name: str, i: Tensor, ndim: int, like: Tensor) -> Tensor:
        """Look up schedule array `name` at step indices i [B]; shaped [B,1,..] in like's dtype/device."""
        arr = self._tensors[name]
        dtype = like.dtype if like.is_floating_point() else torch.float64
        if like.device.type == "mps":
            arr = arr.float()
        vals = arr.to(like.device)[i.to(like.device).long()]
        return append_dims(vals.to(dtype), ndim)

    def respace(self, spacing: str | int) -> DiscreteSchedule:
        """A shorter chain on the kept indices with beta'_k = 1 - abar[i_k] / abar[i_{k-1}] (same marginals)."""
        kept = space_timesteps(self.num_timesteps, spacing)
        ac = self.np["alphas_cumprod"]
        last, new_betas = 1.0, []
        for i in kept:
            new_betas.append(1.0 - ac[i] / last)
            last = ac[i]
        return DiscreteSchedule(betas=np.array(new_betas), timestep_map=[self.timestep_map[i] for i in kept])

    def __repr__(self) -> str:
        return f"DiscreteSchedule(T={self.num_timesteps}, steps={self.timestep_map[:3]}...)"
