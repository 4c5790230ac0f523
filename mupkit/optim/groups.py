"""Param groups of mupkit's optimizers: muP scales from :func:`mupkit.param_groups`, and joining
groups of equal values for a step.

Groups keep ``lr`` as the scheduler-controlled base value and carry ``lr_scale``, ``wd_scale``
and ``eps_scale`` (:data:`SCALE_KEYS`); :class:`.base.Optimizer` applies them to a copy of each
group at every step, so any ``torch.optim.lr_scheduler`` works unchanged.
"""

from __future__ import annotations

import operator
from typing import Any, Iterable

from ..rules import Family

SCALE_KEYS = ("lr_scale", "wd_scale", "eps_scale")


def resolve_groups(params: Iterable[Any], family: Family) -> list[Any]:
    """Copy the caller's groups, turning ``mupkit_scales`` into this family's scale keys."""
    params = list(params)
    if not params or not isinstance(params[0], dict):
        return params
    out = []
    for i, group in enumerate(params):
        if group.get("mupkit_concrete"):
            raise ValueError(f"param group {i} already has concrete lr = lr * lr_scale (it came from "
                             f"mupkit.param_groups(..., optimizer=..., lr=...), which is for torch and third-party "
                             f"optimizers). For mupkit.optim, call mupkit.param_groups(model) without lr.")
        group = {k: v for k, v in group.items() if k != "mupkit_scales"}
        scales = params[i].get("mupkit_scales")
        if scales is not None:
            if family.name not in scales:
                raise ValueError(f"param group {i} has no muP scales for family {family.name!r} (it has "
                                 f"{sorted(scales)}); rebuild the groups with mupkit.param_groups(model) from this "
                                 f"mupkit version.")
            group.update(scales[family.name])
        out.append(group)
    return out


#: group keys that say which tensors a group holds, not how they are stepped
MEMBERSHIP_KEYS = ("params", "param_names")


def merge_equal_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``groups`` with those of equal hyperparameters joined (new dicts), or ``groups`` itself when
    no two are equal. State is per parameter, so a step over the joined groups is the same step.

    Runs every step, so it costs one ``itemgetter`` and one hash per group (~1 us): a group with as
    many keys as the first, the same membership keys and all of the first's others has its keys."""
    if len(groups) < 2:
        return groups
    first = groups[0]
    values_of = operator.itemgetter(*[k for k in first if k not in MEMBERSHIP_KEYS])
    membership = [k in first for k in MEMBERSHIP_KEYS]
    merged: dict[Any, dict[str, Any]] = {}
    for group in groups:
        try:
            same_keys = len(group) == len(first) and [k in group for k in MEMBERSHIP_KEYS] == membership
            key = values_of(group) if same_keys else None
            target = merged.get(key)
        except (KeyError, TypeError):  # other keys, or an unhashable value
            key = None
        if key is None:  # compare by repr (and by which membership keys the group has)
            key = repr(sorted((k, v if k not in MEMBERSHIP_KEYS else None) for k, v in group.items()))
            target = merged.get(key)
        if target is None:
            merged[key] = {**group, **{k: list(group[k]) for k in MEMBERSHIP_KEYS if k in group}}
        else:
            for k in MEMBERSHIP_KEYS:
                if k in target:
                    target[k].extend(group[k])
    return groups if len(merged) == len(groups) else list(merged.values())


__all__ = ["MEMBERSHIP_KEYS", "SCALE_KEYS", "merge_equal_groups", "resolve_groups"]
