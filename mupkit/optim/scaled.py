"""Per-group muP multipliers on top of any ``torch.optim`` algorithm.

Groups keep ``lr`` as the scheduler-controlled base value and carry ``lr_scale``,
``wd_scale`` and ``eps_scale``; for the duration of ``step()`` each group's ``lr``,
``weight_decay`` and ``eps`` are replaced by their effective values and restored afterwards,
so torch's own single-tensor, foreach and fused kernels do the math and any
``torch.optim.lr_scheduler`` works unchanged.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any, Iterable

import torch

from ..groups import WEIGHT_DECAY_POLICIES, effective_weight_decay
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


class ScaledGroups:
    """Mixin for a ``torch.optim.Optimizer`` subclass; set ``family`` on the subclass.

    ``weight_decay_policy``: ``"coupled"`` (effective wd = ``weight_decay * wd_scale``) or
    ``"independent"`` (decoupled families only: per-step decay ``weight_decay * lr_t / lr_0``,
    where ``lr_0`` is the group's lr when the optimizer was made; width-invariant). A group's own
    ``weight_decay_policy`` wins; ``None`` (default): the plan's default carried by
    :func:`mupkit.param_groups` (u-muP: independent) when this optimizer's decay is decoupled,
    else coupled.
    """

    family: Family

    def __init__(self, params, *args, weight_decay_policy: str | None = None, **kwargs):
        if weight_decay_policy is not None:
            self._check_policy(weight_decay_policy)
        if kwargs.get("decoupled_weight_decay") and not self.family.decoupled_wd:
            raise ValueError(f"{type(self).__name__}(decoupled_weight_decay=True) is AdamW; use mupkit.optim.AdamW "
                             f"so the weight-decay multipliers follow the decoupled rule.")
        super().__init__(resolve_groups(params, self.family), *args, **kwargs)
        for group in self.param_groups:
            for key in SCALE_KEYS:
                group.setdefault(key, 1.0)
            plan_policy = group.pop("plan_weight_decay_policy", None)
            if "weight_decay_policy" not in group:  # else the group's own (explicit) policy wins
                if weight_decay_policy is not None:
                    group["weight_decay_policy"] = weight_decay_policy
                else:
                    decoupled_default = plan_policy if self.family.decoupled_wd else None
                    group["weight_decay_policy"] = decoupled_default or "coupled"
            self._check_policy(group["weight_decay_policy"])
            group.setdefault("wd_reference_lr", group["lr"])

    def _check_policy(self, policy: str) -> None:
        if policy not in WEIGHT_DECAY_POLICIES:
            raise ValueError(f"weight_decay_policy={policy!r}; use one of {WEIGHT_DECAY_POLICIES}")
        if policy == "independent" and not self.family.decoupled_wd:
            raise ValueError(f"{type(self).__name__} adds weight decay to the gradient (family "
                             f"{self.family.name!r}); weight_decay_policy='independent' needs decoupled decay. "
                             f"Use mupkit.optim.AdamW, or weight_decay_policy='coupled'.")

    @contextlib.contextmanager
    def _effective_hyperparameters(self):
        saved = [{k: g[k] for k in ("lr", "weight_decay", "eps") if k in g} for g in self.param_groups]
        try:
            for group in self.param_groups:
                lr = group["lr"] * group["lr_scale"]
                if group.get("weight_decay"):
                    group["weight_decay"] = effective_weight_decay(
                        group["weight_decay"], group["weight_decay_policy"], wd_scale=group["wd_scale"],
                        lr_scale=group["lr_scale"], reference_lr=group["wd_reference_lr"])
                if "eps" in group:
                    group["eps"] = group["eps"] * group["eps_scale"]
                group["lr"] = lr
            yield
        finally:
            for group, values in zip(self.param_groups, saved):
                group.update(values)

    def step(self, closure=None):
        with self._merged_groups(), self._effective_hyperparameters():
            return super().step(closure)

    @contextlib.contextmanager
    def _merged_groups(self):
        """For the duration of ``step()``, groups whose values (hyperparameters and muP
        multipliers) are all equal become one group (:func:`merge_equal_groups`), so torch's
        foreach and fused kernels launch once per distinct set of values, not once per group.
        Enter it before :meth:`_effective_hyperparameters`: the multipliers are then applied
        once per merged group (a function of its values), not once per group."""
        saved = self.param_groups
        self.param_groups = merge_equal_groups(saved)
        try:
            yield
        finally:
            self.param_groups = saved

    @staticmethod
    def _loss(closure):
        """Re-evaluate the model with gradients on, as ``torch.optim`` does, when given a closure."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()
