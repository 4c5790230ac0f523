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

Everything per tensor stays on the parameters' device: the clipping norm, history, threshold,
factor and count, ``RMS(P)``, the buffered ``<P, g>`` and ``ss``, each a few multi-tensor ops per
param group. The host keeps only the step counters (Python ints, so which steps refresh what is
known without reading the device); it reads a device value at a threshold refresh (to refuse a
non-finite median) and at a parameter's first step (to warn about an all-zero tensor).

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
* ``<P, g>`` is summed from the unclipped gradient and multiplied by the clipping factor.
* A parameter that is all zeros at its first step is named in a warning: its steps are
  ``param_min_rms``-sized, so it stays frozen (a zero-initialized readout, say).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from ..rules import FAMILIES
from . import dispatch, ops
from .base import Optimizer
from .sharding import ShardInfo, all_sum, global_rms, local_tensor, shard_info, state_like
from .stacked import Stack
from .tensors import by_device_and_dtype, state_dtype

CLIPPING_SCOPES = ("group", "all")

#: the per-tensor state of a sized tensor besides its moments (made at its first step)
SCALE_KEYS = ("param_rms", "scale_exp_avg_sq", "scale_grads")

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


@dataclass
class Bucket:
    """Tensors of one (effective) param group with a gradient that share their step count and
    kind: ``sized`` (more than one element: relative steps and a learned scale) or one-element."""

    group: dict[str, Any]
    step: int
    sized: bool
    params: list[torch.Tensor] = field(default_factory=list)  # rank-local
    grads: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sqs: list[torch.Tensor] = field(default_factory=list)
    deltas: list[torch.Tensor] = field(default_factory=list)
    states: list[dict[str, Any]] = field(default_factory=list)
    infos: list[ShardInfo] = field(default_factory=list)
    #: the ``"stacked"`` path's stacks (:mod:`.stacked`): then ``params``, ``grads``,
    #: ``exp_avg_sqs`` and ``deltas`` hold one stack each, ``states`` and ``infos`` their members
    stacks: list[Stack] | None = None

    def per_tensor(self, key: str) -> torch.Tensor:
        """The members' state ``key`` (a 0-dim or 1-D tensor each) stacked: ``(n, ...)``."""
        if self.stacks:
            return torch.cat([stack.state[SCALE_KEYS.index(key) + 2] for stack in self.stacks])
        return torch.stack([state[key] for state in self.states])

    def set_per_tensor(self, key: str, values: torch.Tensor) -> None:
        """Store :meth:`per_tensor`'s ``values`` (``(n, ...)``) back into the members' state ``key``."""
        if self.stacks:
            parts = values.split([len(stack.params) for stack in self.stacks])
            for stack, part in zip(self.stacks, parts):
                stack.state[SCALE_KEYS.index(key) + 2].copy_(part)
            return
        torch._foreach_copy_([state[key] for state in self.states], list(values.unbind()))

    @property
    def size_update(self) -> bool:
        """``RMS(P)`` is refreshed at this step (and, after the first period, ``ss`` taken)."""
        period = self.group["size_update_period"]
        return self.sized and self.step % period == period - 1


@dataclass
class Sums:
    """A bucket's per-tensor statistics that precede its update (1-D device tensors or None):
    ``grad_sq`` ``||g||^2`` (clipping), ``dots`` ``<P, g>``, ``rms`` ``RMS(P)`` (refresh steps)."""

    grad_sq: torch.Tensor | None = None
    dots: torch.Tensor | None = None
    rms: torch.Tensor | None = None


class ScaledAdam(Optimizer):
    """ScaledAdam with muP group scales (icefall's arguments and defaults, plus
    ``clipping_scope``; see the module docstring). ``foreach``/``fused``: the implementation
    (default: :mod:`.dispatch`); ``fused=True`` runs the Triton kernels (CUDA), whose per-tensor
    sums are atomic adds, so they are not the default under ``torch.use_deterministic_algorithms``."""

    family = FAMILIES["adafactor"]
    kernels = dispatch.Kernels(deterministic=False, stacked=True)
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

    def _effective_group(self, group: dict[str, Any], path: str) -> dict[str, Any]:
        """The base's, except: ``eps_scale`` scales the RMS bounds (parameter units), not ``eps``;
        the size step keeps ``lr * scalar_lr_scale`` (no ``lr_scale``); ``"clip_scope"`` names the
        clipping history (groups of different scopes are never merged)."""
        effective = super()._effective_group(group, path)
        effective.update(eps=group["eps"], param_min_rms=group["param_min_rms"] * group["eps_scale"],
                         param_max_rms=group["param_max_rms"] * group["eps_scale"],
                         size_lr=group["lr"] * group["scalar_lr_scale"],
                         clip_scope=id(group) if self.clipping_scope == "group" else 0)
        return effective

    def _update(self, groups: list[dict[str, Any]]) -> None:
        scopes: dict[int, list[dict[str, Any]]] = {}
        for group in groups:
            scopes.setdefault(group["clip_scope"], []).append(group)
        holders = {id(g): g["params"][0] for g in self.param_groups}
        first = self.param_groups[0]["params"][0]
        for key, scope in scopes.items():
            buckets = [self._stacked(b) if b.group["path"] == "stacked" else b
                       for group in scope for b in self._gather(group)]
            if not buckets:
                continue
            holder = None if scope[0]["clipping_scale"] is None else self.state[holders.get(key, first)]
            clipping = holder is not None and holder.setdefault("clip_step", 0) > 0
            fused = [b for b in buckets if b.group["path"] == "fused"]
            eager = [b for b in buckets if b.group["path"] != "fused"]
            if fused:
                dispatch.check_fused(type(self).__name__, [p for b in fused for p in b.params], self.kernels)
            eager_sums = [_eager_sums(b, clipping) for b in eager]
            fused_sums = _fused_sums(fused, clipping) if fused else []
            factor = None
            if holder is not None:
                factor = _clipping_factor(holder, scope[0], eager + fused, eager_sums + fused_sums)
            for bucket, sums in zip(eager, eager_sums):
                _eager_step(bucket, sums, factor)
            if fused:
                _fused_step(fused, fused_sums, factor)
            for bucket in buckets:
                for stack in bucket.stacks or ():
                    stack.write_back()
                for state in bucket.states:
                    state["step"] += 1

    def _stacked(self, bucket: Bucket) -> Bucket:
        """``bucket`` as stacks of its same-shape tensors (:mod:`.stacked`), members in stack order."""
        scales = [[state[key] for state in bucket.states] for key in SCALE_KEYS] if bucket.sized else []
        stacks = self._stacks(bucket.params, bucket.grads, [bucket.exp_avg_sqs, bucket.deltas, *scales])
        order = [i for stack in stacks for i in stack.members]
        return Bucket(bucket.group, bucket.step, bucket.sized, [s.param for s in stacks], [s.grad for s in stacks],
                      [s.state[0] for s in stacks], [s.state[1] for s in stacks], [bucket.states[i] for i in order],
                      [bucket.infos[i] for i in order], stacks)

    def _gather(self, group: dict[str, Any]) -> list[Bucket]:
        """The group's parameters with a gradient, by (step, sized); state made at a first step."""
        names = group.get("param_names")
        buckets: dict[tuple[int, bool], Bucket] = {}
        fresh: list[tuple[str, Bucket, int]] = []
        whole: dict[torch.Size, ShardInfo] = {}  # one layout per shape of the unsharded tensors
        for index, p in enumerate(group["params"]):
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                name = names[index] if names else f"#{index} of its group"
                raise RuntimeError(f"ScaledAdam got a sparse gradient for parameter {name} of shape "
                                   f"{tuple(p.shape)}; it needs dense gradients (e.g. nn.Embedding(sparse=False)).")
            state = self.state[p]
            plain = dispatch.plain_dense(p)
            if plain:
                info = whole.get(p.shape) or whole.setdefault(p.shape, ShardInfo(p.shape, None))
            else:
                info = shard_info(names[index] if names else f"#{index} of its group", p)
            if not state:
                state["step"] = 0
                state["exp_avg_sq"] = state_like(torch.zeros_like(local_tensor(p), dtype=state_dtype(p)), p, info,
                                                 tuple(p.shape))
                state["delta"] = state_like(torch.zeros_like(local_tensor(p), dtype=state_dtype(p)), p, info,
                                            tuple(p.shape))
            sized = (p.numel() if plain else info.numel) > 1
            bucket = buckets.get((state["step"], sized))
            if bucket is None:
                bucket = buckets[(state["step"], sized)] = Bucket(group, state["step"], sized)
            if sized and "param_rms" not in state:
                fresh.append((names[index] if names else f"#{index} of its group", bucket, len(bucket.params)))
            local = _itself if plain else local_tensor
            bucket.params.append(local(p))
            bucket.grads.append(local(grad))
            bucket.exp_avg_sqs.append(local(state["exp_avg_sq"]))
            bucket.deltas.append(local(state["delta"]))
            bucket.states.append(state)
            bucket.infos.append(info)
        if fresh:
            self._init_sizes(group, fresh)
        return list(buckets.values())

    def _init_sizes(self, group: dict[str, Any], fresh: list[tuple[str, Bucket, int]]) -> None:
        """First step of these sized parameters: measure ``RMS(P)``; warn about all-zero tensors
        (one host read, at their first step only)."""
        works = [ops.to_dtype(b.params[k], torch.float32) for _, b, k in fresh]
        rms = global_rms(works, [b.infos[k] for _, b, k in fresh])
        period = group["size_update_period"]
        for (_, bucket, k), r in zip(fresh, rms.unbind()):
            state = bucket.states[k]
            state["param_rms"] = r.clone()
            state["scale_exp_avg_sq"] = torch.zeros_like(r)
            state["scale_grads"] = r.new_zeros(period)
        zero = [f"{name} {tuple(b.infos[k].shape)}" for (name, b, k), r in zip(fresh, rms.tolist()) if r == 0.0]
        if zero and not self._warned_zero:
            self._warned_zero = True
            warnings.warn(f"ScaledAdam: parameter(s) {', '.join(zero)} are all zeros at their first step. ScaledAdam's "
                          f"steps are proportional to a tensor's RMS (at least param_min_rms={group['param_min_rms']}),"
                          f" so these stay (nearly) frozen. Initialize them with a small nonzero scale (icefall "
                          f"uses U(-0.1, 0.1) * initial_scale for biases), or raise param_min_rms (e.g. 1e-3, "
                          f"Adafactor's floor; mupkit scales it with each tensor's muP init scale).",
                          stacklevel=3)


def _itself(t: torch.Tensor) -> torch.Tensor:
    return t


# ------------------------------------------------------------------------------ clipping

def _clipping_factor(holder: dict[str, Any], group: dict[str, Any], buckets: list[Bucket],
                     sums: list[Sums]) -> torch.Tensor | None:
    """``min(1, threshold / ||g||_scaled)`` of the scope as a 0-dim device tensor (None until a
    threshold exists; 0 for a non-finite norm); records the norm, refreshes the threshold when due."""
    clip_step = holder["clip_step"]
    holder["clip_step"] = clip_step + 1
    if clip_step == 0:
        return None
    norm = _scaled_norm(buckets, sums)
    period = group["clipping_update_period"]
    norms = holder.get("clip_norms")
    if norms is None:
        norms = holder["clip_norms"] = norm.new_zeros(period)
    norms[clip_step % period] = norm
    early = clip_step in EARLY_CLIPPING_STEPS and clip_step < period
    if clip_step % period == 0 or early:
        recorded = norms.sort().values
        if early:
            recorded = recorded[-clip_step:]
        median = recorded[min(len(recorded) - 1, (len(recorded) // 4) * 2)]
        if not torch.isfinite(median):  # a host read, at threshold refreshes only
            raise RuntimeError(f"ScaledAdam clipping: too many gradients were not finite (the median recorded "
                               f"gradient norm is {float(median)}); lower the lr or check the loss for inf/NaN.")
        holder["clip_threshold"] = median * (group["clipping_scale"] * (2.0 if early else 1.0))
        holder["clip_count"] = torch.zeros((), dtype=torch.int64, device=norm.device)
    threshold = holder.get("clip_threshold")
    if threshold is None:
        return None
    factor = torch.where(torch.isfinite(norm), (threshold / (norm + 1.0e-20)).clamp(max=1.0), 0.0)
    holder["clip_count"] += factor < 1.0
    return factor


def _scaled_norm(buckets: list[Bucket], sums: list[Sums]) -> torch.Tensor:
    """``||g||_scaled``: each tensor's ``||g||^2`` weighted by ``RMS(P)^2`` (last refresh) or, for
    one element, ``scalar_lr_scale^2``; one stack of the scalars and a sum per bucket."""
    total = None
    for bucket, s in zip(buckets, sums):
        if bucket.sized:
            rms = bucket.per_tensor("param_rms").to(s.grad_sq.dtype)
            part = (s.grad_sq * rms.square()).sum()
        else:
            part = s.grad_sq.sum() * bucket.group["scalar_lr_scale"] ** 2
        total = part if total is None else total + part
    return total.float().sqrt()


# ------------------------------------------------------------------------------ the update

def scaled_adam_update(p: ops.Tensors, g: ops.Tensors, v: ops.Tensors, delta: ops.Tensors,
                       grad_scale: torch.Tensor | None, beta2: float, correction: float, eps: float,
                       step_size: float, beta1: float, bound: float | None, size: ops.Scalars | ops.Tensors,
                       size_step: ops.Tensors | None) -> None:
    """One ScaledAdam step of a parameter (or, on lists, of each), in place.

    ``g <- g grad_scale`` (the clipping factor, a 0-dim tensor; None: 1);
    ``v <- beta2 v + (1 - beta2) g^2``; ``u = step_size g / (sqrt(v / correction) + eps) size
    (+ size_step p)``; ``delta <- beta1 delta + (1 - beta1) u``; ``p <- p + delta``, clamped to
    ``+-bound`` (one-element tensors). ``size``: ``max(RMS(P), floor)`` (a 0-dim tensor per
    tensor; 1 for one element), ``size_step``: ``ss`` (0-dim tensors) on size-update steps."""
    dtype = (v[0] if ops.is_list(v) else v).dtype
    work, g = ops.to_dtype(p, dtype), ops.to_dtype(g, dtype)
    if grad_scale is not None:
        g = _finite_or_zero_(ops.mul(g, grad_scale))
    ops.mul_(v, beta2)
    ops.addcmul_(v, g, g, 1.0 - beta2)
    denom = ops.add_scalar_(ops.sqrt_(ops.div(v, correction)), eps)
    u = ops.mul_(ops.div(g, denom), step_size)
    ops.mul_(u, size)
    if size_step is not None:
        ops.add_(u, ops.mul(work, size_step))
    ops.mul_(delta, beta1)
    ops.add_(delta, u, alpha=1.0 - beta1)
    ops.add_(work, delta)
    if bound is not None:
        ops.clamp_(work, bound)
    ops.write_back(p, work)


def _finite_or_zero_(g: ops.Tensors) -> ops.Tensors:
    """Non-finite entries of the clipped gradient set to 0: they occur only where the clipping
    factor is 0 (a non-finite norm, so ``g * 0`` holds NaN), and then the whole gradient is 0 (no
    foreach kernel: a list runs tensor by tensor, on clipped steps only)."""
    for t in g if ops.is_list(g) else [g]:
        t.nan_to_num_(0.0, 0.0, 0.0)
    return g


def _second_moment_correction(beta2: float, t: int) -> float:
    """What ``v`` is divided by at step ``t``: ``1 - beta2^(t+1)`` while that is < 0.99, then 1."""
    correction = 1.0 - beta2 ** (t + 1)
    return correction if correction < 0.99 else 1.0


def _values(bucket: Bucket) -> tuple[float, float, float, float, float, float | None]:
    """:func:`scaled_adam_update`'s host values for the bucket: ``beta2, correction, eps,
    step_size, beta1, bound``."""
    group = bucket.group
    beta1, beta2 = group["betas"]
    step_size = -group["lr"] * (1.0 if bucket.sized else group["scalar_lr_scale"])
    return (beta2, _second_moment_correction(beta2, bucket.step), group["eps"], step_size, beta1,
            None if bucket.sized else group["scalar_max"])


def _eager_sums(bucket: Bucket, clipping: bool) -> Sums:
    """The statistics of an eager bucket: ``||g||^2`` with clipping; for sized tensors ``<P, g>``
    and, on refresh steps, ``RMS(P)`` (each reduced over the shards of sharded tensors)."""
    sums = Sums()
    dtype = bucket.exp_avg_sqs[0].dtype
    grads = ops.to_dtype(bucket.grads, dtype)
    if bucket.stacks:  # whole CPU tensors, a row per member
        if clipping:
            sums.grad_sq = torch.cat([g.flatten(1).square().sum(1) for g in grads])
        if bucket.sized:
            works = ops.to_dtype(bucket.params, dtype)
            sums.dots = torch.cat([(w * g).flatten(1).sum(1) for w, g in zip(works, grads)])
            if bucket.size_update:
                sums.rms = torch.cat([w.flatten(1).square().mean(1) for w in works]).sqrt()
        return sums
    if clipping:
        sums.grad_sq = all_sum(ops.norms(grads).square(), bucket.infos)
    if bucket.sized:
        works = ops.to_dtype(bucket.params, dtype)
        sums.dots = all_sum(torch.stack([torch.dot(w.reshape(-1), g.reshape(-1)) for w, g in zip(works, grads)]),
                            bucket.infos)
        if bucket.size_update:
            sums.rms = global_rms(works, bucket.infos)
    return sums


def _eager_step(bucket: Bucket, sums: Sums, factor: torch.Tensor | None) -> None:
    """The bucket's sizes, then :func:`scaled_adam_update` over it: one call on lists
    (``"foreach"``, per device and dtype) or one per tensor (``"single"``)."""
    n = len(bucket.params)
    sizes, steps = None, None
    if bucket.sized:
        _record_dots(bucket, sums.dots, factor)
        sizes, steps = _sizes(bucket, sums.rms)
    values = _values(bucket)
    if bucket.stacks:  # one call per stack, each member's values in a row
        size = [1.0] * n if sizes is None else _rows(sizes, bucket.stacks)
        size_step = [None] * n if steps is None else _rows(steps, bucket.stacks)
        for stack, size, steps in zip(bucket.stacks, size, size_step):
            scaled_adam_update(stack.param, stack.grad, stack.state[0], stack.state[1], factor, *values, size, steps)
        return
    size = [1.0] * n if sizes is None else list(sizes.unbind())
    size_step = None if steps is None else list(steps.unbind())
    columns = (bucket.params, bucket.grads, bucket.exp_avg_sqs, bucket.deltas, size, size_step or [None] * n)
    if bucket.group["path"] == "foreach":
        for ps, gs, vs, ds, size, steps in by_device_and_dtype(*columns):
            scaled_adam_update(ps, gs, vs, ds, factor, *values, size if bucket.sized else 1.0,
                               steps if size_step else None)
        return
    for p, g, v, d, size, steps in zip(*columns):
        scaled_adam_update(p, g, v, d, factor, *values, size, steps)


def _rows(values: torch.Tensor, stacks: list[Stack]) -> list[torch.Tensor]:
    """One value per member (1-D, in stack order) as a ``(n, 1, ..., 1)`` tensor per stack."""
    parts = values.split([len(stack.params) for stack in stacks])
    return [part.view(stack.row_shape) for part, stack in zip(parts, stacks)]


def _record_dots(bucket: Bucket, dots: torch.Tensor, factor: torch.Tensor | None) -> None:
    """Buffer this step's ``<P, g>`` of each sized tensor, times the clipping ``factor`` (0 where
    it is 0), in slot ``step % size_update_period``: one stack, one write, one multi-tensor copy."""
    if factor is not None:
        dots = (dots * factor).nan_to_num_(0.0, 0.0, 0.0)
    buffers = bucket.per_tensor("scale_grads")
    buffers[:, bucket.step % bucket.group["size_update_period"]] = dots
    bucket.set_per_tensor("scale_grads", buffers)


def _sizes(bucket: Bucket, rms: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each sized tensor's ``max(RMS(P), param_min_rms)`` (``RMS(P)`` stored first where ``rms``,
    the refresh, is given) and, on size-update steps after the first period, ``ss`` from the
    buffered ``<P, g>``: stacked over the bucket, a fixed number of ops."""
    group, states = bucket.group, bucket.states
    if rms is None:
        rms = bucket.per_tensor("param_rms")
    else:
        rms = rms.to(states[0]["param_rms"].dtype)
        bucket.set_per_tensor("param_rms", rms)
    sizes = rms.clamp(min=group["param_min_rms"])
    if not (bucket.size_update and bucket.step > 0):
        return sizes, None
    period = group["size_update_period"]
    beta2_period = group["betas"][1] ** period
    buffers = bucket.per_tensor("scale_grads")
    q = bucket.per_tensor("scale_exp_avg_sq")
    q.mul_(beta2_period).add_((buffers * buffers).mean(1), alpha=1.0 - beta2_period)
    bucket.set_per_tensor("scale_exp_avg_sq", q)
    step_size = -group["size_lr"] * math.sqrt(1.0 - beta2_period ** ((bucket.step + 1) // period))
    size_steps = buffers.sum(1) * step_size / (q.sqrt() + group["eps"])
    size_steps = torch.where(rms < group["param_min_rms"], 0.0, size_steps).clamp(-0.1, 0.1)
    return sizes, torch.minimum(size_steps, (group["param_max_rms"] - rms) / rms)


# ------------------------------------------------------------------------------ the Triton route

def _fused_sums(buckets: list[Bucket], clipping: bool) -> list[Sums]:
    """The statistics pass where one is needed (see :mod:`.kernels.scaled_adam`): ``||g||^2`` with
    clipping, ``<P, g>`` and ``RMS(P)`` when a size update is due; one launch per device and dtype."""
    due = any(b.size_update for b in buckets)
    out = [Sums() for _ in buckets]
    if not (clipping or due):
        return out
    from .kernels import scaled_adam as launchers
    for indices in _launch_groups(buckets):
        params = [p for i in indices for p in buckets[i].params]
        sums = launchers.sums(params, [g for i in indices for g in buckets[i].grads], grad_squares=clipping,
                              param_products=due)
        numels = launchers.numels(params)
        start = 0
        for i in indices:
            rows = slice(start, start + len(buckets[i].params))
            start = rows.stop
            out[i].grad_sq = sums[rows, 0] if clipping else None
            if due and buckets[i].sized:
                out[i].dots = sums[rows, 1]
                out[i].rms = (sums[rows, 2] / numels[rows]).sqrt() if buckets[i].size_update else None
    return out


def _fused_step(buckets: list[Bucket], sums: list[Sums], factor: torch.Tensor | None) -> None:
    """The update pass, one launch per device and dtype for all of the scope's fused buckets, each
    tensor's scales from :func:`_sizes`; ``<P, g>`` is summed in the pass where no statistics pass
    ran, and buffered after it."""
    from .kernels import scaled_adam as launchers
    for indices in _launch_groups(buckets):
        params = [p for i in indices for p in buckets[i].params]
        scales = torch.zeros(len(params), 3, dtype=torch.float32, device=params[0].device)
        scales[:, 0] = 1.0 if factor is None else factor
        scales[:, 1] = 1.0
        summed_here = [i for i in indices if buckets[i].sized and sums[i].dots is None]
        dots = scales.new_zeros(len(params)) if summed_here else None
        rows, start, where = [], 0, {}
        for i in indices:
            bucket, n = buckets[i], len(buckets[i].params)
            where[i] = slice(start, start + n)
            start += n
            beta2, correction, eps, step_size, beta1, bound = _values(bucket)
            rows += [(beta2, 1.0 - beta2, correction, eps, step_size, beta1, float(bound is not None),
                      bound or 0.0)] * n
            if not bucket.sized:
                continue
            if sums[i].dots is not None:
                _record_dots(bucket, sums[i].dots, factor)
            sizes, size_steps = _sizes(bucket, sums[i].rms)
            scales[where[i], 1] = sizes
            if size_steps is not None:
                scales[where[i], 2] = size_steps
        launchers.update(params, [g for i in indices for g in buckets[i].grads],
                         [v for i in indices for v in buckets[i].exp_avg_sqs],
                         [d for i in indices for d in buckets[i].deltas], rows, scales, dots)
        for i in summed_here:
            _record_dots(buckets[i], dots[where[i]], None)


def _launch_groups(buckets: list[Bucket]) -> list[list[int]]:
    """Indices of the buckets sharing a (device, dtype), each list one launch."""
    groups: dict[tuple, list[int]] = {}
    for i, bucket in enumerate(buckets):
        groups.setdefault((bucket.params[0].device, bucket.params[0].dtype), []).append(i)
    return list(groups.values())


__all__ = ["CLIPPING_SCOPES", "ScaledAdam", "named_groups", "scaled_adam_update"]
