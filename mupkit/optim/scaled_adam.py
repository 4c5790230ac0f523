"""ScaledAdam (Yao et al. 2024, "Zipformer: A faster and better encoder for automatic speech
recognition", Sec. 4 and App. A; the algorithm of k2-fsa/icefall ``zipformer/optim.py`` after its
December 2024 refactor), with muP group scales, per-parameter state and sharded statistics.

Per parameter ``P`` with (clipped) gradient ``g`` at its step ``t`` (counted from 0), with
``T = size_update_period``::

    second moment  v <- beta2 v + (1 - beta2) g^2;  v_hat = v / (1 - beta2^(t+1)) while that
                   correction is < 0.99, else v
    direction      u = -lr g / (sqrt(v_hat) + eps)      (lr * scalar_lr_scale for one-element P)
    relative       P with more than one element: u <- u * max(r, param_min_rms), r = RMS(P)
                   measured at the first step and refreshed every T steps (step ~ P's scale)
    size           every T steps, from the buffered s_k = <P, g> of the last T steps:
                   q <- beta2^T q + (1 - beta2^T) mean_k s_k^2,
                   ss = -lr scalar_lr_scale sqrt(1 - beta2^(T n)) sum_k s_k / (sqrt(q) + eps)
                   (n = (t+1)/T); ss = 0 where r < param_min_rms; ss clamped to [-0.1, 0.1]
                   and to at most param_max_rms / r - 1;  u <- u + ss P  (learns log RMS(P))
    momentum       delta <- beta1 delta + (1 - beta1) u;  P <- P + delta;
                   one-element P is then clamped to [-scalar_max, scalar_max]

Gradient clipping (``clipping_scale``; Sec. 4 of the paper): each step the norm
``||g||_scaled = sqrt(sum ||g * r||^2 + sum_one-element ||g * scalar_lr_scale||^2)`` (``r`` from
the last refresh) is recorded; at steps 10, 20, 40 and every ``clipping_update_period`` steps
the threshold becomes ``clipping_scale`` times the median of the recorded norms (twice that at
the early steps); from then on ``g <- g * min(1, threshold / ||g||_scaled)``. A non-finite
norm zeroes the step's gradient (icefall means to, but its ``min(1.0, nan)`` is 1, so a NaN
gradient there flows into the parameters).

How mupkit differs from icefall, on purpose:

* State is per parameter (icefall stacks each same-shape bucket on its first parameter), so a
  ``state_dict`` survives adding, removing or reordering parameters; no per-step stacked copy
  of parameters and gradients is made. A parameter whose ``.grad`` is ``None`` is skipped (as in
  ``torch.optim``); icefall steps it with a zero gradient, which moves it only by momentum.
* muP (family ``adafactor``: the step is relative to ``RMS(P)``, like Adafactor with parameter
  scaling): the group's ``lr_scale`` multiplies the direction step ``u``; the size step is left
  at ``lr * scalar_lr_scale``, since a relative change ``ss P`` of a whole tensor changes its
  output by the same relative amount at every width; ``eps_scale`` (the tensor's init scale
  relative to the base model) multiplies ``param_min_rms`` and ``param_max_rms``, the bounds in
  parameter units. All scales 1 is icefall's algorithm.
* ``clipping_scope="group"`` (default, icefall) keeps one clipping history per param group;
  ``"all"`` one for the whole model, so splitting the model into muP groups does not change
  clipping. Sharded parameters (FSDP2 ``fully_shard``) reduce ``RMS(P)``, ``<P, g>`` and the
  clipping norm over their shards, so every rank makes the same clipping decision.
* A parameter that is all zeros at its first step is named in a warning: its steps are
  ``param_min_rms``-sized, so it stays frozen (a zero-initialized readout, say).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable

import torch

from ..rules import FAMILIES
from . import kernels
from .master import MasterWeights
from .scaled import ScaledGroups
from .sharding import all_sum, global_rms, local_tensor, shard_info, state_like
from .tensors import KeepsStateDtypes, default_foreach, foreach_scalar, state_dtype, working_copy, write_back

CLIPPING_SCOPES = ("group", "all")

#: the early steps at which the clipping threshold is first set, from fewer recorded norms
EARLY_CLIPPING_STEPS = (10, 20, 40)


def named_groups(params: Iterable[Any]) -> list[Any]:
    """Accept icefall's inputs too: ``(name, tensor)`` pairs and groups with ``named_params``;
    names go to ``param_names`` (used in warnings)."""
    params = list(params)
    if params and isinstance(params[0], tuple):
        params = [{"named_params": params}]
    out = []
    for group in params:
        if isinstance(group, dict) and "named_params" in group:
            group = dict(group)
            names, tensors = zip(*group.pop("named_params")) if group["named_params"] else ((), ())
            group["params"], group["param_names"] = list(tensors), list(names)
        out.append(group)
    return out


class ScaledAdam(MasterWeights, KeepsStateDtypes, ScaledGroups, torch.optim.Optimizer):
    """ScaledAdam with muP group scales (icefall's arguments and defaults, plus
    ``clipping_scope`` and ``foreach``; see the module docstring). ``fused=True``: the Triton
    kernels (CUDA); by default (``fused`` and ``foreach`` not given) on CUDA
    (:func:`.kernels.fused_by_default`), except under ``torch.use_deterministic_algorithms``,
    since their per-tensor sums are atomic adds."""

    family = FAMILIES["adafactor"]
    #: arguments under which a zero-initialized tensor trains: an RMS floor like Adafactor's eps2
    #: (scaled per tensor by its muP init scale, so a zero-init muP readout steps like Adam's)
    zero_init_kwargs = {"param_min_rms": 1.0e-3}

    def __init__(self, params, lr: float = 3e-2, clipping_scale: float | None = None,
                 betas: tuple[float, float] = (0.9, 0.98), scalar_lr_scale: float = 0.1, eps: float = 1.0e-8,
                 param_min_rms: float = 1.0e-5, param_max_rms: float = 3.0, scalar_max: float = 10.0,
                 size_update_period: int = 4, clipping_update_period: int = 100, *,
                 clipping_scope: str = "group", foreach: bool | None = None, fused: bool | None = None,
                 master_weights: bool = False):
        if not lr >= 0:
            raise ValueError(f"lr={lr} must be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas={betas} must lie in [0, 1)")
        if clipping_scale is not None and not clipping_scale > 0:
            raise ValueError(f"clipping_scale={clipping_scale} must be > 0 (or None for no clipping)")
        if not 0 < param_min_rms < param_max_rms:
            raise ValueError(f"need 0 < param_min_rms < param_max_rms, got {param_min_rms}, {param_max_rms}")
        if size_update_period < 1 or clipping_update_period < 1:
            raise ValueError(f"size_update_period={size_update_period} and clipping_update_period="
                             f"{clipping_update_period} must be >= 1")
        if foreach and fused:
            raise ValueError("choose one of foreach=True and fused=True")
        if clipping_scope not in CLIPPING_SCOPES:
            raise ValueError(f"clipping_scope={clipping_scope!r}; use one of {CLIPPING_SCOPES}")
        defaults = dict(lr=lr, clipping_scale=clipping_scale, betas=tuple(betas), scalar_lr_scale=scalar_lr_scale,
                        eps=eps, param_min_rms=param_min_rms, param_max_rms=param_max_rms, scalar_max=scalar_max,
                        size_update_period=size_update_period, clipping_update_period=clipping_update_period,
                        foreach=foreach, fused=fused)
        self.clipping_scope = clipping_scope
        self._warned_zero = False
        super().__init__(named_groups(params), defaults, master_weights=master_weights)

    def __getstate__(self):  # torch's keeps defaults, state and groups only
        return {**super().__getstate__(), "clipping_scope": self.clipping_scope}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_warned_zero", True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._loss(closure)
        with self._master_weights(), kernels.fused_defaults(self, deterministic=False):
            live = [(group, self._gather(group)) for group in self.param_groups]
            live = [(group, items) for group, items in live if items]
            if self.clipping_scope == "all":
                scopes = [live] if live else []
            else:
                scopes = [[entry] for entry in live]
            for scope in scopes:
                factor = self._clipping_factor(scope)
                for group, items in scope:
                    self._update(group, items, factor)
        return loss

    def _gather(self, group: dict[str, Any]) -> list[dict[str, Any]]:
        """The group's parameters with a gradient: local shard, gradient, state and layout."""
        names = group.get("param_names")
        items, fresh = [], []
        for index, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            name = names[index] if names else f"#{index} of its group"
            if p.grad.is_sparse:
                raise RuntimeError(f"ScaledAdam got a sparse gradient for parameter {name} of shape "
                                   f"{tuple(p.shape)}; it needs dense gradients (e.g. nn.Embedding(sparse=False)).")
            info = shard_info(name, p)
            state = self.state[p]
            local = local_tensor(p)
            if not state:
                dtype = state_dtype(p)
                state["step"] = 0
                state["exp_avg_sq"] = state_like(torch.zeros_like(local, dtype=dtype), p, info, tuple(p.shape))
                state["delta"] = state_like(torch.zeros_like(local, dtype=dtype), p, info, tuple(p.shape))
                fresh.append(len(items))
            items.append({"param": local, "grad": local_tensor(p.grad), "name": name, "info": info,
                          "state": state, "scalar": info.numel == 1, "exp_avg_sq": local_tensor(state["exp_avg_sq"]),
                          "delta": local_tensor(state["delta"])})  # rank-local views of sharded state
        if fresh:
            self._init_sizes(group, [items[k] for k in fresh])
        return items

    def _init_sizes(self, group: dict[str, Any], items: list[dict[str, Any]]) -> None:
        """First step of these parameters: measure ``RMS(P)``; warn about all-zero tensors."""
        sized = [it for it in items if not it["scalar"]]
        if not sized:
            return
        rms = global_rms([working_copy(it["param"]) for it in sized], [it["info"] for it in sized])
        for it, r in zip(sized, rms.unbind()):
            it["state"]["param_rms"] = r.clone()
            it["state"]["scale_exp_avg_sq"] = torch.zeros_like(r)
            it["state"]["scale_grads"] = r.new_zeros(group["size_update_period"])
        zero = [f"{it['name']} {tuple(it['info'].shape)}" for it, r in zip(sized, rms.tolist()) if r == 0.0]
        if zero and not self._warned_zero:
            self._warned_zero = True
            floor = group["param_min_rms"]
            warnings.warn(f"ScaledAdam: parameter(s) {', '.join(zero)} are all zeros at their first step. ScaledAdam's "
                          f"steps are proportional to a tensor's RMS (at least param_min_rms={floor}), "
                          f"so these stay (nearly) frozen. Initialize them with a small nonzero scale (icefall "
                          f"uses U(-0.1, 0.1) * initial_scale for biases), or raise param_min_rms (e.g. 1e-3, "
                          f"Adafactor's floor; mupkit scales it with each tensor's muP init scale).",
                          stacklevel=2)

    # ---------------------------------------------------------------- clipping

    def _clipping_holder(self, scope: list[tuple[dict[str, Any], list]]) -> dict[str, Any] | None:
        """The state dict holding the clipping history: that of the scope's first parameter."""
        group = scope[0][0]
        if group["clipping_scale"] is None:
            return None
        return self.state[group["params"][0]]

    def _clipping_factor(self, scope: list[tuple[dict[str, Any], list]]) -> float:
        """``min(1, threshold / ||g||_scaled)`` for the scope (1 until a threshold exists; 0 for a
        non-finite norm). One host sync per step, only when clipping is on."""
        holder = self._clipping_holder(scope)
        if holder is None:
            return 1.0
        group = scope[0][0]
        clip_step = holder.get("clip_step", 0)
        holder["clip_step"] = clip_step + 1
        if clip_step == 0:
            return 1.0
        items = [it for _, group_items in scope for it in group_items]
        sumsq = torch.stack(torch._foreach_norm([it["grad"] for it in items], ord=2)).to(torch.float64).square()
        sumsq = all_sum(sumsq, [it["info"] for it in items])
        # squared weights: scalar_lr_scale^2 for one-element tensors, RMS(P)^2 (last refresh) for the others
        scalar_weights = [g["scalar_lr_scale"] ** 2 if it["scalar"] else 0.0 for g, group_items in scope
                          for it in group_items]
        weights = torch.tensor(scalar_weights, dtype=torch.float64).to(sumsq.device, non_blocking=True)
        sized = [k for k, it in enumerate(items) if not it["scalar"]]
        if sized:
            rms = torch.stack([items[k]["state"]["param_rms"] for k in sized]).to(torch.float64)
            weights[torch.tensor(sized, device=sumsq.device)] = rms.square()
        norm = float((sumsq * weights).sum().sqrt())
        period = group["clipping_update_period"]
        norms = holder.setdefault("clip_norms", torch.zeros(period, dtype=torch.float64))
        norms[clip_step % period] = norm
        early = clip_step in EARLY_CLIPPING_STEPS and clip_step < period
        if clip_step % period == 0 or early:
            recorded = norms.sort().values
            if early:
                recorded = recorded[-clip_step:]
            count = len(recorded)
            median = float(recorded[min(count - 1, (count // 4) * 2)])
            if not math.isfinite(median):
                raise RuntimeError(f"ScaledAdam clipping: too many gradients were not finite (the median recorded "
                                   f"gradient norm is {median}); lower the lr or check the loss for inf/NaN.")
            holder["clip_threshold"] = group["clipping_scale"] * median * (2.0 if early else 1.0)
            holder["clip_count"] = 0
        threshold = holder.get("clip_threshold")
        if threshold is None:
            return 1.0
        factor = min(1.0, threshold / (norm + 1.0e-20)) if math.isfinite(norm) else 0.0
        if factor < 1.0:
            holder["clip_count"] = holder.get("clip_count", 0) + 1
        return factor

    # ---------------------------------------------------------------- the step

    def _update(self, group: dict[str, Any], items: list[dict[str, Any]], factor: float) -> None:
        foreach = group["foreach"]
        if foreach is None:
            foreach = default_foreach([it["param"] for it in items])
        if not (group["fused"] or foreach):
            for it in items:
                _step([it], group, factor)
            return
        buckets: dict[tuple, list[dict[str, Any]]] = {}
        for it in items:
            buckets.setdefault((it["param"].device, it["param"].dtype), []).append(it)
        for bucket in buckets.values():
            (_fused_step if group["fused"] else _step)(bucket, group, factor)


def _step(items: list[dict[str, Any]], group: dict[str, Any], factor: float) -> None:
    """One ScaledAdam step for parallel lists (a list of one is the single-tensor path)."""
    beta1, beta2 = group["betas"]
    eps = group["eps"]
    period = group["size_update_period"]
    params = [it["param"] for it in items]
    works = [working_copy(p) for p in params]
    states = [it["state"] for it in items]
    grads = [it["grad"].to(w.dtype) for it, w in zip(items, works)]
    if factor != 1.0:
        grads = [g * factor for g in grads] if factor > 0.0 else [torch.zeros_like(g) for g in grads]
    steps = [s["step"] for s in states]

    sized = [k for k, it in enumerate(items) if not it["scalar"]]
    if sized:  # <P, g> for the size step; RMS(P) where a refresh is due (one reduction for all)
        dots = torch.stack([torch.dot(works[k].flatten(), grads[k].flatten()) for k in sized])
        dots = all_sum(dots, [items[k]["info"] for k in sized])
        due = [k for k in sized if steps[k] % period == period - 1]
        fresh = {}
        if due:
            fresh = dict(zip(due, global_rms([works[k] for k in due], [items[k]["info"] for k in due]).unbind()))
        _record_sizes(states, steps, dict(zip(sized, dots.unbind())), fresh, period)

    vs = [it["exp_avg_sq"] for it in items]
    torch._foreach_mul_(vs, foreach_scalar(beta2, vs))
    torch._foreach_addcmul_(vs, grads, grads, value=1.0 - beta2)
    denoms = torch._foreach_div(vs, [_second_moment_correction(beta2, t) for t in steps])
    torch._foreach_sqrt_(denoms)
    torch._foreach_add_(denoms, foreach_scalar(eps, denoms))
    updates = torch._foreach_div(grads, denoms)
    torch._foreach_mul_(updates, [_direction_step_size(group, it["scalar"]) for it in items])
    if sized:
        factors = _size_factors(states, sized, steps, group)
        torch._foreach_mul_([updates[k] for k in sized], [factors[k][0] for k in sized])
        for k in sized:
            if factors[k][1] is not None:
                updates[k].add_(works[k] * factors[k][1])
    deltas = [it["delta"] for it in items]
    torch._foreach_mul_(deltas, foreach_scalar(beta1, deltas))
    torch._foreach_add_(deltas, updates, alpha=1.0 - beta1)
    torch._foreach_add_(works, deltas)
    for k, it in enumerate(items):
        if it["scalar"]:
            works[k].clamp_(-group["scalar_max"], group["scalar_max"])
        states[k]["step"] += 1
    for p, w in zip(params, works):
        write_back(p, w)


def _record_sizes(states: list[dict[str, Any]], steps: list[int], dots: dict[int, torch.Tensor],
                  fresh: dict[int, torch.Tensor], period: int) -> None:
    """Buffer each sized tensor's ``<P, g>`` and refresh ``RMS(P)`` where it is due (two
    multi-tensor copies, not one small op per tensor)."""
    if dots:
        torch._foreach_copy_([states[k]["scale_grads"][steps[k] % period] for k in dots], list(dots.values()))
    if fresh:
        torch._foreach_copy_([states[k]["param_rms"] for k in fresh], list(fresh.values()))


def _size_factors(states: list[dict[str, Any]], sized: list[int], steps: list[int],
                  group: dict[str, Any]) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """Per sized tensor: ``max(RMS(P), param_min_rms)`` and the size step ``ss`` (None unless due);
    a fixed number of ops for all tensors (:func:`_size_steps`)."""
    period = group["size_update_period"]
    min_rms = group["param_min_rms"] * group["eps_scale"]
    max_rms = group["param_max_rms"] * group["eps_scale"]
    floors = torch._foreach_clamp_min([states[k]["param_rms"] for k in sized], min_rms)
    due = [k for k in sized if steps[k] % period == period - 1 and steps[k] > 0]
    size_steps = dict(zip(due, _size_steps([states[k] for k in due], group, [steps[k] for k in due], min_rms,
                                           max_rms).unbind())) if due else {}
    return {k: (floor, size_steps.get(k)) for k, floor in zip(sized, floors)}


def _second_moment_correction(beta2: float, t: int) -> float:
    """What ``v`` is divided by at step ``t``: ``1 - beta2^(t+1)`` while that is < 0.99, then 1."""
    correction = 1.0 - beta2 ** (t + 1)
    return correction if correction < 0.99 else 1.0


def _direction_step_size(group: dict[str, Any], scalar: bool) -> float:
    """``-lr lr_scale`` (times ``scalar_lr_scale`` for a one-element tensor)."""
    return -group["lr"] * group["lr_scale"] * (group["scalar_lr_scale"] if scalar else 1.0)


def _fused_step(items: list[dict[str, Any]], group: dict[str, Any], factor: float) -> None:
    """One ScaledAdam step of tensors sharing a device and dtype as two Triton launches (see
    :mod:`.kernels.scaled_adam`); the size bookkeeping between them stays on the device."""
    from .kernels import scaled_adam as launchers
    params = [it["param"] for it in items]
    kernels.check_fused("ScaledAdam", params, deterministic=False)
    for it in items:
        if it["info"].dim is not None:
            raise ValueError(f"ScaledAdam(fused=True) runs on whole tensors, but parameter {it['name']} (shape "
                             f"{tuple(it['info'].shape)}) is sharded; use fused=False, which reduces over the shards.")
    beta1, beta2 = group["betas"]
    period = group["size_update_period"]
    grads = [it["grad"] for it in items]
    if factor == 0.0:  # a non-finite gradient norm: the step sees zero gradients
        grads = [torch.zeros_like(g) for g in grads]
    states, steps = [it["state"] for it in items], [it["state"]["step"] for it in items]
    sums = launchers.stats(params, grads)
    sized = [k for k, it in enumerate(items) if not it["scalar"]]
    numel = torch.tensor([p.numel() for p in params], dtype=torch.float32, device=sums.device)
    rms = (sums[:, 1] / numel).sqrt()
    dots = sums[:, 0] * factor
    fresh = {k: rms[k] for k in sized if steps[k] % period == period - 1}
    _record_sizes(states, steps, {k: dots[k] for k in sized}, fresh, period)
    factors = _size_factors(states, sized, steps, group)
    sizes = torch.zeros(len(items), 2, device=sums.device)  # per tensor: (max(RMS, floor), ss); 1 and 0 if unsized
    sizes[:, 0] = 1.0
    if sized:
        sizes[torch.tensor(sized, device=sums.device), 0] = torch.stack([factors[k][0] for k in sized]).float()
        due = [k for k in sized if factors[k][1] is not None]
        if due:
            sizes[torch.tensor(due, device=sums.device), 1] = torch.stack([factors[k][1] for k in due]).float()
    rows = [(factor, beta2, 1.0 - beta2, _second_moment_correction(beta2, t), group["eps"],
             _direction_step_size(group, it["scalar"]), beta1, 1.0 if it["scalar"] else 0.0, group["scalar_max"])
            for it, t in zip(items, steps)]
    launchers.update(params, grads, [it["exp_avg_sq"] for it in items], [it["delta"] for it in items], rows, sizes)
    for state in states:
        state["step"] += 1


def _size_steps(states: list[dict[str, Any]], group: dict[str, Any], steps: list[int], min_rms: float,
                max_rms: float) -> torch.Tensor:
    """``ss`` of each tensor at its size-update step ``t``: the relative change of its scale, for
    all of them at once (their buffers stacked; one copy writes the new ``q`` back)."""
    beta2, eps = group["betas"][1], group["eps"]
    period = group["size_update_period"]
    beta2_period = beta2 ** period
    buffered = torch.stack([state["scale_grads"] for state in states])
    q = torch.stack([state["scale_exp_avg_sq"] for state in states])
    q.mul_(beta2_period).add_((buffered * buffered).mean(1), alpha=1.0 - beta2_period)
    torch._foreach_copy_([state["scale_exp_avg_sq"] for state in states], list(q.unbind()))
    step_size = [-group["lr"] * group["scalar_lr_scale"] * math.sqrt(1.0 - beta2_period ** ((t + 1) // period))
                 for t in steps]
    rms = torch.stack([state["param_rms"] for state in states])
    ss = buffered.sum(1) * torch.tensor(step_size, dtype=q.dtype).to(q.device, non_blocking=True) / (q.sqrt() + eps)
    ss = torch.where(rms < min_rms, torch.zeros_like(ss), ss).clamp(-0.1, 0.1)
    return torch.minimum(ss, (max_rms - rms) / rms)


__all__ = ["CLIPPING_SCOPES", "ScaledAdam", "named_groups"]
