"""Multi-tensor Adafactor kernels: a statistics pass and an update pass over ``g`` (Shazeer & Stern
2018, Sec. 3, 6, 8), and in torch mode a third launch that reads only tensors whose floor can bite.

Programs own whole rows: one takes ``TILES_PER_PROGRAM`` tiles of ``BLOCK_R`` rows x ``BLOCK_C``
(every column) of one ``R x C`` matrix (leading dims are batch; a program stays in its matrix). So
in the statistics pass the new row statistic ``R_i`` (its old value and this step's row mean of
``g^2``) is known within the program and written in place (no atomics: ``R`` is deterministic),
and the program adds into the launch's column buffers the column sums of ``g^2`` and
``w_j = sum_i g_ij^2 / R_i``, one atomic add per column per program. Then a fixed number of torch
ops for all tensors together (O(rows + cols), :func:`_factors`) update ``C`` and form the factors
``rsqrt(R_i / mean(R))``, ``rsqrt(C_j)`` and ``sum U^2 = mean(R) sum_j w_j / C_j`` (hf's ``eps1``
is inside ``R`` and ``C``, not in ``w``). Unfactored tensors (viewed as rows of ``BLOCK_C``) update
``V`` and sum ``U^2`` in the statistics pass; every tensor sums ``p^2`` there. The step sizes and
clipping factors are formed on the device; the update pass applies them. No host read.

Torch mode floors ``V`` at ``eps1^2``: ``U = g min(rsqrt(R_i / mean(R)) rsqrt(C_j), eps1^-1)``,
which does not factor. It cannot bite where ``max_i rsqrt(R_i / mean(R)) max_j rsqrt(C_j)`` is
under the cap (tested on the device per matrix); tensors that fail the test get ``sum U^2`` from
``g`` again in :func:`_clamped_sums_kernel`, whose programs of the other tensors return at once.

Traffic (``docs/kernels.md``, Adafactor), the minimum: factored ``g`` read twice, ``p`` read twice
and written once (fp32 20 B/param); unfactored also ``V`` read twice, written once (32 B); with
``beta1`` the first moment is read and written in the update pass (+8 B). The column sums, ``w``
and the per-tensor sums are atomic adds: their rounding order varies from run to run on a GPU.
Semantics are :func:`mupkit.optim.adafactor.adafactor_update`'s, which the tests compare with.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import triton
import triton.language as tl

from .elementwise import TL_DTYPES, tensor_pointer
from .tables import packed

#: per-tensor values: ``floor`` (torch mode's ``eps1^2`` under ``V``; hf 0), ``cap`` (its
#: ``floor^-1/2``; hf inf), ``omb`` (``1 - beta2_t``), ``decay`` (torch mode's ``1 - lr wd``),
#: ``hf_wd`` (hf mode's weight decay); the kernels read the first six, the rest form the step sizes
ADAFACTOR_ROW = ("eps1", "floor", "cap", "sign", "beta1", "omb", "rho", "rms_floor", "lr_scale", "clip_threshold",
                 "decay", "hf_wd", "scaled")

#: elements a program holds at a time (at least one row), and tiles a program takes in turn
TILE, TILES_PER_PROGRAM = 1024, 4


@triton.jit
def _program(programs, ints, BLOCK_C: tl.constexpr):
    """This program's tensor ``t``, whether factored, its first row, the tensor's rows per matrix,
    columns and size, its offset into the row buffers, and the columns' indices into the column
    buffers (and mask)."""
    t, first = tl.load(programs + 2 * tl.program_id(0)), tl.load(programs + 2 * tl.program_id(0) + 1)
    info = ints + 6 * t
    rows_per_matrix, cols = tl.load(info + 1), tl.load(info + 2)
    col = tl.arange(0, BLOCK_C)
    return (t, tl.load(info) != 0, first, rows_per_matrix, cols, tl.load(info + 5), tl.load(info + 3),
            tl.load(info + 4) + (first // rows_per_matrix) * cols + col, col < cols)


@triton.jit
def _tile(first, i, rows_per_matrix, cols, numel, col_ok, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The ``i``-th ``BLOCK_R x BLOCK_C`` tile of the program's rows: element offsets, mask, rows
    and their mask (a tile never leaves its matrix)."""
    rows = first + i * BLOCK_R + tl.arange(0, BLOCK_R)
    offs = rows[:, None] * cols + tl.arange(0, BLOCK_C)[None, :]
    row_ok = rows < (first // rows_per_matrix + 1) * rows_per_matrix
    return offs, row_ok[:, None] & col_ok[None, :] & (offs < numel), rows, row_ok


@triton.jit
def _ema(v, x, omb, eps1, HF: tl.constexpr):
    """torch: ``lerp(v, x, omb)``; hf: ``(1 - omb) v + omb (x + eps1)``."""
    if HF:
        return v * (1.0 - omb) + (x + eps1) * omb
    return v + omb * (x - v)


@triton.jit
def _total(x):
    return tl.sum(tl.sum(x, axis=1), axis=0)


@triton.jit
def _statistics_kernel(p_ptrs, g_ptrs, v_ptrs, programs, ints, vals, col_sums, weighted, sums, NV: tl.constexpr,
                       P_DTYPE: tl.constexpr, HF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                       TILES: tl.constexpr):
    """Pass 1. Factored: ``R`` in place; column sums of ``g^2`` and ``w_j = sum_i g_ij^2 / R_i``.
    Unfactored: ``V`` in place and ``sum U^2``. Every tensor: ``sum p^2``."""
    t, factored, first, rows_per_matrix, cols, numel, _, col_index, col_ok = _program(programs, ints, BLOCK_C)
    row_vals, v_ptr = vals + t * NV, tensor_pointer(v_ptrs, t, tl.float32)
    eps1, floor, omb = tl.load(row_vals + 0), tl.load(row_vals + 1), tl.load(row_vals + 5)
    col_sum, w = tl.zeros([BLOCK_C], dtype=tl.float32), tl.zeros([BLOCK_C], dtype=tl.float32)
    u2, p2 = 0.0, 0.0
    for i in range(TILES):
        offs, mask, rows, row_ok = _tile(first, i, rows_per_matrix, cols, numel, col_ok, BLOCK_R, BLOCK_C)
        p = tl.load(tensor_pointer(p_ptrs, t, P_DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(tensor_pointer(g_ptrs, t, P_DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
        g2 = g * g
        p2 += _total(p * p)
        if factored:  # v_ptr: R, one entry per row
            r = _ema(tl.load(v_ptr + rows, mask=row_ok, other=0.0), tl.sum(g2, axis=1) / cols, omb, eps1, HF)
            tl.store(v_ptr + rows, r, mask=row_ok)
            col_sum += tl.sum(g2, axis=0)
            w += tl.sum(g2 / tl.where(g2 > 0, r[:, None], 1.0), axis=0)  # rows of zeros add 0
        else:
            v = _ema(tl.load(v_ptr + offs, mask=mask, other=1.0), g2, omb, eps1, HF)
            tl.store(v_ptr + offs, v, mask=mask)
            u = g * tl.rsqrt(tl.maximum(v, floor))
            u2 += _total(tl.where(mask, u * u, 0.0))
    if factored:
        tl.atomic_add(col_sums + col_index, col_sum, mask=col_ok)
        tl.atomic_add(weighted + col_index, w, mask=col_ok)
    tl.atomic_add(sums + 2 * t, u2)
    tl.atomic_add(sums + 2 * t + 1, p2)


@triton.jit
def _direction(g, t, factored, offs, mask, row_index, row_ok, col_index, col_ok, v_ptrs, row_factors, col_factors,
               row_vals):
    """``U = g V^-1/2``, torch mode's floor on ``V`` included: factored
    ``min(rsqrt(R_i / mean(R)) rsqrt(C_j), cap)``, else ``rsqrt(max(V, floor))``."""
    if factored:
        inv_sqrt_v = (tl.load(row_factors + row_index, mask=row_ok, other=0.0)[:, None]
                      * tl.load(col_factors + col_index, mask=col_ok, other=0.0)[None, :])
        return g * tl.minimum(inv_sqrt_v, tl.load(row_vals + 2))
    v = tl.load(tensor_pointer(v_ptrs, t, tl.float32) + offs, mask=mask, other=1.0)
    return g * tl.rsqrt(tl.maximum(v, tl.load(row_vals + 1)))


@triton.jit
def _clamped_sums_kernel(g_ptrs, v_ptrs, programs, ints, vals, row_factors, col_factors, clamped, sums,
                         NV: tl.constexpr, P_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                         TILES: tl.constexpr):
    """Torch mode: ``sum U^2`` from ``g`` again, for the tensors whose clamp can bite (``clamped``)."""
    t, factored, first, rows_per_matrix, cols, numel, row_offset, col_index, col_ok = _program(programs, ints, BLOCK_C)
    if tl.load(clamped + t) == 0:
        return
    u2 = 0.0
    for i in range(TILES):
        offs, mask, rows, row_ok = _tile(first, i, rows_per_matrix, cols, numel, col_ok, BLOCK_R, BLOCK_C)
        g = tl.load(tensor_pointer(g_ptrs, t, P_DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
        u = _direction(g, t, factored, offs, mask, row_offset + rows, row_ok, col_index, col_ok, v_ptrs, row_factors,
                       col_factors, vals + t * NV)
        u2 += _total(u * u)
    tl.atomic_add(sums + 2 * t, u2)


@triton.jit
def _update_kernel(p_ptrs, g_ptrs, v_ptrs, m_ptrs, programs, ints, vals, row_factors, col_factors, coefs,
                   NV: tl.constexpr, P_DTYPE: tl.constexpr, MOMENTUM: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_C: tl.constexpr, TILES: tl.constexpr):
    """``p <- p decay - scale U`` (or through the first moment), ``coefs[t] = (decay, scale)``."""
    t, factored, first, rows_per_matrix, cols, numel, row_offset, col_index, col_ok = _program(programs, ints, BLOCK_C)
    row_vals, p_ptr = vals + t * NV, tensor_pointer(p_ptrs, t, P_DTYPE)
    sign, beta1 = tl.load(row_vals + 3), tl.load(row_vals + 4)
    decay, scale = tl.load(coefs + 2 * t), tl.load(coefs + 2 * t + 1)
    for i in range(TILES):
        offs, mask, rows, row_ok = _tile(first, i, rows_per_matrix, cols, numel, col_ok, BLOCK_R, BLOCK_C)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(tensor_pointer(g_ptrs, t, P_DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
        step = scale * _direction(g * sign, t, factored, offs, mask, row_offset + rows, row_ok, col_index, col_ok,
                                  v_ptrs, row_factors, col_factors, row_vals)
        if MOMENTUM:
            m_ptr = tensor_pointer(m_ptrs, t, tl.float32)
            step = beta1 * tl.load(m_ptr + offs, mask=mask) + (1.0 - beta1) * step
            tl.store(m_ptr + offs, step, mask=mask)
        tl.store(p_ptr + offs, (p * decay - step).to(P_DTYPE), mask=mask)


@dataclass(frozen=True)
class Layout:
    """A launch's programs and where its factored tensors keep their statistics: a factored tensor
    (``*B x R x C``) is ``B`` matrices, each owning ``R`` consecutive entries of the launch's row
    buffers and ``C`` of its column buffers; an unfactored one is rows of ``block_cols`` elements.
    Index arrays live on the device."""

    programs: torch.Tensor  # (programs, 2) int64: tensor, first row
    ints: torch.Tensor  # (tensors, 6) int64: factored, rows, cols, row offset, col offset, numel
    block_rows: int
    block_cols: int
    matrix_of_row: torch.Tensor  # (row entries,) int64
    matrix_of_col: torch.Tensor  # (column entries,) int64
    matrix_rows: torch.Tensor  # (matrices,) float64: R
    tensor_of_matrix: torch.Tensor  # (matrices,) int64


@functools.lru_cache(maxsize=32)
def layout_for(shapes: tuple[tuple[int, ...], ...], device: torch.device) -> Layout:
    """The cached :class:`Layout` of tensors of these shapes (fewer than 2 dims: unfactored)."""
    block_cols = max(16, triton.next_power_of_2(max((s[-1] for s in shapes if len(s) >= 2), default=1)))
    block_rows = max(1, TILE // block_cols)
    programs, ints, matrix_of_row, matrix_of_col, matrix_rows, tensor_of_matrix = [], [], [], [], [], []
    for t, shape in enumerate(shapes):
        numel, factored = math.prod(shape), len(shape) >= 2
        rows, cols = (shape[-2], shape[-1]) if factored else (-(-numel // block_cols), block_cols)
        ints.append([int(factored), rows, cols, len(matrix_of_row), len(matrix_of_col), numel])
        for matrix in range(numel // (rows * cols) if factored else 1):
            programs += [(t, matrix * rows + r) for r in range(0, rows, block_rows * TILES_PER_PROGRAM)]
            if factored:
                matrix_of_row += [len(matrix_rows)] * rows
                matrix_of_col += [len(matrix_rows)] * cols
                matrix_rows.append(float(rows))
                tensor_of_matrix.append(t)
    def on_device(values, dtype=torch.int64):
        return torch.tensor(values, dtype=dtype, device=device)
    return Layout(on_device(programs), on_device(ints), block_rows, block_cols, on_device(matrix_of_row),
                  on_device(matrix_of_col), on_device(matrix_rows, torch.float64), on_device(tensor_of_matrix))


def _factors(items: Sequence[Any], layout: Layout, col_sums: torch.Tensor, weighted: torch.Tensor,
             sums: torch.Tensor, vals: torch.Tensor, hf: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Between the passes, all factored tensors at once: ``C`` <- EMA of the column means of
    ``g^2``; the factors ``rsqrt(R / mean(R))`` (torch: the mean clamped at ``eps1``; per matrix,
    summed in float64) and ``rsqrt(C)``; ``sum U^2 = mean(R) sum_j w_j / C_j`` added into
    ``sums[:, 0]``. Returns the factors and, per tensor, whether its clamp can bite (torch mode:
    a product of factors over the cap somewhere; its ``sum U^2`` is then zeroed for the third pass)."""
    row_vars = [it.moment[0].view(-1) for it in items if it.factored]
    col_vars = [it.moment[1].view(-1) for it in items if it.factored]
    rows, cols = torch.cat(row_vars), torch.cat(col_vars)
    tensor_of_col = layout.tensor_of_matrix[layout.matrix_of_col]
    eps1, omb = vals[tensor_of_col, 0], vals[tensor_of_col, 5]
    mean_col = col_sums / layout.matrix_rows[layout.matrix_of_col].float()
    if hf:
        cols.mul_(1.0 - omb).add_((mean_col + eps1) * omb)
    else:
        cols.lerp_(mean_col, omb)
    torch._foreach_copy_(col_vars, list(cols.split([v.numel() for v in col_vars])))
    matrices = layout.matrix_rows.new_zeros(layout.matrix_rows.shape)
    mean = matrices.index_add(0, layout.matrix_of_row, rows.double()) / layout.matrix_rows
    if not hf:
        mean = torch.maximum(mean, vals[layout.tensor_of_matrix, 0].double())
    mean = mean.float()
    row_factors, col_factors = (rows / mean[layout.matrix_of_row]).rsqrt(), cols.rsqrt()
    u2 = torch.where(weighted > 0, weighted / cols, 0.0) * mean[layout.matrix_of_col]  # mean(R) w_j / C_j
    sums[:, 0].index_add_(0, tensor_of_col, u2)
    clamped = vals.new_zeros(len(vals))
    if not hf:
        largest_row, largest_col = (matrices.float().scatter_reduce(0, index, x, "amax") for index, x in
                                    ((layout.matrix_of_row, row_factors), (layout.matrix_of_col, col_factors)))
        bites = largest_row * largest_col > vals[layout.tensor_of_matrix, 2]
        clamped.scatter_reduce_(0, layout.tensor_of_matrix, bites.float(), "amax")
        sums[:, 0].masked_fill_(clamped > 0, 0.0)
    return row_factors, col_factors, clamped


def adafactor(steps: Sequence[tuple[Any, Any, tuple[float, float, float]]]) -> None:
    """One Adafactor step of every fused tensor: ``steps`` holds, per parameter, its
    :class:`..adafactor.StepTensors`, its group's :class:`..adafactor.Settings` and its
    ``(rho, omb, decay)`` row; one launch per pass for each (device, dtype, mode, momentum)."""
    from ..adafactor import _eps1, _floor
    buckets: dict[tuple, tuple[list, list]] = {}
    for tensors, settings, (rho, omb, decay) in steps:
        key = (tensors.param.device, tensors.param.dtype, settings.hf, settings.beta1 is not None)
        floor = 0.0 if settings.hf else _floor(settings, torch.float32)
        row = (_eps1(settings, torch.float32), floor, floor ** -0.5 if floor else math.inf,
               -1.0 if settings.maximize else 1.0, settings.beta1 or 0.0, omb, rho, settings.rms_floor,
               settings.lr_scale, settings.clip_threshold, decay, settings.weight_decay,
               float(settings.scale_parameter))
        for column, value in zip(buckets.setdefault(key, ([], [])), (tensors, row)):
            column.append(value)
    for (_, _, hf, momentum), (items, rows) in buckets.items():
        _launch(items, rows, hf, momentum)


def _launch(items: Sequence[Any], rows: Sequence[Sequence[float]], hf: bool, momentum: bool) -> None:
    """The passes for tensors sharing a device, a parameter dtype and a mode (``items``:
    :class:`..adafactor.StepTensors` with fp32 state; ``rows``: their :data:`ADAFACTOR_ROW`)."""
    params = [it.param for it in items]
    device = params[0].device
    layout = layout_for(tuple(tuple(p.shape) for p in params), device)
    moments = [it.moment[0] if it.factored else it.moment for it in items]  # R or V
    exp_avgs = [it.exp_avg for it in items] if momentum else params
    (p_table, g_table, v_table, m_table), vals = packed([params, [it.grad for it in items], moments, exp_avgs], rows,
                                                        device)
    vals = vals[:len(items) * len(ADAFACTOR_ROW)].view(len(items), -1)
    common = dict(NV=len(ADAFACTOR_ROW), P_DTYPE=TL_DTYPES[params[0].dtype], BLOCK_R=layout.block_rows,
                  BLOCK_C=layout.block_cols, TILES=TILES_PER_PROGRAM,
                  num_warps=min(32, max(4, layout.block_rows * layout.block_cols // 256)))
    grid, tables = (layout.programs.shape[0],), (layout.programs, layout.ints, vals)

    col_sums, weighted = torch.zeros(2, layout.matrix_of_col.numel(), dtype=torch.float32, device=device)
    sums = torch.zeros(len(items), 2, dtype=torch.float32, device=device)  # sum U^2, sum p^2
    _statistics_kernel[grid](p_table, g_table, v_table, *tables, col_sums, weighted, sums, HF=hf, **common)
    row_factors = col_factors = sums  # unread without factored tensors
    if col_sums.numel():
        row_factors, col_factors, clamped = _factors(items, layout, col_sums, weighted, sums, vals, hf)
        if not hf:
            _clamped_sums_kernel[grid](g_table, v_table, *tables, row_factors, col_factors, clamped, sums, **common)

    # on the device: step size (relative to RMS(p)), clipping by RMS(U), decay
    rho, rms_floor, lr_scale, clip_threshold, decay, hf_wd, scaled = vals[:, 6:].unbind(1)
    rms_u, rms_p = (sums / layout.ints[:, 5:].float()).sqrt().unbind(1)
    alpha0 = rho * torch.where(scaled > 0, torch.maximum(rms_floor, rms_p), 1.0)
    decay = 1.0 - hf_wd * alpha0 if hf else decay
    coefs = torch.stack([decay, alpha0 * lr_scale / (rms_u / clip_threshold).clamp(min=1.0)], dim=1)
    _update_kernel[grid](p_table, g_table, v_table, m_table, *tables, row_factors, col_factors, coefs,
                         MOMENTUM=momentum, **common)


__all__ = ["ADAFACTOR_ROW", "Layout", "adafactor", "layout_for"]
