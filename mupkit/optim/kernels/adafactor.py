"""Multi-tensor Adafactor kernels: a row/column reduction pass, a direction pass that measures
``RMS(U)`` and ``RMS(p)``, and an apply pass (Shazeer & Stern 2018, Sec. 3, 6, 8).

One launch per pass for all tensors of a (device, dtype, mode) bucket. The small factored
statistics (``R``, ``C``: one value per row or column) are updated between the passes with
torch ops on the device; the per-tensor step size and clipping factor are computed on the
device from the pass-2 sums, so nothing waits for the host. Semantics are
:class:`mupkit.optim.Adafactor`'s (``mode="torch"`` or ``"hf"``).

Per tensor, ``ints`` holds ``[factored, rows, cols, row_offset, col_offset]`` (offsets into the
launch's shared row/column sum buffers) and ``vals`` the :data:`ADAFACTOR_ROW` values.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import triton
import triton.language as tl

from .elementwise import TL_DTYPES, program_block, tensor_pointer
from .tables import BLOCK, addresses, blocks_for, values

ADAFACTOR_ROW = ("eps1", "floor", "sign", "beta1")


@triton.jit
def _indices(offs, ints, t):
    """Whether tensor ``t`` is factored (as a block: masks must be blocks in the interpreter), and
    each element's row and column index."""
    factored = (offs * 0 + tl.load(ints + 5 * t)) > 0
    rows = tl.load(ints + 5 * t + 1)
    cols = tl.load(ints + 5 * t + 2)
    row = offs // cols
    col = (offs // (rows * cols)) * cols + offs % cols
    return factored, row, col


@triton.jit
def _sums_kernel(g_ptrs, numels, tensor_of_block, start_of_block, ints, row_sums, col_sums,
                 P_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """Row and column sums of ``g^2`` of the factored tensors (atomic adds into shared buffers)."""
    t, offs, mask = program_block(tensor_of_block, start_of_block, numels, BLOCK)
    factored, row, col = _indices(offs, ints, t)
    g = tl.load(tensor_pointer(g_ptrs, t, P_DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
    g2 = g * g
    keep = mask & factored
    tl.atomic_add(row_sums + tl.load(ints + 5 * t + 3) + row, g2, mask=keep)
    tl.atomic_add(col_sums + tl.load(ints + 5 * t + 4) + col, g2, mask=keep)


@triton.jit
def _direction(g, a, c, factored, floor, HF: tl.constexpr):
    """``U = g / sqrt(V)``: factored ``V = a_row c_col`` (``a`` the normalized row statistic),
    else ``V = a``; torch mode clamps ``V`` at ``floor``."""
    if HF:
        factored_u = g * tl.rsqrt(a) * tl.rsqrt(c)
        plain_u = g * tl.rsqrt(a)
    else:
        factored_u = g * tl.rsqrt(tl.maximum(a * c, floor))
        plain_u = g * tl.rsqrt(tl.maximum(a, floor))
    return tl.where(factored, factored_u, plain_u)


@triton.jit
def _load_direction(p_ptrs, g_ptrs, a_ptrs, c_ptrs, vals, ints, t, offs, mask, omb, UPDATE_V: tl.constexpr,
                    NV: tl.constexpr, P_DTYPE: tl.constexpr, HF: tl.constexpr):
    """This block's ``p`` (fp32) and ``U``; with ``UPDATE_V`` the unfactored second moment is
    updated (and stored) first."""
    row_vals = vals + t * NV
    factored, row, col = _indices(offs, ints, t)
    p = tl.load(tensor_pointer(p_ptrs, t, P_DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(tensor_pointer(g_ptrs, t, P_DTYPE) + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(row_vals + 2)
    a_ptr = tensor_pointer(a_ptrs, t, tl.float32)
    a = tl.load(a_ptr + tl.where(factored, row, offs), mask=mask, other=1.0)
    c = tl.load(tensor_pointer(c_ptrs, t, tl.float32) + col, mask=mask & factored, other=1.0)
    if UPDATE_V:
        if HF:
            v = a * (1.0 - omb) + (g * g + tl.load(row_vals + 0)) * omb
        else:
            v = a + omb * (g * g - a)
        a = tl.where(factored, a, v)
        tl.store(a_ptr + offs, v, mask=mask & (factored == 0))
    return p, _direction(g, a, c, factored, tl.load(row_vals + 1), HF)


@triton.jit
def _direction_kernel(p_ptrs, g_ptrs, a_ptrs, c_ptrs, numels, tensor_of_block, start_of_block, vals, ints, ombs,
                      sums, NV: tl.constexpr, P_DTYPE: tl.constexpr, HF: tl.constexpr, BLOCK: tl.constexpr):
    """Update unfactored second moments; accumulate ``sum U^2`` and ``sum p^2`` per tensor."""
    t, offs, mask = program_block(tensor_of_block, start_of_block, numels, BLOCK)
    p, u = _load_direction(p_ptrs, g_ptrs, a_ptrs, c_ptrs, vals, ints, t, offs, mask, tl.load(ombs + t), True, NV,
                           P_DTYPE, HF)
    tl.atomic_add(sums + 2 * t, tl.sum(tl.where(mask, u * u, 0.0), axis=0))
    tl.atomic_add(sums + 2 * t + 1, tl.sum(p * p, axis=0))


@triton.jit
def _apply_kernel(p_ptrs, g_ptrs, a_ptrs, c_ptrs, m_ptrs, numels, tensor_of_block, start_of_block, vals, ints,
                  coefs, NV: tl.constexpr, P_DTYPE: tl.constexpr, HF: tl.constexpr, MOMENTUM: tl.constexpr,
                  BLOCK: tl.constexpr):
    """``p <- p decay - scale U`` (or through the first moment), ``coefs[t] = (decay, scale)``."""
    t, offs, mask = program_block(tensor_of_block, start_of_block, numels, BLOCK)
    p, u = _load_direction(p_ptrs, g_ptrs, a_ptrs, c_ptrs, vals, ints, t, offs, mask, 0.0, False, NV, P_DTYPE, HF)
    step = tl.load(coefs + 2 * t + 1) * u
    if MOMENTUM:
        m_ptr = tensor_pointer(m_ptrs, t, tl.float32)
        beta1 = tl.load(vals + t * NV + 3)
        step = beta1 * tl.load(m_ptr + offs, mask=mask) + (1.0 - beta1) * step
        tl.store(m_ptr + offs, step, mask=mask)
    p = p * tl.load(coefs + 2 * t) - step
    tl.store(tensor_pointer(p_ptrs, t, P_DTYPE) + offs, p.to(P_DTYPE), mask=mask)


def adafactor(items: Sequence[dict[str, Any]], hf: bool, momentum: bool) -> None:
    """One Adafactor step of tensors sharing a device, a parameter dtype and a mode.

    Each item: ``param``, ``grad``, ``state`` (``row_var``/``col_var`` or ``variance``, and
    ``exp_avg`` with momentum; fp32), ``rows``/``cols`` (0 when unfactored), and the step's
    ``omb`` (1 - beta2_t), ``rho``, ``eps1``, ``floor``, ``rms_floor``, ``lr_scale``,
    ``clip_threshold``, ``decay`` (torch mode's ``1 - lr wd``), ``hf_wd``, ``sign``, ``beta1``.
    """
    params = [it["param"] for it in items]
    device, dtype = params[0].device, params[0].dtype
    blocks = blocks_for(params)
    factored = [it["rows"] > 0 for it in items]
    row_sizes = [it["param"].numel() // it["cols"] if f else 0 for it, f in zip(items, factored)]
    col_sizes = [it["param"].numel() // it["rows"] if f else 0 for it, f in zip(items, factored)]
    row_offsets = [sum(row_sizes[:k]) for k in range(len(items))]
    col_offsets = [sum(col_sizes[:k]) for k in range(len(items))]
    ints = torch.tensor([[int(f), it["rows"] or 1, it["cols"] or 1, r, c] for it, f, r, c in
                         zip(items, factored, row_offsets, col_offsets)], dtype=torch.int64).to(device)
    vals = values([[it["eps1"], it["floor"], it["sign"], it["beta1"] or 0.0] for it in items], device)
    common = dict(NV=len(ADAFACTOR_ROW), P_DTYPE=TL_DTYPES[dtype], BLOCK=BLOCK)
    grads = addresses([it["grad"] for it in items], device)
    p_table = addresses(params, device)
    grid = (blocks.blocks,)

    # pass 1: row/column sums of g^2, then the factored statistics (small tensors, torch ops)
    row_sums = torch.zeros(max(sum(row_sizes), 1), dtype=torch.float32, device=device)
    col_sums = torch.zeros(max(sum(col_sizes), 1), dtype=torch.float32, device=device)
    if any(factored):
        _sums_kernel[grid](grads, blocks.numel, blocks.tensor, blocks.start, ints, row_sums, col_sums,
                           P_DTYPE=TL_DTYPES[dtype], BLOCK=BLOCK)
    row_factors, seconds = [], []
    for it, f, r0, c0, nr, nc in zip(items, factored, row_offsets, col_offsets, row_sizes, col_sizes):
        state = it["state"]
        if not f:
            row_factors.append(state["variance"])
            seconds.append(state["variance"])
            continue
        row_var, col_var = state["row_var"], state["col_var"]
        row_mean = row_sums[r0:r0 + nr].view(row_var.shape) / it["cols"]
        col_mean = col_sums[c0:c0 + nc].view(col_var.shape) / it["rows"]
        if hf:
            for var, mean in ((row_var, row_mean), (col_var, col_mean)):
                var.mul_(1.0 - it["omb"]).add_((mean + it["eps1"]) * it["omb"])
            row_factors.append(row_var / (row_var.sum(-2, keepdim=True) / it["rows"]))
        else:
            row_var.lerp_(row_mean, it["omb"])
            col_var.lerp_(col_mean, it["omb"])
            row_factors.append(row_var / (row_var.sum(-2, keepdim=True) / it["rows"]).clamp_(min=it["eps1"]))
        seconds.append(col_var)
    a_table, c_table = addresses(row_factors, device), addresses(seconds, device)

    # pass 2: unfactored moments, sum U^2 and sum p^2 per tensor
    sums = torch.zeros(len(items), 2, dtype=torch.float32, device=device)
    ombs = torch.tensor([it["omb"] for it in items], dtype=torch.float32).to(device)
    _direction_kernel[grid](p_table, grads, a_table, c_table, blocks.numel, blocks.tensor, blocks.start, vals, ints,
                            ombs, sums, HF=hf, **common)

    # on the device: step size (relative to RMS(p)), clipping by RMS(U), decay
    per_tensor = torch.tensor([[it["rho"], it["rms_floor"], it["lr_scale"], it["clip_threshold"], it["decay"],
                                it["hf_wd"], 1.0 if it["scale_parameter"] else 0.0] for it in items],
                              dtype=torch.float32).to(device)
    rho, rms_floor, lr_scale, clip_threshold, decay, hf_wd, scaled = per_tensor.unbind(1)
    numel = blocks.numel.to(torch.float32)
    rms_u, rms_p = (sums[:, 0] / numel).sqrt(), (sums[:, 1] / numel).sqrt()
    alpha0 = rho * torch.where(scaled > 0, torch.maximum(rms_floor, rms_p), torch.ones_like(rho))
    decay = 1.0 - hf_wd * alpha0 if hf else decay
    coefs = torch.stack([decay, alpha0 * lr_scale / (rms_u / clip_threshold).clamp(min=1.0)], dim=1).contiguous()

    # pass 3: the update
    m_table = addresses([it["state"]["exp_avg"] for it in items], device) if momentum else p_table
    _apply_kernel[grid](p_table, grads, a_table, c_table, m_table, blocks.numel, blocks.tensor, blocks.start, vals,
                        ints, coefs, HF=hf, MOMENTUM=momentum, **common)


__all__ = ["ADAFACTOR_ROW", "adafactor"]
