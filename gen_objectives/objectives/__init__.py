"""Objectives behind one interface (base.Objective) and a name -> class registry."""

from ..paths import check_choice
from .base import Objective
from .diffusion import DiffusionObjective
from .flow import FlowObjective
from .score import ScoreObjective

OBJECTIVES: dict[str, type[Objective]] = {
    "diffusion": DiffusionObjective,
    "score": ScoreObjective,
    "flow": FlowObjective,
}


def build_objective(name: str, **kwargs) -> Objective:
    """Objective by config name with its constructor keys."""
    check_choice("objective", name, OBJECTIVES)
    return OBJECTIVES[name](**kwargs)


__all__ = ["OBJECTIVES", "DiffusionObjective", "FlowObjective", "Objective", "ScoreObjective", "build_objective"]
