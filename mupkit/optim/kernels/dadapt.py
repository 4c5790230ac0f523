"""Triton kernels of DAdaptAdam and Prodigy, with ``d`` kept on the device.

Each launch covers every tensor of a (device, dtype) bucket (:mod:`.tables`); the per-group
coefficients are a row of ``vals`` (``*_ROW``), and the values that depend on ``d`` (``dlr = d lr
bias_correction``, ...) are read from a small float64 device array ``shared`` that the optimizer
computes on the device from the previous step's sums. The terms of ``d`` (numerator and
denominator) are summed per block into ``partials`` and reduced on the device: nothing is read
back to the host (on CUDA a host read is a sync that stalls the launch queue).

Minimum traffic (``docs/kernels.md``), fp32:

* DAdaptAdam, **one pass**, 36 B/param (p, m, v, s read and written, g read). The update
  ``p <- p - decay p - m / (sqrt(v) + eps)`` uses this step's ``m`` and ``v``, whose scale
  ``dlr`` comes from the ``d`` of the step *before* (Defazio & Mishchenko 2023, Alg. 1: the new
  ``d`` only scales the next step). So the statistics and the update of an element run in one
  pass, before the sums are complete. The reference skips the update of a step whose
  denominator is 0 (every gradient 0); that can only happen before ``d`` first adapted, so the
  optimizer takes its exact two-pass eager route while its step count ``k`` is 0 on the host,
  and this kernel from then on.
* Prodigy, **two passes**, 48 B/param with momentum. The update's denominator ``sqrt(v) + d
  eps`` (and, without momentum, its step ``dlr d``) needs this step's ``d``, which needs the sum
  ``<g, p0 - p>`` over the whole model (Mishchenko & Defazio 2023, Alg. 4): pass 1 reads p, g,
  p0, s and writes s; pass 2 reads p, g, m, v and writes p, m, v (the EMAs of ``m`` and ``v``
  use the previous ``d``, so they move to pass 2, where ``v`` is needed anyway). A step whose
  denominator is 0 is skipped on the device (its ``shared`` step size is 0).

fp32 parameters and state only (the references keep state in the parameter's dtype).
``decay`` is subtracted as ``p - decay p`` like the references' ``p.add_(p, alpha=-decay)``.
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


#: a group's DAdaptAdam coefficients; the kernel multiplies the ``*_coef`` columns by ``dlr``
#: (``shared[0]``). A frozen group (lr 0) has the identity row: beta1 = beta2 = root = 1, r and
#: the coefficients 0 (its moments stay, its decay applies, as the reference's)
DADAPT_ADAM_ROW = ("eps", "r", "beta1", "m_coef", "beta2", "one_minus_beta2", "root", "s_coef", "l2", "decay_coef")


@triton.jit
def _dadapt_adam_kernel(p_ptrs, g_ptrs, m_ptrs, v_ptrs, s_ptrs, numels, tensor_of_block, start_of_block, vals,
                        partials, shared, NV: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, mask = program_block(tensor_of_block, start_of_block, numels, BLOCK)
    row = vals + t * NV
    dlr = tl.load(shared).to(tl.float32)
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
    r = tl.load(row + 1)
    g = g + tl.load(row + 8) * p
    num = tl.sum(g * (s / (tl.sqrt(v) + eps)), axis=0) * (r * dlr)
    m = m * tl.load(row + 2) + g * (tl.load(row + 3) * dlr)
    v = v * tl.load(row + 4) + g * g * tl.load(row + 5)
    s = s * tl.load(row + 6) + g * (tl.load(row + 7) * dlr)
    p = p - (tl.load(row + 9) * dlr) * p - m / (tl.sqrt(v) + eps)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    tl.store(s_ptr + offs, s, mask=mask)
    tl.store(p_ptr + offs, p, mask=mask)
    _store_sums(partials, num, s, r)


def dadapt_adam(params, grads, exp_avgs, exp_avg_sqs, s, rows, shared: torch.Tensor) -> torch.Tensor:
    """One fused DAdaptAdam step (``shared = [dlr]``, float64 on the device); returns the float64
    device pair ``[numerator term, denominator term]``."""
    return launch(_dadapt_adam_kernel, [params, grads, exp_avgs, exp_avg_sqs, s], rows, reduce="blocks",
                  shared=shared)


#: Prodigy's pass 1 coefficients; ``shared = [(d / d0) dlr, (d / d0) d]``: the numerator term is
#: ``(d / d0) dlr <g, p0 - p>``, ``s``'s step ``(d / d0) dlr`` or, with ``safeguard_warmup``,
#: ``(d / d0) d`` (``warmup`` 1); ``p0_scalar`` 1 for the reference's 0-dim ``p0`` of a zero parameter
PRODIGY_SUMS_ROW = ("l2", "beta3", "warmup", "r", "p0_scalar")


@triton.jit
def _prodigy_sums_kernel(p_ptrs, g_ptrs, p0_ptrs, s_ptrs, numels, tensor_of_block, start_of_block, vals,
                         partials, shared, NV: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, mask = program_block(tensor_of_block, start_of_block, numels, BLOCK)
    row = vals + t * NV
    num_scale = tl.load(shared).to(tl.float32)
    s_scale = tl.where(tl.load(row + 2) > 0, tl.load(shared + 1).to(tl.float32), num_scale)
    s_ptr = tensor_pointer(s_ptrs, t, tl.float32)
    p = tl.load(tensor_pointer(p_ptrs, t, tl.float32) + offs, mask=mask, other=0.0)
    g = tl.load(tensor_pointer(g_ptrs, t, tl.float32) + offs, mask=mask, other=0.0)
    p0_offs = tl.where(tl.load(row + 4) > 0, offs * 0, offs)
    p0 = tl.load(tensor_pointer(p0_ptrs, t, tl.float32) + p0_offs, mask=mask, other=0.0)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0)
    g = g + tl.load(row + 0) * p
    num = tl.sum(g * (p0 - p), axis=0) * num_scale
    s = s * tl.load(row + 1) + g * s_scale
    tl.store(s_ptr + offs, s, mask=mask)
    _store_sums(partials, num, s, tl.load(row + 3))


def prodigy_sums(params, grads, p0s, s, rows, shared: torch.Tensor) -> torch.Tensor:
    """Prodigy's pass 1; returns the float64 device pair ``[numerator term, denominator term]``."""
    return launch(_prodigy_sums_kernel, [params, grads, p0s, s], rows, reduce="blocks", shared=shared)


#: Prodigy's pass 2 coefficients; ``shared = [d_old, d_new, dlr, step]`` (``dlr`` 0 on a skipped
#: step; ``step``: ``dlr`` with momentum, else ``dlr d_new``): ``m <- beta1 m + m_coef d_old g``,
#: ``v <- beta2 v + v_coef d_old^2 g^2``, ``p <- p - decay_coef dlr p - step_coef step u / (sqrt(v)
#: + eps d_new)`` with ``u = m`` (``step_coef`` 1), or without momentum ``u = g`` (``step_coef`` r).
#: A frozen group's ``m_coef``, ``v_coef`` are 0 and its betas 1
PRODIGY_UPDATE_ROW = ("l2", "beta1", "m_coef", "beta2", "v_coef", "eps", "decay_coef", "step_coef")


@triton.jit
def _prodigy_update_kernel(p_ptrs, g_ptrs, m_ptrs, v_ptrs, numels, tensor_of_block, start_of_block, vals, shared,
                           NV: tl.constexpr, MOMENTUM: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, mask = program_block(tensor_of_block, start_of_block, numels, BLOCK)
    row = vals + t * NV
    d_old = tl.load(shared)  # float64: each scale below is rounded to fp32 once
    d_new = tl.load(shared + 1)
    v_scale = (tl.load(row + 4).to(tl.float64) * d_old * d_old).to(tl.float32)
    eps_d = (tl.load(row + 5).to(tl.float64) * d_new).to(tl.float32)
    decay = (tl.load(row + 6).to(tl.float64) * tl.load(shared + 2)).to(tl.float32)
    step = (tl.load(row + 7).to(tl.float64) * tl.load(shared + 3)).to(tl.float32)
    p_ptr = tensor_pointer(p_ptrs, t, tl.float32)
    v_ptr = tensor_pointer(v_ptrs, t, tl.float32)
    p = tl.load(p_ptr + offs, mask=mask)
    g = tl.load(tensor_pointer(g_ptrs, t, tl.float32) + offs, mask=mask) + tl.load(row + 0) * p
    v = tl.load(v_ptr + offs, mask=mask) * tl.load(row + 3) + g * g * v_scale
    tl.store(v_ptr + offs, v, mask=mask)
    if MOMENTUM:
        m_ptr = tensor_pointer(m_ptrs, t, tl.float32)
        u = tl.load(m_ptr + offs, mask=mask) * tl.load(row + 1) + g * (tl.load(row + 2).to(tl.float64) * d_old).to(
            tl.float32)
        tl.store(m_ptr + offs, u, mask=mask)
    else:
        u = g
    p = p - decay * p - step * u / (tl.sqrt(v) + eps_d)
    tl.store(p_ptr + offs, p, mask=mask)


def prodigy_update(params, grads, exp_avgs, exp_avg_sqs, rows, shared: torch.Tensor) -> None:
    """Prodigy's pass 2 (``exp_avgs`` None without momentum)."""
    momentum = exp_avgs is not None
    launch(_prodigy_update_kernel, [params, grads, exp_avgs if momentum else params, exp_avg_sqs], rows,
           MOMENTUM=momentum, shared=shared)


__all__ = ["DADAPT_ADAM_ROW", "PRODIGY_SUMS_ROW", "PRODIGY_UPDATE_ROW", "dadapt_adam", "prodigy_sums",
           "prodigy_update"]
