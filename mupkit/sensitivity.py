"""How much each hyperparameter matters: the loss profile along one hyperparameter, the others at
their best (the "loss vs HP" curves Tensor Programs V, Sec. 6 and Fig. 4, draws per HP).

For hyperparameter ``h`` with values ``v_1 < ... < v_k`` and seed-averaged losses ``L(point)``::

    profile(v) = min over points with h = v of L(point)
    cost       = mean over the finite neighbours v_{i*-1}, v_{i*+1} of profile(v) - profile(v_{i*})

``i*`` is the profile's minimum, so ``cost`` is the loss lost by missing ``h`` by one grid step
(inf when a neighbour diverged). A grid gives exact profiles; a random search over the same
values gives profiles from the points it drew.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class Sensitivity:
    """The loss profile of one hyperparameter and its one-grid-step cost."""

    hparam: str
    values: tuple[float, ...]
    profile: tuple[float, ...]
    best: float
    cost: float


def sensitivities(averaged: Mapping[tuple[tuple[str, float], ...], float]) -> list[Sensitivity]:
    """One :class:`Sensitivity` per hyperparameter with more than one value in ``averaged``
    (hyperparameter point, as sorted ``(name, value)`` pairs -> seed-averaged loss)."""
    names = sorted({k for point in averaged for k, _ in point})
    out = []
    for h in names:
        profile: dict[float, float] = {}
        for point, loss in averaged.items():
            v = dict(point)[h]
            profile[v] = min(profile.get(v, math.inf), loss)
        if len(profile) < 2:
            continue
        values = sorted(profile)
        losses = [profile[v] for v in values]
        i = min(range(len(values)), key=losses.__getitem__)
        near = [losses[j] for j in (i - 1, i + 1) if 0 <= j < len(values)]
        cost = sum(near) / len(near) - losses[i]
        out.append(Sensitivity(h, tuple(values), tuple(losses), values[i], cost))
    return out
