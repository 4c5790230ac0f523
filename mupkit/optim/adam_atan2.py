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

muP family: ``adamw`` (entrywise-normalized, decoupled decay). Implementations: single-tensor,
foreach (torch has no ``_foreach_atan2``: foreach ops on the state, then one ``atan2`` over each
run's numerators and denominators laid side by side in scratch, :func:`_multi_tensor_run`), and compiled
(``torch.compile`` of the update of every compiled group's tensors as one graph, per-tensor
values in a table, ``atan2`` as a polynomial: :func:`atan2_nonnegative_x`). On the CPU the
default (``compiled=None``) compiles a large model (:func:`.compiled.compiled_by_default`);
whatever it does not compile takes the foreach path.
bf16/fp16 parameters keep fp32 state.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..rules import FAMILIES
from . import kernels
from .compiled import ListKernel, compiled_by_default, left_to_default
from .master import MasterWeights
from .scaled import ScaledGroups
from .sharding import local_tensors
from .tensors import (CPU_SMALL_TENSOR, KeepsStateDtypes, advance_steps, as_dtype, by_device_and_dtype, cache_sized,
                      default_foreach, device_steps, flat_pieces, flat_scratch, foreach_scalar, foreach_scalars,
                      state_dtype, subset, working_copies, write_back)

FORMULATIONS = ("lucidrains", "fused")


class AdamAtan2(MasterWeights, KeepsStateDtypes, ScaledGroups, torch.optim.Optimizer):
    """Adam-atan2 with muP group scales; a drop-in for ``adam_atan2_pytorch.AdamAtan2``.

    ``weight_decay``: decoupled, ``p *= 1 - lr * weight_decay`` per step (the reference's
    ``decoupled_wd=True``, decay independent of the LR, is ``weight_decay_policy="independent"``).
    ``foreach``/``compiled``/``fused``: the implementation. Default (all ``None``): on CUDA the
    Triton kernel (:func:`.kernels.fused_by_default`); on the CPU the compiled path for a large
    model (:func:`.compiled.compiled_by_default`), foreach for what it leaves.
    ``foreach=False`` is the reference's own op sequence, bitwise; ``compiled=True`` compiles
    every tensor, ``compiled=False`` none; ``fused=True``: the Triton kernel of :mod:`.kernels`,
    one launch for all tensors, on CUDA (``False``: never).
    """

    family = FAMILIES["adamw"]

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
        if sum(map(bool, (foreach, compiled, fused))) > 1:
            raise ValueError("choose one of foreach=True, compiled=True and fused=True")
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, a=a, b=b, formulation=formulation,
                        maximize=maximize, foreach=foreach, compiled=compiled, fused=fused)
        super().__init__(params, defaults, weight_decay_policy=weight_decay_policy, master_weights=master_weights)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._loss(closure)
        # every compiled (fused) tensor of every group goes to one graph (one launch per device and dtype)
        compiled: tuple[list, ...] = ([], [], [], [], [])
        fused: tuple[list, ...] = ([], [], [], [], [], [])
        with self._master_weights():  # the launches below too: they update the fp32 copies
            with kernels.fused_defaults(self), self._merged_groups(), self._effective_hyperparameters():
                gathered = [(group, self._gather(group)) for group in self.param_groups]  # equal groups merged
                auto = [p for group, lists in gathered if left_to_default(group) for p in lists[0]]
                auto_compiled = {id(p) for p, yes in zip(auto, compiled_by_default(auto)) if yes}
                for group, lists in gathered:
                    if not lists[0]:
                        continue
                    if group["fused"]:
                        self._tabulate_fused(group, *lists[:4], into=fused)
                        continue
                    chosen = [group["compiled"] or id(p) in auto_compiled for p in lists[0]]
                    if any(chosen):
                        self._tabulate_compiled(group, *(subset(column, chosen) for column in lists),
                                                into=compiled)
                    if not all(chosen):
                        eager = [subset(column, [not c for c in chosen]) for column in lists]
                        beta1, beta2 = group["betas"]
                        adam_atan2(*eager, lr=group["lr"], beta1=beta1, beta2=beta2,
                                   weight_decay=group["weight_decay"], a=group["a"], b=group["b"],
                                   formulation=group["formulation"], maximize=group["maximize"],
                                   foreach=group["foreach"], compiled=False)
            if compiled[0]:
                _run_compiled(*compiled)
            if fused[0]:
                _run_fused(*fused)
        return loss

    @staticmethod
    def _tabulate_compiled(group: dict[str, Any], params, grads, exp_avgs, exp_avg_sqs, steps, *,
                           into: tuple[list, ...]):
        """Advance the steps and append the tensors and their value rows to the compiled columns."""
        beta1, beta2 = group["betas"]
        rows = [_compiled_row(t, group["lr"], beta1, beta2, group["weight_decay"], group["a"], group["b"],
                              group["formulation"]) for t in advance_steps(steps)]
        if group["maximize"]:
            grads = [-g for g in grads]
        for column, values in zip(into, (params, grads, exp_avgs, exp_avg_sqs, rows)):
            column.extend(values)

    def _tabulate_fused(self, group: dict[str, Any], params, grads, exp_avgs, exp_avg_sqs, *,
                        into: tuple[list, ...]):
        """Append the tensors, their step counters (on the device, advanced there: the kernel
        computes the bias corrections) and the group's value row to the fused columns."""
        from .kernels.elementwise import adam_atan2_row
        beta1, beta2 = group["betas"]
        steps = device_steps([self.state[p] for p in params], params)
        row = adam_atan2_row(lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                             a=group["a"], b=group["b"], formulation=group["formulation"], maximize=group["maximize"])
        for column, values in zip(into, (params, grads, exp_avgs, exp_avg_sqs, steps, [row] * len(params))):
            column.extend(values)

    def _gather(self, group: dict[str, Any]):
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"AdamAtan2 got a sparse gradient for a parameter of shape {tuple(p.shape)}; "
                               f"it needs dense gradients (e.g. nn.Embedding(sparse=False)).")
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


def adam_atan2(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
               exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], *, lr: float, beta1: float,
               beta2: float, weight_decay: float, a: float, b: float, formulation: str = "lucidrains",
               maximize: bool = False, foreach: bool | None = None, compiled: bool = False) -> None:
    """Functional Adam-atan2 over parallel lists (steps are 0-dim CPU tensors, incremented here).
    ``foreach=None``: the multi-tensor path unless ``compiled``."""
    if foreach is None:
        foreach = not compiled and default_foreach(params, cpu="always")
    values = advance_steps(steps)
    if maximize:
        grads = torch._foreach_neg(grads) if foreach else [-g for g in grads]
    if compiled:
        rows = [_compiled_row(t, lr, beta1, beta2, weight_decay, a, b, formulation) for t in values]
        _run_compiled(params, grads, exp_avgs, exp_avg_sqs, rows)
        return
    by_step = {t: _coefficients(t, lr, beta1, beta2, a, b, formulation) for t in set(values)}  # few distinct
    coefs = [by_step[t] for t in values]
    impl = _multi_tensor if foreach else _single_tensor  # elementwise: each shard of a DTensor steps alone
    impl(*local_tensors(params, grads, exp_avgs, exp_avg_sqs), coefs, lr=lr, beta1=beta1, beta2=beta2,
         weight_decay=weight_decay)


def _coefficients(t: float, lr: float, beta1: float, beta2: float, a: float, b: float,
                  formulation: str) -> tuple[float, float, float]:
    """(numerator scale, v scale under the sqrt, step size) for step ``t``."""
    bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
    if formulation == "lucidrains":
        return 1.0 / bc1, b * b / bc2, lr * a
    return 1.0, b * b / bc2, lr * a / bc1


def _single_tensor(params, grads, exp_avgs, exp_avg_sqs, coefs, *, lr, beta1, beta2, weight_decay):
    """The reference's per-parameter op sequence (so the same values, bitwise), a cache-sized flat
    piece of a parameter at a time on the CPU (:func:`.tensors.flat_pieces`), with
    :func:`.tensors.scratch` temporaries. The reference allocates three temporaries per parameter
    and streams each through memory once per op (benchmarks/RESULTS.md)."""
    for p, g, m, v, (num_scale, den_scale, step_size) in zip(params, grads, exp_avgs, exp_avg_sqs, coefs):
        pieces = flat_pieces(p, g, m, v)
        reuse = m.numel() >= CPU_SMALL_TENSOR  # a small temporary comes cheaply from the allocator's free lists
        flat_den, flat_update = (flat_scratch([pieces[0][2]], slot)[0] if reuse else None for slot in (0, 1))
        for p, g, m, v in pieces:
            (work,), (g,) = working_copies([p], slot=2), as_dtype([g], m.dtype, slot=3)
            n = m.numel()
            den, update = (flat_den[:n].view(m.shape), flat_update[:n].view(m.shape)) if reuse else (None, None)
            m.lerp_(g, 1.0 - beta1)
            v.lerp_(torch.mul(g, g, out=den), 1.0 - beta2)
            den = torch.mul(v, den_scale, out=den).sqrt_()
            update = torch.mul(m, num_scale, out=update).atan2_(den)
            if weight_decay > 0:
                work.mul_(1.0 - lr * weight_decay)
            work.add_(update, alpha=-step_size)
            write_back(p, work)


def _multi_tensor(params, grads, exp_avgs, exp_avg_sqs, coefs, *, lr, beta1, beta2, weight_decay):
    for bucket in by_device_and_dtype(exp_avgs, exp_avg_sqs, params, grads, coefs):
        for ms, vs, ps, gs, cs in cache_sized(bucket, cut=True):
            _multi_tensor_run(ms, vs, ps, gs, cs, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)


def _multi_tensor_run(ms, vs, ps, gs, cs, *, lr, beta1, beta2, weight_decay):
    """One cache-sized run: foreach ops on the state, flat ops on the run's scratch.

    ``atan2(s1 m, sqrt(s2 v)) = atan2(m, sqrt(v s2 / s1^2))`` (``s1 > 0``) saves a pass; the
    numerators are copied next to each other so one ``atan2`` covers the run (torch has no
    ``_foreach_atan2``, and its ``atan`` is twice the cost of ``atan2`` on the CPU)."""
    works, gs = working_copies(ps, slot=2), as_dtype(gs, ms[0].dtype, slot=3)
    torch._foreach_lerp_(ms, gs, 1.0 - beta1)
    torch._foreach_mul_(vs, foreach_scalar(beta2, vs))
    torch._foreach_addcmul_(vs, gs, gs, 1.0 - beta2)
    (flat_den, den), (flat_num, num) = flat_scratch(vs, 0), flat_scratch(ms, 1)
    torch._foreach_copy_(den, vs)
    den_scales = [c[1] / (c[0] * c[0]) for c in cs]
    if len(set(den_scales)) == 1:  # one step and betas for the run: one op over the flat scratch
        flat_den.mul_(den_scales[0])
    else:
        torch._foreach_mul_(den, foreach_scalars(den_scales, den))
    torch._foreach_copy_(num, ms)
    flat_den.sqrt_()
    torch.atan2(flat_num, flat_den, out=flat_num)
    if weight_decay > 0:
        torch._foreach_mul_(works, foreach_scalar(1.0 - lr * weight_decay, works))
    step_sizes = {c[2] for c in cs}
    if len(step_sizes) == 1:
        torch._foreach_add_(works, num, alpha=-step_sizes.pop())
    else:
        torch._foreach_mul_(num, foreach_scalars([-c[2] for c in cs], num))
        torch._foreach_add_(works, num)
    for p, work in zip(ps, works):
        write_back(p, work)


def _run_fused(params, grads, exp_avgs, exp_avg_sqs, steps, rows) -> None:
    """The Triton kernel, one launch per (device, parameter dtype) for every fused group."""
    kernels.check_fused("AdamAtan2", params)
    from .kernels.elementwise import adam_atan2 as launch
    for bucket in by_device_and_dtype(params, grads, exp_avgs, exp_avg_sqs, steps, rows):
        launch(*bucket)


def _compiled_row(t: float, lr: float, beta1: float, beta2: float, weight_decay: float, a: float, b: float,
                  formulation: str) -> tuple[float, ...]:
    """One tensor's row of the compiled path's table: the coefficients, the decay and the EMA weights."""
    return (*_coefficients(t, lr, beta1, beta2, a, b, formulation), 1.0 - lr * weight_decay, 1.0 - beta1,
            1.0 - beta2)


def _compiled_tensor(m, v, p, g, num_scale, den_scale, step_size, decay, one_minus_beta1, one_minus_beta2):
    """One parameter's step in the compiled path (values from its :func:`_compiled_row`)."""
    g = g.to(m.dtype)
    m.lerp_(g, one_minus_beta1)
    v.lerp_(g * g, one_minus_beta2)
    update = atan2_nonnegative_x(m * num_scale, torch.sqrt(v * den_scale))
    p.copy_((p.to(m.dtype) * decay - step_size * update).to(p.dtype))


#: ``atan(z) = z P(z^2)`` on ``[0, 1]``: P's coefficients, lowest degree first, fitted by relative-error
#: weighted least squares on 20000 Chebyshev nodes in ``z^2`` (max relative error 1.8e-8 in exact arithmetic)
ATAN_COEFFICIENTS = (0.9999999823925497, -0.33333043964493614, 0.19992017436063023, -0.14198919825390605,
                     0.10622653469648123, -0.0746577875193055, 0.04224103524187588, -0.01579383566181117,
                     0.00278170789222209)


def atan2_nonnegative_x(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``atan2(y, x)`` for ``x >= 0`` from multiply-adds and one division, for the compiled path
    (inductor's vectorized ``atan2`` costs more than the rest of the step on the CPU).

    With ``a = |y|`` and ``z = min(a, x) / max(a, x)`` in ``[0, 1]``: ``atan(z) = z P(z^2)``
    (:data:`ATAN_COEFFICIENTS`), the angle is that or ``pi/2 - atan(z)`` when ``a > x``, with
    ``y``'s sign; ``(0, 0)`` gives 0, like ``atan2``. Float64 inputs use ``torch.atan2`` (the
    polynomial's 1.8e-8 is below fp32's resolution, not fp64's). In fp32 it is within 2.2e-7
    relative of ``torch.atan2`` (tests/test_default_paths.py).
    """
    if y.dtype == torch.float64:
        return torch.atan2(y, x)
    a = y.abs()
    high, low = torch.maximum(a, x), torch.minimum(a, x)
    z = torch.where(high == 0, 0.0, low / high)
    z2 = z * z
    poly = torch.full_like(z2, ATAN_COEFFICIENTS[-1])
    for c in reversed(ATAN_COEFFICIENTS[:-1]):
        poly = poly * z2 + c
    angle = poly * z
    return torch.copysign(torch.where(a > x, math.pi / 2 - angle, angle), y)


_COMPILED = ListKernel(_compiled_tensor, writes=(0, 1, 2))


def _run_compiled(params, grads, exp_avgs, exp_avg_sqs, rows) -> None:
    """All the tensors, of every compiled group, through one compiled graph per (device, state
    dtype); per-tensor values live in a table (:class:`.compiled.ListKernel`)."""
    _COMPILED([exp_avgs, exp_avg_sqs, params, grads], rows)


__all__ = ["ATAN_COEFFICIENTS", "AdamAtan2", "FORMULATIONS", "adam_atan2", "atan2_nonnegative_x"]
