"""Separate forward and backward scales: the primitive of unit scaling (Blake et al. 2023, Sec. 4).

``scale(x, fwd, bwd)`` returns ``fwd * x`` and sends ``bwd * grad`` back to ``x``. With
``bwd != fwd`` the backward pass is no longer the derivative of the forward pass; unit
scaling uses this to give the outputs *and* the gradients of every op unit variance. Adam-like
optimizers are invariant to a constant gradient scale per tensor (ignoring eps), so the
mismatch changes nothing for them off the residual path (u-muP, Blake et al. 2024, Sec. 4.1).
"""

from __future__ import annotations

import math

import torch


class _Scale(torch.autograd.Function):
    """``y = fwd * x``; ``dx = bwd * dy``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fwd: float, bwd: float) -> torch.Tensor:
        ctx.bwd = bwd
        return x * fwd

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.bwd, None, None


def scale(x: torch.Tensor, fwd: float = 1.0, bwd: float = 1.0) -> torch.Tensor:
    """``fwd * x`` in the forward pass, ``bwd * grad`` in the backward pass."""
    if fwd == 1.0 and bwd == 1.0:
        return x
    return _Scale.apply(x, fwd, bwd)


def scale_fwd(x: torch.Tensor, s: float) -> torch.Tensor:
    """``s * x`` forward; the gradient passes unscaled."""
    return scale(x, fwd=s)


def scale_bwd(x: torch.Tensor, s: float) -> torch.Tensor:
    """``x`` forward; the gradient is multiplied by ``s``."""
    return scale(x, bwd=s)


def log_interpolate(alpha: float, lower: float, upper: float) -> float:
    """``lower^(1 - alpha) * upper^alpha``: the geometric blend u-muP uses between an op's
    two analytic limits (e.g. softmax's flat and one-hot limits; u-muP App. E)."""
    return math.exp(alpha * math.log(upper) + (1 - alpha) * math.log(lower))


#: how an op's output scale and its gradient scales are tied together (unit scaling, Sec. 5.2):
#: ``None`` leaves them independent; on the residual path the forward and backward scales must
#: agree ("to_output_scale", the default of most ops), since there a mismatch changes the model.
CONSTRAINTS = {
    "to_output_scale": lambda out, *grads: out,
    "to_grad_input_scale": lambda out, grad: grad,
    "to_left_grad_scale": lambda out, left, right: left,
    "to_right_grad_scale": lambda out, left, right: right,
    "gmean": lambda *s: math.prod(s) ** (1 / len(s)),
    "hmean": lambda *s: len(s) / sum(1 / x for x in s),
    "amean": lambda *s: sum(s) / len(s),
}


def constrain(constraint: str | None, *scales: float) -> tuple[float, ...]:
    """Replace ``(output_scale, *grad_scales)`` by one shared scale per ``constraint``."""
    if not constraint:
        return scales
    if constraint not in CONSTRAINTS:
        raise ValueError(f"constraint={constraint!r}; use None or one of {sorted(CONSTRAINTS)}")
    shared = CONSTRAINTS[constraint](*scales)
    return (shared,) * len(scales)
