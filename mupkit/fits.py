"""Where a loss curve bottoms out, and how that optimum scales: parabola refinement, log-log power
laws and the bootstrap that gives them intervals.

* :func:`refine_optimum`: the vertex of the parabola in ``log2(x)`` through the grid minimum and
  its two neighbours (Tensor Programs V, Sec. 5 reads the optimum off such curves).
* :func:`fit_power_law`: least squares of ``log2 y = log2 c + sum_a e_a log2 x_a`` (one column
  per axis: ``LR* = c T^-beta`` for one axis, Bjorck et al. 2024, "Scaling Optimal LR Across
  Token Horizons", Sec. 3; several axes at once, Shen et al. 2024, "Power Scheduler", Sec. 3:
  ``lr_opt = beta a T^b`` in batch ``beta`` and tokens ``T``).
* :func:`bootstrap`: percentile intervals from refits on resampled data (Efron & Tibshirani 1993,
  ch. 13). The derivation and the resampling scheme are in ``docs/transfer.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

#: the central probability mass of a reported interval
LEVEL = 0.95


def refine_optimum(line: Sequence[tuple[float, float]], i: int) -> float:
    """Vertex of the parabola in ``log2(x)`` through points ``i-1, i, i+1`` of ``line`` (``(x,
    loss)`` sorted by ``x``, ``i`` the minimum), clipped to ``[x_{i-1}, x_{i+1}]``; the grid point
    itself when the minimum is at an edge, a neighbour diverged, or the parabola opens downward."""
    if i in (0, len(line) - 1) or not all(math.isfinite(line[j][1]) for j in (i - 1, i, i + 1)):
        return line[i][0]
    xs = np.log2([line[j][0] for j in (i - 1, i, i + 1)])
    a, b, _ = np.polyfit(xs, [line[j][1] for j in (i - 1, i, i + 1)], 2)
    if a <= 0:
        return line[i][0]
    return float(2 ** np.clip(-b / (2 * a), xs[0], xs[2]))


@dataclass(frozen=True)
class PowerLaw:
    """``y = coefficient * prod_a x_a^exponents[a]``, fitted in log2 space, with percentile
    intervals (``intervals[a] = (low, high)``; None without a bootstrap)."""

    coefficient: float
    exponents: Mapping[str, float]
    intervals: Mapping[str, tuple[float, float]] | None = None

    def __call__(self, **x: float) -> float:
        missing = set(self.exponents) - set(x)
        if missing:
            raise ValueError(f"the power law needs {sorted(self.exponents)}; missing {sorted(missing)}")
        return float(self.coefficient * math.prod(x[a] ** e for a, e in self.exponents.items()))

    def describe(self, y: str = "y") -> str:
        """E.g. ``lr* = 0.012 * tokens^-0.31 [-0.40, -0.22]``."""
        terms = []
        for a, e in self.exponents.items():
            band = "" if self.intervals is None else f" [{self.intervals[a][0]:+.2f}, {self.intervals[a][1]:+.2f}]"
            terms.append(f"{a}^{e:+.2f}{band}")
        return f"{y} = {self.coefficient:.3g} * " + " * ".join(terms)


def fit_power_law(points: Sequence[tuple[Mapping[str, float], float]], axes: Sequence[str]) -> PowerLaw:
    """Least-squares ``log2 y = log2 c + sum_a e_a log2 x_a`` over ``points`` (``(x, y)`` with
    ``x[a]`` for each of ``axes``). The points must span the axes (``len(axes) + 1`` independent
    ones at least; with exactly that many the law interpolates them)."""
    if not axes:
        raise ValueError("fit_power_law(axes=[]) has nothing to fit; name the axes the points vary along, "
                         "e.g. axes=[\"tokens\"] or [\"width\", \"batch\"]")
    X = np.array([[1.0] + [math.log2(x[a]) for a in axes] for x, _ in points])
    y = np.log2([v for _, v in points])
    if np.linalg.matrix_rank(X) < len(axes) + 1:
        raise ValueError(f"the points do not vary independently along {list(axes)}: a power law in these axes "
                         f"needs at least {len(axes) + 1} points that span them (sweep more values per axis)")
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    return PowerLaw(float(2 ** beta[0]), {a: float(e) for a, e in zip(axes, beta[1:])})


def bootstrap(estimate: Callable[[np.random.Generator], dict[str, float]], replicates: int = 200,
              seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile intervals (:data:`LEVEL`) of the quantities ``estimate(rng)`` returns, each call
    computing them from one resampling of the data drawn with ``rng``."""
    if replicates < 2:
        raise ValueError(f"replicates={replicates}: a bootstrap needs at least 2 (200 is the default)")
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(replicates):
        for k, v in estimate(rng).items():
            draws.setdefault(k, []).append(v)
    tail = 100 * (1 - LEVEL) / 2
    return {k: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) for k, v in draws.items()}
