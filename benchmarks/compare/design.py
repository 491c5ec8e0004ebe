"""The ablation's fractional factorial design: prediction x weighting x time_sampling x path x learn_sigma.

The full grid has 4 x 4 x 3 x 2 x 2 = 192 cells; 16 of them, an orthogonal array, estimate every main effect
without confounding it with another main effect (interactions are assumed small: the fit's residual checks
that). The array is L16(4^5): rows (a, b) over GF(4), columns a, b, a+b, a+2b, a+3b, so every pair of columns
shows each pair of levels exactly once. A 3-level factor takes a 4-level column with its reference level
doubled, a 2-level factor one with levels paired up; both keep the main effects orthogonal (proportional
frequencies). The three objectives' own corners are added to the 16 cells.
"""

from __future__ import annotations

import itertools

import numpy as np

# Levels per factor, the reference first: score's corner, so diffusion and flow read as changes from it. The
# factors take L16's columns in this order. Discrete times reach t = 1, where the linear path has alpha = 0 and
# only the sigma2 weight stays finite; no orthogonal assignment avoids every such cell (weighting x time is
# balanced), and this order leaves one, which the objectives refuse at construction: the fit uses the rest.
FACTORS: dict[str, list] = {
    "prediction": ["eps", "velocity", "x0", "score"],
    "weighting": ["sigma2", "velocity", "likelihood", "min_snr"],
    "time_sampling": ["uniform", "discrete", "logit_normal"],
    "learn_sigma": [False, True],
    "path": ["vp", "linear"],
}

# Each objective's own defaults: its corner of the grid (docs/ARCHITECTURE.md, "Objective keys").
CORNERS: dict[str, dict] = {
    "diffusion": {"prediction": "eps", "weighting": "sigma2", "time_sampling": "discrete", "path": "vp",
                  "learn_sigma": True},
    "score": {"prediction": "eps", "weighting": "sigma2", "time_sampling": "uniform", "path": "vp",
              "learn_sigma": False},
    "flow": {"prediction": "velocity", "weighting": "velocity", "time_sampling": "uniform", "path": "vp",
             "learn_sigma": False},
}

# Keys a level brings with it: alpha(1) = 0 on the linear path makes x0 = (x - sigma eps) / alpha and the
# likelihood weight infinite at t = 1, so linear-path cells train and sample on [t_min, 1 - 1e-3] (as SiT does).
LEVEL_KEYS: dict[tuple[str, object], dict] = {("path", "linear"): {"t_max": 0.999}}

# GF(4) = {0, 1, x, x + 1} as 0..3: addition is XOR, multiplication by this table (x^2 = x + 1).
GF4_MUL = np.array([[0, 0, 0, 0], [0, 1, 2, 3], [0, 2, 3, 1], [0, 3, 1, 2]])

# How a 4-level column carries a k-level factor (proportional frequencies keep main effects orthogonal).
COLLAPSE = {4: (0, 1, 2, 3), 3: (0, 1, 2, 0), 2: (0, 1, 0, 1)}


def l16() -> np.ndarray:
    """The orthogonal array L16(4^5) [16, 5] with levels 0..3."""
    rows = []
    for a, b in itertools.product(range(4), repeat=2):
        rows.append([a, b] + [a ^ GF4_MUL[k, b] for k in (1, 2, 3)])
    return np.array(rows)


def fractional_design(factors: dict[str, list] = FACTORS) -> list[dict]:
    """The 16 cells of L16 with the factors assigned to its columns in order (at most 5 factors)."""
    if len(factors) > 5 or any(len(levels) not in COLLAPSE for levels in factors.values()):
        raise ValueError(f"L16 holds at most 5 factors of 2-4 levels, got {[len(v) for v in factors.values()]}")
    array = l16()
    cells = []
    for row in array:
        cells.append({f: levels[COLLAPSE[len(levels)][row[j]]] for j, (f, levels) in enumerate(factors.items())})
    return cells


def ablation_cells(factors: dict[str, list] = FACTORS, corners: dict[str, dict] = CORNERS) -> list[dict]:
    """The design's cells plus the objectives' corners, each {'name', 'objective', 'levels'}.

    Corners run as their own objective (what a user runs); the other cells as `score` with every factor set
    (every objective accepts every key), so a cell differs from score's corner only in its factor levels.
    """
    out = [{"name": name, "objective": name, "levels": dict(levels)} for name, levels in corners.items()]
    seen = [c["levels"] for c in out]
    for k, levels in enumerate(fractional_design(factors)):
        if levels not in seen:
            out.append({"name": f"cell{k:02d}", "objective": "score", "levels": levels})
            seen.append(levels)
    return out


def cell_overrides(levels: dict) -> tuple[str, ...]:
    """The Hydra overrides of a cell: every factor set explicitly (booleans as true/false), plus LEVEL_KEYS."""
    out = []
    for factor, level in levels.items():
        out.append(f"objective.{factor}={str(level).lower() if isinstance(level, bool) else level}")
        out += [f"objective.{k}={v}" for k, v in LEVEL_KEYS.get((factor, level), {}).items()]
    return tuple(out)
