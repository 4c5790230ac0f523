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
* The foreach path makes no per-tensor host sync: all RMS values are reduced as one tensor.

muP family (with ``scale_parameter``): ``adafactor``, whose step is relative to the parameter's
RMS. Hidden LR multiplier ``m_in^-1/2`` (Adam's ``m_in^-1`` over the hidden init scale
``m_in^-1/2``), input/vector/output ``1``; the RMS floor ``eps2`` follows each parameter's init
scale (``eps_scale``), so zero-initialized tensors step like their muP init would. Without
``scale_parameter`` the update is entrywise-normalized: family ``adamw``. See
:mod:`mupkit.rules`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..rules import FAMILIES
from .scaled import ScaledGroups
from .sharding import ShardInfo, all_sum, local_tensor, shard_info, sum_over
from .tensors import default_foreach, state_dtype, working_copy, write_back

MODES = ("torch", "hf")


class Adafactor(ScaledGroups, torch.optim.Optimizer):
    """Adafactor with muP group scales; ``mode="torch"`` (default) or ``mode="hf"``.

    Arguments as in the chosen reference: ``lr`` (torch: cap of the relative step, default
    1e-2; hf: the step with ``relative_step=False``), ``eps=(eps1, eps2)`` (torch default
    ``(None, 1e-3)``, hf ``(1e-30, 1e-3)``), ``clip_threshold`` (torch's ``d``), ``beta2_decay``
    (hf's ``decay_rate``), ``weight_decay``, ``maximize``; hf only: ``scale_parameter``,
    ``relative_step``, ``warmup_init``. ``beta1``: optional first moment, on the clipped and
    scaled update (as hf). ``foreach``: the multi-tensor path (default: on CUDA).
    """

    family = FAMILIES["adafactor"]

    def __init__(self, params, lr: float | None = None, *, mode: str = "torch", beta1: float | None = None,
                 beta2_decay: float = -0.8, eps: tuple[float | None, float] | None = None,
                 clip_threshold: float = 1.0, weight_decay: float = 0.0, scale_parameter: bool = True,
                 relative_step: bool = True, warmup_init: bool = False, maximize: bool = False,
                 foreach: bool | None = None):
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
                        relative_step=relative_step, warmup_init=warmup_init, maximize=maximize, foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            tensors = [self._tensors(group, i, p) for i, p in enumerate(group["params"]) if p.grad is not None]
            if not tensors:
                continue
            foreach = group["foreach"]
            if foreach is None:
                foreach = default_foreach([t["param"] for t in tensors])
            if not foreach:
                _single_tensor(tensors, group)
                continue
            buckets: dict[tuple, list[dict[str, Any]]] = {}
            for t in tensors:
                buckets.setdefault((t["param"].device, state_dtype(t["param"])), []).append(t)
            for bucket in buckets.values():
                _multi_tensor(bucket, group)
        return loss

    def _tensors(self, group: dict[str, Any], index: int, p: torch.Tensor) -> dict[str, Any]:
        """The parameter's local shard, gradient, state and shard layout."""
        if p.grad.is_sparse:
            raise RuntimeError("Adafactor does not support sparse gradients")
        names = group.get("param_names")
        info = shard_info(names[index] if names else f"#{index} of its group", p)
        state = self.state[p]
        local = local_tensor(p)
        if not state:
            dtype = state_dtype(p)
            state["step"] = torch.tensor(0.0)
            if p.dim() >= 2:
                state["row_var"] = local.new_zeros(local.shape[:-1] + (1,), dtype=dtype)
                state["col_var"] = local.new_zeros(local.shape[:-2] + (1,) + local.shape[-1:], dtype=dtype)
            else:
                state["variance"] = torch.zeros_like(local, dtype=dtype)
            if group["beta1"] is not None:
                state["exp_avg"] = torch.zeros_like(local, dtype=dtype)
        return {"param": local, "grad": local_tensor(p.grad), "state": state, "info": info}


def _relative_step(group: dict[str, Any], t: float) -> float:
    if group["mode"] == "torch":
        return min(group["lr"], t ** -0.5)
    if not group["relative_step"]:
        return group["lr"]
    return min(1e-6 * t if group["warmup_init"] else 1e-2, t ** -0.5)


def _rms(tensors: list[torch.Tensor], infos: list[ShardInfo]) -> torch.Tensor:
    """RMS of each global tensor, as one 1-D tensor (one reduction for all sharded ones)."""
    sumsq = torch.stack([t.square().sum() for t in tensors]) if len(tensors) == 1 else \
        torch.stack(torch._foreach_norm(tensors)).square()
    numel = torch.tensor([i.numel for i in infos], dtype=sumsq.dtype, device=sumsq.device)
    return (all_sum(sumsq, infos) / numel).sqrt()


def _update_direction(g: torch.Tensor, state: dict[str, Any], info: ShardInfo, group: dict[str, Any],
                      one_minus_beta2: float) -> torch.Tensor:
    """``g / sqrt(V)`` with the second-moment statistics updated in place (either mode)."""
    eps1 = group["eps"][0]
    if group["mode"] == "hf":
        g2 = g * g + eps1
    else:
        eps1 = torch.finfo(g.dtype).eps if eps1 is None else eps1
        g2 = g * g
    floor = max(eps1 * eps1, torch.finfo(g.dtype).tiny)  # eps1^2 must not underflow to 0: rsqrt(0) * 0 = NaN
    if "variance" in state:
        variance = state["variance"]
        if group["mode"] == "hf":
            variance.mul_(1.0 - one_minus_beta2).add_(g2, alpha=one_minus_beta2)
            return variance.rsqrt().mul_(g)
        variance.lerp_(g2, one_minus_beta2)
        return variance.clamp(min=floor).rsqrt_().mul_(g)
    rows, cols = info.shape[-2], info.shape[-1]
    row_var, col_var = state["row_var"], state["col_var"]
    row_mean = sum_over(g2, -1, info).div_(cols)
    col_mean = sum_over(g2, -2, info).div_(rows)
    if group["mode"] == "hf":
        row_var.mul_(1.0 - one_minus_beta2).add_(row_mean, alpha=one_minus_beta2)
        col_var.mul_(1.0 - one_minus_beta2).add_(col_mean, alpha=one_minus_beta2)
        row_factor = (row_var / sum_over(row_var, -2, info).div_(rows)).rsqrt_()
        return (row_factor * col_var.rsqrt()).mul_(g)
    row_var.lerp_(row_mean, one_minus_beta2)
    col_var.lerp_(col_mean, one_minus_beta2)
    var = row_var @ col_var
    var.div_(sum_over(row_var, -2, info).div_(rows).clamp_(min=eps1))
    return var.clamp_(min=floor).rsqrt_().mul_(g)


def _step_sizes(works: list[torch.Tensor], infos: list[ShardInfo], group: dict[str, Any],
                rhos: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_0 without the muP multiplier, alpha) per tensor, as 1-D tensors."""
    rho = torch.tensor(rhos, dtype=works[0].dtype, device=works[0].device)
    if not group["scale_parameter"]:
        return rho, rho * group["lr_scale"]
    floor = group["eps"][1] * group["eps_scale"]
    alpha0 = _rms(works, infos).clamp_(min=floor) * rho
    return alpha0, alpha0 * group["lr_scale"]


def _decay(works: list[torch.Tensor], alpha0: torch.Tensor, group: dict[str, Any], foreach: bool) -> None:
    """Decoupled weight decay; ``lr_scale * wd_scale`` is 1 under muP (width-invariant decay)."""
    wd = group["weight_decay"] * group["lr_scale"] * group["wd_scale"]
    if wd == 0:
        return
    if group["mode"] == "torch":
        factors = [1.0 - group["lr"] * wd] * len(works)
    else:
        factors = list((1.0 - wd * alpha0).unbind())
    if foreach:
        torch._foreach_mul_(works, factors)
    else:
        for w, f in zip(works, factors):
            w.mul_(f)


def _prepare(tensors: list[dict[str, Any]], group: dict[str, Any]):
    works = [working_copy(t["param"]) for t in tensors]
    grads = [t["grad"].to(state_dtype(t["param"])) for t in tensors]
    if group["maximize"]:
        grads = [-g for g in grads]
    rhos, ombs = [], []
    for t in tensors:
        t["state"]["step"] += 1
        step = float(t["state"]["step"])
        rhos.append(_relative_step(group, step))
        ombs.append(step ** group["beta2_decay"])
    return works, grads, rhos, ombs


def _apply(tensors, works, updates, scales, group, foreach: bool) -> None:
    """``update *= scale`` (alpha over the clip denominator), momentum, then ``p -= update``."""
    if foreach:
        torch._foreach_mul_(updates, list(scales.unbind()))
    else:
        for u, s in zip(updates, scales.unbind()):
            u.mul_(s)
    if group["beta1"] is not None:
        momenta = [t["state"]["exp_avg"] for t in tensors]
        for m, u in zip(momenta, updates):
            m.mul_(group["beta1"]).add_(u, alpha=1.0 - group["beta1"])
        updates = momenta
    if foreach:
        torch._foreach_sub_(works, updates)
    else:
        for w, u in zip(works, updates):
            w.sub_(u)
    for t, w in zip(tensors, works):
        write_back(t["param"], w)


def _single_tensor(tensors: list[dict[str, Any]], group: dict[str, Any]) -> None:
    for t in tensors:
        (work,), (g,), (rho,), (omb,) = _prepare([t], group)
        alpha0, alpha = _step_sizes([work], [t["info"]], group, [rho])
        _decay([work], alpha0, group, foreach=False)
        update = _update_direction(g, t["state"], t["info"], group, omb)
        clip = (_rms([update], [t["info"]]) / group["clip_threshold"]).clamp_(min=1.0)
        _apply([t], [work], [update], alpha / clip, group, foreach=False)


def _multi_tensor(tensors: list[dict[str, Any]], group: dict[str, Any]) -> None:
    works, grads, rhos, ombs = _prepare(tensors, group)
    infos = [t["info"] for t in tensors]
    alpha0, alpha = _step_sizes(works, infos, group, rhos)
    _decay(works, alpha0, group, foreach=True)
    updates = [_update_direction(g, t["state"], t["info"], group, omb)
               for g, t, omb in zip(grads, tensors, ombs)]
    clip = (_rms(updates, infos) / group["clip_threshold"]).clamp_(min=1.0)
    _apply(tensors, works, updates, alpha / clip, group, foreach=True)


__all__ = ["Adafactor", "MODES"]
