"""Adafactor (Shazeer & Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear Memory
Cost") with muP group scales, in two documented compatibility modes.

Per parameter ``p`` (gradient ``g``, step ``t``, ``omb = t ** beta2_decay`` = 1 - beta2_t, Sec. 7.2)::

    second moment   factored for >= 2 dims (last two dims; leading dims are batch dims, Sec. 3):
                    R <- lerp(R, mean_cols(g^2), omb),  C <- lerp(C, mean_rows(g^2), omb),
                    V = R C / mean_rows(R);  unfactored for 0-D/1-D: V <- lerp(V, g^2, omb)
    update          U = g / sqrt(V);  U <- U / max(1, RMS(U) / clip_threshold)        (Sec. 6)
    step size       alpha = lr_scale * rho_t * max(eps2 * eps_scale, RMS(p))         (Sec. 8)
    momentum        (optional, beta1) m <- beta1 m + (1 - beta1) alpha U;  the step is m
    parameter       p <- p - alpha U   (after the decoupled weight decay below)

``mode="torch"`` is ``torch.optim.Adafactor``: ``rho_t = min(lr, t^-1/2)`` (``lr`` is the cap of
the relative step), ``eps1`` clamps the statistics (``None``: the machine epsilon), decay
``p *= 1 - lr * weight_decay``. ``mode="hf"`` is ``transformers.optimization.Adafactor``:
``eps1 = 1e-30`` added to ``g^2``, ``rho_t = min(1e-2, t^-1/2)`` with ``relative_step`` (or
``1e-6 t`` with ``warmup_init``) else ``lr``; ``scale_parameter`` toggles the RMS factor; decay
``p -= weight_decay * alpha_0 * p`` with ``alpha_0`` the step size without the muP multiplier.

Deliberate fixes of the references' pitfalls:

* muP's multiplier ``lr_scale`` multiplies ``alpha`` for the whole run. (torch applies group
  ``lr`` only as the cap inside ``min(lr, t^-1/2)``, so a per-group multiplier vanishes after
  ``1 / lr^2`` steps.)
* ``eps1=None`` means the epsilon of each tensor's *state* dtype, not of the first parameter's.
* bf16/fp16 parameters keep fp32 state and do the math in fp32 (torch keeps bf16 state).
* Sharded parameters (FSDP2 ``fully_shard``): column statistics and both RMS values are reduced
  over the shards (torch 2.13's Adafactor fails on DTensors); see :mod:`.sharding`.
* The foreach path makes no per-tensor host sync on CUDA: all RMS values are reduced as one
  tensor, and the step sizes stay on the device. On the CPU, where reading a value costs no
  sync, the eager step reads the RMS values back once per run of tensors and computes the step
  sizes as Python floats, and a vector or matrix of over a million elements steps in blocks
  that stay in cache (:func:`_step_in_blocks`).

muP family (with ``scale_parameter``): ``adafactor``, whose step is relative to the parameter's
RMS. Hidden LR multiplier ``m_in^-1/2`` (Adam's ``m_in^-1`` over the hidden init scale
``m_in^-1/2``), input/vector/output ``1``; the RMS floor ``eps2`` follows each parameter's init
scale (``eps_scale``), so zero-initialized tensors step like their muP init would. Without
``scale_parameter`` the update is entrywise-normalized: family ``adamw``. See
:mod:`mupkit.rules`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..rules import FAMILIES
from . import kernels
from .compiled import compiled_by_default, left_to_default
from .master import MasterWeights
from .scaled import ScaledGroups
from .sharding import ShardInfo, global_rms, local_tensor, mean_over, rms_values, shard_info, state_like
from .tensors import (CPU_PIECE, KeepsStateDtypes, advance_steps, as_dtype, cache_sized, compile_safe, default_foreach,
                      flat_scratch, foreach_scalar, foreach_scalars, scratch_like, state_dtype, subset,
                      working_copies, working_copy, write_back)

MODES = ("torch", "hf")

#: elements from which a CPU matrix steps faster on the eager path (in cache, from the two factor
#: vectors, in blocks when large) than compiled, so the default keeps it eager: 16 matrices of
#: 512 x 512 step in about the same time both ways, of 1024 x 1024 1.2x faster eagerly
#: (benchmarks/RESULTS.md)
CPU_EAGER_MATRIX = 1 << 18


class Adafactor(MasterWeights, KeepsStateDtypes, ScaledGroups, torch.optim.Optimizer):
    """Adafactor with muP group scales; ``mode="torch"`` (default) or ``mode="hf"``.

    Arguments as in the chosen reference: ``lr`` (torch: cap of the relative step, default
    1e-2; hf: the step with ``relative_step=False``), ``eps=(eps1, eps2)`` (torch default
    ``(None, 1e-3)``, hf ``(1e-30, 1e-3)``), ``clip_threshold`` (torch's ``d``), ``beta2_decay``
    (hf's ``decay_rate``), ``weight_decay``, ``maximize``; hf only: ``scale_parameter``,
    ``relative_step``, ``warmup_init``. ``beta1``: optional first moment, on the clipped and
    scaled update (as hf). ``foreach``: the multi-tensor path (default: on CUDA, and on the CPU
    for small tensors, see :func:`.tensors.default_foreach`); ``compiled``: ``torch.compile`` of
    the multi-tensor step (unsharded parameters; per-step scalars are tensors, so it compiles
    once per bucket). ``fused``: the Triton kernels (CUDA; their sums are atomic adds, so not
    under ``torch.use_deterministic_algorithms``). Default (none given): on CUDA the kernels
    (:func:`.kernels.fused_by_default`); on the CPU matrices of :data:`CPU_EAGER_MATRIX` elements
    or more step eagerly, the other tensors of a large model are compiled
    (:func:`.compiled.compiled_by_default`), what is left takes the eager default;
    ``compiled=False``: nothing is compiled.
    """

    family = FAMILIES["adafactor"]

    def __init__(self, params, lr: float | None = None, *, mode: str = "torch", beta1: float | None = None,
                 beta2_decay: float = -0.8, eps: tuple[float | None, float] | None = None,
                 clip_threshold: float = 1.0, weight_decay: float = 0.0, scale_parameter: bool = True,
                 relative_step: bool = True, warmup_init: bool = False, maximize: bool = False,
                 foreach: bool | None = None, compiled: bool | None = None, fused: bool | None = None,
                 master_weights: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; use one of {MODES}")
        if mode == "torch":
            if not (scale_parameter and relative_step) or warmup_init:
                raise ValueError("mode='torch' is torch.optim.Adafactor (relative step with parameter scaling "
                                 "always); scale_parameter, relative_step and warmup_init are mode='hf' options.")
            lr = 1e-2 if lr is None else lr
            eps = (None, 1e-3) if eps is None else eps
        else:
            if relative_step and lr is not None:
                raise ValueError(f"mode='hf' with relative_step=True sets the step itself; lr={lr} would be ignored. "
                                 f"Pass relative_step=False to use lr, or drop lr.")
            if not relative_step and lr is None:
                raise ValueError("mode='hf' with relative_step=False needs lr=...")
            if warmup_init and not relative_step:
                raise ValueError("warmup_init=True needs relative_step=True")
            eps = (1e-30, 1e-3) if eps is None else eps
        if lr is not None and not lr >= 0:
            raise ValueError(f"lr={lr} must be >= 0")
        if not beta2_decay <= 0:
            raise ValueError(f"beta2_decay={beta2_decay} must be <= 0")
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"beta1={beta1} must lie in [0, 1)")
        if not (eps[0] is None or eps[0] >= 0) or not eps[1] >= 0:
            raise ValueError(f"eps={eps} must be (None or >= 0, >= 0)")
        if not clip_threshold >= 1.0 and mode == "torch":
            raise ValueError(f"clip_threshold={clip_threshold} must be >= 1 (torch's d)")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay={weight_decay} must be >= 0")
        if sum(map(bool, (foreach, compiled, fused))) > 1:
            raise ValueError("choose one of foreach=True, compiled=True and fused=True")
        if not scale_parameter:
            self.family = FAMILIES["adamw"]  # entrywise-normalized step: Adam's muP rules
        defaults = dict(lr=lr, mode=mode, beta1=beta1, beta2_decay=beta2_decay, eps=tuple(eps),
                        clip_threshold=clip_threshold, weight_decay=weight_decay, scale_parameter=scale_parameter,
                        relative_step=relative_step, warmup_init=warmup_init, maximize=maximize, foreach=foreach,
                        compiled=compiled, fused=fused)
        super().__init__(params, defaults, master_weights=master_weights)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._loss(closure)
        with self._master_weights(), kernels.fused_defaults(self, deterministic=False), self._merged_groups():
            self._step_groups()
        return loss

    def _step_groups(self) -> None:
        fused: dict[tuple, list[dict[str, Any]]] = {}  # every fused group's tensors, by launch bucket
        auto = [p for group in self.param_groups if left_to_default(group) for p in group["params"]
                if p.grad is not None and not _faster_eager(p)]
        auto_compiled = {id(p) for p, yes in zip(auto, compiled_by_default(auto)) if yes}
        for group in self.param_groups:
            with_grad = [(i, p) for i, p in enumerate(group["params"]) if p.grad is not None]
            tensors = [self._tensors(group, i, p) for i, p in with_grad]
            if not tensors:
                continue
            cfg = {k: group[k] for k in ("mode", "eps", "clip_threshold", "scale_parameter", "beta1", "lr_scale",
                                         "eps_scale")}
            cfg["weight_decay"] = group["weight_decay"] * group["lr_scale"] * group["wd_scale"]  # 1 under muP
            if group["fused"]:
                for item in _fused_items(tensors, group, cfg):
                    key = (item["param"].device, item["param"].dtype, group["mode"], group["beta1"] is not None)
                    fused.setdefault(key, []).append(item)
                continue
            chosen = [bool(group["compiled"]) or id(p) in auto_compiled for _, p in with_grad]
            self._run_buckets([t for t, c in zip(tensors, chosen) if c], group, cfg, "compiled")
            eager = [t for t, c in zip(tensors, chosen) if not c]
            foreach = group["foreach"]
            if foreach is None:
                foreach = default_foreach([t["param"] for t in eager])
            self._run_buckets(eager, group, cfg, "foreach" if foreach else "single")
        if fused:
            kernels.check_fused("Adafactor", [it["param"] for items in fused.values() for it in items],
                                deterministic=False)
            from .kernels.adafactor import adafactor as launch
            for (_, _, mode, momentum), items in fused.items():
                launch(items, hf=mode == "hf", momentum=momentum)

    @staticmethod
    def _run_buckets(tensors: list[dict[str, Any]], group: dict[str, Any], cfg: dict[str, Any], path: str):
        """:func:`_run` once per (device, state dtype) bucket."""
        buckets: dict[tuple, list[dict[str, Any]]] = {}
        for t in tensors:
            buckets.setdefault((t["param"].device, state_dtype(t["param"])), []).append(t)
        for bucket in buckets.values():
            _run(bucket, group, cfg, path)

    def _tensors(self, group: dict[str, Any], index: int, p: torch.Tensor) -> dict[str, Any]:
        """The parameter's local shard, gradient, state and shard layout."""
        if p.grad.is_sparse:
            raise RuntimeError(f"Adafactor got a sparse gradient for a parameter of shape {tuple(p.shape)}; "
                               f"it needs dense gradients (e.g. nn.Embedding(sparse=False)).")
        names = group.get("param_names")
        info = shard_info(names[index] if names else f"#{index} of its group", p)
        state = self.state[p]
        local = local_tensor(p)
        if not state:
            dtype, shape = state_dtype(p), tuple(p.shape)
            state["step"] = torch.tensor(0.0)
            if p.dim() >= 2:
                state["row_var"] = state_like(local.new_zeros(local.shape[:-1] + (1,), dtype=dtype), p, info,
                                              shape[:-1] + (1,), reduced_dims=(-1,))
                state["col_var"] = state_like(local.new_zeros(local.shape[:-2] + (1,) + local.shape[-1:], dtype=dtype),
                                              p, info, shape[:-2] + (1,) + shape[-1:], reduced_dims=(-2,))
            else:
                state["variance"] = state_like(torch.zeros_like(local, dtype=dtype), p, info, shape)
            if group["beta1"] is not None:
                state["exp_avg"] = state_like(torch.zeros_like(local, dtype=dtype), p, info, shape)
        local_state = {k: local_tensor(v) for k, v in state.items()}  # views: updates reach the DTensors
        return {"param": local, "grad": local_tensor(p.grad), "state": local_state, "info": info}


def _faster_eager(p: torch.Tensor) -> bool:
    """A CPU matrix of :data:`CPU_EAGER_MATRIX` elements or more: the default steps it eagerly."""
    return p.dim() >= 2 and p.numel() >= CPU_EAGER_MATRIX and not p.is_cuda


def _fused_items(tensors: list[dict[str, Any]], group: dict[str, Any], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The fused kernels' per-tensor inputs (see :func:`.kernels.adafactor.adafactor`); advances
    the step counters."""
    items = []
    sharded = [t["info"].shape for t in tensors if t["info"].dim is not None]
    if sharded:
        raise ValueError(f"Adafactor(fused=True) runs on whole tensors, but a parameter of shape "
                         f"{tuple(sharded[0])} is sharded; use foreach=True, which reduces over the shards.")
    for t, step in zip(tensors, advance_steps([t["state"]["step"] for t in tensors])):
        dtype = state_dtype(t["param"])
        shape = t["info"].shape
        items.append(dict(param=t["param"], grad=t["grad"], state=t["state"],
                          rows=shape[-2] if len(shape) >= 2 else 0, cols=shape[-1] if len(shape) >= 2 else 0,
                          omb=step ** group["beta2_decay"], rho=_relative_step(group, step), eps1=_eps1(cfg, dtype),
                          floor=_floor(cfg, dtype), rms_floor=cfg["eps"][1] * cfg["eps_scale"],
                          lr_scale=cfg["lr_scale"], clip_threshold=cfg["clip_threshold"],
                          decay=1.0 - (group["lr"] or 0.0) * cfg["weight_decay"], hf_wd=cfg["weight_decay"],
                          sign=-1.0 if group["maximize"] else 1.0, beta1=cfg["beta1"],
                          scale_parameter=cfg["scale_parameter"]))
    return items


def _relative_step(group: dict[str, Any], t: float) -> float:
    if group["mode"] == "torch":
        return min(group["lr"], t ** -0.5)
    if not group["relative_step"]:
        return group["lr"]
    return min(1e-6 * t if group["warmup_init"] else 1e-2, t ** -0.5)


def _update_direction(g: torch.Tensor, state: dict[str, Any], info: ShardInfo, cfg: dict[str, Any],
                      one_minus_beta2: torch.Tensor) -> Callable[..., torch.Tensor]:
    """Update the second-moment statistics in place (either mode) and return a function
    ``direction(out, rows=None)`` that computes ``g / sqrt(V)`` from them (``rows``: of that slice
    of rows only), into ``out`` when it is a tensor: the compiled step calls it twice
    (``out=None``), for the update's RMS and in the update loop, so inductor fuses it into both
    instead of storing it; the eager step once, into scratch."""
    g2 = torch.mul(g, g, out=_temporary(g, slot=1))
    if "variance" in state:
        _update_variance(state["variance"], g2, cfg, one_minus_beta2)
        return _unfactored_direction(g, state["variance"], cfg)
    return _factored_direction(g, state, info, cfg, one_minus_beta2, mean_over(g2, -1, info),
                               mean_over(g2, -2, info))


def _update_variance(variance: torch.Tensor, g2: torch.Tensor, cfg: dict[str, Any],
                     one_minus_beta2: torch.Tensor) -> None:
    """The unfactored second moment's EMA, in place (``g2`` is overwritten in hf mode)."""
    if cfg["mode"] == "hf":  # g^2 + eps1
        variance.mul_(1.0 - one_minus_beta2).add_(g2.add_(_eps1(cfg, g2.dtype)).mul_(one_minus_beta2))
    else:
        variance.lerp_(g2, one_minus_beta2)


def _unfactored_direction(g: torch.Tensor, variance: torch.Tensor, cfg: dict[str, Any]) -> Callable[..., torch.Tensor]:
    """:func:`_update_direction` of an unfactored tensor (0-D or 1-D), from its updated ``variance``."""
    if cfg["mode"] == "hf":
        return lambda out, rows=None: torch.rsqrt(_rows(variance, rows), out=out).mul_(_rows(g, rows))
    floor = _floor(cfg, g.dtype)
    return lambda out, rows=None: torch.clamp(_rows(variance, rows), min=floor, out=out).rsqrt_().mul_(_rows(g, rows))


def _factored_direction(g: torch.Tensor, state: dict[str, Any], info: ShardInfo, cfg: dict[str, Any],
                        one_minus_beta2: torch.Tensor, row_mean: torch.Tensor,
                        col_mean: torch.Tensor) -> Callable[..., torch.Tensor]:
    """:func:`_update_direction` of a factored tensor, from the means of ``g^2`` over its last dim
    (``row_mean``) and over its rows (``col_mean``); updates them in place in hf mode."""
    hf, eps1, floor = cfg["mode"] == "hf", _eps1(cfg, g.dtype), _floor(cfg, g.dtype)
    row_var, col_var = state["row_var"], state["col_var"]
    if hf:  # mean(g^2 + eps1) = mean(g^2) + eps1
        row_mean.add_(eps1)
        col_mean.add_(eps1)
        row_var.mul_(1.0 - one_minus_beta2).add_(row_mean * one_minus_beta2)
        col_var.mul_(1.0 - one_minus_beta2).add_(col_mean * one_minus_beta2)
        row_factor = (row_var / mean_over(row_var, -2, info)).rsqrt_()
        col_factor = col_var.rsqrt()
        return lambda out, rows=None: torch.mul(_rows(row_factor, rows), col_factor, out=out).mul_(_rows(g, rows))
    row_var.lerp_(row_mean, one_minus_beta2)
    col_var.lerp_(col_mean, one_minus_beta2)
    scaled_rows = row_var / mean_over(row_var, -2, info).clamp_(min=eps1)  # R / mean(R)
    if not (g.is_cuda or torch.compiler.is_compiling()) and float(scaled_rows.min()) * float(col_var.min()) >= floor:
        # no product falls under the floor, so rsqrt(R_i C_j / mean(R)) = rsqrt(R_i / mean(R)) rsqrt(C_j):
        # the roots of the vectors, then two passes over the tensor instead of four (on the CPU, where
        # reading the two minima costs no device sync)
        row_factor, col_factor = scaled_rows.rsqrt(), col_var.rsqrt()
        return lambda out, rows=None: torch.mul(_rows(g, rows), _rows(row_factor, rows), out=out).mul_(col_factor)
    return lambda out, rows=None: torch.mul(_rows(scaled_rows, rows), col_var, out=out).clamp_(min=floor).rsqrt_(
    ).mul_(_rows(g, rows))


def _blocks(grads: list[torch.Tensor], states: list[dict[str, Any]], infos: list[ShardInfo],
            omb: list[float]) -> list[list[int]]:
    """The indices of the tensors an eager CPU step updates together, in blocks of two or more
    sharing one ``1 - beta2_t``: the unfactored tensors (0-D/1-D), and the unsharded matrices of
    each shape."""
    keys: dict[tuple, list[int]] = {}
    for k, (g, state, info) in enumerate(zip(grads, states, infos)):
        if "variance" in state:
            keys.setdefault(("unfactored", omb[k]), []).append(k)
        elif g.dim() == 2 and info.dim is None:
            keys.setdefault((tuple(g.shape), omb[k]), []).append(k)
    return [block for block in keys.values() if len(block) > 1]


def _outs(grads: list[torch.Tensor], blocks: list[list[int]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The eager step's update tensors, shaped like ``grads``: views of one scratch buffer, each
    block's back to back from its start, then the rest; and the flat tensor of each block."""
    chosen = {k for block in blocks for k in block}
    order = [k for block in blocks for k in block] + [k for k in range(len(grads)) if k not in chosen]
    flat, views = flat_scratch([grads[k] for k in order], slot=0)
    outs: list[torch.Tensor] = [None] * len(grads)
    for k, view in zip(order, views):
        outs[k] = view
    flats, start = [], 0
    for block in blocks:
        size = sum(grads[k].numel() for k in block)
        flats.append(flat[start:start + size])
        start += size
    return outs, flats


def _unfactored_updates(grads: list[torch.Tensor], states: list[dict[str, Any]], outs: list[torch.Tensor],
                        flat_out: torch.Tensor, cfg: dict[str, Any], one_minus_beta2: float) -> None:
    """:func:`_update_variance` and the direction of :func:`_unfactored_direction` for a block of
    unfactored tensors, op for op (so the same values) but as multi-tensor ops over the lists and
    flat ops over their scratch: ``outs`` are views of ``flat_out``, back to back (:func:`_outs`)."""
    variances = [state["variance"] for state in states]
    flat_g2, g2 = flat_scratch(grads, slot=1)
    torch._foreach_copy_(g2, grads)
    flat_g2.mul_(flat_g2)
    if cfg["mode"] == "hf":  # g^2 + eps1
        torch._foreach_mul_(variances, foreach_scalar(1.0 - one_minus_beta2, variances))
        flat_g2.add_(_eps1(cfg, flat_g2.dtype)).mul_(one_minus_beta2)
        torch._foreach_add_(variances, g2)
        torch._foreach_copy_(outs, variances)
        flat_out.rsqrt_()
    else:
        torch._foreach_lerp_(variances, g2, one_minus_beta2)
        torch._foreach_copy_(outs, variances)
        flat_out.clamp_(min=_floor(cfg, flat_out.dtype)).rsqrt_()
    torch._foreach_mul_(outs, grads)


def _factored_updates(grads: list[torch.Tensor], states: list[dict[str, Any]], outs: list[torch.Tensor],
                      flat_out: torch.Tensor, cfg: dict[str, Any], one_minus_beta2: float) -> None:
    """:func:`_factored_direction`'s statistics and directions for a block of unsharded matrices
    of one shape, op for op, on the block stacked in scratch (``n x rows x cols``): the means,
    factor vectors and products are batched ops, the state updates multi-tensor ops. In torch
    mode the factor vectors' roots are used (two passes) when every matrix of the block allows
    it, else the clamped product for all (they differ by rounding only)."""
    n, (rows, cols) = len(grads), grads[0].shape
    flat_g, g_views = flat_scratch(grads, slot=1)
    torch._foreach_copy_(g_views, grads)
    g = flat_g.view(n, rows, cols)
    g2 = torch.mul(g, g, out=flat_scratch(grads, slot=4)[0].view(n, rows, cols))  # 2, 3: _run's working copies
    row_mean, col_mean = g2.mean(-1, keepdim=True), g2.mean(-2, keepdim=True)
    row_vars, col_vars = [state["row_var"] for state in states], [state["col_var"] for state in states]
    hf, eps1, floor = cfg["mode"] == "hf", _eps1(cfg, g.dtype), _floor(cfg, g.dtype)
    if hf:  # mean(g^2 + eps1) = mean(g^2) + eps1
        row_mean.add_(eps1)
        col_mean.add_(eps1)
        for variances, mean in ((row_vars, row_mean), (col_vars, col_mean)):
            torch._foreach_mul_(variances, foreach_scalar(1.0 - one_minus_beta2, variances))
            torch._foreach_add_(variances, list((mean * one_minus_beta2).unbind(0)))
    else:
        torch._foreach_lerp_(row_vars, list(row_mean.unbind(0)), one_minus_beta2)
        torch._foreach_lerp_(col_vars, list(col_mean.unbind(0)), one_minus_beta2)
    row_var, col_var, out = torch.stack(row_vars), torch.stack(col_vars), flat_out.view(n, rows, cols)
    if hf:
        row_factor = (row_var / row_var.mean(-2, keepdim=True)).rsqrt_()
        torch.mul(row_factor, col_var.rsqrt(), out=out).mul_(g)
        return
    scaled_rows = row_var / row_var.mean(-2, keepdim=True).clamp_(min=eps1)  # R / mean(R)
    if float((scaled_rows.amin(dim=(1, 2)) * col_var.amin(dim=(1, 2))).min()) >= floor:
        torch.mul(g, scaled_rows.rsqrt(), out=out).mul_(col_var.rsqrt())
    else:
        torch.mul(scaled_rows, col_var, out=out).clamp_(min=floor).rsqrt_().mul_(g)


def _eps1(cfg: dict[str, Any], dtype: torch.dtype) -> float:
    """``eps1``; ``None`` means the machine epsilon of the state dtype."""
    return torch.finfo(dtype).eps if cfg["eps"][0] is None else cfg["eps"][0]


def _floor(cfg: dict[str, Any], dtype: torch.dtype) -> float:
    """The floor of ``V`` in torch mode, ``eps1^2``, kept above 0 (``rsqrt(0) * 0`` would be NaN)."""
    eps1 = _eps1(cfg, dtype)
    return max(eps1 * eps1, torch.finfo(dtype).tiny)


def _rows(t: torch.Tensor, rows: slice | None) -> torch.Tensor:
    return t if rows is None else t[rows]


def _temporary(like: torch.Tensor, slot: int) -> torch.Tensor | None:
    """A :func:`.tensors.scratch` tensor shaped like ``like`` for an eager step; ``None`` (a fresh
    result) when compiling, where inductor decides what is stored."""
    return None if torch.compiler.is_compiling() else scratch_like(like, slot)


def _step(params: list[torch.Tensor], works: list[torch.Tensor], grads: list[torch.Tensor],
          states: list[dict[str, Any]], infos: list[ShardInfo], rho, omb, decay, cfg: dict[str, Any]) -> None:
    """One Adafactor step for parallel lists; ``rho``, ``omb`` (1 - beta2_t) and ``decay`` (torch
    mode's ``1 - lr wd``) hold one value per tensor (floats, or a tensor when compiled). Eager, the
    updates of all the tensors live in one :func:`.tensors.scratch` buffer until their RMS is known.

    The per-tensor step sizes ``alpha`` and clipping divisors are Python floats on the CPU, eager
    (one host read of the RMS values per call, which costs no device sync there, instead of ~10 ops
    on 0-dim tensors: a quarter of a small tensor's step), and tensors otherwise (no host sync)."""
    compiling = torch.compiler.is_compiling()
    on_host = not compiling and not works[0].is_cuda
    if on_host:
        alpha0 = _host_step_sizes(works, infos, rho, cfg)
    else:
        rho = torch.as_tensor(rho, dtype=works[0].dtype, device=works[0].device)
        floor = cfg["eps"][1] * cfg["eps_scale"]
        alpha0 = global_rms(works, infos).clamp_(min=floor) * rho if cfg["scale_parameter"] else rho
    if cfg["weight_decay"]:
        if on_host:
            factors = _host_decays(alpha0, decay, cfg)
        elif cfg["mode"] == "torch":
            factors = list(decay)
        else:
            factors = list((1.0 - cfg["weight_decay"] * alpha0).unbind())
        torch._foreach_mul_(works, foreach_scalars(factors, works) if on_host else factors)
    blocks = _blocks(grads, states, infos, omb) if on_host else []
    outs, flats = ([None] * len(grads), []) if compiling else _outs(grads, blocks)
    for block, flat_out in zip(blocks, flats):  # a few multi-tensor and batched ops per block, not ~5 per tensor
        updates_of = _unfactored_updates if "variance" in states[block[0]] else _factored_updates
        updates_of([grads[k] for k in block], [states[k] for k in block], [outs[k] for k in block], flat_out, cfg,
                   omb[block[0]])
    together = {k for block in blocks for k in block}
    directions = [None if k in together else _update_direction(g, s, i, cfg, omb[k])
                  for k, (g, s, i) in enumerate(zip(grads, states, infos))]
    updates = [out if direction is None else direction(out) for direction, out in zip(directions, outs)]
    if on_host:
        scales = _host_scales(alpha0, rms_values(updates, infos), cfg)
    else:
        clip = (global_rms(updates, infos) / cfg["clip_threshold"]).clamp_(min=1.0)
        scales = list((alpha0 * cfg["lr_scale"] / clip).unbind())
    if cfg["beta1"] is None:
        if compiling:  # recomputed inside the update loop: no buffer per tensor
            updates = [direction(None) for direction in directions]
        if on_host:
            for work, update, scale in zip(works, updates, scales):
                work.add_(update, alpha=-scale)  # p -= alpha U / clip, one pass
        else:
            torch._foreach_addcmul_(works, updates, scales, value=-1.0)
    else:
        torch._foreach_mul_(updates, foreach_scalars(scales, updates) if on_host else scales)
        momenta = [s["exp_avg"] for s in states]
        torch._foreach_mul_(momenta, foreach_scalar(cfg["beta1"], momenta))
        torch._foreach_add_(momenta, updates, alpha=1.0 - cfg["beta1"])
        torch._foreach_sub_(works, momenta)
    for p, w in zip(params, works):
        write_back(p, w)


def _host_step_sizes(works: list[torch.Tensor], infos: list[ShardInfo], rho: list[float],
                     cfg: dict[str, Any]) -> list[float]:
    """``alpha_0 = rho max(eps2 eps_scale, RMS(p))`` per tensor (``rho`` without ``scale_parameter``),
    as Python floats."""
    if not cfg["scale_parameter"]:
        return list(rho)
    floor = cfg["eps"][1] * cfg["eps_scale"]
    return [max(r, floor) * t for r, t in zip(rms_values(works, infos), rho)]


def _host_decays(alpha0: list[float], decay: list[float], cfg: dict[str, Any]) -> list[float]:
    """The weight-decay factors of the parameters: ``1 - lr wd`` (torch mode, given) or ``1 - wd alpha_0`` (hf)."""
    return list(decay) if cfg["mode"] == "torch" else [1.0 - cfg["weight_decay"] * a for a in alpha0]


def _host_scales(alpha0: list[float], update_rms: list[float], cfg: dict[str, Any]) -> list[float]:
    """The step sizes of the clipped updates: ``alpha_0 lr_scale / max(1, RMS(U) / d)`` (Sec. 6)."""
    return [a * cfg["lr_scale"] / max(r / cfg["clip_threshold"], 1.0) for a, r in zip(alpha0, update_rms)]


def _in_blocks(t: dict[str, Any]) -> bool:
    """Does the tensor take :func:`_step_in_blocks`: a CPU vector or matrix of over
    :data:`.tensors.CPU_PIECE` elements, whole on this rank?"""
    p = t["param"]
    return p.dim() in (1, 2) and p.numel() > CPU_PIECE and not p.is_cuda and t["info"].dim is None


def _step_in_blocks(t: dict[str, Any], rho: float, omb: float, decay: float, cfg: dict[str, Any],
                    maximize: bool) -> None:
    """The eager CPU step of a large vector or matrix (:func:`_in_blocks`), a block of at most
    :data:`.tensors.CPU_PIECE` elements (of whole rows, for a matrix) at a time, in
    :func:`.tensors.scratch` temporaries: the same arithmetic as :func:`_step`, but each block is
    worked on while in cache, and no temporary is the size of the tensor (a fresh one is mapped
    in anew, page by page, every step).

    Three passes over the blocks: the second moment (a matrix's column sums accumulated across the
    blocks), the RMS of the update, and the update itself, recomputed rather than stored. The step
    reads ``g`` three times and ``p`` twice and writes ``p`` once; :func:`_step` on a tensor this
    size streams ~13 of its sizes through memory.
    """
    p, state, info = t["param"], t["state"], t["info"]
    work, g = working_copy(p), t["grad"].to(state_dtype(p))
    if maximize:
        g = -g
    rows, cols = g.shape if g.dim() == 2 else (g.numel(), 1)
    size = max(1, CPU_PIECE // cols)
    blocks = [slice(start, start + size) for start in range(0, rows, size)]
    alpha0 = _host_step_sizes([work], [info], [rho], cfg)
    if "variance" in state:
        for block in blocks:
            _update_variance(state["variance"][block], torch.mul(g[block], g[block], out=scratch_like(g[block], 1)),
                             cfg, omb)
        direction = _unfactored_direction(g, state["variance"], cfg)
    else:
        row_mean, col_mean = g.new_empty(rows, 1), g.new_zeros(1, cols)
        for block in blocks:
            g2 = torch.mul(g[block], g[block], out=scratch_like(g[block], 1))
            torch.mean(g2, -1, keepdim=True, out=row_mean[block])
            col_mean.add_(g2.sum(0, keepdim=True))
        direction = _factored_direction(g, state, info, cfg, omb, row_mean, col_mean.div_(rows))
    squares = sum(float(torch.linalg.vector_norm(direction(scratch_like(g[b], 0), b))) ** 2 for b in blocks)
    (scale,) = _host_scales(alpha0, [math.sqrt(squares / g.numel())], cfg)
    (factor,) = _host_decays(alpha0, [decay], cfg) if cfg["weight_decay"] else (1.0,)
    for block in blocks:
        update, piece = direction(scratch_like(g[block], 0), block), work[block]
        if factor != 1.0:
            piece.mul_(factor)
        if cfg["beta1"] is None:
            piece.add_(update, alpha=-scale)
        else:
            momentum = state["exp_avg"][block]
            momentum.mul_(cfg["beta1"]).add_(update.mul_(scale), alpha=1.0 - cfg["beta1"])
            piece.sub_(momentum)
    write_back(p, work)


_compiled_step = None


def _run(tensors: list[dict[str, Any]], group: dict[str, Any], cfg: dict[str, Any], path: str) -> None:
    """Advance the step counters of a bucket (one device and state dtype), then :func:`_step` on
    it: a tensor at a time (``path="single"``), a cache-sized run of tensors at a time
    (``"foreach"``; a bucket holding sharded tensors at once, so that every rank makes the same
    collective calls) or as one compiled graph (``"compiled"``).

    Per-tensor scalars are Python floats when eager and tensors when compiled (so nothing recompiles).
    """
    steps = advance_steps([t["state"]["step"] for t in tensors])
    rhos = [_relative_step(group, step) for step in steps]
    ombs = [step ** group["beta2_decay"] for step in steps]
    decay = 1.0 - (group["lr"] or 0.0) * cfg["weight_decay"]
    if path == "compiled":
        _run_compiled(tensors, group, cfg, rhos, ombs, decay)
        return
    blocked = [_in_blocks(t) for t in tensors]
    if any(blocked):
        for t, rho, omb in zip(*(subset(column, blocked) for column in (tensors, rhos, ombs))):
            _step_in_blocks(t, rho, omb, decay, cfg, group["maximize"])
        tensors, rhos, ombs = (subset(column, [not b for b in blocked]) for column in (tensors, rhos, ombs))
        if not tensors:
            return
    infos = [t["info"] for t in tensors]
    if path == "single":
        runs = [([t], [r], [o]) for t, r, o in zip(tensors, rhos, ombs)]
    elif any(i.dim is not None for i in infos):
        runs = [(tensors, rhos, ombs)]
    else:  # every statistic is per tensor, so cache-sized runs of tensors step alone, each while in cache
        runs = [run[1:] for run in cache_sized(([t["param"] for t in tensors], tensors, rhos, ombs))]
    dtype = state_dtype(tensors[0]["param"])
    for run, run_rhos, run_ombs in runs:
        params = [t["param"] for t in run]
        works = working_copies(params, slot=2)
        grads = as_dtype([t["grad"] for t in run], dtype, slot=3)
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        _step(params, works, grads, [t["state"] for t in run], [t["info"] for t in run], run_rhos, run_ombs,
              [decay] * len(run), cfg)


def _run_compiled(tensors: list[dict[str, Any]], group: dict[str, Any], cfg: dict[str, Any], rhos: list[float],
                  ombs: list[float], decay: float) -> None:
    """:func:`_step` compiled, once per bucket; its per-tensor scalars are tensors (nothing recompiles)."""
    global _compiled_step
    sharded = [t["info"] for t in tensors if t["info"].dim is not None]
    if sharded:
        raise ValueError(f"Adafactor(compiled=True) runs on whole tensors, but a parameter of shape "
                         f"{tuple(sharded[0].shape)} is sharded; use foreach=True, which reduces over the shards.")
    params = [t["param"] for t in tensors]
    works = [working_copy(p) for p in params]
    grads = [t["grad"].to(state_dtype(p)) for t, p in zip(tensors, params)]
    if group["maximize"]:
        grads = [-g for g in grads]
    if _compiled_step is None:
        _compiled_step = torch.compile(_step, dynamic=False)
    like = dict(dtype=works[0].dtype, device=works[0].device)
    states = [{k: compile_safe(v) for k, v in t["state"].items() if k != "step"} for t in tensors]
    infos = [ShardInfo(compile_safe(w).shape, None) for w in works]
    _compiled_step([compile_safe(p) for p in params], [compile_safe(w) for w in works],
                   [compile_safe(g) for g in grads], states, infos, torch.tensor(rhos, **like),
                   torch.tensor(ombs, **like), torch.full((len(works),), decay, **like), cfg)


__all__ = ["Adafactor", "MODES"]
