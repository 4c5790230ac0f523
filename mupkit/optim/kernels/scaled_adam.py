"""Multi-tensor ScaledAdam kernels: a statistics pass (``<P, g>`` and ``sum P^2`` per tensor)
and the update pass (second moment, RMS-relative direction, learned-scale step, momentum,
scalar clamp). Semantics are :class:`mupkit.optim.ScaledAdam`'s; the per-tensor size
statistics between the passes stay on the device (``sizes``: ``[max(RMS, floor), ss]``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .elementwise import TL_DTYPES, program_block, tensor_pointer
from .tables import launch

#: host values per tensor; ``step_size`` is ``-lr lr_scale`` (times scalar_lr_scale for one element)
SCALED_ADAM_ROW = ("grad_scale", "beta2", "one_minus_beta2", "correction", "eps", "step_size", "beta1", "scalar",
                   "scalar_max")


@triton.jit
def _stats_kernel(p_ptrs, g_ptrs, numels, tensor_of_block, start_of_block, vals, partials,
                  NV: tl.constexpr, P_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, mask = program_block(tensor_of_block, start_of_block, numels, BLOCK)
    p = tl.load(tensor_pointer(p_ptrs, t, P_DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(tensor_pointer(g_ptrs, t, P_DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
    tl.atomic_add(partials + 2 * t, tl.sum(p * g, axis=0))
    tl.atomic_add(partials + 2 * t + 1, tl.sum(p * p, axis=0))


@triton.jit
def _update_kernel(p_ptrs, g_ptrs, v_ptrs, d_ptrs, numels, tensor_of_block, start_of_block, vals, sizes,
                   NV: tl.constexpr, P_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, mask = program_block(tensor_of_block, start_of_block, numels, BLOCK)
    row = vals + t * NV
    p_ptr = tensor_pointer(p_ptrs, t, P_DTYPE)
    v_ptr = tensor_pointer(v_ptrs, t, tl.float32)
    d_ptr = tensor_pointer(d_ptrs, t, tl.float32)
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(tensor_pointer(g_ptrs, t, P_DTYPE) + offs, mask=mask).to(tl.float32) * tl.load(row + 0)
    v = tl.load(v_ptr + offs, mask=mask) * tl.load(row + 1) + tl.load(row + 2) * g * g
    tl.store(v_ptr + offs, v, mask=mask)
    u = g / (tl.sqrt(v / tl.load(row + 3)) + tl.load(row + 4)) * tl.load(row + 5)
    u = u * tl.load(sizes + 2 * t) + tl.load(sizes + 2 * t + 1) * p
    beta1 = tl.load(row + 6)
    delta = beta1 * tl.load(d_ptr + offs, mask=mask) + (1.0 - beta1) * u
    tl.store(d_ptr + offs, delta, mask=mask)
    p = p + delta
    bound = tl.load(row + 8)
    p = tl.where(tl.load(row + 7) > 0, tl.minimum(tl.maximum(p, -bound), bound), p)
    tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)


def stats(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[<P, g>, sum P^2]`` per tensor, an fp32 ``(n, 2)`` device array."""
    return launch(_stats_kernel, [params, grads], [[0.0]] * len(params), reduce="tensors",
                  P_DTYPE=TL_DTYPES[params[0].dtype])


def update(params, grads, exp_avg_sqs, deltas, rows, sizes: torch.Tensor) -> None:
    """The update pass; ``rows`` per :data:`SCALED_ADAM_ROW`, ``sizes`` an fp32 ``(n, 2)`` device
    array of ``[max(RMS(P), floor) (1 for one element), ss (0 when no size step is due)]``."""
    launch(_update_kernel, [params, grads, exp_avg_sqs, deltas], rows, sizes=sizes,
           P_DTYPE=TL_DTYPES[params[0].dtype])


__all__ = ["SCALED_ADAM_ROW", "stats", "update"]
