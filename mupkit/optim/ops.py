"""Elementwise ops over one tensor or a list of tensors, so one update function serves both paths.

An algorithm writes its per-tensor update once, with these ops (:func:`lerp_`, :func:`mul_`,
...). Called on tensors with Python floats it is the single-tensor path; called on lists of
tensors with a float or a list of floats (one per tensor) it is the multi-tensor path, each op
one ``torch._foreach_*`` call over the list (one launch per op on CUDA). Ops with no foreach
kernel (``atan2``) run tensor by tensor on a list.

Scalars: a float applies to every tensor; a list gives one value per tensor (the foreach
``ScalarList`` overloads); on one tensor a 0-dim tensor works too (the compiled path passes its
values as tensors, so new values do not recompile). Every op returns what torch's returns.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

Tensors = Union[torch.Tensor, list[torch.Tensor]]
Scalars = Union[float, Sequence[float]]


def is_list(x: Tensors) -> bool:
    return type(x) is list or type(x) is tuple


def _operand(x: list[torch.Tensor], s):
    """The operand of a multi-tensor multiply: tensors as they are; on the CPU a number as one
    0-dim tensor and per-tensor numbers as 0-dim tensors (torch's CPU foreach ops wrap a Python
    number into a tensor once per tensor, which costs more than the multiply of a small tensor;
    the results are bitwise the same)."""
    if isinstance(s, torch.Tensor):
        return s
    if isinstance(s, (int, float)):
        return torch.tensor(s, dtype=x[0].dtype) if x[0].is_cpu and x[0].is_floating_point() else s
    if len(s) and isinstance(s[0], (int, float)):
        if x[0].is_cpu and x[0].is_floating_point():
            return list(torch.tensor(s, dtype=x[0].dtype).unbind())
        return list(s)
    return s


def lerp_(x: Tensors, y: Tensors, w: Scalars) -> Tensors:
    """``x += w (y - x)``."""
    if not is_list(x):
        return x.lerp_(y, w)
    torch._foreach_lerp_(x, y, list(w) if isinstance(w, tuple) else w)
    return x


def mul_(x: Tensors, s: Scalars | Tensors) -> Tensors:
    """``x *= s`` (``s``: scalars, or tensors like ``x``); nothing for the number 1."""
    if isinstance(s, (int, float)) and s == 1:
        return x
    if not is_list(x):
        return x.mul_(s)
    torch._foreach_mul_(x, _operand(x, s))
    return x


def mul(x: Tensors, s: Scalars | Tensors) -> Tensors:
    """``x * s``, new tensors."""
    if not is_list(x):
        return torch.mul(x, s)
    return torch._foreach_mul(x, _operand(x, s))


def add_(x: Tensors, y: Tensors, alpha: Scalars = 1.0) -> Tensors:
    """``x += alpha y``; a per-tensor ``alpha`` scales ``y`` in place first (it must be a temporary)."""
    if not is_list(x):
        return x.add_(y * alpha) if isinstance(alpha, torch.Tensor) else x.add_(y, alpha=alpha)
    if isinstance(alpha, (list, tuple)):
        torch._foreach_mul_(y, list(alpha))
        torch._foreach_add_(x, y)
    else:
        torch._foreach_add_(x, y, alpha=alpha)
    return x


def addcmul_(x: Tensors, a: Tensors, b: Tensors, value: Scalars = 1.0) -> Tensors:
    """``x += value a b``."""
    if not is_list(x):
        return x.add_(a * b * value) if isinstance(value, torch.Tensor) else x.addcmul_(a, b, value=value)
    torch._foreach_addcmul_(x, a, b, list(value) if isinstance(value, tuple) else value)
    return x


def addcdiv_(x: Tensors, a: Tensors, b: Tensors, value: Scalars = 1.0) -> Tensors:
    """``x += value a / b``."""
    if not is_list(x):
        return x.add_(a / b * value) if isinstance(value, torch.Tensor) else x.addcdiv_(a, b, value=value)
    torch._foreach_addcdiv_(x, a, b, list(value) if isinstance(value, tuple) else value)
    return x


def sqrt_(x: Tensors) -> Tensors:
    if not is_list(x):
        return x.sqrt_()
    torch._foreach_sqrt_(x)
    return x


def add_scalar_(x: Tensors, s: Scalars) -> Tensors:
    """``x += s`` (a scalar per tensor or for all)."""
    if not is_list(x):
        return x.add_(s)
    torch._foreach_add_(x, list(s) if isinstance(s, tuple) else s)
    return x


def maximum_(x: Tensors, s: Scalars) -> Tensors:
    """``x = max(x, s)`` elementwise."""
    if not is_list(x):
        return x.clamp_(min=s)
    torch._foreach_clamp_min_(x, list(s) if isinstance(s, tuple) else s)
    return x


def atan2_(y: Tensors, x: Tensors) -> Tensors:
    """``y = atan2(y, x)`` (torch has no foreach ``atan2``: a list runs tensor by tensor)."""
    if not is_list(y):
        return y.atan2_(x)
    for a, b in zip(y, x):
        a.atan2_(b)
    return y


def copy_(x: Tensors, y: Tensors) -> Tensors:
    if not is_list(x):
        return x.copy_(y)
    torch._foreach_copy_(x, y)
    return x


def neg(x: Tensors) -> Tensors:
    return torch._foreach_neg(x) if is_list(x) else torch.neg(x)


def to_dtype(x: Tensors, dtype: torch.dtype) -> Tensors:
    """``x`` in ``dtype`` (itself when it has it, else a copy): a bf16/fp16 parameter's fp32
    working copy, or its gradient in the state's dtype."""
    if not is_list(x):
        return x if x.dtype == dtype else x.to(dtype)
    return [t if t.dtype == dtype else t.to(dtype) for t in x]


def write_back(p: Tensors, work: Tensors) -> None:
    """Round the working copies made by :func:`to_dtype` into the parameters (one rounding per
    step); nothing where the parameter was its own working copy."""
    if not is_list(p):
        if work is not p:
            p.copy_(work)
        return
    for a, b in zip(p, work):
        if a is not b:
            a.copy_(b)


def negated(s: Scalars | torch.Tensor) -> Scalars | torch.Tensor:
    """``-s`` for a number, a 0-dim tensor or a list of per-tensor values."""
    return [-v for v in s] if isinstance(s, (list, tuple)) else -s


def scalars(values: Sequence[float]) -> Scalars:
    """Per-tensor values as one float when they are all equal (the cheaper foreach overload)."""
    return values[0] if all(v == values[0] for v in values) else list(values)


def norms(x: Tensors) -> torch.Tensor:
    """The 2-norm of each tensor, as one 1-D tensor on their device (a 0-dim one for a tensor)."""
    if not is_list(x):
        return torch.linalg.vector_norm(x)
    return torch.stack(torch._foreach_norm(x))


def div_into(x: Tensors, y: Tensors) -> Tensors:
    """``x / y``; on one tensor written into ``y``, a temporary the caller gives up (one large
    allocation fewer on the CPU), on lists new tensors."""
    if not is_list(x):
        return torch.div(x, y, out=y)
    return torch._foreach_div(x, y)


def div(x: Tensors, y: Tensors) -> Tensors:
    """``x / y`` (``y``: tensors like ``x``, or a scalar), new tensors."""
    return torch._foreach_div(x, y) if is_list(x) else torch.div(x, y)


def clamp_(x: Tensors, bound: Scalars) -> Tensors:
    """``x = min(max(x, -bound), bound)`` elementwise."""
    if not is_list(x):
        return x.clamp_(-bound, bound)
    torch._foreach_clamp_min_(x, negated(bound))
    torch._foreach_clamp_max_(x, list(bound) if isinstance(bound, tuple) else bound)
    return x


def sqrt(x: Tensors) -> Tensors:
    """``sqrt(x)``, new tensors."""
    return torch._foreach_sqrt(x) if is_list(x) else torch.sqrt(x)


def sub(x: Tensors, y: Tensors) -> Tensors:
    """``x - y``, new tensors (``y`` broadcast to ``x``'s shape on one tensor)."""
    return torch._foreach_sub(x, y) if is_list(x) else torch.sub(x, y)


def add(x: Tensors, y: Tensors, alpha: float | torch.Tensor) -> Tensors:
    """``x + alpha y``, new tensors."""
    if is_list(x):
        return torch._foreach_add(x, y, alpha=alpha)
    return x + y * alpha if isinstance(alpha, torch.Tensor) else torch.add(x, y, alpha=alpha)


def total_dot(x: Tensors, y: Tensors) -> torch.Tensor:
    """``sum(x * y)`` over every element (of every tensor of a list), a float64 0-dim tensor: each
    tensor's dot product in its dtype, summed in float64."""
    if not is_list(x):
        return torch.dot(x.reshape(-1), y.reshape(-1)).to(torch.float64)
    return torch.stack([torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(x, y)]).to(torch.float64).sum()


def total_abs(x: Tensors, into: Tensors | None = None) -> torch.Tensor:
    """``sum(|x|)`` over every element (of every tensor of a list), a float64 0-dim tensor: each
    tensor's sum in its dtype, summed in float64. ``into``: a temporary like ``x`` that may hold
    ``|x|`` (one large allocation fewer on the CPU)."""
    if not is_list(x):
        return (x.abs() if into is None else torch.abs(x, out=into)).sum().to(torch.float64)
    return torch.stack(torch._foreach_norm(x, 1)).to(torch.float64).sum()


def rsqrt(x: Tensors) -> Tensors:
    """``1 / sqrt(x)``, new tensors."""
    return torch._foreach_rsqrt(x) if is_list(x) else torch.rsqrt(x)


def rsqrt_(x: Tensors) -> Tensors:
    if not is_list(x):
        return x.rsqrt_()
    torch._foreach_rsqrt_(x)
    return x


def maximum(x: Tensors, s: Scalars) -> Tensors:
    """``max(x, s)`` elementwise, new tensors."""
    if not is_list(x):
        return torch.clamp(x, min=s)
    return torch._foreach_clamp_min(x, list(s) if isinstance(s, tuple) else s)


def minimum_(x: Tensors, s: Scalars) -> Tensors:
    """``x = min(x, s)`` elementwise."""
    if not is_list(x):
        return x.clamp_(max=s)
    torch._foreach_clamp_max_(x, list(s) if isinstance(s, tuple) else s)
    return x


__all__ = ["Scalars", "Tensors", "add", "add_", "add_scalar_", "addcdiv_", "addcmul_", "atan2_", "clamp_",
           "copy_", "div", "div_into", "is_list", "lerp_", "maximum", "maximum_", "minimum_", "mul", "mul_", "neg",
           "negated", "norms", "rsqrt", "rsqrt_", "scalars", "sqrt", "sqrt_", "sub", "to_dtype", "total_abs",
           "total_dot", "write_back"]
