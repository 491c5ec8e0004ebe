"""gen_objectives: Gaussian paths, DDPM schedules, conversions and the diffusion/score/flow objectives."""

from .objectives import OBJECTIVES, Objective, build_objective
from .paths import PATHS, GaussianPath, GVPPath, LinearPath, VPPath, make_path
from .schedules import DiscreteSchedule, space_timesteps

__all__ = [
    "OBJECTIVES", "PATHS", "DiscreteSchedule", "GVPPath", "GaussianPath", "LinearPath", "Objective", "VPPath",
    "build_objective", "make_path", "space_timesteps",
]
