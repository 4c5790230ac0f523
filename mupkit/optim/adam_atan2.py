"""Adam-atan2: epsilon-free, scale-invariant Adam (Everett et al. 2024, "Scaling Exponents
Across Parameterizations and Optimizers", Sec. 4.4), with muP group scales.

Per parameter, with ``t`` the step and ``bc_k = 1 - beta_k^t``::

    m <- lerp(m, g, 1 - beta1);   v <- lerp(v, g*g, 1 - beta2)
    p <- p * (1 - lr * wd)                                   (decoupled weight decay)
    p <- p - lr * a * atan2(m / bc1, b * sqrt(v / bc2))      (formulation "lucidrains")
    p <- p - (lr * a / bc1) * atan2(m, b * sqrt(v / bc2))    (formulation "fused")

``atan2`` replaces ``m / (sqrt(v) + eps)``: no epsilon, invariant to the gradient's scale, and
bounded by ``a * pi / 2``. With ``|m| << sqrt(v)`` the step is ``(a / b) m / sqrt(v)``, Adam's.
The "lucidrains" formulation (default; ``a = 1.27, b = 1``, betas ``(0.9, 0.99)``) follows
``adam-atan2-pytorch`` 0.4.1 op for op, so its single-tensor path is bitwise equal to it. The
"fused" formulation is the CUDA ``adam-atan2`` package's (bias correction 1 outside atan2;
use ``a = b = 1`` and betas ``(0.9, 0.999)`` to match it).

muP family: ``adamw`` (entrywise-normalized, decoupled decay). The math is
:func:`adam_atan2_update`, one function for the single-tensor and foreach paths (and, compiled,
for ``compiled=True``); the Triton kernel (:mod:`.kernels.elementwise`) is tested against it.
bf16/fp16 parameters keep fp32 state and do the math in fp32.
"""

from __future__ import annotations

from typing import Any

import torch

from ..rules import FAMILIES
from . import dispatch, ops
from .base import Optimizer
from .compiled import run_compiled
from .sharding import local_tensors
from .stacked import Stack
from .tensors import advance_steps, by_device_and_dtype, device_steps, state_dtype

FORMULATIONS = ("lucidrains", "fused")


class AdamAtan2(Optimizer):
    """Adam-atan2 with muP group scales; a drop-in for ``adam_atan2_pytorch.AdamAtan2``.

    ``weight_decay``: decoupled, ``p *= 1 - lr * weight_decay`` per step (the reference's
    ``decoupled_wd=True``, decay independent of the LR, is ``weight_decay_policy="independent"``).
    ``foreach``/``fused``/``compiled``: the implementation (default: :mod:`.dispatch`).
    ``foreach=False`` is the reference's own op sequence, bitwise. ``fused=True``: the Triton
    kernel, one launch for all tensors, on CUDA. ``compiled=True``: ``torch.compile`` of the
    update (:mod:`.compiled`: the first step costs the compile, seconds to minutes).
    """

    family = FAMILIES["adamw"]
    kernels = dispatch.Kernels(stacked=True)

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, a: float | None = None, b: float | None = None,
                 formulation: str = "lucidrains", maximize: bool = False, foreach: bool | None = None,
                 compiled: bool | None = None, fused: bool | None = None, weight_decay_policy: str | None = None,
                 master_weights: bool = False):
        if formulation not in FORMULATIONS:
            raise ValueError(f"formulation={formulation!r}; use one of {FORMULATIONS}")
        a = (1.27 if formulation == "lucidrains" else 1.0) if a is None else a
        b = 1.0 if b is None else b
        if not lr >= 0:
            raise ValueError(f"lr={lr} must be >= 0")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas={betas} must lie in [0, 1)")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay={weight_decay} must be >= 0")
        if not (a > 0 and b > 0):
            raise ValueError(f"a={a} and b={b} must be > 0")
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, a=a, b=b, formulation=formulation,
                        maximize=maximize, foreach=foreach, compiled=compiled, fused=fused)
        super().__init__(params, defaults, weight_decay_policy=weight_decay_policy, master_weights=master_weights)

    def _update(self, groups: list[dict[str, Any]]) -> None:
        fused: list[list[Any]] = [[], [], [], [], [], []]
        for group in groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = self._gather(group)
            if not params:
                continue
            if group["path"] == "fused":  # every fused group in one launch per device and dtype
                for column, values in zip(fused, (params, grads, exp_avgs, exp_avg_sqs, device_steps(
                        [self.state[p] for p in params], params), [_kernel_row(group)] * len(params))):
                    column.extend(values)
                continue
            if group["path"] == "stacked":
                for stack in self._stacks(params, grads, [exp_avgs, exp_avg_sqs, steps]):
                    _stacked_update(stack, group)
                continue
            rows = [_row(group, t) for t in advance_steps(steps)]
            if group["maximize"]:
                grads = ops.neg(grads)
            if group["path"] == "compiled":
                run_compiled(adam_atan2_update, [params, grads, exp_avgs, exp_avg_sqs], rows)
            elif group["path"] == "foreach":
                for ps, gs, ms, vs, rs in by_device_and_dtype(*local_tensors(params, grads, exp_avgs, exp_avg_sqs),
                                                               rows):
                    adam_atan2_update(ps, gs, ms, vs, *(ops.scalars(column) for column in zip(*rs)))
            else:
                for tensors in zip(*local_tensors(params, grads, exp_avgs, exp_avg_sqs), rows):
                    adam_atan2_update(*tensors[:4], *tensors[4])
        if fused[0]:
            dispatch.check_fused(type(self).__name__, fused[0], self.kernels)
            from .kernels.elementwise import adam_atan2 as launch
            for bucket in by_device_and_dtype(*fused):
                launch(*bucket)

    def _gather(self, group: dict[str, Any]):
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for _, p in self._with_grads(group):
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_avg_sqs, steps


def adam_atan2_update(p: ops.Tensors, g: ops.Tensors, m: ops.Tensors, v: ops.Tensors, num_scale: ops.Scalars,
                      den_scale: ops.Scalars, step_size: ops.Scalars, decay: ops.Scalars,
                      one_minus_beta1: ops.Scalars, one_minus_beta2: ops.Scalars) -> None:
    """One Adam-atan2 step of a parameter (or, on lists, of each), in place; values from :func:`_row`.

    ``m <- lerp(m, g, 1 - beta1)``, ``v <- lerp(v, g^2, 1 - beta2)``,
    ``p <- p decay - step_size atan2(num_scale m, sqrt(den_scale v))``: the reference's op
    sequence, so the single-tensor path is bitwise ``adam_atan2_pytorch``'s."""
    work, g = ops.to_dtype(p, _dtype(m)), ops.to_dtype(g, _dtype(m))
    ops.lerp_(m, g, one_minus_beta1)
    ops.lerp_(v, ops.mul(g, g), one_minus_beta2)
    den = ops.sqrt_(ops.mul(v, den_scale))
    update = ops.atan2_(ops.mul(m, num_scale), den)
    ops.mul_(work, decay)
    ops.add_(work, update, alpha=ops.negated(step_size))
    ops.write_back(p, work)


def _stacked_update(stack: Stack, group: dict[str, Any]) -> None:
    """:func:`adam_atan2_update` on a stack (its members one by one with their own values, in
    the rare case that their step counts differ)."""
    m, v, steps = stack.state
    values = steps.add_(1).tolist()
    if values.count(values[0]) != len(values):
        params, grads = stack.params, [p.grad for p in stack.params]
        grads = ops.neg(grads) if group["maximize"] else grads
        rows = [_row(group, t) for t in values]
        adam_atan2_update(params, grads, list(m.unbind()), list(v.unbind()), *(ops.scalars(c) for c in zip(*rows)))
        return
    grad = stack.grad.neg_() if group["maximize"] else stack.grad
    adam_atan2_update(stack.param, grad, m, v, *_row(group, values[0]))
    stack.write_back()


def _dtype(m: ops.Tensors) -> torch.dtype:
    return m[0].dtype if ops.is_list(m) else m.dtype


def _row(group: dict[str, Any], t: float) -> tuple[float, ...]:
    """:func:`adam_atan2_update`'s values at step ``t``."""
    beta1, beta2 = group["betas"]
    bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
    lr, a, b = group["lr"], group["a"], group["b"]
    num_scale, step_size = (1.0 / bc1, lr * a) if group["formulation"] == "lucidrains" else (1.0, lr * a / bc1)
    return num_scale, b * b / bc2, step_size, 1.0 - lr * group["weight_decay"], 1.0 - beta1, 1.0 - beta2


def _kernel_row(group: dict[str, Any]) -> tuple[float, ...]:
    """The Triton kernel's row (it computes the bias corrections from the device step counter)."""
    from .kernels.elementwise import adam_atan2_row
    beta1, beta2 = group["betas"]
    return adam_atan2_row(lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], a=group["a"],
                          b=group["b"], formulation=group["formulation"], maximize=group["maximize"])


__all__ = ["AdamAtan2", "FORMULATIONS", "adam_atan2_update"]
