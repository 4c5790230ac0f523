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

The math is :func:`adafactor_update`, one function for the single-tensor and foreach paths (and,
compiled, for ``compiled=True``); the Triton kernels (:mod:`.kernels.adafactor`) are tested
against it. Step sizes and clipping factors are computed as tensors: on CUDA they stay on the
device (no host sync); on the CPU they are read back as floats, which costs no sync there.

muP family (with ``scale_parameter``): ``adafactor``, whose step is relative to the parameter's
RMS. Hidden LR multiplier ``m_in^-1/2`` (Adam's ``m_in^-1`` over the hidden init scale
``m_in^-1/2``), input/vector/output ``1``; the RMS floor ``eps2`` follows each parameter's init
scale (``eps_scale``), so zero-initialized tensors step like their muP init would. Without
``scale_parameter`` the update is entrywise-normalized: family ``adamw``. See
:mod:`mupkit.rules`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..rules import FAMILIES
from . import dispatch, ops
from .base import Optimizer
from .sharding import ShardInfo, global_rms, local_tensor, mean_over, shard_info, state_like
from .tensors import advance_steps, by_device_and_dtype, state_dtype

MODES = ("torch", "hf")

#: graphs the compiled update may compile (one per parameter shape, dtype and kind)
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class Settings:
    """A param group's constants for :func:`adafactor_update` (``weight_decay`` with its muP scales)."""

    hf: bool
    eps1: float | None  # None: the state dtype's machine epsilon
    rms_floor: float  # eps2 * eps_scale
    clip_threshold: float
    lr_scale: float
    weight_decay: float
    beta1: float | None
    scale_parameter: bool
    maximize: bool


class Adafactor(Optimizer):
    """Adafactor with muP group scales; ``mode="torch"`` (default) or ``mode="hf"``.

    Arguments as in the chosen reference: ``lr`` (torch: cap of the relative step, default
    1e-2; hf: the step with ``relative_step=False``), ``eps=(eps1, eps2)`` (torch default
    ``(None, 1e-3)``, hf ``(1e-30, 1e-3)``), ``clip_threshold`` (torch's ``d``), ``beta2_decay``
    (hf's ``decay_rate``), ``weight_decay``, ``maximize``; hf only: ``scale_parameter``,
    ``relative_step``, ``warmup_init``. ``beta1``: optional first moment, on the clipped and
    scaled update (as hf). ``foreach``/``fused``/``compiled``: the implementation (default:
    :mod:`.dispatch`). ``fused=True``: the Triton kernels, on CUDA (their sums are atomic adds, so
    not under ``torch.use_deterministic_algorithms``). ``compiled=True``: ``torch.compile`` of the
    update, a graph per parameter shape (the first step costs the compiles: seconds to minutes).
    """

    family = FAMILIES["adafactor"]
    kernels = dispatch.Kernels(deterministic=False, stacked=True)

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
        if not scale_parameter:
            self.family = FAMILIES["adamw"]  # entrywise-normalized step: Adam's muP rules
        defaults = dict(lr=lr, mode=mode, beta1=beta1, beta2_decay=beta2_decay, eps=tuple(eps),
                        clip_threshold=clip_threshold, weight_decay=weight_decay, scale_parameter=scale_parameter,
                        relative_step=relative_step, warmup_init=warmup_init, maximize=maximize, foreach=foreach,
                        compiled=compiled, fused=fused)
        super().__init__(params, defaults, master_weights=master_weights)

    def _effective_group(self, group: dict[str, Any], path: str) -> dict[str, Any]:
        """The group with its path; ``lr`` stays the reference's (a cap of the relative step, or
        hf's fixed step) and ``lr_scale`` multiplies the step size (:class:`Settings`)."""
        return {**group, "path": path}

    def _update(self, groups: list[dict[str, Any]]) -> None:
        fused = []
        for group in groups:
            tensors = self._gather(group)
            if not tensors:
                continue
            if group["path"] == "stacked":
                self._stacked_update(tensors, group)
                continue
            steps = advance_steps([t.state["step"] for t in tensors])
            settings = _settings(group)
            rows = [_row(group, step) for step in steps]
            if group["path"] == "fused":
                fused += [(t, settings, row) for t, row in zip(tensors, rows)]
            elif group["path"] == "compiled":
                _run_compiled(tensors, settings, rows)
            else:
                for kind in (True, False):  # factored, then unfactored
                    chosen = [(t, row) for t, row in zip(tensors, rows) if t.factored == kind]
                    if chosen:
                        _run_eager([t for t, _ in chosen], settings, [r for _, r in chosen], group["path"])
        if fused:
            dispatch.check_fused(type(self).__name__, [t.param for t, _, _ in fused], self.kernels)
            from .kernels.adafactor import adafactor as launch
            launch(fused)

    def _stacked_update(self, tensors: list[StepTensors], group: dict[str, Any]) -> None:
        """:func:`adafactor_update` once per stack of same-shape tensors (:mod:`.stacked`; per-tensor
        statistics over each row), its members one by one in the rare case their steps differ."""
        settings = _settings(group)
        for kind in (True, False):  # factored, then unfactored
            chosen = [t for t in tensors if t.factored == kind]
            if not chosen:
                continue
            moments = [[t.moment[0] for t in chosen], [t.moment[1] for t in chosen]] if kind else \
                [[t.moment for t in chosen]]
            momentum = [[t.exp_avg for t in chosen]] if chosen[0].exp_avg is not None else []
            steps = [t.state["step"] for t in chosen]
            columns = [*moments, *momentum, steps]
            for stack in self._stacks([t.param for t in chosen], [t.grad for t in chosen], columns):
                values = stack.state[-1].add_(1).tolist()
                if values.count(values[0]) != len(values):
                    _run_eager([chosen[i] for i in stack.members], settings, [_row(group, t) for t in values],
                               "foreach")
                    continue
                moment = (stack.state[0], stack.state[1]) if kind else stack.state[0]
                adafactor_update(stack.param, stack.grad, moment, stack.state[-2] if momentum else None,
                                 chosen[stack.members[0]].info, *_row(group, values[0]), settings, rows=True)
                stack.write_back()

    def _gather(self, group: dict[str, Any]) -> list[StepTensors]:
        """Every parameter of ``group`` with a gradient: its local shard, gradient, state (made on
        the first step, torch's keys and shapes) and shard layout."""
        names = group.get("param_names")
        out = []
        for index, p in self._with_grads(group):
            state = self.state[p]
            plain = dispatch.plain_dense(p)  # else a DTensor: its shard, and views of its state's shards
            info = ShardInfo(p.shape, None) if plain else shard_info(names[index] if names else f"#{index}", p)
            if not state:
                _init_state(state, p, info, group["beta1"] is not None)
            local = state if plain else {k: local_tensor(v) for k, v in state.items() if k != "step"}
            moment = (local["row_var"], local["col_var"]) if "row_var" in local else local["variance"]
            out.append(StepTensors(p if plain else local_tensor(p), p.grad if plain else local_tensor(p.grad), moment,
                                   local.get("exp_avg"), info, state))
        return out


@dataclass
class StepTensors:
    """One parameter's rank-local tensors for a step: ``moment`` is ``(R, C)`` when factored."""

    param: torch.Tensor
    grad: torch.Tensor
    moment: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    exp_avg: torch.Tensor | None
    info: ShardInfo
    state: dict[str, Any]

    @property
    def factored(self) -> bool:
        return isinstance(self.moment, tuple)


def _init_state(state: dict[str, Any], p: torch.Tensor, info: ShardInfo, momentum: bool) -> None:
    """torch's state: ``step``, ``row_var`` (``... x rows x 1``) and ``col_var`` (``... x 1 x cols``)
    for >= 2 dims, else ``variance``; ``exp_avg`` with ``beta1``. fp32 for bf16/fp16 parameters."""
    local, dtype, shape = local_tensor(p), state_dtype(p), tuple(p.shape)
    state["step"] = torch.tensor(0.0)
    if p.dim() >= 2:
        state["row_var"] = state_like(local.new_zeros(local.shape[:-1] + (1,), dtype=dtype), p, info,
                                      shape[:-1] + (1,), reduced_dims=(-1,))
        state["col_var"] = state_like(local.new_zeros(local.shape[:-2] + (1,) + local.shape[-1:], dtype=dtype),
                                      p, info, shape[:-2] + (1,) + shape[-1:], reduced_dims=(-2,))
    else:
        state["variance"] = state_like(torch.zeros_like(local, dtype=dtype), p, info, shape)
    if momentum:
        state["exp_avg"] = state_like(torch.zeros_like(local, dtype=dtype), p, info, shape)


def _settings(group: dict[str, Any]) -> Settings:
    eps1, eps2 = group["eps"]
    return Settings(hf=group["mode"] == "hf", eps1=eps1, rms_floor=eps2 * group["eps_scale"],
                    clip_threshold=group["clip_threshold"], lr_scale=group["lr_scale"],
                    weight_decay=group["weight_decay"] * group["lr_scale"] * group["wd_scale"],  # 1 under muP
                    beta1=group["beta1"], scale_parameter=group["scale_parameter"], maximize=group["maximize"])


def _row(group: dict[str, Any], t: float) -> tuple[float, float, float]:
    """``(rho_t, omb_t, torch mode's decay 1 - lr wd)`` at step ``t``."""
    if group["mode"] == "torch":
        rho = min(group["lr"], t ** -0.5)
    elif not group["relative_step"]:
        rho = group["lr"]
    else:
        rho = min(1e-6 * t if group["warmup_init"] else 1e-2, t ** -0.5)
    wd = group["weight_decay"] * group["lr_scale"] * group["wd_scale"]
    return rho, t ** group["beta2_decay"], 1.0 - (group["lr"] or 0.0) * wd


def _run_eager(tensors: list[StepTensors], settings: Settings, rows: list[tuple[float, ...]], path: str) -> None:
    """:func:`adafactor_update` tensor by tensor (``"single"``) or on each (device, dtype) bucket's
    lists (``"foreach"``; sharded tensors of a bucket reduce together)."""
    if path == "single":
        for t, row in zip(tensors, rows):
            adafactor_update(t.param, t.grad, t.moment, t.exp_avg, t.info, *row, settings)
        return
    for bucket in by_device_and_dtype(*zip(*((t.param, t.grad, t.moment, t.exp_avg, t.info, row)
                                             for t, row in zip(tensors, rows)))):
        params, grads, moments, exp_avgs, infos, bucket_rows = bucket
        moments = tuple(map(list, zip(*moments))) if isinstance(moments[0], tuple) else moments
        adafactor_update(params, grads, moments, None if exp_avgs[0] is None else exp_avgs, infos,
                         *(ops.scalars(column) for column in zip(*bucket_rows)), settings)


_compiled_update = None


def _run_compiled(tensors: list[StepTensors], settings: Settings, rows: list[tuple[float, ...]]) -> None:
    """:func:`adafactor_update` under ``torch.compile``, a call per parameter; the row's values are
    0-dim tensors, so new values do not recompile (new shapes do)."""
    global _compiled_update
    sharded = [t.info for t in tensors if t.info.dim is not None]
    if sharded:
        raise ValueError(f"Adafactor(compiled=True) runs on whole tensors, but a parameter of shape "
                         f"{tuple(sharded[0].shape)} is sharded; use the default path (compiled=None), which "
                         f"reduces over the shards.")
    if _compiled_update is None:
        _compiled_update = torch.compile(adafactor_update, fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        for t, row in zip(tensors, rows):
            values = torch.tensor(row, dtype=torch.float64).unbind()
            moment = t.moment if t.factored else _at_least_1d(t.moment)
            _compiled_update(_at_least_1d(t.param), _at_least_1d(t.grad), moment,
                             None if t.exp_avg is None else _at_least_1d(t.exp_avg), t.info, *values, settings)


def _at_least_1d(t: torch.Tensor) -> torch.Tensor:
    """A 1-element view of a 0-dim tensor (torch 2.13's inductor loses in-place updates of 0-dim
    graph inputs; the view shares storage)."""
    return t.view(1) if t.dim() == 0 else t


def adafactor_update(p: ops.Tensors, g: ops.Tensors, moment, exp_avg: ops.Tensors | None,
                     info: ShardInfo | list[ShardInfo], rho: ops.Scalars, omb: ops.Scalars, decay: ops.Scalars,
                     settings: Settings, rows: bool = False) -> None:
    """One Adafactor step of a parameter (or, on lists, of each), in place.

    ``moment``: ``(R, C)`` of a factored parameter (or of lists), else ``V``; ``rho``, ``omb``
    (``1 - beta2_t``) and ``decay`` (torch mode's ``1 - lr wd``): :func:`_row`'s values. The
    step size ``alpha_0 = rho max(eps2, RMS(p))`` (Sec. 8) is measured before the decay, the
    clipping ``max(1, RMS(U) / d)`` (Sec. 6) on the direction, both over all shards. ``rows``:
    ``p`` is a stack of parameters of ``info``'s shape (:mod:`.stacked`), each row stepped as one."""
    dtype = _dtype(exp_avg if exp_avg is not None else moment[1] if isinstance(moment, tuple) else moment)
    work, g = ops.to_dtype(p, dtype), ops.to_dtype(g, dtype)
    if settings.maximize:
        g = ops.neg(g)
    infos = info if ops.is_list(p) else [info]
    alpha0 = torch.as_tensor(rho, dtype=torch.float64, device=_device(p))
    if settings.scale_parameter:
        alpha0 = alpha0 * _rms(work, infos, rows).double().clamp(min=settings.rms_floor)
    u = _direction(g, moment, info, omb, settings)
    clip = (_rms(u, infos, rows).double() / settings.clip_threshold).clamp(min=1.0)
    scale = alpha0 * settings.lr_scale / clip
    if settings.weight_decay:
        ops.mul_(work, _values(1.0 - settings.weight_decay * alpha0, work, rows) if settings.hf else decay)
    if exp_avg is None and ops.is_list(p):
        ops.addcmul_(work, u, _values(-scale, work))  # p += U (-scale): one multi-tensor op
    elif exp_avg is None:
        ops.add_(work, u, alpha=_values(-scale, work, rows))
    else:
        ops.mul_(u, _values(scale, work, rows))
        ops.mul_(exp_avg, settings.beta1)
        ops.add_(exp_avg, u, alpha=1.0 - settings.beta1)
        ops.add_(work, exp_avg, alpha=-1.0)
    ops.write_back(p, work)


def _direction(g: ops.Tensors, moment, info, omb: ops.Scalars, settings: Settings) -> ops.Tensors:
    """Update the second moment in place and return ``U = g / sqrt(V)`` (new tensors)."""
    if isinstance(moment, tuple):
        return _factored_direction(g, *moment, info, omb, settings)
    return _unfactored_direction(g, moment, omb, settings)


def _unfactored_direction(g: ops.Tensors, v: ops.Tensors, omb: ops.Scalars, settings: Settings) -> ops.Tensors:
    """``V <- lerp(V, g^2, omb)`` (hf: ``V <- (1 - omb) V + omb (g^2 + eps1)``), ``U = g / sqrt(V)``
    (torch: ``V`` clamped at ``eps1^2``)."""
    g2 = ops.mul(g, g)
    if settings.hf:
        ops.add_scalar_(g2, _eps1(settings, _dtype(v)))
        ops.mul_(v, _complement(omb))
        ops.add_(v, g2, alpha=omb)
        u = ops.rsqrt(v)
    else:
        ops.lerp_(v, g2, omb)
        u = ops.rsqrt_(ops.maximum(v, _floor(settings, _dtype(v))))
    return ops.mul_(u, g)


def _factored_direction(g: ops.Tensors, row_var: ops.Tensors, col_var: ops.Tensors, info, omb: ops.Scalars,
                        settings: Settings) -> ops.Tensors:
    """``R``, ``C`` from this step's means of ``g^2`` over the last dim and over the rows (hf: of
    ``g^2 + eps1``), then ``U = g / sqrt(R C / mean_rows(R))`` as
    ``g min(rsqrt(R / mean_rows(R)) rsqrt(C), eps1^-1)``: torch mode's clamps (the mean at eps1,
    the product at eps1^2) on the factors' roots, so only two ops run over the whole tensor. The
    means are per tensor (over the shards); the rest multi-tensor ops on lists, broadcasting."""
    g2 = ops.mul(g, g)
    row_mean, col_mean = _means(g2, -1, info), _means(g2, -2, info)
    eps1 = _eps1(settings, _dtype(g))
    if settings.hf:  # mean(g^2 + eps1) = mean(g^2) + eps1
        for var, mean in ((row_var, row_mean), (col_var, col_mean)):
            ops.add_scalar_(mean, eps1)
            ops.mul_(var, _complement(omb))
            ops.add_(var, mean, alpha=omb)
        u = ops.mul(ops.rsqrt_(ops.div(row_var, _means(row_var, -2, info))), ops.rsqrt(col_var))
    else:
        ops.lerp_(row_var, row_mean, omb)
        ops.lerp_(col_var, col_mean, omb)
        row_factor = ops.rsqrt_(ops.div(row_var, ops.maximum_(_means(row_var, -2, info), eps1)))
        u = ops.minimum_(ops.mul(row_factor, ops.rsqrt(col_var)), _floor(settings, _dtype(g)) ** -0.5)
    return ops.mul_(u, g)


def _means(x: ops.Tensors, dim: int, info) -> ops.Tensors:
    """:func:`.sharding.mean_over` of each tensor (``keepdim``)."""
    if not ops.is_list(x):
        return mean_over(x, dim, info)
    return [mean_over(t, dim, i) for t, i in zip(x, info)]


def _eps1(settings: Settings, dtype: torch.dtype) -> float:
    """``eps1``; ``None`` means the machine epsilon of the state dtype."""
    return torch.finfo(dtype).eps if settings.eps1 is None else settings.eps1


def _floor(settings: Settings, dtype: torch.dtype) -> float:
    """The floor of ``V`` in torch mode, ``eps1^2``, kept above 0 (``rsqrt(0) * 0`` would be NaN)."""
    eps1 = _eps1(settings, dtype)
    return max(eps1 * eps1, torch.finfo(dtype).tiny)


def _complement(s: ops.Scalars) -> ops.Scalars:
    return [1.0 - v for v in s] if isinstance(s, (list, tuple)) else 1.0 - s


def _as_list(x: ops.Tensors) -> list[torch.Tensor]:
    return x if ops.is_list(x) else [x]


def _dtype(x: ops.Tensors) -> torch.dtype:
    return x[0].dtype if ops.is_list(x) else x.dtype


def _device(x: ops.Tensors) -> torch.device:
    return x[0].device if ops.is_list(x) else x.device


def _rms(x: ops.Tensors, infos: list[ShardInfo], rows: bool) -> torch.Tensor:
    """RMS of each tensor (:func:`.sharding.global_rms`), or of each row of a stack."""
    if rows:
        return x.flatten(1).square().mean(1).sqrt()
    return global_rms(_as_list(x), infos)


def _values(t: torch.Tensor, like: ops.Tensors, rows: bool = False):
    """Per-tensor values (a 1-D tensor) as ops take them for ``like``: for lists the tensor's
    entries (0-dim tensors: no host sync, and on the CPU torch's multi-tensor ops take them
    faster than Python floats, which they wrap as tensors one by one); for one tensor a Python
    float on the CPU (reading it costs no sync there) and the 0-dim entry elsewhere; for a stack
    (``rows``) one value per row, ``(n, 1, ..., 1)`` in its dtype."""
    if rows:
        return t.to(like.dtype).view((-1,) + (1,) * (like.dim() - 1))
    if ops.is_list(like):
        return list(t.unbind())
    return t.reshape(()) if t.is_cuda or torch.compiler.is_compiling() else t.item()


__all__ = ["Adafactor", "MODES", "Settings", "adafactor_update"]
