"""Learning-rate-free Adam: D-Adaptation (Defazio & Mishchenko 2023, Alg. "DAdaptAdam") and
Prodigy (Mishchenko & Defazio 2023, Alg. 4), with muP group scales and sharded training.

Both estimate one global step size ``d`` from a ratio of sums over all parameters, then take an
Adam step with ``dlr = d * lr``. Per step, for each parameter with gradient ``g``:

* DAdaptAdam: ``num += r dlr <g, s / (sqrt(v) + eps)>`` (old ``s``, ``v``);
  ``m <- beta1 m + r dlr (1 - beta1) g``; ``v <- beta2 v + (1 - beta2) g^2``;
  ``s <- sqrt(beta2) s + dlr (1 - sqrt(beta2)) g``; ``den += r ||s||_1``. Then
  ``num_w <- sqrt(beta2) num_w + (1 - sqrt(beta2)) num``, ``d_hat = num_w / ((1 - sqrt(beta2)) den)``,
  ``d <- max(d, min(d_hat, d * growth_rate))`` and ``p <- p - m / (sqrt(v) + eps)``.
* Prodigy: ``num <- beta3 num + sum r (d / d0) dlr <g, p0 - p>``; ``m <- beta1 m + r d (1 - beta1) g``;
  ``v <- beta2 v + d^2 (1 - beta2) g^2``; ``s <- beta3 s + (d / d0) dlr g`` (``d`` instead of ``dlr``
  with ``safeguard_warmup``); ``den += r ||s||_1``; ``d_hat = d_coef num / den``; the step is
  ``p <- p - dlr m / (sqrt(v) + d eps)`` (``beta1 = 0``: ``p <- p - r dlr d g / (...)``).

muP: ``r`` is each group's ``lr_scale`` times its ``layer_scale`` (DAdaptAdam's own per-group
scale, Sec. 6.2 of the reference notes). Each group runs the reference algorithm in rescaled
coordinates ``z = x / r`` (Adam-type; the step in ``x`` is ``r`` times the step in ``z``), which
fixes how ``r`` weighs the group's terms of ``d``: DAdaptAdam's ``<g_z, s_z / sqrt(v_z)>`` and
``||s_z||_1`` are ``r`` times their ``x`` values (exactly its ``layer_scale``); Prodigy's
``<g_z, z_0 - z> = <g, x_0 - x>`` is unweighted, as the displacement already carries ``r``, while
``||s_z||_1`` has weight ``r``. Any other weighting makes ``d`` drift with width under muP
(measured: Prodigy with ``r`` on both terms keeps ``d`` at ``d0`` at width 1024 while it grows at
64). All scales 1 is exactly the reference. Decoupled decay
``p -= dlr wd (lr_scale wd_scale) p`` is the reference's ``dlr wd`` at every width (the scales
cancel under muP's coupled policy); L2 decay adds ``wd wd_scale p`` to a *copy* of the gradient.

Fixes of the references: the sums are device tensors reduced once per step (one host sync,
not one ``.item()`` per tensor); sharded parameters (FSDP2 DTensors) all-reduce the numerator
and denominator over their process group on every rank, also on a rank whose shard is empty or
frozen (no deadlock), on any device; ``p.grad`` is never modified.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from ..rules import FAMILIES
from . import kernels
from .compiled import ListKernel, compiled_by_default, flattenable, packed_by_default, packed_runs_compiled
from .scaled import ScaledGroups
from .sharding import DTensor, local_tensor
from .tensors import flat_pieces, scratch_like

#: the fused kernels' parameter dtype (the references keep state in the parameter's dtype)
FUSED_DTYPES = (torch.float32,)



class _GlobalStep(ScaledGroups, torch.optim.Optimizer):
    """The parts DAdaptAdam and Prodigy share: groups, ``r``, the one reduction, state in groups."""

    #: ``lr`` multiplies the adapted step size ``d`` (1 is the usual choice)
    adapts_step_size = True

    def __init__(self, params, defaults: dict[str, Any], decouple: bool):
        if not defaults["lr"] > 0:
            raise ValueError(f"lr={defaults['lr']} must be > 0 (it multiplies the adapted d; 1.0 is the usual choice)")
        if not 0.0 <= defaults.get("momentum", 0.0) < 1.0:
            raise ValueError(f"momentum={defaults['momentum']} must lie in [0, 1)")
        if not all(0.0 <= b < 1.0 for b in defaults.get("betas", ())):
            raise ValueError(f"betas={defaults['betas']} must lie in [0, 1)")
        if not decouple:
            self.family = FAMILIES["adam"]
        super().__init__(params, defaults)
        lrs = {g["lr"] for g in self.param_groups} - {0.0}
        if len(lrs) > 1:
            raise ValueError(f"all param groups must share one lr (or 0 to freeze a group), got {sorted(lrs)}: d is a "
                             f"global step size. Per-group multipliers belong in lr_scale/layer_scale "
                             f"(mupkit.param_groups(model) sets them).")
        self._sharded_groups = {id(p.device_mesh.get_group()): p.device_mesh.get_group()
                                for g in self.param_groups for p in g["params"]
                                if DTensor is not None and isinstance(p, DTensor)}

    def _compiled_ids(self) -> set[int]:
        """ids of the parameters whose passes run compiled this step: every one with
        ``compiled=True``; with ``compiled=None`` (default) those :func:`.compiled.compiled_by_default`
        picks (DAdaptAdam then runs the others through the same one-pass function, packed or
        eagerly, which needs plain contiguous tensors, no DTensor shards, and ``slice_p = 1``);
        else none (the eager path)."""
        top = self.param_groups[0]
        if top["compiled"] is False or top["fused"]:
            return set()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if top["compiled"]:
            return {id(p) for p in params}
        flat = all(flattenable(p) for p in params) and all(group.get("slice_p", 1) == 1 for group in self.param_groups)
        return {id(p) for p, yes in zip(params, compiled_by_default(params)) if yes} if flat else set()

    def _view(self, p: torch.Tensor) -> dict[str, Any]:
        """``p``'s state with rank-local views of DTensor entries (in-place updates reach them)."""
        return {k: local_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in self.state[p].items()}

    def _shared(self) -> dict[str, Any]:
        return self.param_groups[0]

    def _adam_step_size(self) -> tuple[dict[str, Any], float]:
        """The shared state and ``dlr = d * lr * bias_correction`` (sqrt(1 - beta2^t) / (1 - beta1^t)
        when ``use_bias_correction``) of the Adam-type variants, from the state before this step."""
        top = self.param_groups[0]
        beta1, beta2 = top["betas"]
        k = top["k"]
        correction = math.sqrt(1 - beta2 ** (k + 1)) / (1 - beta1 ** (k + 1)) if top["use_bias_correction"] else 1.0
        return top, top["d"] * top["lr"] * correction

    def _store(self, **values) -> None:
        for group in self.param_groups:
            group.update(values)

    @staticmethod
    def _r(group: dict[str, Any]) -> float:
        return group["lr_scale"] * group.get("layer_scale", 1.0)

    @staticmethod
    def _grad(group: dict[str, Any], p: torch.Tensor, decouple: bool) -> torch.Tensor:
        """The local gradient, with L2 decay added to a copy (never to ``p.grad``)."""
        g = local_tensor(p.grad)
        wd = group["weight_decay"] * group["wd_scale"]
        return g.add(local_tensor(p), alpha=wd) if wd and not decouple else g

    def _reduce(self, terms: list[torch.Tensor], like: torch.Tensor | None, width: int = 2) -> list[float]:
        """Sum the per-tensor rows of ``width`` terms locally, then over every shard group: one
        collective, one host sync."""
        device = like.device if like is not None else "cpu"
        total = torch.stack(terms).sum(0) if terms else torch.zeros(width, dtype=torch.float64, device=device)
        if self._sharded_groups:
            import torch.distributed as dist
            for group in self._sharded_groups.values():
                dist.all_reduce(total, group=group)
        return total.tolist()

    def _with_grads(self) -> list[torch.Tensor]:
        """The parameters that have a gradient this step, in group order."""
        return [p for group in self.param_groups for p in group["params"] if p.grad is not None]

    def _packed_ids(self, compiled: set[int], keys: tuple[str, ...]) -> tuple[set[int], bool]:
        """ids of the parameters, of those not in ``compiled``, that the default steps packed
        (:func:`.compiled.packed_by_default`, with their initialized state tensors under ``keys``:
        Prodigy's 0-dim ``p0`` of a zero parameter keeps it out), in groups that step (``lr`` not
        0) whole (``slice_p = 1``); and whether their runs are compiled."""
        tensors = [(p, p.grad, *(self.state[p][key] for key in keys if key in self.state[p]))
                   for group in self.param_groups if group["lr"] != 0.0 and group.get("slice_p", 1) == 1
                   for p in group["params"] if p.grad is not None and id(p) not in compiled]
        ids = {id(ts[0]) for ts, yes in zip(tensors, packed_by_default(tensors)) if yes}
        return ids, bool(ids) and packed_runs_compiled(sum(p.numel() for p in self._with_grads()))

    def _decay(self, group: dict[str, Any], p: torch.Tensor, dlr: float) -> None:
        wd = group["weight_decay"] * group["lr_scale"] * group["wd_scale"]
        if wd and group["decouple"]:
            local = local_tensor(p)
            local.add_(local, alpha=-wd * dlr)


def _summed(rows: list[torch.Tensor]) -> torch.Tensor:
    """The float64 sum of a tensor's per-piece rows of terms (the row itself for one piece)."""
    return rows[0].to(torch.float64) if len(rows) == 1 else torch.stack(rows).to(torch.float64).sum(0)


def _flat_state(p: torch.Tensor, local_flat: torch.Tensor, slice_p: int) -> torch.Tensor:
    """Prodigy's flattened per-parameter state: for a parameter sharded along dim 0, the local
    slice is a contiguous block of the flattened tensor, i.e. a ``Shard(0)`` DTensor."""
    if DTensor is None or not isinstance(p, DTensor):
        return local_flat
    from torch.distributed.tensor import Shard
    if slice_p != 1 or list(p.placements) != [Shard(0)]:
        raise ValueError(f"Prodigy(slice_p={slice_p}) on a parameter of shape {tuple(p.shape)} with placements "
                                  f"{p.placements}: only slice_p=1 with Shard(0) (fully_shard's layout) is supported.")
    return DTensor.from_local(local_flat, p.device_mesh, [Shard(0)], run_check=False, shape=torch.Size((p.numel(),)),
                              stride=(1,))


#: DAdaptAdam's per-parameter state tensors
STATE_KEYS = ("s", "exp_avg", "exp_avg_sq")


class DAdaptAdam(_GlobalStep):
    """D-Adapted Adam (``dadaptation.DAdaptAdam`` 3.2 arguments and defaults) with muP group scales.

    ``compiled=True``: each tensor's step as one fused pass, all tensors in one ``torch.compile``
    graph (CPU or GPU);
    ``fused=True``: one Triton launch for all tensors (CUDA, fp32), see :mod:`.kernels`. Both
    start once ``d`` adapts (the first steps, while every gradient is zero, run eagerly).
    Default (neither given): on CUDA the kernels for fp32 parameters
    (:func:`.kernels.fused_by_default`); on the CPU, a large model takes the compiled pass
    (:meth:`_compiled_ids`), and many small tensors left out of it step in packed runs
    (:meth:`_packed_ids`). ``compiled=False``/``fused=False``: the eager path.
    """

    family = FAMILIES["adamw"]

    def __init__(self, params, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decouple: bool = False, use_bias_correction: bool = False,
                 d0: float = 1e-6, growth_rate: float = math.inf, *, compiled: bool | None = None,
                 fused: bool | None = None):
        if compiled and fused:
            raise ValueError("choose one of compiled=True and fused=True")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, decouple=decouple,
                        use_bias_correction=use_bias_correction, growth_rate=growth_rate, d=d0, k=0,
                        numerator=0.0, layer_scale=1.0, compiled=compiled, fused=fused)
        super().__init__(params, defaults, decouple)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._loss(closure)
        with kernels.fused_defaults(self, FUSED_DTYPES):
            self._step()
        return loss

    def _step(self) -> None:
        top, dlr = self._adam_step_size()
        if top["k"] > 0 and top["fused"]:
            self._advance(top, *self._one_pass_terms(top, dlr, None).tolist())
            return
        compiled = self._compiled_ids() if top["k"] > 0 else set()
        packed, compile_runs = set(), False
        if top["k"] > 0 and top["compiled"] is None:
            for p in self._with_grads():
                self._init_state(p)
            packed, compile_runs = self._packed_ids(compiled, STATE_KEYS)
        terms = []
        if packed:  # many small CPU tensors: the one-pass function on packed runs
            terms.append(self._one_pass_terms(top, dlr, packed, packed=True, compile_runs=compile_runs))
        like = next(iter(self._with_grads()), None)
        if compiled:  # every other tensor in one pass too: compiled, or the same function eagerly
            others = {id(p) for p in self._with_grads()} - packed
            terms.append(self._one_pass_terms(top, dlr, others, compiled=compiled))
            self._advance(top, *self._reduce([t for t in terms if t is not None], like))
            return
        beta1, beta2 = top["betas"]
        root = math.sqrt(beta2)
        for group in self.param_groups:
            r, eps = self._r(group), group["eps"] * group["eps_scale"]
            for p in group["params"]:
                if p.grad is None or id(p) in packed:
                    continue
                g = self._grad(group, p, group["decouple"])
                self._init_state(p)
                if group["lr"] == 0.0:
                    continue
                view = self._view(p)
                sums = []  # per flat piece (pieces stay in cache across the ops: tensors.flat_pieces)
                for g_, s, m, v in flat_pieces(g, view["s"], view["exp_avg"], view["exp_avg_sq"]):
                    ratio = torch.sqrt(v, out=scratch_like(v, 0)).add_(eps)
                    num = torch.dot(g_.flatten(), torch.div(s, ratio, out=ratio).flatten())
                    m.mul_(beta1).add_(g_, alpha=r * dlr * (1 - beta1))
                    v.mul_(beta2).addcmul_(g_, g_, value=1 - beta2)
                    s.mul_(root).add_(g_, alpha=dlr * (1 - root))
                    sums.append(torch.stack([num * (r * dlr), torch.abs(s, out=scratch_like(s, 0)).sum() * r]))
                terms.append(_summed(sums))
        if not self._advance(top, *self._reduce([t for t in terms if t is not None], like)):
            return  # nothing to adapt from yet (e.g. an all-zero first gradient): skip, as the reference
        for group in self.param_groups:
            eps = group["eps"] * group["eps_scale"]
            for p in group["params"]:
                if p.grad is None or id(p) in packed:
                    continue
                self.state[p]["step"] += 1
                view = self._view(p)
                self._decay(group, p, dlr)
                for local, m, v in flat_pieces(local_tensor(p), view["exp_avg"], view["exp_avg_sq"]):
                    local.addcdiv_(m, torch.sqrt(v, out=scratch_like(v, 0)).add_(eps), value=-1)

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = 0
            for key in STATE_KEYS:
                state[key] = torch.zeros_like(p.detach())  # a DTensor for a sharded p (checkpoints)
        return state

    def _advance(self, top: dict[str, Any], num: float, den: float) -> bool:
        """Update the numerator and ``d`` from this step's global sums (False: ``den`` is 0, skip)."""
        root = math.sqrt(top["betas"][1])
        numerator = root * top["numerator"] + (1 - root) * num
        if den == 0:
            return False
        d = max(top["d"], min(numerator / ((1 - root) * den), top["d"] * top["growth_rate"]))
        self._store(numerator=numerator, d=d, k=top["k"] + 1)
        return True

    def _one_pass_terms(self, top: dict[str, Any], dlr: float, ids: set[int] | None, *,
                        compiled: set[int] = frozenset(), packed: bool = False,
                        compile_runs: bool = False) -> torch.Tensor | None:
        """Step the tensors whose ids are in ``ids`` (None: all) in one pass each, and return
        their summed terms: ``fused``: one Triton launch for all; ``packed``: in packed runs
        (:meth:`.compiled.ListKernel.packed`, compiled or not by ``compile_runs``); else a
        compiled function for those in ``compiled`` and the same function eagerly for the rest.
        The parameter update does not depend on this step's ``d``, so it runs before the
        reduction; that is only valid once some gradient was nonzero (``k > 0``), since the
        reference skips the update while ``den`` is 0."""
        beta1, beta2 = top["betas"]
        root = math.sqrt(beta2)
        items = []
        for group in self.param_groups:
            if group["lr"] == 0.0:
                continue
            r, eps = self._r(group), group["eps"] * group["eps_scale"]
            wd = group["weight_decay"] * group["wd_scale"]
            l2, decay = (0.0, wd * group["lr_scale"] * dlr) if group["decouple"] else (wd, 0.0)
            row = (eps, r * dlr, beta1, r * dlr * (1 - beta1), beta2, 1 - beta2, root, dlr * (1 - root), l2, decay, r)
            for p in group["params"]:
                if p.grad is not None and (ids is None or id(p) in ids):
                    state = self._init_state(p)
                    state["step"] += 1
                    items.append((p, state, row))
        if top["fused"]:
            return _fused_launch("DAdaptAdam", "dadapt_adam", [[p, p.grad, s["exp_avg"], s["exp_avg_sq"], s["s"], row]
                                                               for p, s, row in items])
        if not items:
            return None
        columns = [[p for p, _, _ in items], [p.grad for p, _, _ in items]] + \
            [[s[key] for _, s, _ in items] for key in ("exp_avg", "exp_avg_sq", "s")]
        rows = [row for _, _, row in items]
        if packed:
            return _DADAPT_ADAM.packed(columns, rows, compile_runs)
        return _DADAPT_ADAM(columns, rows, [id(p) in compiled for p, _, _ in items])


def _dadapt_adam_pass(p, g, m, v, s, eps, num_scale, beta1, m_scale, beta2, one_minus_beta2, root, s_scale, l2,
                      decay, r):
    """One DAdaptAdam step of one flat tensor; returns ``[<g, s / (sqrt(v) + eps)> * num_scale,
    r ||s_new||_1]`` (old ``s``, ``v`` in the first term, as the reference). The scalars are a
    row of :data:`.kernels.dadapt.DADAPT_ADAM_ROW`, shared with the fused kernel."""
    g = g + l2 * p
    num = torch.dot(g, s / (v.sqrt() + eps)) * num_scale
    m_new = m * beta1 + g * m_scale
    v_new = v * beta2 + g * g * one_minus_beta2
    s_new = s * root + g * s_scale
    m.copy_(m_new)
    v.copy_(v_new)
    s.copy_(s_new)
    p.copy_(p - decay * p - m_new / (v_new.sqrt() + eps))
    return torch.stack([num, s_new.abs().sum() * r])


_DADAPT_ADAM = ListKernel(_dadapt_adam_pass, writes=(0, 2, 3, 4))


def _fused_launch(name: str, kernel: str, rows: list[list[Any]]) -> torch.Tensor | None:
    """Run a Triton kernel of :mod:`.kernels.dadapt` over every tensor: ``rows`` hold each
    tensor's parallel arguments (None for an absent one), its value row last. One launch per
    device; returns the summed ``[numerator term, denominator]`` (for the reducing kernels)."""
    from .kernels import dadapt as launchers
    kernels.check_fused(name, [r[0] for r in rows], dtypes=FUSED_DTYPES)
    totals = []
    for device in {r[0].device for r in rows}:
        mine = [r for r in rows if r[0].device == device]
        columns = [None if mine[0][k] is None else [r[k] for r in mine] for k in range(len(mine[0]))]
        totals.append(getattr(launchers, kernel)(*columns))
    return torch.stack([t.cpu() for t in totals]).sum(0) if totals and totals[0] is not None else None


class Prodigy(_GlobalStep):
    """Prodigy (``prodigyopt.Prodigy`` 1.1.2 arguments and defaults) with muP group scales.

    ``compiled=True``: a statistics pass and an update pass per tensor, each over all tensors
    in one ``torch.compile`` graph; ``fused=True``:
    the same two passes as Triton launches over all tensors (CUDA, fp32, ``slice_p=1``).
    Default (neither given): on CUDA the kernels for fp32 parameters when every group has
    ``slice_p=1`` (:func:`.kernels.fused_by_default`); on the CPU, a large model takes the
    compiled passes (:meth:`_compiled_ids`), and many small tensors left out of them step in
    packed runs (:meth:`_packed_ids`). ``compiled=False``/``fused=False``: the eager path.
    """

    family = FAMILIES["adamw"]

    def __init__(self, params, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999), beta3: float | None = None,
                 eps: float = 1e-8, weight_decay: float = 0.0, decouple: bool = True, use_bias_correction: bool = False,
                 safeguard_warmup: bool = False, d0: float = 1e-6, d_coef: float = 1.0, growth_rate: float = math.inf,
                 slice_p: int = 1, *, compiled: bool | None = None, fused: bool | None = None):
        if slice_p < 1:
            raise ValueError(f"slice_p={slice_p} must be >= 1")
        if (compiled or fused) and slice_p != 1:
            raise ValueError(f"compiled=True and fused=True support slice_p=1 only, got slice_p={slice_p}")
        if compiled and fused:
            raise ValueError("choose one of compiled=True and fused=True")
        defaults = dict(lr=lr, betas=tuple(betas), beta3=beta3, eps=eps, weight_decay=weight_decay, decouple=decouple,
                        use_bias_correction=use_bias_correction, safeguard_warmup=safeguard_warmup, d=d0, d0=d0,
                        d_max=d0, d_coef=d_coef, growth_rate=growth_rate, slice_p=slice_p, k=0, numerator=0.0,
                        layer_scale=1.0, compiled=compiled, fused=fused)
        super().__init__(params, defaults, decouple)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._loss(closure)
        unsliced = all(group["slice_p"] == 1 for group in self.param_groups)  # what the kernels take
        with kernels.fused_defaults(self, FUSED_DTYPES) if unsliced else contextlib.nullcontext():
            self._step()
        return loss

    def _step(self) -> None:
        top, dlr = self._adam_step_size()
        beta1, beta2 = top["betas"]
        beta3 = top["beta3"] if top["beta3"] is not None else math.sqrt(beta2)
        d, d0, k = top["d"], top["d0"], top["k"]
        compiled = self._compiled_ids()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._init_state(group, p, beta1)
        keys = ("p0", "exp_avg_sq", "s", "exp_avg")
        packed, compile_runs = self._packed_ids(compiled, keys) if top["compiled"] is None else (set(), False)
        terms, like, fused = [], None, []
        sums_rows: dict[int, list[float]] = {}  # per group: the statistics pass's values
        one_pass: list[tuple[list[torch.Tensor], list[float]]] = []  # (tensors, row) of the one-pass statistics
        for group in self.param_groups:
            r, step = self._r(group), group["slice_p"]
            for p in group["params"]:
                if p.grad is None or group["lr"] == 0.0:
                    continue
                g = self._grad(group, p, group["decouple"])
                local = local_tensor(p)
                state = self.state[p]
                like = g
                if id(p) in compiled or id(p) in packed or top["fused"]:
                    if id(group) not in sums_rows:
                        s_scale = (d / d0) * (d if group["safeguard_warmup"] else dlr)
                        l2 = 0.0 if group["decouple"] else group["weight_decay"] * group["wd_scale"]
                        sums_rows[id(group)] = [l2, (d / d0) * dlr, beta2, d * d * (1 - beta2), beta3, s_scale, r]
                    row = sums_rows[id(group)]
                    if top["fused"]:
                        fused.append([p, p.grad, state["p0"], state["exp_avg_sq"], state["s"],
                                      (*row, 1.0 if state["p0"].dim() == 0 else 0.0)])
                        continue
                    one_pass.append(([p, p.grad, state["p0"], state["exp_avg_sq"], state["s"]], row))
                    continue
                view = self._view(p)
                if beta1 > 0:
                    view["exp_avg"].mul_(beta1).add_(g, alpha=r * d * (1 - beta1))
                view["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=d * d * (1 - beta2))
                sliced, p0 = g.flatten()[::step], view["p0"]
                if p0.dim() == 0:  # the reference's 0-dim p0 of a zero parameter
                    p0 = p0.expand(sliced.shape)
                sums = []  # per flat piece, when the tensors can be cut (slice_p=1): see tensors.flat_pieces
                for g_, local_, p0_, s in flat_pieces(sliced, local.flatten()[::step], p0, view["s"]):
                    num = torch.dot(g_, torch.sub(p0_, local_, out=scratch_like(g_, 0)))  # weight 1: see top
                    s.mul_(beta3).add_(g_, alpha=(d / d0) * (d if group["safeguard_warmup"] else dlr))
                    sums.append(torch.stack([num * ((d / d0) * dlr), torch.abs(s, out=scratch_like(s, 0)).sum() * r]))
                terms.append(_summed(sums))
        if fused:
            terms.append(_fused_launch("Prodigy", "prodigy_sums", fused))
            fused = []
        terms.extend(_run_kernel(_PRODIGY_SUMS, one_pass, packed, compile_runs))
        delta, den = self._reduce(terms, like)
        if den == 0:  # every rank saw the same zero (the reduction ran), so every rank skips alike
            return
        d_old = d
        numerator = top["numerator"] * beta3 + delta
        d_hat = top["d_coef"] * numerator / den
        d_max = top["d_max"]
        if d == d0:
            d = max(d, d_hat)
        d_max = max(d_max, d_hat)
        d = min(d_max, d * top["growth_rate"])
        self._store(numerator=numerator, d=d, d_max=d_max, d_hat=d_hat, d_denom=den, k=k + 1)
        updates: list[tuple[list[torch.Tensor], list[float]]] = []  # (tensors, row) of the one-pass update
        for group in self.param_groups:
            r, eps = self._r(group), group["eps"] * group["eps_scale"]
            update_row = None
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["step"] += 1
                if top["fused"]:
                    update_row = update_row or self._update_row(group, beta1, d_old, d, dlr)
                    fused.append([p, p.grad, self.state[p]["exp_avg"] if beta1 > 0 else None,
                                  self.state[p]["exp_avg_sq"], (*update_row, 1.0 if beta1 > 0 else 0.0)])
                    continue
                if id(p) in compiled or id(p) in packed:
                    update_row = update_row or self._update_row(group, beta1, d_old, d, dlr)
                    momentum = [self.state[p]["exp_avg"]] if beta1 > 0 else []
                    updates.append(([p, p.grad, *momentum, self.state[p]["exp_avg_sq"]], update_row))
                    continue
                view = self._view(p)
                self._decay(group, p, dlr)
                numerator, scale = ((view["exp_avg"], -dlr) if beta1 > 0 else
                                    (self._grad(group, p, group["decouple"]), -r * dlr * d))
                for local, num, v in flat_pieces(local_tensor(p), numerator, view["exp_avg_sq"]):
                    local.addcdiv_(num, torch.sqrt(v, out=scratch_like(v, 0)).add_(d * eps), value=scale)
        if fused:
            _fused_launch("Prodigy", "prodigy_update", fused)
        _run_kernel(_PRODIGY_UPDATE_KERNELS[beta1 > 0], updates, packed, compile_runs)

    def _init_state(self, group: dict[str, Any], p: torch.Tensor, beta1: float) -> None:
        """``p``'s state on its first step, as prodigyopt lays it out (``s`` and ``p0`` flat and
        sliced by ``slice_p``; ``p0`` 0-dim for a parameter that starts all zeros)."""
        state = self.state[p]
        if state:
            return
        local, step = local_tensor(p), group["slice_p"]
        state["step"] = 0
        state["s"] = _flat_state(p, torch.zeros_like(local.flatten()[::step]), step)
        unsharded_zero = not isinstance(p, DTensor or ()) and not local.any()  # the reference's 0-dim p0
        state["p0"] = local.new_zeros(()) if unsharded_zero else _flat_state(p, local.flatten()[::step].clone(), step)
        if beta1 > 0:
            state["exp_avg"] = torch.zeros_like(p.detach())
        state["exp_avg_sq"] = torch.zeros_like(p.detach())

    def _update_row(self, group: dict[str, Any], beta1: float, d_old: float, d: float, dlr: float) -> list[float]:
        """A group's per-step values for the update pass (momentum uses the old ``d``): a row of
        :data:`.kernels.dadapt.PRODIGY_UPDATE_ROW` without its last (momentum) column."""
        r, eps = self._r(group), group["eps"] * group["eps_scale"]
        wd = group["weight_decay"] * group["wd_scale"]
        l2, decay = (0.0, wd * group["lr_scale"] * dlr) if group["decouple"] else (wd, 0.0)
        if beta1 > 0:
            return [l2, beta1, r * d_old * (1 - beta1), d * eps, decay, dlr]
        return [l2, beta1, 0.0, d * eps, decay, r * dlr * d]


def _run_kernel(kernel: ListKernel, items: list[tuple[list[torch.Tensor], list[float]]],
                packed: set[int], compile_runs: bool) -> list[torch.Tensor]:
    """``kernel`` over ``(tensors, row)`` items, compiled, or in packed runs (compiled or not by
    ``compile_runs``) for the items whose parameter (first tensor) has its id in ``packed``;
    returns what it returned."""
    results = []
    for pack in (False, True):
        chosen = [(tensors, row) for tensors, row in items if (id(tensors[0]) in packed) == pack]
        if chosen:
            columns, rows = [list(column) for column in zip(*(t for t, _ in chosen))], [row for _, row in chosen]
            result = kernel.packed(columns, rows, compile_runs) if pack else kernel(columns, rows)
            if result is not None:
                results.append(result)
    return results


def _prodigy_sums(p, g, p0, v, s, l2, num_scale, beta2, v_scale, beta3, s_scale, r):
    """Prodigy's statistics pass of one flat tensor: updates ``v`` and ``s``, returns
    ``[<g, p0 - p> * num_scale, r ||s_new||_1]``."""
    g = g + l2 * p
    num = torch.dot(g, p0 - p) * num_scale
    v.copy_(v * beta2 + g * g * v_scale)
    s_new = s * beta3 + g * s_scale
    s.copy_(s_new)
    return torch.stack([num, s_new.abs().sum() * r])


def _prodigy_momentum_update(p, g, m, v, l2, beta1, m_scale, eps_d, decay, step):
    m_new = m * beta1 + (g + l2 * p) * m_scale
    m.copy_(m_new)
    p.copy_(p - decay * p - step * m_new / (v.sqrt() + eps_d))


def _prodigy_update(p, g, v, l2, beta1, m_scale, eps_d, decay, step):
    """``beta1 = 0``: the step uses ``g`` itself (``beta1``, ``m_scale`` are unused, kept so both
    update functions take the same row)."""
    p.copy_(p - decay * p - step * (g + l2 * p) / (v.sqrt() + eps_d))


_PRODIGY_SUMS = ListKernel(_prodigy_sums, writes=(3, 4))
#: the update pass, by whether there is a first moment (beta1 > 0)
_PRODIGY_UPDATE_KERNELS = {True: ListKernel(_prodigy_momentum_update, writes=(0, 2)),
                           False: ListKernel(_prodigy_update, writes=(0,))}


class DAdaptSGD(_GlobalStep):
    """D-Adapted SGD by dual averaging (``dadaptation.DAdaptSGD`` 3.2) with muP group scales.

    ``s <- s + dlr g`` with ``dlr = d lr / ||g_0||``, ``num += dlr <g, s_old>``, ``d_hat = 2 num /
    sqrt(sum ||s||^2)``; the iterate is ``x0 - r s`` (mixed with ``p`` by ``momentum``). ``r``
    scales each group's step and weighs its terms of ``d`` (all 1: the reference). Unlike the
    reference, an all-zero first gradient does not divide by zero: the step waits for a nonzero
    one. Weight decay and momentum are per group (the reference reads group 0's for all).
    """

    family = FAMILIES["sgd"]

    def __init__(self, params, lr: float = 1.0, momentum: float = 0.0, weight_decay: float = 0.0,
                 d0: float = 1e-6, growth_rate: float = math.inf):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, growth_rate=growth_rate, d=d0, k=0,
                        numerator=0.0, g0_norm=0.0, layer_scale=1.0, decouple=False)
        super().__init__(params, defaults, decouple=True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._loss(closure)
        top = self._shared()
        d, k, lr = top["d"], top["k"], top["lr"]
        live = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        grads = {id(p): self._grad(group, p, decouple=False) for group, p in live}
        if k == 0:  # the first gradient's norm fixes the scale of dlr (one reduction)
            # of the raw gradient, without weight decay, as the reference effectively computes it
            terms = [torch.stack([local_tensor(p.grad).square().sum(), torch.zeros((), dtype=p.dtype, device=p.device)])
                     .to(torch.float64) for group, p in live if group["lr"] > 0]
            g_sq, _ = self._reduce(terms, grads[id(live[0][1])] if live else None)
            if g_sq == 0:
                return loss
            self._store(g0_norm=math.sqrt(g_sq))
        dlr = d * lr / top["g0_norm"]
        terms, like = [], None
        for group, p in live:
            state, g = self.state[p], grads[id(p)]
            if not state:
                state["z"], state["x0"] = p.detach().clone(), p.detach().clone()
                state["s"] = torch.zeros_like(p.detach())
            if group["lr"] > 0.0:
                r, view = self._r(group), self._view(p)
                num = torch.dot(g.flatten(), view["s"].flatten()) * (r * dlr)
                view["s"].add_(g, alpha=dlr)
                terms.append(torch.stack([num, (view["s"] * view["s"]).sum() * r]).to(torch.float64))
                like = g
        delta, sk_sq = self._reduce(terms, like)
        numerator = top["numerator"] + delta
        if sk_sq == 0:
            return loss
        d = max(d, min(2 * numerator / math.sqrt(sk_sq), d * top["growth_rate"]))
        self._store(numerator=numerator, d=d, k=k + 1)
        for group, p in live:
            view = self._view(p)
            view["z"].copy_(view["x0"] - self._r(group) * view["s"])
            local_tensor(p).mul_(group["momentum"]).add_(view["z"], alpha=1 - group["momentum"])
        return loss


class DAdaptLion(_GlobalStep):
    """D-Adapted Lion (``dadaptation.DAdaptLion`` 3.2) with muP group scales.

    ``u = sign(beta1 m + (1 - beta1) g)``; ``p <- p (1 - dlr wd) - r dlr u``; ``m <- beta2 m + (1 -
    beta2) dlr g``; ``num += r dlr <u, s>``; ``s <- sqrt(beta2) s + (1 - sqrt(beta2)) dlr u``;
    ``den += r ||s||_1``; ``d <- max(d, num_w / ((1 - sqrt(beta2)) den))``.
    """

    family = FAMILIES["adamw"]

    def __init__(self, params, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0,
                 d0: float = 1e-6):
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, d=d0, k=0, numerator=0.0,
                        layer_scale=1.0, decouple=True)
        super().__init__(params, defaults, decouple=True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._loss(closure)
        top = self._shared()
        beta1, beta2 = top["betas"]
        d, lr = top["d"], top["lr"]
        dlr, root = d * lr, math.sqrt(beta2)
        terms, like = [], None
        for group in self.param_groups:
            r = self._r(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, local, state = local_tensor(p.grad), local_tensor(p), self.state[p]
                if not state:
                    state["exp_avg"], state["s"] = torch.zeros_like(p.detach()), torch.zeros_like(p.detach())
                view = self._view(p)
                m, s = view["exp_avg"], view["s"]
                self._decay(group, p, dlr)
                update = m.mul(beta1).add_(g, alpha=1 - beta1).sign_()
                local.add_(update, alpha=-r * dlr)
                m.mul_(beta2).add_(g, alpha=(1 - beta2) * dlr)
                num = torch.dot(update.flatten(), s.flatten()) * (r * dlr)
                s.mul_(root).add_(update, alpha=(1 - root) * dlr)
                terms.append(torch.stack([num, torch.abs(s, out=scratch_like(s, 0)).sum() * r]).to(torch.float64))
                like = g
        num, den = self._reduce(terms, like)
        numerator = root * top["numerator"] + (1 - root) * num
        if den == 0:
            return loss
        self._store(numerator=numerator, d=max(d, numerator / ((1 - root) * den)), k=top["k"] + 1)
        return loss


class DAdaptAdaGrad(_GlobalStep):
    """D-Adapted AdaGrad (``dadaptation.DAdaptAdaGrad`` 3.2, dense gradients) with muP group scales.

    ``a <- a + g^2`` (``a`` starts at 1e-6), ``s <- s + dlr g``; with ``q = sqrt(a) + eps``:
    ``G += dlr^2 sum g^2 / q``, ``S = sum s^2 / q``, ``l1 = ||s||_1`` (each group's terms weighted by
    ``r``), ``d_hat = (S - G) / l1``; the iterate is ``x0 - r s / q`` (mixed with ``p`` by
    ``momentum``). Sparse gradients, which the reference also takes, are refused with an error.
    """

    family = FAMILIES["adam"]

    def __init__(self, params, lr: float = 1.0, momentum: float = 0.0, weight_decay: float = 0.0, eps: float = 1e-6,
                 d0: float = 1e-6, growth_rate: float = math.inf):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps, growth_rate=growth_rate, d=d0,
                        k=0, gsq_weighted=0.0, sksq_weighted=0.0, skl1=0.0, layer_scale=1.0, decouple=False)
        super().__init__(params, defaults, decouple=False)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._loss(closure)
        top = self._shared()
        d = top["d"]
        dlr = d * top["lr"]
        terms, like = [], None
        for group in self.param_groups:
            r, eps = self._r(group), group["eps"] * group["eps_scale"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"DAdaptAdaGrad got a sparse gradient for a parameter of shape {tuple(p.shape)}; "
                                     f"mupkit's version takes dense gradients (e.g. nn.Embedding(sparse=False)).")
                g = self._grad(group, p, decouple=False)
                state = self.state[p]
                if not state:
                    state["alphak"] = torch.full_like(p.detach(), 1e-6)
                    state["sk"], state["x0"] = torch.zeros_like(p.detach()), p.detach().clone()
                view = self._view(p)
                a, sk = view["alphak"], view["sk"]
                old_q = a.sqrt().add_(eps)
                old_sksq, old_l1 = (sk * sk).div(old_q).sum(), sk.abs().sum()
                a.add_(g * g)
                q = a.sqrt().add_(eps)
                g_sq = (g * g).div(q).sum()
                sk.add_(g, alpha=dlr)
                terms.append(torch.stack([g_sq, (sk * sk).div(q).sum() - old_sksq, sk.abs().sum() - old_l1])
                             .to(torch.float64) * r)
                like = g
        g_sq, sksq_change, skl1_change = self._reduce(terms, like, width=3)
        sksq_weighted, skl1 = top["sksq_weighted"] + sksq_change, top["skl1"] + skl1_change
        if skl1 == 0:
            return loss
        gsq_weighted = top["gsq_weighted"] + dlr * dlr * g_sq
        d = max(d, min((sksq_weighted - gsq_weighted) / skl1, d * top["growth_rate"]))
        self._store(gsq_weighted=gsq_weighted, skl1=skl1, sksq_weighted=sksq_weighted, d=d)
        for group in self.param_groups:
            r, eps = self._r(group), group["eps"] * group["eps_scale"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                view = self._view(p)
                z = view["x0"] - r * view["sk"] / view["alphak"].sqrt().add_(eps)
                local_tensor(p).mul_(group["momentum"]).add_(z, alpha=1 - group["momentum"])
        return loss


__all__ = ["DAdaptAdaGrad", "DAdaptAdam", "DAdaptLion", "DAdaptSGD", "Prodigy"]
