"""Multi-tensor kernels of DAdaptAdam and Prodigy: per-block partial sums of the numerator and
denominator of ``d`` (summed on the device, then one host read per step) and the update.

fp32 parameters and state (the references keep state in the parameter's dtype; mupkit's
D-Adaptation does too, so the fused path takes fp32 only). Row layouts: ``*_ROW``; ``decay`` is the
decoupled decay's fraction of ``p`` per step, subtracted as ``p - decay p`` like the references'
``p.add_(p, alpha=-decay)`` (a factor ``1 - decay`` rounded to fp32 would lose most of a small
decay's digits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .elementwise import program_block, tensor_pointer
from .tables import launch

@triton.jit
def _store_sums(partials, num, s, r):
    """This block's terms of ``d``: the numerator term and ``r ||s||_1``."""
    b = tl.program_id(0)
    tl.store(partials + 2 * b, num)
    tl.store(partials + 2 * b + 1, tl.sum(tl.abs(s), axis=0) * r)


#: one DAdaptAdam step (valid once ``d`` has started adapting; see ``DAdaptAdam._compiled_step``)
DADAPT_ADAM_ROW = ("eps", "num_scale", "beta1", "m_scale", "beta2", "one_minus_beta2", "root", "s_scale", "l2",
                   "decay", "r")


@triton.jit
def _dadapt_adam_kernel(p_ptrs, g_ptrs, m_ptrs, v_ptrs, s_ptrs, numels, tensor_of_block, start_of_block, vals,
                        partials, NV: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, mask = program_block(tensor_of_block, start_of_block, numels, BLOCK)
    row = vals + t * NV
    p_ptr = tensor_pointer(p_ptrs, t, tl.float32)
    m_ptr = tensor_pointer(m_ptrs, t, tl.float32)
    v_ptr = tensor_pointer(v_ptrs, t, tl.float32)
    s_ptr = tensor_pointer(s_ptrs, t, tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g = tl.load(tensor_pointer(g_ptrs, t, tl.float32) + offs, mask=mask, other=0.0)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0)
    eps = tl.load(row + 0)
    g = g + tl.load(row + 8) * p
    num = tl.sum(g * (s / (tl.sqrt(v) + eps)), axis=0) * tl.load(row + 1)
    m = m * tl.load(row + 2) + g * tl.load(row + 3)
    v = v * tl.load(row + 4) + g * g * tl.load(row + 5)
    s = s * tl.load(row + 6) + g * tl.load(row + 7)
    p = p - tl.load(row + 9) * p - m / (tl.sqrt(v) + eps)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    tl.store(s_ptr + offs, s, mask=mask)
    tl.store(p_ptr + offs, p, mask=mask)
    _store_sums(partials, num, s, tl.load(row + 10))


def dadapt_adam(params, grads, exp_avgs, exp_avg_sqs, s, rows) -> torch.Tensor:
    """One fused DAdaptAdam step; returns the float64 device pair ``[numerator term, denominator]``."""
    return launch(_dadapt_adam_kernel, [params, grads, exp_avgs, exp_avg_sqs, s], rows, reduce="blocks")


#: Prodigy's statistics pass (``p0_scalar`` 1 when the reference keeps a 0-dim zero ``p0``)
PRODIGY_SUMS_ROW = ("l2", "num_scale", "beta2", "v_scale", "beta3", "s_scale", "r", "p0_scalar")


@triton.jit
def _prodigy_sums_kernel(p_ptrs, g_ptrs, p0_ptrs, v_ptrs, s_ptrs, numels, tensor_of_block, start_of_block, vals,
                         partials, NV: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, mask = program_block(tensor_of_block, start_of_block, numels, BLOCK)
    row = vals + t * NV
    v_ptr = tensor_pointer(v_ptrs, t, tl.float32)
    s_ptr = tensor_pointer(s_ptrs, t, tl.float32)
    p = tl.load(tensor_pointer(p_ptrs, t, tl.float32) + offs, mask=mask, other=0.0)
    g = tl.load(tensor_pointer(g_ptrs, t, tl.float32) + offs, mask=mask, other=0.0)
    p0_offs = tl.where(tl.load(row + 7) > 0, offs * 0, offs)
    p0 = tl.load(tensor_pointer(p0_ptrs, t, tl.float32) + p0_offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0)
    g = g + tl.load(row + 0) * p
    num = tl.sum(g * (p0 - p), axis=0) * tl.load(row + 1)
    v = v * tl.load(row + 2) + g * g * tl.load(row + 3)
    s = s * tl.load(row + 4) + g * tl.load(row + 5)
    tl.store(v_ptr + offs, v, mask=mask)
    tl.store(s_ptr + offs, s, mask=mask)
    _store_sums(partials, num, s, tl.load(row + 6))


def prodigy_sums(params, grads, p0s, exp_avg_sqs, s, rows) -> torch.Tensor:
    """Prodigy's first pass; returns the float64 device pair ``[numerator term, denominator]``."""
    return launch(_prodigy_sums_kernel, [params, grads, p0s, exp_avg_sqs, s], rows, reduce="blocks")


#: Prodigy's update pass (``momentum`` 0 when beta1 = 0: then the step uses g itself)
PRODIGY_UPDATE_ROW = ("l2", "beta1", "m_scale", "eps_d", "decay", "step", "momentum")


@triton.jit
def _prodigy_update_kernel(p_ptrs, g_ptrs, m_ptrs, v_ptrs, numels, tensor_of_block, start_of_block, vals,
                           NV: tl.constexpr, MOMENTUM: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, mask = program_block(tensor_of_block, start_of_block, numels, BLOCK)
    row = vals + t * NV
    p_ptr = tensor_pointer(p_ptrs, t, tl.float32)
    p = tl.load(p_ptr + offs, mask=mask)
    g = tl.load(tensor_pointer(g_ptrs, t, tl.float32) + offs, mask=mask) + tl.load(row + 0) * p
    v = tl.load(tensor_pointer(v_ptrs, t, tl.float32) + offs, mask=mask)
    if MOMENTUM:
        m_ptr = tensor_pointer(m_ptrs, t, tl.float32)
        g = tl.load(m_ptr + offs, mask=mask) * tl.load(row + 1) + g * tl.load(row + 2)
        tl.store(m_ptr + offs, g, mask=mask)
    p = p - tl.load(row + 4) * p - tl.load(row + 5) * g / (tl.sqrt(v) + tl.load(row + 3))
    tl.store(p_ptr + offs, p, mask=mask)


def prodigy_update(params, grads, exp_avgs, exp_avg_sqs, rows) -> None:
    """Prodigy's second pass (``exp_avgs`` None without momentum)."""
    momentum = exp_avgs is not None
    launch(_prodigy_update_kernel, [params, grads, exp_avgs if momentum else params, exp_avg_sqs], rows,
           MOMENTUM=momentum)


__all__ = ["DADAPT_ADAM_ROW", "PRODIGY_SUMS_ROW", "PRODIGY_UPDATE_ROW", "dadapt_adam", "prodigy_sums",
           "prodigy_update"]
