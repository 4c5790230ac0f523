"""The base of every mupkit optimizer: one explicit step template around each algorithm's update.

``step(closure)``:

1. the closure, with gradients on (as ``torch.optim``);
2. fp32 master copies swapped in for the low-precision parameters of ``master_weights`` groups
   (:func:`.master.master_weights`);
3. each group's path from :mod:`.dispatch` (cached), and its effective muP hyperparameters
   (:meth:`Optimizer._effective_group`: ``lr * lr_scale``, the weight decay per policy,
   ``eps * eps_scale``), on a copy: the groups keep the scheduler's base ``lr``;
4. groups whose values are all equal joined into one (:func:`.groups.merge_equal_groups`), so
   a multi-tensor call or a kernel covers them together;
5. ``self._update(groups)``: the algorithm, which subclasses implement, given the effective
   groups (each with its ``"path"``); then the stacked state this step did not use is
   released (:class:`.stacked.StackCache`).

Subclasses set :attr:`family` (the muP rule family their groups' scales come from) and
:attr:`kernels` (what :mod:`.dispatch` may choose), and implement :meth:`_update`.
"""

from __future__ import annotations

import abc

from typing import Any

import torch

from ..groups import WEIGHT_DECAY_POLICIES, effective_weight_decay
from ..rules import Family
from . import dispatch, stacked
from .groups import SCALE_KEYS, merge_equal_groups, resolve_groups
from .master import master_weights
from .tensors import restore_saved_dtypes


class Optimizer(torch.optim.Optimizer, abc.ABC):
    """A ``torch.optim.Optimizer`` whose param groups carry muP multipliers.

    ``weight_decay_policy``: ``"coupled"`` (effective wd = ``weight_decay * wd_scale``) or
    ``"independent"`` (decoupled families only: per-step decay ``weight_decay * lr_t / lr_0``,
    where ``lr_0`` is the group's lr when the optimizer was made; width-invariant). A group's own
    ``weight_decay_policy`` wins; ``None`` (default): the plan's default carried by
    :func:`mupkit.param_groups` (u-muP: independent) when this optimizer's decay is decoupled,
    else coupled. ``master_weights``: fp32 copies of bf16/fp16 parameters (:mod:`.master`).
    """

    family: Family
    kernels: dispatch.Kernels = dispatch.Kernels(dtypes=())
    #: state tensors keep the dtype they were made with across ``load_state_dict`` (fp32 state of
    #: bf16 parameters), instead of torch's cast to the parameter's dtype
    keeps_state_dtypes = True

    def __init__(self, params, defaults: dict[str, Any], *, weight_decay_policy: str | None = None,
                 master_weights: bool = False):
        dispatch.check_flags(defaults.get("foreach"), defaults.get("compiled"), defaults.get("fused"))
        self._set_options(weight_decay_policy, master_weights)
        super().__init__(resolve_groups(params, self.family), {**defaults, "master_weights": master_weights})

    def _set_options(self, weight_decay_policy: str | None, master_weights: bool) -> None:
        """Keep the constructor's group options for :meth:`add_param_group` (call before
        ``torch.optim.Optimizer.__init__``, which adds the groups)."""
        if weight_decay_policy is not None:
            self._check_policy(weight_decay_policy)
        self._group_options = (weight_decay_policy, master_weights)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, then the group's scale keys (1 when absent), its weight-decay policy, the lr
        its ``"independent"`` decay is relative to, and ``master_weights`` (the constructor's value
        unless the group has its own)."""
        if "mupkit_scales" in param_group or param_group.get("mupkit_concrete"):
            param_group = resolve_groups([param_group], self.family)[0]
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        weight_decay_policy, master = self._group_options
        group.setdefault("master_weights", master)
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

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad(), master_weights(self):
            paths = dispatch.group_paths(self, self.kernels)
            groups = merge_equal_groups([self._effective_group(g, path) for g, path in zip(self.param_groups, paths)])
            self._update(groups)
            if "_stack_cache" in self.__dict__:
                self._stack_cache.end_step()
        return loss

    def _effective_group(self, group: dict[str, Any], path: str) -> dict[str, Any]:
        """A copy of ``group`` with this step's values: ``lr * lr_scale``, the weight decay of its
        policy, ``eps * eps_scale``, and ``"path"``."""
        effective = {**group, "lr": group["lr"] * group["lr_scale"], "path": path}
        if group.get("weight_decay"):
            effective["weight_decay"] = effective_weight_decay(
                group["weight_decay"], group["weight_decay_policy"], wd_scale=group["wd_scale"],
                lr_scale=group["lr_scale"], reference_lr=group["wd_reference_lr"])
        if isinstance(group.get("eps"), (int, float)):
            effective["eps"] = group["eps"] * group["eps_scale"]
        return effective

    def _with_grads(self, group: dict[str, Any]):
        """``(index, p)`` for each parameter of ``group`` that has a gradient; a sparse gradient is
        refused (the algorithms need dense ones)."""
        for index, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} got a sparse gradient for a parameter of shape "
                                   f"{tuple(p.shape)}; it needs dense gradients (e.g. nn.Embedding(sparse=False)).")
            yield index, p

    def _stacks(self, params: list[torch.Tensor], grads: list[torch.Tensor] | None,
                 state: list[list[torch.Tensor]]) -> list[stacked.Stack]:
        """:func:`.stacked.stacks` of a group's ``params`` with this optimizer's stacked state (not
        pickled: torch's ``__getstate__`` keeps defaults, state and groups only)."""
        cache = self.__dict__.get("_stack_cache")
        if cache is None:
            cache = self.__dict__["_stack_cache"] = stacked.StackCache()
        return stacked.stacks(cache, params, grads, state)

    def _stacked_columns(self, columns: list[list[torch.Tensor]]
                         ) -> tuple[list[stacked.Stack], list[list[torch.Tensor]]]:
        """A group's ``[params, grads, *state]`` columns as :meth:`_stacks` and the same columns
        of stacks (a foreach update runs on them as on the tensors; :meth:`.stacked.Stack.write_back`
        stores the parameters after it)."""
        stacks = self._stacks(columns[0], columns[1], columns[2:])
        return stacks, [[s.param for s in stacks], [s.grad for s in stacks],
                        *(list(c) for c in zip(*(s.state for s in stacks)))]

    @abc.abstractmethod
    def _update(self, groups: list[dict[str, Any]]) -> None:
        """The algorithm's step of every parameter with a gradient in ``groups`` (effective values)."""

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, then: groups saved before ``master_weights`` existed take the constructor's
        value, and state tensors keep their saved dtype (:attr:`keeps_state_dtypes`; master copies
        always)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.setdefault("master_weights", self._group_options[1])
        keep_all = self.keeps_state_dtypes
        restore_saved_dtypes(self, state_dict,
                             lambda group, key: keep_all or key == "master" or group["master_weights"])


__all__ = ["Optimizer"]
