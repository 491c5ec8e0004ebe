"""gen_objectives: Gaussian paths, DDPM schedules, conversions, the objective factors and the three objectives."""

from .factors import PREDICTIONS, TIME_SAMPLINGS, WEIGHTINGS
from .objectives import OBJECTIVES, Objective, build_objective
from .paths import PATHS, DiscreteVPPath, GaussianPath, GVPPath, LinearPath, VPPath, make_path
from .schedules import DiscreteSchedule, space_timesteps

__all__ = [
    "OBJECTIVES", "PATHS", "PREDICTIONS", "TIME_SAMPLINGS", "WEIGHTINGS", "DiscreteSchedule", "DiscreteVPPath",
    "GVPPath", "GaussianPath", "LinearPath", "Objective", "VPPath", "build_objective", "make_path",
    "space_timesteps",
]
