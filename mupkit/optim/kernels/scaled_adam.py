"""ScaledAdam's Triton kernels: :func:`sums` (what must be known before the update) and
:func:`update` (one pass over ``p, g, v, delta``). Semantics: :func:`.scaled_adam.scaled_adam_update`.

Minimum traffic (fp32 ``p, g`` and fp32 state ``v, delta``; ``docs/kernels.md``):

* a step that is neither a size-update step nor clipped: the update needs only per-tensor
  scalars from earlier steps (``max(RMS(P), floor)``), so one pass, reading ``p, g, v, delta`` and
  writing ``p, v, delta``: 28 B/param (bf16 ``p, g``: 22). This step's ``<P, g>``, buffered for the
  next size step, is summed in the same pass (``DOT``);
* a size-update step (1 in ``size_update_period``): the scale step ``ss`` and the refreshed
  ``RMS(P)`` need this step's ``<P, g>`` and ``sum P^2`` of the whole tensor before any element is
  updated: a first pass reading ``p, g`` (+8 B: 36 B/param);
* with clipping, the global gradient norm must be known before any update: the first pass reads
  ``g`` (``sum g^2``, +4 B: 32 B/param), and ``p`` too on size-update steps (36 B/param).

Between the passes the per-tensor statistics stay on the device (the clipping factor, ``RMS(P)``,
``ss``: a few multi-tensor ops per param group); nothing is read back to the host.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .elementwise import TL_DTYPES, program_block, tensor_pointer
from .tables import blocks_for, launch

#: per-tensor host values of :func:`update`; ``step_size`` is ``-lr lr_scale`` (times
#: ``scalar_lr_scale`` for one element); ``scalar`` 1 clamps the result to ``+-scalar_max``
SCALED_ADAM_ROW = ("beta2", "one_minus_beta2", "correction", "eps", "step_size", "beta1", "scalar", "scalar_max")

#: the columns of :func:`update`'s per-tensor device values: the clipping factor, ``max(RMS(P),
#: floor)`` (1 for one element) and the scale step ``ss`` (0 unless one is due)
SCALES = ("factor", "size", "size_step")

#: the columns of :func:`sums`' result
SUMS = ("g.g", "p.g", "p.p")


@triton.jit
def _sums_kernel(p_ptrs, g_ptrs, numels, tensor_of_block, start_of_block, vals, sums,
                 NV: tl.constexpr, P_DTYPE: tl.constexpr, SUM_GG: tl.constexpr, SUM_P: tl.constexpr,
                 BLOCK: tl.constexpr):
    t, offs, mask = program_block(tensor_of_block, start_of_block, numels, BLOCK)
    g = tl.load(tensor_pointer(g_ptrs, t, P_DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
    if SUM_GG:
        tl.atomic_add(sums + 3 * t, tl.sum(g * g, axis=0))
    if SUM_P:
        p = tl.load(tensor_pointer(p_ptrs, t, P_DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
        tl.atomic_add(sums + 3 * t + 1, tl.sum(p * g, axis=0))
        tl.atomic_add(sums + 3 * t + 2, tl.sum(p * p, axis=0))


@triton.jit
def _update_kernel(p_ptrs, g_ptrs, v_ptrs, d_ptrs, numels, tensor_of_block, start_of_block, vals, scales, dots,
                   NV: tl.constexpr, P_DTYPE: tl.constexpr, DOT: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, mask = program_block(tensor_of_block, start_of_block, numels, BLOCK)
    row = vals + t * NV
    p_ptr = tensor_pointer(p_ptrs, t, P_DTYPE)
    v_ptr = tensor_pointer(v_ptrs, t, tl.float32)
    d_ptr = tensor_pointer(d_ptrs, t, tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(tensor_pointer(g_ptrs, t, P_DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
    factor = tl.load(scales + 3 * t)
    g = tl.where(factor > 0, g * factor, 0.0)  # factor 0: a non-finite norm; g * 0 would keep its NaNs
    if DOT:
        tl.atomic_add(dots + t, tl.sum(p * g, axis=0))
    v = tl.load(v_ptr + offs, mask=mask) * tl.load(row + 0) + tl.load(row + 1) * g * g
    tl.store(v_ptr + offs, v, mask=mask)
    u = g / (tl.sqrt(v / tl.load(row + 2)) + tl.load(row + 3)) * tl.load(row + 4)
    u = u * tl.load(scales + 3 * t + 1) + tl.load(scales + 3 * t + 2) * p
    beta1 = tl.load(row + 5)
    delta = beta1 * tl.load(d_ptr + offs, mask=mask) + (1.0 - beta1) * u
    tl.store(d_ptr + offs, delta, mask=mask)
    p = p + delta
    bound = tl.load(row + 7)
    p = tl.where(tl.load(row + 6) > 0, tl.minimum(tl.maximum(p, -bound), bound), p)
    tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)


def sums(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], *, grad_squares: bool,
         param_products: bool) -> torch.Tensor:
    """Per tensor ``[sum g^2, <P, g>, sum P^2]`` (:data:`SUMS`), an fp32 ``(n, 3)`` device array;
    only ``sum g^2`` with ``grad_squares``, only the two sums with ``P`` with ``param_products``
    (``P`` is read only then), the other columns 0."""
    out = torch.zeros(len(params), 3, dtype=torch.float32, device=params[0].device)
    launch(_sums_kernel, [params, grads], [[0.0]] * len(params), sums=out, P_DTYPE=TL_DTYPES[params[0].dtype],
           SUM_GG=grad_squares, SUM_P=param_products)
    return out


def update(params, grads, exp_avg_sqs, deltas, rows: Sequence[Sequence[float]], scales: torch.Tensor,
           dots: torch.Tensor | None) -> None:
    """The update pass; ``rows`` per :data:`SCALED_ADAM_ROW`, ``scales`` an fp32 ``(n, 3)`` device
    array per :data:`SCALES`; ``dots`` (an fp32 ``(n,)`` device array of zeros, or None): where
    this step's ``<P, g>`` (``g`` clipped) is summed, in the same pass."""
    launch(_update_kernel, [params, grads, exp_avg_sqs, deltas], rows, scales=scales,
           dots=scales if dots is None else dots, DOT=dots is not None, P_DTYPE=TL_DTYPES[params[0].dtype])


def numels(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors' sizes as an int64 device array (cached with the launches' block map)."""
    return blocks_for(params).numel


__all__ = ["SCALED_ADAM_ROW", "SCALES", "SUMS", "numels", "sums", "update"]
