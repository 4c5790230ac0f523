"""Elementwise multi-tensor kernels: muP Adam/AdamW, SGD with momentum, Adam-atan2.

Each program updates one block of one tensor (see :mod:`.tables`); the math is in fp32 with
fp32 state, parameters may be fp32/bf16/fp16 (``P_DTYPE``). Per-tensor values come from a row of
``vals``; the column order of each kernel is given by its ``*_ROW`` tuple and filled by the
Python launcher below it, which is the only caller.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from .tables import launch

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def program_block(tensor_of_block, start_of_block, numels, BLOCK: tl.constexpr):
    """This program's tensor index, element offsets and mask."""
    b = tl.program_id(0)
    t = tl.load(tensor_of_block + b)
    offsets = tl.load(start_of_block + b) + tl.arange(0, BLOCK)
    return t, offsets, offsets < tl.load(numels + t)


@triton.jit
def tensor_pointer(table, t, DTYPE: tl.constexpr):
    return tl.load(table + t).to(tl.pointer_type(DTYPE))


@triton.jit
def atan2_nonneg_x(y, x):
    """``atan2(y, x)`` for ``x >= 0`` from core ops (Cephes ``atanf``: range reduction to
    ``|z| <= tan(pi/8)`` and a degree-9 odd polynomial; ~1 ulp in fp32). ``x = 0`` gives
    ``sign(y) pi / 2`` and ``(0, 0)`` gives 0, as ``atan2``."""
    z = tl.abs(y) / tl.maximum(x, 1.1754943508222875e-38)
    big = z > 2.414213562373095
    mid = z > 0.4142135623730950
    reduced = tl.where(big, -1.0 / tl.maximum(z, 1e-30), tl.where(mid, (z - 1.0) / (z + 1.0), z))
    offset = tl.where(big, 1.5707963267948966, tl.where(mid, 0.7853981633974483, 0.0))
    w = reduced * reduced
    poly = (((8.05374449538e-2 * w - 1.38776856032e-1) * w + 1.99777106478e-1) * w - 3.33329491539e-1) * w
    angle = offset + poly * reduced + reduced
    return tl.where(y < 0, -angle, angle)


@triton.jit
def bias_correction(step, log_beta):
    """``1 - beta^step = -expm1(step ln(beta))`` in fp32 to ~2e-7 relative, also for ``beta``
    near 1 (``1 - exp`` would cancel: ``beta2 = 0.999`` at step 1 lost 5 digits). ``expm1(x)``
    is a degree-8 Taylor polynomial for ``-0.5 < x <= 0`` (truncation < 2e-8 relative), else
    ``exp(x) - 1``; ``ln(0) = -inf`` gives 1."""
    x = step * log_beta
    s = tl.maximum(x, -0.5)
    series = s * (1.0 + s / 2.0 * (1.0 + s / 3.0 * (1.0 + s / 4.0 * (1.0 + s / 5.0 * (1.0 + s / 6.0 * (
        1.0 + s / 7.0 * (1.0 + s / 8.0)))))))
    return -tl.where(x > -0.5, series, tl.exp(x) - 1.0)


def log_or_minus_inf(beta: float) -> float:
    """``ln(beta)`` for a kernel row; ``-inf`` for ``beta = 0`` (so ``beta^step = 0``)."""
    return math.log(beta) if beta > 0 else -math.inf


# ------------------------------------------------------------------------------ Adam / AdamW

#: torch.optim.Adam(W) single-tensor semantics; ``l2`` is Adam's coupled decay (added to g),
#: ``decay`` AdamW's multiplier ``1 - lr wd``; ``sign`` is -1 to maximize. The bias corrections
#: come from each tensor's step counter on the device, so rows are per group
ADAM_ROW = ("l2", "decay", "one_minus_beta1", "beta2", "one_minus_beta2", "lr", "log_beta1", "log_beta2", "eps",
            "sign")


@triton.jit
def _adam_kernel(p_ptrs, g_ptrs, m_ptrs, v_ptrs, step_ptrs, numels, tensor_of_block, start_of_block, vals,
                 NV: tl.constexpr, P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, mask = program_block(tensor_of_block, start_of_block, numels, BLOCK)
    row = vals + t * NV
    p_ptr = tensor_pointer(p_ptrs, t, P_DTYPE)
    g_ptr = tensor_pointer(g_ptrs, t, P_DTYPE)
    m_ptr = tensor_pointer(m_ptrs, t, S_DTYPE)
    v_ptr = tensor_pointer(v_ptrs, t, S_DTYPE)
    step = tl.load(tensor_pointer(step_ptrs, t, tl.float32))
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32) * tl.load(row + 9)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
    g = g + tl.load(row + 0) * p
    p = p * tl.load(row + 1)
    m = m + tl.load(row + 2) * (g - m)
    v = v * tl.load(row + 3) + tl.load(row + 4) * g * g  # 1 - beta2 from the host: no fp32 cancellation
    denom = tl.sqrt(v) / tl.sqrt(bias_correction(step, tl.load(row + 7))) + tl.load(row + 8)
    p = p - tl.load(row + 5) / bias_correction(step, tl.load(row + 6)) * m / denom
    tl.store(m_ptr + offs, m.to(S_DTYPE), mask=mask)
    tl.store(v_ptr + offs, v.to(S_DTYPE), mask=mask)
    tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)


def adam(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
         exp_avg_sqs: Sequence[torch.Tensor], steps: Sequence[torch.Tensor], rows: Sequence[Sequence[float]]) -> None:
    """One Adam/AdamW step of tensors sharing a device and dtype (and a state dtype), one launch;
    ``steps``: fp32 0-dim step counters on the device, advanced here (one multi-tensor add);
    ``rows`` per :data:`ADAM_ROW` (see :func:`adam_row`)."""
    torch._foreach_add_(steps, 1.0)
    launch(_adam_kernel, [params, grads, exp_avgs, exp_avg_sqs, steps], rows, P_DTYPE=TL_DTYPES[params[0].dtype],
           S_DTYPE=TL_DTYPES[exp_avgs[0].dtype])


def adam_row(*, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool,
             maximize: bool = False) -> tuple[float, ...]:
    l2, decay = (0.0, 1.0 - lr * weight_decay) if decoupled else (weight_decay, 1.0)
    return (l2, decay, 1.0 - beta1, beta2, 1.0 - beta2, lr, log_or_minus_inf(beta1), log_or_minus_inf(beta2), eps,
            -1.0 if maximize else 1.0)


# ------------------------------------------------------------------------------ SGD

#: torch.optim.SGD semantics: ``first`` is 1 at a momentum buffer's first step (it is set to g)
SGD_ROW = ("lr", "weight_decay", "momentum", "one_minus_dampening", "first", "nesterov", "sign")


@triton.jit
def _sgd_kernel(p_ptrs, g_ptrs, buf_ptrs, numels, tensor_of_block, start_of_block, vals,
                NV: tl.constexpr, P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, MOMENTUM: tl.constexpr,
                BLOCK: tl.constexpr):
    t, offs, mask = program_block(tensor_of_block, start_of_block, numels, BLOCK)
    row = vals + t * NV
    p_ptr = tensor_pointer(p_ptrs, t, P_DTYPE)
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(tensor_pointer(g_ptrs, t, P_DTYPE) + offs, mask=mask).to(tl.float32) * tl.load(row + 6)
    g = g + tl.load(row + 1) * p
    if MOMENTUM:
        buf_ptr = tensor_pointer(buf_ptrs, t, S_DTYPE)
        buf = tl.load(buf_ptr + offs, mask=mask).to(tl.float32)
        momentum = tl.load(row + 2)
        buf = tl.where(tl.load(row + 4) > 0, g, buf * momentum + tl.load(row + 3) * g)
        tl.store(buf_ptr + offs, buf.to(S_DTYPE), mask=mask)
        g = tl.where(tl.load(row + 5) > 0, g + momentum * buf, buf)
    p = p - tl.load(row + 0) * g
    tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)


def sgd(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor] | None,
        rows: Sequence[Sequence[float]]) -> None:
    """One SGD step (momentum buffers, or None without momentum); ``rows`` per :data:`SGD_ROW`."""
    tables = [params, grads] + ([buffers] if buffers is not None else [params])
    launch(_sgd_kernel, tables, rows, MOMENTUM=buffers is not None, P_DTYPE=TL_DTYPES[params[0].dtype],
           S_DTYPE=TL_DTYPES[(buffers or params)[0].dtype])


def sgd_row(*, lr: float, weight_decay: float, momentum: float, dampening: float, nesterov: bool, first: bool,
            maximize: bool = False) -> tuple[float, ...]:
    return (lr, weight_decay, momentum, 1.0 - dampening, 1.0 if first else 0.0, 1.0 if nesterov else 0.0,
            -1.0 if maximize else 1.0)


# ------------------------------------------------------------------------------ Adam-atan2

#: mupkit.optim.AdamAtan2 semantics (``adam_atan2._coefficients`` with the step's bias corrections
#: from the device counter: ``lucidrains`` 1 puts ``1 / bc1`` on the numerator, 0 on the step
#: size; ``decay`` = 1 - lr wd; ``sign`` -1 to maximize)
ADAM_ATAN2_ROW = ("lr_a", "b_squared", "log_beta1", "log_beta2", "lucidrains", "decay", "one_minus_beta1",
                  "one_minus_beta2", "sign")


@triton.jit
def _adam_atan2_kernel(p_ptrs, g_ptrs, m_ptrs, v_ptrs, step_ptrs, numels, tensor_of_block, start_of_block, vals,
                       NV: tl.constexpr, P_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, mask = program_block(tensor_of_block, start_of_block, numels, BLOCK)
    row = vals + t * NV
    p_ptr = tensor_pointer(p_ptrs, t, P_DTYPE)
    m_ptr = tensor_pointer(m_ptrs, t, tl.float32)
    v_ptr = tensor_pointer(v_ptrs, t, tl.float32)
    step = tl.load(tensor_pointer(step_ptrs, t, tl.float32))
    inv_bc1 = 1.0 / bias_correction(step, tl.load(row + 2))
    lucidrains = tl.load(row + 4) > 0
    num_scale = tl.where(lucidrains, inv_bc1, 1.0)
    step_size = tl.load(row + 0) * tl.where(lucidrains, 1.0, inv_bc1)
    den_scale = tl.load(row + 1) / bias_correction(step, tl.load(row + 3))
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(tensor_pointer(g_ptrs, t, P_DTYPE) + offs, mask=mask).to(tl.float32) * tl.load(row + 8)
    m = tl.load(m_ptr + offs, mask=mask)
    v = tl.load(v_ptr + offs, mask=mask)
    m = m + tl.load(row + 6) * (g - m)
    v = v + tl.load(row + 7) * (g * g - v)
    update = atan2_nonneg_x(m * num_scale, tl.sqrt(v * den_scale))
    p = p * tl.load(row + 5) - step_size * update
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)


def adam_atan2(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
               exp_avg_sqs: Sequence[torch.Tensor], steps: Sequence[torch.Tensor],
               rows: Sequence[Sequence[float]]) -> None:
    """One Adam-atan2 step, one launch; ``steps`` as for :func:`adam` (advanced here); ``rows`` per
    :data:`ADAM_ATAN2_ROW` (see :func:`adam_atan2_row`)."""
    torch._foreach_add_(steps, 1.0)
    launch(_adam_atan2_kernel, [params, grads, exp_avgs, exp_avg_sqs, steps], rows, P_DTYPE=TL_DTYPES[params[0].dtype])


def adam_atan2_row(*, lr: float, beta1: float, beta2: float, weight_decay: float, a: float, b: float,
                   formulation: str, maximize: bool) -> tuple[float, ...]:
    return (lr * a, b * b, log_or_minus_inf(beta1), log_or_minus_inf(beta2), float(formulation == "lucidrains"),
            1.0 - lr * weight_decay, 1.0 - beta1, 1.0 - beta2, -1.0 if maximize else 1.0)


__all__ = ["ADAM_ATAN2_ROW", "ADAM_ROW", "SGD_ROW", "adam", "adam_atan2", "adam_atan2_row", "adam_row",
           "atan2_nonneg_x", "bias_correction", "log_or_minus_inf", "program_block", "sgd", "sgd_row",
           "tensor_pointer"]
