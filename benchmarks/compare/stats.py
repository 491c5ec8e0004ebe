"""Statistics a reviewer accepts: paired t-intervals over training seeds, rankings that order only what those
intervals separate, the additive main-effects model of the ablation, and the rule that picks the headline budget.

Pairing: runs with the same training seed share initial weights, data order and training noise, and every run
samples from the same noise, so a per-seed difference removes what the two runs have in common.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as st

CONFIDENCE = 0.95
NOT_DISTINGUISHABLE = "not distinguishable"


@dataclass(frozen=True)
class Interval:
    """An estimate with its two-sided t-interval; df = 0 means too few values for an interval."""

    estimate: float
    lo: float
    hi: float
    se: float
    df: int
    n: int

    @property
    def excludes_zero(self) -> bool:
        """False without an interval, and for identical per-seed differences (se = 0: no t-interval exists;
        with metrics on a grid, such as an accuracy over N samples, that is rounding, not evidence)."""
        return self.df > 0 and self.se > 0.0 and (self.lo > 0.0 or self.hi < 0.0)

    def as_dict(self) -> dict:
        return {**asdict(self), "excludes_zero": self.excludes_zero}

    def text(self, digits: int = 2) -> str:
        if self.df < 1:
            return f"{self.estimate:+.{digits}f} (n={self.n}: no interval)"
        return f"{self.estimate:+.{digits}f} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]"


def _t_quantile(confidence: float, df: int) -> float:
    return float(st.t.ppf(0.5 + confidence / 2.0, df))


def t_interval(values, confidence: float = CONFIDENCE) -> Interval:
    """Mean of `values` and its t-interval (sample std, n - 1 degrees of freedom)."""
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    if v.size == 0 or not np.all(np.isfinite(v)):
        raise ValueError(f"t_interval needs finite values, got {v.tolist()}")
    mean = float(v.mean())
    if v.size < 2:
        return Interval(mean, math.nan, math.nan, math.nan, 0, int(v.size))
    se = float(v.std(ddof=1) / math.sqrt(v.size))
    q = _t_quantile(confidence, v.size - 1)
    return Interval(mean, mean - q * se, mean + q * se, se, int(v.size - 1), int(v.size))


def paired_difference(a: dict, b: dict, confidence: float = CONFIDENCE) -> Interval:
    """a - b over the seeds both have ({seed: value} each): the per-seed differences' t-interval."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"no common seeds: {sorted(a)} vs {sorted(b)}")
    return t_interval([a[s] - b[s] for s in seeds], confidence)


def verdict(interval: Interval, name_a: str, name_b: str, lower_is_better: bool) -> str:
    """'<name> better' when the interval of a - b excludes zero, else 'not distinguishable'."""
    if not interval.excludes_zero:
        return NOT_DISTINGUISHABLE
    a_lower = interval.estimate < 0.0
    return f"{name_a if a_lower == lower_is_better else name_b} better"


def ranking(per_name: dict[str, dict], lower_is_better: bool = True, confidence: float = CONFIDENCE) -> dict:
    """Names by seed-mean, best first, joined by '<' (lower is better) or '>' only where the neighbours' paired
    interval excludes zero and by '≈' where it does not; plus every pair's difference and verdict."""
    names = sorted(per_name, key=lambda n: float(np.mean(list(per_name[n].values()))), reverse=not lower_is_better)
    better = " < " if lower_is_better else " > "
    order = names[0]
    for x, y in zip(names, names[1:]):
        order += (better if paired_difference(per_name[x], per_name[y], confidence).excludes_zero else " ≈ ") + y
    pairs = []
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            iv = paired_difference(per_name[x], per_name[y], confidence)
            pairs.append({"a": x, "b": y, "difference": iv.as_dict(), "verdict": verdict(iv, x, y, lower_is_better)})
    return {"order": order, "pairs": pairs, "confidence": confidence}


# ---- the ablation's additive model -------------------------------------------------------------------------
@dataclass
class MainEffects:
    """Least-squares fit of response = intercept + sum over factors of effect[level] + block[seed] + noise.

    Treatment coding: each factor's first level is its reference (effect 0); blocks (training seeds) absorb
    what runs with the same seed share. Intervals use the residual variance with n - p degrees of freedom.
    """

    factors: dict[str, list]
    columns: list[str]
    coef: np.ndarray        # [p]
    cov: np.ndarray         # [p, p]
    df: int
    rss: float
    n: int
    factor_tests: dict      # factor -> {"F", "p", "df_num"}
    confidence: float = CONFIDENCE

    def contrast(self, weights: dict[str, float]) -> Interval:
        """sum_k w_k coef_k with its t-interval (weights by column name)."""
        unknown = set(weights) - set(self.columns)
        if unknown:
            raise KeyError(f"no columns {sorted(unknown)}; have {self.columns}")
        w = np.array([weights.get(c, 0.0) for c in self.columns])
        est = float(w @ self.coef)
        se = float(math.sqrt(max(w @ self.cov @ w, 0.0)))
        if self.df < 1:
            return Interval(est, math.nan, math.nan, math.nan, 0, self.n)
        q = _t_quantile(self.confidence, self.df)
        return Interval(est, est - q * se, est + q * se, se, self.df, self.n)

    def predict(self, levels: dict, block_weights: dict[str, float] | None = None) -> float:
        """The fitted response at these factor levels (blocks: weights per block column, default none)."""
        weights = {"intercept": 1.0, **(block_weights or {})}
        for factor, level in levels.items():
            if factor in self.factors and level != self.factors[factor][0]:
                weights[column_name(factor, level)] = 1.0
        return self.contrast(weights).estimate

    def effect(self, factor: str, level) -> Interval:
        """Response at `level` minus at the factor's reference level, the other factors held fixed."""
        return self.difference({factor: level}, {factor: self.factors[factor][0]})

    def difference(self, levels_a: dict, levels_b: dict) -> Interval:
        """Predicted response at levels_a minus at levels_b (factors missing from both cancel)."""
        weights: dict[str, float] = {}
        for levels, sign in ((levels_a, 1.0), (levels_b, -1.0)):
            for factor, level in levels.items():
                if level != self.factors[factor][0]:
                    col = column_name(factor, level)
                    weights[col] = weights.get(col, 0.0) + sign
        return self.contrast(weights)


def column_name(factor: str, level) -> str:
    return f"{factor}={level}"


def _design_matrix(rows: list[dict], factors: dict[str, list], block: str | None) -> tuple[np.ndarray, list[str]]:
    columns, cols = ["intercept"], [np.ones(len(rows))]
    for factor, levels in factors.items():
        for row in rows:
            if row[factor] not in levels:
                raise ValueError(f"{factor}={row[factor]!r} is not one of its levels {levels}")
        for level in levels[1:]:
            columns.append(column_name(factor, level))
            cols.append(np.array([float(r[factor] == level) for r in rows]))
    if block is not None:
        for value in sorted({r[block] for r in rows})[1:]:
            columns.append(column_name(block, value))
            cols.append(np.array([float(r[block] == value) for r in rows]))
    return np.stack(cols, axis=1), columns


def _least_squares(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, int]:
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    return coef, float(resid @ resid), int(np.linalg.matrix_rank(X))


def fit_main_effects(rows: list[dict], factors: dict[str, list], response: str, block: str | None = "seed",
                     confidence: float = CONFIDENCE) -> MainEffects:
    """Fit the additive model to rows ({factor: level, block: seed, response: value}); fails when the design
    cannot separate the effects (rank-deficient) and names the columns it cannot estimate."""
    y = np.array([float(r[response]) for r in rows])
    X, columns = _design_matrix(rows, factors, block)
    coef, rss, rank = _least_squares(X, y)
    if rank < X.shape[1]:
        null = np.linalg.svd(X)[2][rank:]
        lost = sorted({columns[j] for v in null for j in np.flatnonzero(np.abs(v) > 1e-8)})
        raise ValueError(f"the design cannot separate these effects (rank {rank} < {X.shape[1]}): {lost}")
    n, p = X.shape
    df = n - p
    sigma2 = rss / df if df > 0 else math.nan
    cov = sigma2 * np.linalg.inv(X.T @ X)
    tests = {}
    for factor, levels in factors.items():
        keep = [j for j, c in enumerate(columns) if not c.startswith(f"{factor}=")]
        _, rss_reduced, _ = _least_squares(X[:, keep], y)
        q = len(levels) - 1
        if df > 0 and q > 0 and rss > 0:
            F = ((rss_reduced - rss) / q) / (rss / df)
            tests[factor] = {"F": float(F), "p": float(st.f.sf(F, q, df)), "df_num": q, "df_den": df}
        else:
            tests[factor] = {"F": math.nan, "p": math.nan, "df_num": q, "df_den": df}
    return MainEffects(factors={f: list(v) for f, v in factors.items()}, columns=columns, coef=coef, cov=cov, df=df,
                       rss=rss, n=n, factor_tests=tests, confidence=confidence)


# ---- the headline budget -----------------------------------------------------------------------------------
def headline_budget(curves: dict[str, dict[int, float]], tol: float) -> dict:
    """The first training budget B from which every curve is flat: for each objective, the step into B and
    every later step changes the (seed-mean) metric by at most `tol` relative to the step's start. With no such
    B the largest budget is returned with flattened=False (the report then says the curves had not flattened).

    curves: objective -> {budget: seed-mean metric}.
    """
    budgets = sorted(set.intersection(*(set(c) for c in curves.values())))
    if not budgets:
        raise ValueError("no training budget is common to every curve")
    changes = {name: {b: abs(c[b] - c[a]) / max(abs(c[a]), 1e-12) for a, b in zip(budgets, budgets[1:])}
               for name, c in curves.items()}
    rule = (f"the first budget B such that, for every objective, the step into B and every later step change "
            f"the seed-mean metric by at most {100 * tol:g}%")
    for k in range(1, len(budgets)):
        if all(changes[name][b] <= tol for name in curves for b in budgets[k:]):
            return {"budget": budgets[k], "flattened": True, "rule": rule, "tolerance": tol,
                    "relative_changes": changes}
    return {"budget": budgets[-1], "flattened": False, "rule": rule, "tolerance": tol, "relative_changes": changes}
