"""Multi-tensor Adafactor kernels: a row/column reduction pass, a direction pass that measures
``RMS(U)`` and ``RMS(p)``, and an apply pass (Shazeer & Stern 2018, Sec. 3, 6, 8).

One launch per pass for all tensors of a (device, dtype, mode) bucket. The small factored
statistics (``R``, ``C``: one value per row or column) are updated between the passes by a fixed
number of torch ops on the device for all tensors together (:func:`_factored_statistics`); the
per-tensor step size and clipping factor are computed on the device from the pass-2 sums, so
nothing waits for the host. The row and column sums are atomic adds: their rounding order
varies from run to run on a GPU. Semantics are
:class:`mupkit.optim.Adafactor`'s (``mode="torch"`` or ``"hf"``).

Per tensor, ``ints`` holds ``[factored, rows, cols, row_offset, col_offset]`` (offsets into the
launch's shared row/column sum buffers) and ``vals`` the :data:`ADAFACTOR_ROW` values.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
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


@dataclass(frozen=True)
class FactoredLayout:
    """Where a launch's tensors keep their factored statistics, for tensors of these shapes.

    Every factored tensor (``*B x R x C``, ``R, C`` its last two dims) owns ``B R`` consecutive
    entries of the launch's row buffer and ``B C`` of its column buffer. The row statistic is
    normalized per ``R``-long segment (one per leading index), so each row entry knows its
    segment and the tensor it belongs to. All index arrays live on the device."""

    ints: torch.Tensor  # (tensors, 5) int64: factored, rows, cols, row offset, col offset
    row_offsets: tuple[int, ...]
    col_offsets: tuple[int, ...]
    row_div: torch.Tensor  # (row entries,) fp32: C, what each row sum of g^2 is divided by
    col_div: torch.Tensor  # (column entries,) fp32: R
    tensor_of_row: torch.Tensor  # (row entries,) int64
    tensor_of_col: torch.Tensor  # (column entries,) int64
    segment_of_row: torch.Tensor  # (row entries,) int64
    segment_rows: torch.Tensor  # (segments,) float64: R
    tensor_of_segment: torch.Tensor  # (segments,) int64

    @property
    def row_entries(self) -> int:
        return self.row_div.numel()

    @property
    def col_entries(self) -> int:
        return self.col_div.numel()


@functools.lru_cache(maxsize=32)
def factored_layout(shapes: tuple[tuple[int, ...], ...], device: torch.device) -> FactoredLayout:
    """The cached :class:`FactoredLayout` of tensors of these shapes (``()`` for 0-dim; tensors
    with fewer than 2 dims are unfactored)."""
    ints, row_offsets, col_offsets = [], [], []
    row_div, col_div, tensor_of_row, tensor_of_col, segment_of_row = [], [], [], [], []
    seg_rows, tensor_of_segment = [], []
    for t, shape in enumerate(shapes):
        factored = len(shape) >= 2
        rows, cols = (shape[-2], shape[-1]) if factored else (1, 1)
        batch = math.prod(shape[:-2]) if factored else 0
        row_offsets.append(len(row_div))
        col_offsets.append(len(col_div))
        ints.append([int(factored), rows, cols, len(row_div), len(col_div)])
        for _ in range(batch):
            segment_of_row += [len(seg_rows)] * rows
            seg_rows.append(float(rows))
            tensor_of_segment.append(t)
            row_div += [float(cols)] * rows
            tensor_of_row += [t] * rows
            col_div += [float(rows)] * cols
            tensor_of_col += [t] * cols
    def on_device(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device)
    return FactoredLayout(on_device(ints, torch.int64), tuple(row_offsets), tuple(col_offsets),
                          on_device(row_div, torch.float32), on_device(col_div, torch.float32),
                          on_device(tensor_of_row, torch.int64), on_device(tensor_of_col, torch.int64),
                          on_device(segment_of_row, torch.int64), on_device(seg_rows, torch.float64),
                          on_device(tensor_of_segment, torch.int64))


def _factored_statistics(items: Sequence[dict[str, Any]], layout: FactoredLayout, row_sums: torch.Tensor,
                         col_sums: torch.Tensor, ombs: torch.Tensor, eps1: torch.Tensor,
                         hf: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Update every factored tensor's ``R`` and ``C`` from this step's row and column means of
    ``g^2``, all tensors at once; return the normalized row statistic ``R / mean_rows(R)`` (torch
    mode: the mean clamped at eps1; mean per leading index, summed per segment in float64) and the new ``C``,
    both laid out as the launch's row and column buffers.

    A fixed number of device ops for any number of tensors: the states are gathered into the
    buffers, updated there and copied back (the per-tensor loop this replaces cost about ten ops
    per factored tensor)."""
    factored = [it for it in items if it["rows"] > 0]
    row_vars = [it["state"]["row_var"].view(-1) for it in factored]
    col_vars = [it["state"]["col_var"].view(-1) for it in factored]
    rows, cols = torch.cat(row_vars), torch.cat(col_vars)
    for stat, sums, div, owner in ((rows, row_sums, layout.row_div, layout.tensor_of_row),
                                   (cols, col_sums, layout.col_div, layout.tensor_of_col)):
        mean, omb = sums / div, ombs[owner]
        if hf:  # hf: eps1 inside the EMA
            stat.mul_(1.0 - omb).add_((mean + eps1[owner]) * omb)
        else:
            stat.lerp_(mean, omb)
    torch._foreach_copy_(row_vars, list(rows.split([v.numel() for v in row_vars])))
    torch._foreach_copy_(col_vars, list(cols.split([v.numel() for v in col_vars])))
    segment_sums = torch.zeros(layout.segment_rows.numel(), dtype=torch.float64, device=rows.device)
    mean_row = segment_sums.index_add_(0, layout.segment_of_row, rows.double()) / layout.segment_rows
    if not hf:
        mean_row = torch.maximum(mean_row, eps1[layout.tensor_of_segment].double())
    return (rows / mean_row[layout.segment_of_row]).float(), cols


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
    layout = factored_layout(tuple(tuple(p.shape) for p in params), device)
    vals = values([[it["eps1"], it["floor"], it["sign"], it["beta1"] or 0.0] for it in items], device)
    ombs = torch.tensor([it["omb"] for it in items], dtype=torch.float32).to(device)
    common = dict(NV=len(ADAFACTOR_ROW), P_DTYPE=TL_DTYPES[dtype], BLOCK=BLOCK)
    grads = addresses([it["grad"] for it in items], device)
    p_table = addresses(params, device)
    grid = (blocks.blocks,)

    # pass 1: row/column sums of g^2, then the factored statistics (a few torch ops for all tensors)
    firsts, seconds = [it["state"].get("variance") for it in items], [it["state"].get("variance") for it in items]
    if layout.row_entries:
        row_sums = torch.zeros(layout.row_entries, dtype=torch.float32, device=device)
        col_sums = torch.zeros(layout.col_entries, dtype=torch.float32, device=device)
        _sums_kernel[grid](grads, blocks.numel, blocks.tensor, blocks.start, layout.ints, row_sums, col_sums,
                           P_DTYPE=TL_DTYPES[dtype], BLOCK=BLOCK)
        row_factors, cols = _factored_statistics(items, layout, row_sums, col_sums, ombs, vals[:, 0], hf)
        for k, it in enumerate(items):
            if it["rows"] > 0:  # views into the shared buffers, at this tensor's offsets
                firsts[k] = row_factors[layout.row_offsets[k]:]
                seconds[k] = cols[layout.col_offsets[k]:]
    a_table, c_table = addresses(firsts, device), addresses(seconds, device)

    # pass 2: unfactored moments, sum U^2 and sum p^2 per tensor
    sums = torch.zeros(len(items), 2, dtype=torch.float32, device=device)
    _direction_kernel[grid](p_table, grads, a_table, c_table, blocks.numel, blocks.tensor, blocks.start, vals,
                            layout.ints, ombs, sums, HF=hf, **common)

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
                        layout.ints, coefs, HF=hf, MOMENTUM=momentum, **common)


__all__ = ["ADAFACTOR_ROW", "FactoredLayout", "adafactor", "factored_layout"]
