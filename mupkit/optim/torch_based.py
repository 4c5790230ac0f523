"""muP-aware drop-in replacements for ``torch.optim.Adam``, ``AdamW`` and ``SGD``.

They run torch's own algorithms (single-tensor, foreach or fused) with each group's effective
``lr * lr_scale``, weight decay per policy and ``eps * eps_scale`` (:class:`.base.Optimizer`).
Pass ``mupkit.param_groups(model)``, or plain parameters (all scales 1: torch's class, up to
the rounding of its fused CPU kernel; ``fused=False`` gives torch's CPU default bitwise).

Paths (:mod:`.dispatch`): by default a step is fused, torch's fused kernel on the CPU and
mupkit's Triton kernel on CUDA, one launch per (device, dtype) for every group where torch's
fused kernels launch once per group; the state layout is then torch's fused one (``step`` on
the device). ``fused=True`` on CUDA chooses the Triton kernel too. ``amsgrad``, ``capturable``
and ``differentiable`` steps run torch's kernels, as torch chooses them.
"""

from __future__ import annotations

from typing import Any

import torch

from ..rules import FAMILIES
from . import dispatch
from .base import Optimizer
from .groups import resolve_groups
from .tensors import by_device_and_dtype, device_steps

#: group options only torch's kernels implement
TORCH_ONLY = ("amsgrad", "capturable", "differentiable")


class _TorchAlgorithm(Optimizer):
    """A ``torch.optim`` algorithm (:attr:`torch_class`, also a base class of the subclass)
    stepped by the template of :class:`.base.Optimizer`; subclasses give the Triton route's
    inputs (:meth:`_kernel_inputs`) and launch (:meth:`_launch`)."""

    torch_class: type[torch.optim.Optimizer]

    kernels = dispatch.Kernels(cpu_fused=True)
    keeps_state_dtypes = False  # torch casts loaded state to the parameter's dtype; so do these

    def __init__(self, params, *args, weight_decay_policy: str | None = None, master_weights: bool = False,
                 **kwargs):
        if kwargs.get("decoupled_weight_decay") and not self.family.decoupled_wd:
            raise ValueError(f"{type(self).__name__}(decoupled_weight_decay=True) is AdamW; use mupkit.optim.AdamW "
                             f"so the weight-decay multipliers follow the decoupled rule.")
        self._set_options(weight_decay_policy, master_weights)
        self.torch_class.__init__(self, resolve_groups(params, self.family), *args, **kwargs)
        self.defaults["master_weights"] = master_weights

    def _effective_group(self, group: dict[str, Any], path: str) -> dict[str, Any]:
        """The base's values, and the flags that make torch's step take ``path``."""
        effective = super()._effective_group(group, path)
        if any(group.get(k) for k in TORCH_ONLY) and group.get("fused") is None and group.get("foreach") is None:
            effective["path"] = "torch"  # torch's own default for these options
        elif path in ("fused", "foreach", "single"):
            effective.update(fused=path == "fused", foreach=path == "foreach")
        return effective

    def _update(self, groups: list[dict[str, Any]]) -> None:
        triton = [g for g in groups if g["path"] == "fused" and not any(g.get(k) for k in TORCH_ONLY)
                  and all(dispatch.kernel_device(p) for p in g["params"])]
        rest = [g for g in groups if not any(g is t for t in triton)]
        if triton:
            self._triton_step(triton)
        if rest:
            saved = self.param_groups
            self.param_groups = rest
            try:
                self.torch_class.step(self)
            finally:
                self.param_groups = saved

    def _triton_step(self, groups: list[dict[str, Any]]) -> None:
        columns: list[list[Any]] = []
        for group in groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                lists = (params, [p.grad for p in params], *self._kernel_inputs(group, params))
                columns = columns or [[] for _ in lists]
                for column, new in zip(columns, lists):
                    column.extend(new)
        if columns:
            dispatch.check_fused(type(self).__name__, columns[0], self.kernels)
            for bucket in by_device_and_dtype(*columns):
                self._launch(*bucket)


class _AdamFamily(_TorchAlgorithm):
    """The Triton route's inputs for Adam (``decoupled = False``) and AdamW (``True``)."""

    decoupled: bool

    def _kernel_inputs(self, group: dict[str, Any], params: list[torch.Tensor]):
        from .kernels.elementwise import adam_row
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        row = adam_row(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                       decoupled=self.decoupled, maximize=group["maximize"])
        return ([s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], device_steps(states, params),
                [row] * len(params))

    @staticmethod
    def _launch(params, grads, exp_avgs, exp_avg_sqs, steps, rows):
        from .kernels.elementwise import adam
        # one launch per state dtype too (a checkpoint can hold fp32 moments for some bf16 parameters)
        for ms, ps, gs, vs, ss, rs in by_device_and_dtype(exp_avgs, params, grads, exp_avg_sqs, steps, rows):
            adam(ps, gs, ms, vs, ss, rs)


class Adam(_AdamFamily, torch.optim.Adam):
    """``torch.optim.Adam`` (L2 weight decay added to the gradient) with muP group scales."""

    family = FAMILIES["adam"]
    torch_class = torch.optim.Adam
    decoupled = False


class AdamW(_AdamFamily, torch.optim.AdamW):
    """``torch.optim.AdamW`` (decoupled weight decay) with muP group scales."""

    family = FAMILIES["adamw"]
    torch_class = torch.optim.AdamW
    decoupled = True


class SGD(_TorchAlgorithm, torch.optim.SGD):
    """``torch.optim.SGD`` with muP group scales (TP5 Table 8 SGD column)."""

    family = FAMILIES["sgd"]
    torch_class = torch.optim.SGD

    def _kernel_inputs(self, group: dict[str, Any], params: list[torch.Tensor]):
        from .kernels.elementwise import sgd_row
        buffers, rows = [], []
        for p in params:
            state = self.state[p]
            first = group["momentum"] != 0 and state.get("momentum_buffer") is None
            if first:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buffers.append(state["momentum_buffer"] if group["momentum"] else None)
            rows.append(sgd_row(lr=group["lr"], weight_decay=group["weight_decay"], momentum=group["momentum"],
                                dampening=group["dampening"], nesterov=group["nesterov"], first=first,
                                maximize=group["maximize"]))
        return buffers, rows

    @staticmethod
    def _launch(params, grads, buffers, rows):
        from .kernels.elementwise import sgd
        if any(b is None for b in buffers) and not all(b is None for b in buffers):
            raise ValueError("SGD(fused=True) groups mixing momentum 0 and momentum > 0 on one device and dtype "
                             "are not supported by the Triton kernel; give them the same momentum.")
        if buffers[0] is None:
            sgd(params, grads, None, rows)
            return
        for bs, ps, gs, rs in by_device_and_dtype(buffers, params, grads, rows):  # one launch per buffer dtype too
            sgd(ps, gs, bs, rs)


__all__ = ["Adam", "AdamW", "SGD"]
