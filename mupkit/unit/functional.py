"""Unit-scaled ops: outputs and gradients of unit variance for unit-variance inputs.

Unit Scaling (Blake et al. 2023) and u-muP (Blake et al. 2024, "u-muP: The Unit-Scaled Maximal
Update Parametrization", Sec. 4 and App. E) give every op a forward scale and separate
backward scales (:func:`mupkit.unit.scale.scale`), chosen so that, for inputs of unit variance,
the output and every gradient have unit variance too. Numerically these ops equal
``unit_scaling.functional`` 0.3.5 for the same arguments (a test checks outputs and gradients
to 1e-6 relative). ``B`` below is the batch size of an op: its input's elements per feature.

=========================  =====================================  ==============================
op                         forward                                gradients
=========================  =====================================  ==============================
linear                     ``x W^T / fan_in^1/2 + b``             x: ``fan_out^-1/2``; W, b: ``B^-1/2``
linear_readout             ``x W^T / fan_in + b``                 as linear (unconstrained)
embedding                  lookup                                 W: ``(V / B)^1/2``
gelu/silu/relu             ``f(x)`` x its inverse std             see each op
softmax                    ``softmax(mult x)`` x scale            see :func:`softmax`
scaled_dot_product_attn.   logits ``mult q k^T / d_head``         q, k, v: the output scale
layer_norm/rms_norm        plain                                  gain, bias: ``B^-1/2``
residual_split/add         ``(tau f(x) + x) / (1 + tau^2)^1/2``   branch grad not multiplied by tau
cross_entropy              ``CE(mult x)``                         x: ``V / (V - 1)^1/2``
dropout                    ``dropout(x) (1 - p)^1/2``             ``(1 - p)^1/2``
=========================  =====================================  ==============================

``constraint`` (see :data:`mupkit.unit.scale.CONSTRAINTS`): ``"to_output_scale"`` uses the
output scale for the input gradient too, as an op on the residual path must; ``None`` keeps
them independent (safe where the mismatch cancels, e.g. a GLU's up and down projections).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .scale import constrain, log_interpolate, scale, scale_bwd, scale_fwd

#: std of relu(x), x ~ N(0, 1): sqrt(1/2 - 1/(2 pi)); also gelu's limit for a large ``mult``
RELU_STD = (0.5 - 0.5 / math.pi) ** 0.5


def _elementwise(f: Callable[..., torch.Tensor], x: torch.Tensor, out_scale: float, grad_scale: float,
                 constraint: str | None, *args, **kwargs) -> torch.Tensor:
    out_scale, grad_scale = constrain(constraint, out_scale, grad_scale)
    return scale_fwd(f(scale_bwd(x, grad_scale), *args, **kwargs), out_scale)


def _smooth_act_alpha(mult: float, knee: float) -> float:
    """Blend weight between an activation's linear limit (``mult -> 0``) and relu limit."""
    return 1 / (1 + knee / mult ** 2)


def gelu(input: torch.Tensor, mult: float = 1.0, constraint: str | None = "to_output_scale",
         approximate: str = "none") -> torch.Tensor:
    """``gelu(mult x) / mult``, scaled between the linear limit (2) and relu's
    (``1 / RELU_STD``); its gradient between 2 and ``sqrt 2`` (u-muP App. E, ``alpha_ffn_act``)."""
    alpha = _smooth_act_alpha(mult, 0.25)
    out = log_interpolate(alpha, 2.0, 1 / RELU_STD)
    grad = log_interpolate(alpha, 2.0, 2 ** 0.5)
    f = (lambda x: F.gelu(x, approximate=approximate)) if mult == 1 else \
        (lambda x: F.gelu(x * mult, approximate=approximate) / mult)
    return _elementwise(f, input, out, grad, constraint)


def _silu(x: torch.Tensor, mult: float) -> torch.Tensor:
    return F.silu(x) if mult == 1 else x * torch.sigmoid(x * mult)


def silu(input: torch.Tensor, mult: float = 1.0, constraint: str | None = "to_output_scale") -> torch.Tensor:
    """``x sigmoid(mult x)``, output scaled as :func:`gelu`, gradient with the knee at ``mult^2 = 1``."""
    out = log_interpolate(_smooth_act_alpha(mult, 0.25), 2.0, 1 / RELU_STD)
    grad = log_interpolate(_smooth_act_alpha(mult, 1.0), 2.0, 2 ** 0.5)
    return _elementwise(_silu, input, out, grad, constraint, mult)


def relu(input: torch.Tensor, constraint: str | None = "to_output_scale") -> torch.Tensor:
    """``relu(x) / RELU_STD``; gradient ``x sqrt 2`` (half the units pass): the ``mult -> inf``
    limit of :func:`gelu`. (``unit_scaling`` 0.3.5 has no relu; a test checks unit scale.)"""
    return _elementwise(F.relu, input, 1 / RELU_STD, 2 ** 0.5, constraint)


def silu_glu(input: torch.Tensor, gate: torch.Tensor, mult: float = 1.0) -> torch.Tensor:
    """SwiGLU ``x * silu(gate)`` with one scale for the output and both gradients."""
    s = log_interpolate(_smooth_act_alpha(mult, 1.0), 2.0, 2 ** 0.5)
    return scale_fwd(scale_bwd(input, s) * _silu(scale_bwd(gate, s), mult), s)


def softmax(input: torch.Tensor, dim: int, dtype: torch.dtype | None = None,
            constraint: str | None = "to_output_scale", mult: float = 1.0) -> torch.Tensor:
    """``softmax(mult x)`` over ``dim`` of size ``S``: scaled between the flat limit (``S``) and
    the one-hot limit (``S^1/2``), gradient between ``S / mult`` and ``(S / mult)^1/2``."""
    size = input.shape[dim]
    alpha = 1 / (1 + 4 / mult ** 2)
    out = log_interpolate(alpha, size, size ** 0.5)
    grad = log_interpolate(alpha, size / mult, (size / mult) ** 0.5)
    return _elementwise(lambda x: F.softmax(x * mult, dim=dim, dtype=dtype), input, out, grad, constraint)


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """Dropout with output and gradient scaled by ``(1 - p)^1/2`` (torch's ``1/(1-p)`` keeps the
    mean; this keeps the variance)."""
    if inplace:
        raise ValueError("dropout(inplace=True) is not supported by unit-scaled dropout (the backward scale "
                         "needs the input); pass inplace=False")
    s = (1 - p) ** 0.5
    return _elementwise(F.dropout, input, s, s, None, p, training)


def matmul(left: torch.Tensor, right: torch.Tensor, constraint: str | None = "to_output_scale") -> torch.Tensor:
    """``left @ right / k^1/2``; gradients ``n^-1/2`` (left) and ``m^-1/2`` (right)."""
    m, k, n = left.shape[-2], left.shape[-1], right.shape[-1]
    out, grad_left, grad_right = constrain(constraint, k ** -0.5, n ** -0.5, m ** -0.5)
    return scale_fwd(torch.matmul(scale_bwd(left, grad_left), scale_bwd(right, grad_right)), out)


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           constraint: str | None = "to_output_scale",
           scale_power: tuple[float, float, float] = (0.5, 0.5, 0.5)) -> torch.Tensor:
    """``x W^T fan_in^-p0 + b``; input gradient ``fan_out^-p1``, weight and bias gradients
    ``B^-p2`` (never constrained: they do not flow on to other ops)."""
    fan_out, fan_in = weight.shape
    batch = input.numel() // fan_in
    out, grad_in = constrain(constraint, fan_in ** -scale_power[0], fan_out ** -scale_power[1])
    grad_w = batch ** -scale_power[2]
    bias = None if bias is None else scale_bwd(bias, grad_w)
    return scale_fwd(F.linear(scale_bwd(input, grad_in), scale_bwd(weight, grad_w), bias), out)


def linear_readout(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   constraint: str | None = None) -> torch.Tensor:
    """The readout: muP's ``1/fan_in`` forward multiplier, unconstrained gradients (u-muP Sec. 4.3)."""
    return linear(input, weight, bias, constraint=constraint, scale_power=(1.0, 0.5, 0.5))


def embedding(input: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None,
              max_norm: float | None = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
              sparse: bool = False) -> torch.Tensor:
    """A plain lookup; the table's gradient is scaled by ``(V / B)^1/2`` (each row is hit about
    ``B / V`` times)."""
    if scale_grad_by_freq or sparse:
        raise ValueError(f"unit-scaled embedding of table {tuple(weight.shape)}: scale_grad_by_freq and sparse "
                         f"are not supported (they would change the gradient scale); pass False")
    weight = scale_bwd(weight, (weight.shape[0] / input.numel()) ** 0.5)
    return F.embedding(input, weight, padding_idx, max_norm, norm_type)


def layer_norm(input: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """Plain layer norm; gain and bias gradients scaled by ``B^-1/2``."""
    s = (math.prod(normalized_shape) / input.numel()) ** 0.5
    weight = None if weight is None else scale_bwd(weight, s)
    bias = None if bias is None else scale_bwd(bias, s)
    return F.layer_norm(input, normalized_shape, weight, bias, eps)


def rms_norm(input: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None = None,
             eps: float = 1e-5) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * w`` (mean over ``normalized_shape``, in fp32); gain gradient
    scaled by ``B^-1/2``."""
    dims = tuple(range(-len(normalized_shape), 0))
    rms = (input.float().pow(2).mean(dims, keepdim=True) + eps).sqrt().to(input.dtype)
    out = input / rms
    if weight is not None:
        out = out * scale_bwd(weight, (math.prod(normalized_shape) / input.numel()) ** 0.5)
    return out


def residual_split(input: torch.Tensor, tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the stream into (branch input, skip) for :func:`residual_add` with the same ``tau``:
    the gradients are weighted ``tau / (1 + tau^2)^1/2`` and ``1 / (1 + tau^2)^1/2``, the
    weights of the add, so the stream's gradient is exact."""
    denom = (1 + tau ** 2) ** 0.5
    return scale_bwd(input, tau / denom), scale_bwd(input, 1 / denom)


def residual_add(residual: torch.Tensor, skip: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``(tau f + x) / (1 + tau^2)^1/2``: ``tau`` is the std ratio of branch to skip and the
    sum keeps unit variance. The branch's gradient is *not* multiplied by ``tau`` (it was
    weighted in :func:`residual_split`), so gradients inside the branch stay unit scale."""
    denom = (1 + tau ** 2) ** 0.5
    return scale_fwd(residual, tau / denom) + scale_fwd(skip, 1 / denom)


def residual_apply(fn: Callable[[torch.Tensor], torch.Tensor], input: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``residual_add(fn(branch), skip, tau)`` after ``residual_split(input, tau)``."""
    branch, skip = residual_split(input, tau)
    return residual_add(fn(branch), skip, tau)


def residual_taus(layers: int, alpha_res: float = 1.0, alpha_res_attn_ratio: float = 1.0) -> list[float]:
    """The ``tau`` of every branch of a pre-norm transformer, attention and MLP alternating.

    u-muP App. G: with a unit-variance embedding, branch ``k`` adds ``alpha_k^2 / L`` to the
    stream's variance (``L`` = layers, so ``tau ~ L^-1/2``: Depth-muP's branch scaling), with
    ``alpha_attn / alpha_mlp = alpha_res_attn_ratio`` and their RMS ``alpha_res``; then
    ``tau_k^2 = (alpha_k^2 / L) / (1 + sum_{j<k} alpha_j^2 / L)``.
    """
    alpha_mlp = alpha_res * (2 / (1 + alpha_res_attn_ratio ** 2)) ** 0.5
    alpha_attn = alpha_res_attn_ratio * alpha_mlp
    taus, added = [], 0.0
    for k in range(2 * layers):
        a = alpha_attn if k % 2 == 0 else alpha_mlp
        taus.append(a / (layers + added) ** 0.5)
        added += a ** 2
    return taus


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, mult: float = 1.0) -> torch.Tensor:
    """Attention with muP's logits ``mult q k^T / d_head`` (``alpha_attn_softmax = mult``); output
    and q, k, v gradients scaled by ``(1 - p)^1/2 / s``, ``s`` blending the uniform-attention
    limit (``((ln S if causal else 1) / S)^1/2``) and the one-hot limit (1)."""
    seq, d_head = value.shape[-2], value.shape[-1]
    uniform = ((math.log(seq) if is_causal else 1.0) / seq) ** 0.5
    s = (1 - dropout_p) ** 0.5 / log_interpolate(1 / (1 + 4 * d_head / mult ** 2), uniform, 1.0)
    q, k, v = (scale_bwd(t, s) for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                         scale=mult / d_head)
    return scale_fwd(out, s)


def cross_entropy(input: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
                  mult: float = 1.0) -> torch.Tensor:
    """``CE(mult x)`` (``alpha_loss_softmax = mult``, forward only); logit gradients scaled by
    ``V / (V - 1)^1/2``. ``input``: ``(V,)`` or ``(B, V)``; ``"mean"`` divides the sum by ``B``."""
    if input.dim() not in (1, 2):
        raise ValueError(f"unit-scaled cross_entropy takes logits of shape (V,) or (B, V), got {tuple(input.shape)}; "
                         f"flatten the leading dims first, e.g. logits.flatten(0, -2), targets.flatten()")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}; use 'mean' or 'sum'")
    batch, vocab = (1, input.shape[0]) if input.dim() == 1 else input.shape
    logits = scale(input, fwd=mult, bwd=vocab / (vocab - 1) ** 0.5)
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return scale_fwd(loss, 1 / batch) if reduction == "mean" else loss


def mse_loss(input: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Squared error, both gradients scaled by ``8^-1/2``."""
    if input.shape != target.shape:
        raise ValueError(f"unit-scaled mse_loss needs equal shapes, got input {tuple(input.shape)} and target "
                         f"{tuple(target.shape)}")
    s = 8 ** -0.5
    loss = F.mse_loss(scale_bwd(input, s), scale_bwd(target, s), reduction="sum")
    return scale_fwd(loss, 1 / input.numel()) if reduction == "mean" else loss
