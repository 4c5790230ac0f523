"""Learning-rate-free optimizers: D-Adaptation (Defazio & Mishchenko 2023: DAdaptAdam, DAdaptSGD,
DAdaptLion, DAdaptAdaGrad) and Prodigy (Mishchenko & Defazio 2023, Alg. 4), with muP group
scales and sharded training.

Each estimates one global step size ``d`` from a ratio of sums over all parameters, then steps
with ``dlr = d * lr``. Per step, for each parameter with gradient ``g``:

* DAdaptAdam: ``num += r dlr <g, s / (sqrt(v) + eps)>`` (old ``s``, ``v``);
  ``m <- beta1 m + r dlr (1 - beta1) g``; ``v <- beta2 v + (1 - beta2) g^2``;
  ``s <- sqrt(beta2) s + dlr (1 - sqrt(beta2)) g``; ``den += r ||s||_1``. Then
  ``num_w <- sqrt(beta2) num_w + (1 - sqrt(beta2)) num``, ``d_hat = num_w / ((1 - sqrt(beta2)) den)``,
  ``d <- max(d, min(d_hat, d * growth_rate))`` and ``p <- p - m / (sqrt(v) + eps)``.
* Prodigy: ``num <- beta3 num + sum (d / d0) dlr <g, p0 - p>``; ``m <- beta1 m + r d (1 - beta1) g``;
  ``v <- beta2 v + d^2 (1 - beta2) g^2``; ``s <- beta3 s + (d / d0) dlr g`` (``d`` instead of ``dlr``
  with ``safeguard_warmup``); ``den += r ||s||_1``; ``d_hat = d_coef num / den``; the step is
  ``p <- p - dlr m / (sqrt(v) + d eps)`` (``beta1 = 0``: ``p <- p - r dlr d g / (...)``).

muP: ``r`` is each group's ``lr_scale`` times its ``layer_scale`` (DAdaptAdam's own per-group
scale, Sec. 6.2 of the reference notes); ``lr`` is global (``d`` is). Each group runs the
reference algorithm in rescaled coordinates ``z = x / r`` (Adam-type; the step in ``x`` is ``r``
times the step in ``z``), which fixes how ``r`` weighs the group's terms of ``d``: DAdaptAdam's
``<g_z, s_z / sqrt(v_z)>`` and ``||s_z||_1`` are ``r`` times their ``x`` values (exactly its
``layer_scale``); Prodigy's ``<g_z, z_0 - z> = <g, x_0 - x>`` is unweighted, as the displacement
already carries ``r``, while ``||s_z||_1`` has weight ``r``. Any other weighting makes ``d`` drift
with width under muP (measured: Prodigy with ``r`` on both terms keeps ``d`` at ``d0`` at width 1024
while it grows at 64). All scales 1 is exactly the reference. Decoupled decay
``p -= dlr wd (lr_scale wd_scale) p`` is the reference's ``dlr wd`` at every width (the scales
cancel under muP's coupled policy; the ``weight_decay_policy`` does not apply: the decay follows
the adapted step); L2 decay adds ``wd wd_scale p`` to a *copy* of the gradient.

Paths (:mod:`.dispatch`): DAdaptAdam and Prodigy have one function per pass
(:func:`dadapt_adam_step` = :func:`dadapt_adam_moments` then :func:`dadapt_adam_apply`;
:func:`prodigy_sums`, :func:`prodigy_step`) for the single-tensor, foreach and opt-in compiled
paths, and Triton kernels (:mod:`.kernels.dadapt`, fp32, tested against them) that keep ``d``
on the device. The others step tensor by tensor. On the CPU, small tensors in few shapes step
as one stack per shape (:mod:`.stacked`): the same functions, or loop bodies, on the stacks.

Fixes of the references: the sums are device tensors reduced once per step (the eager paths
read the new ``d`` once per step, the kernels never), not one ``.item()`` per tensor; sharded
parameters (FSDP2 DTensors) all-reduce the numerator and denominator over their process group on
every rank, also on a rank whose shard is empty or frozen (no deadlock), on any device;
``p.grad`` is never modified.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..rules import FAMILIES
from . import dispatch, ops
from .base import Optimizer
from .compiled import run_compiled
from .sharding import DTensor, local_tensor, local_tensors
from .tensors import by_device_and_dtype

#: the kernels' parameter dtype (the references keep state in the parameter's dtype)
FUSED_DTYPES = (torch.float32,)


class _DAdapted(Optimizer):
    """What the family shares: one global ``lr``, ``r`` per group, the global state of ``d`` in
    every group (as the references keep it), one reduction of the sums per step.

    The state of ``d`` (:attr:`shared_keys`) is Python numbers after an eager step and float64
    0-dim device tensors after a step of the kernels alone (no host read); :meth:`state_dict`
    holds numbers either way."""

    shared_keys: tuple[str, ...] = ("d", "k")
    kernels = dispatch.Kernels(dtypes=(), foreach=False, stacked=True)

    def __init__(self, params, defaults: dict[str, Any], decouple: bool):
        if not defaults["lr"] > 0:
            raise ValueError(f"lr={defaults['lr']} must be > 0 (it multiplies the adapted d; 1.0 is the usual choice)")
        if not 0.0 <= defaults.get("momentum", 0.0) < 1.0:
            raise ValueError(f"momentum={defaults['momentum']} must lie in [0, 1)")
        if not all(0.0 <= b < 1.0 for b in defaults.get("betas", ())):
            raise ValueError(f"betas={defaults['betas']} must lie in [0, 1)")
        if not decouple and self.family.decoupled_wd:  # L2 decay: Adam's family
            self.family = FAMILIES["adam"]
        super().__init__(params, {**defaults, "layer_scale": 1.0, "decouple": decouple})
        lrs = {g["lr"] for g in self.param_groups} - {0.0}
        if len(lrs) > 1:
            raise ValueError(f"all param groups must share one lr (or 0 to freeze a group), got {sorted(lrs)}: d is a "
                             f"global step size. Per-group multipliers belong in lr_scale/layer_scale "
                             f"(mupkit.param_groups(model) sets them).")
        self._sharded_groups = {id(p.device_mesh.get_group()): p.device_mesh.get_group()
                                for g in self.param_groups for p in g["params"]
                                if DTensor is not None and isinstance(p, DTensor)}

    def _effective_group(self, group: dict[str, Any], path: str) -> dict[str, Any]:
        """A copy of ``group`` with ``r``, its L2 coefficient ``l2`` and its decoupled decay per
        unit of ``dlr`` ``decay`` (see the module doc), ``eps * eps_scale`` and ``"path"``; ``lr``
        stays the global one."""
        wd, decouple = group["weight_decay"], group["decouple"]
        effective = {**group, "path": path, "r": group["lr_scale"] * group["layer_scale"],
                     "l2": 0.0 if decouple else wd * group["wd_scale"],
                     "decay": wd * group["lr_scale"] * group["wd_scale"] if decouple else 0.0}
        if "eps" in group:
            effective["eps"] = group["eps"] * group["eps_scale"]
        return effective

    def _lr(self) -> float:
        return max(group["lr"] for group in self.param_groups)

    def _shared(self) -> dict[str, Any]:
        top = self.param_groups[0]
        return {key: top[key] for key in self.shared_keys}

    def _store(self, values: dict[str, Any]) -> None:
        for group in self.param_groups:
            group.update(values)

    def _on_device(self, values: dict[str, Any], device: torch.device) -> torch.Tensor:
        """The state of ``d`` as one float64 1-D tensor on ``device`` (no host read)."""
        return torch.stack([v.to(device, torch.float64) if isinstance(v, torch.Tensor) else
                            torch.tensor(float(v), dtype=torch.float64, device=device)
                            for v in (values[key] for key in self.shared_keys)])

    def _finish(self, new: torch.Tensor, on_device: bool) -> dict[str, Any]:
        """Store the new state of ``d`` (:meth:`_advance`'s) in every group: as device tensors
        when ``on_device``, else read once to numbers. Returns what was stored."""
        values = dict(zip(self.shared_keys, new.unbind() if on_device else _numbers(new.tolist(), self.shared_keys)))
        self._store(values)
        return values

    def state_dict(self) -> dict[str, Any]:
        """torch's, with the state of ``d`` as numbers (one read when it is on the device)."""
        state = super().state_dict()
        values = self._shared()
        if any(isinstance(v, torch.Tensor) for v in values.values()):
            values = _host(values)
            for group in state["param_groups"]:
                group.update(values)
        return state

    def _all_reduce(self, sums: torch.Tensor) -> torch.Tensor:
        """``sums`` over every shard group (in place; one collective per group, on every rank)."""
        if self._sharded_groups:
            import torch.distributed as dist
            for group in self._sharded_groups.values():
                dist.all_reduce(sums, group=group)
        return sums

    def _reduce(self, terms: list[torch.Tensor], like: torch.Tensor | None, width: int = 2) -> list[float]:
        """Sum per-tensor rows of ``width`` terms locally, then over every shard group: one
        collective, one host read (the eager optimizers without kernels)."""
        device = like.device if like is not None else "cpu"
        total = torch.stack(terms).sum(0) if terms else torch.zeros(width, dtype=torch.float64, device=device)
        return self._all_reduce(total).tolist()

    def _items(self, group: dict[str, Any], keys: tuple[str, ...],
               init: Callable[[dict[str, Any], torch.Tensor], None]):
        """``(items, stacks)``: ``(p, g, state)`` of each parameter of ``group`` with a gradient (the
        rank-local tensors, ``state`` its tensors under ``keys``, made by ``init`` at the first
        step), or of each stack of them (``"stacked"``: the stacks, to write back after the step)."""
        params = [p for _, p in self._with_grads(group)]
        for p in params:
            if not self.state[p]:
                init(self.state[p], p)
        columns = [[self.state[p][key] for p in params] for key in keys]
        if group["path"] == "stacked" and params:
            stacks = self._stacks(params, [p.grad for p in params], columns)
            return [(s.param, s.grad, s.state) for s in stacks], stacks
        return list(zip(local_tensors(params)[0], local_tensors([p.grad for p in params])[0],
                        zip(*local_tensors(*columns)) if columns else [()] * len(params))), []

    def _stacked(self, gathered: list[tuple[dict[str, Any], list[list[Any]]]]):
        """``gathered`` with each ``"stacked"`` group's ``[params, grads, *state]`` columns
        replaced by columns of stacks (:meth:`_stacked_columns`; a state column of ``None``, a
        state the group does not keep, stays ``None`` per stack), and the stacks to write back."""
        out, stacks = [], []
        for group, columns in gathered:
            if group["path"] == "stacked":
                kept = [i for i, column in enumerate(columns) if column[0] is not None]
                group_stacks, stacked = self._stacked_columns([columns[i] for i in kept])
                stacks += group_stacks
                columns = [[None] * len(group_stacks)] * len(columns)
                for i, column in zip(kept, stacked):
                    columns[i] = column
            out.append((group, columns))
        return out, stacks

    def _count(self, params: list[torch.Tensor]) -> None:
        for p in params:
            self.state[p]["step"] += 1


def _numbers(values: list[float], keys: tuple[str, ...]) -> list[float | int]:
    return [int(v) if key == "k" else v for v, key in zip(values, keys)]


def _host(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` as numbers (one read of the device tensors among them)."""
    keys = tuple(values)
    read = torch.stack([torch.as_tensor(v, dtype=torch.float64).cpu() for v in values.values()]).tolist()
    return dict(zip(keys, _numbers(read, keys)))


def _bias_correction(group: dict[str, Any], k: float | torch.Tensor) -> float | torch.Tensor:
    """``sqrt(1 - beta2^(k+1)) / (1 - beta1^(k+1))`` with ``use_bias_correction``, else 1 (a
    number or, for a device ``k``, a device tensor)."""
    if not group["use_bias_correction"]:
        return 1.0
    beta1, beta2 = group["betas"]
    return (1 - beta2 ** (k + 1)) ** 0.5 / (1 - beta1 ** (k + 1))


def _run(fn: Callable[..., None], path: str, columns: list[list[torch.Tensor]], values: tuple[float, ...],
         sums: torch.Tensor | None = None) -> None:
    """``fn(*tensors, [sums], *values)`` over a group's tensors by its path: tensor by tensor
    (``"single"``), per (device, dtype) list (``"foreach"``, and ``"stacked"`` on columns of
    stacks), or compiled (``"compiled"``, each tensor's sums in a row of its own, added after).
    ``sums`` (float64) accumulates what ``fn`` adds to it."""
    if path == "compiled":
        rows = [] if sums is None else list(torch.zeros(len(columns[0]), sums.numel(), dtype=sums.dtype,
                                                        device=sums.device).unbind())
        run_compiled(fn, columns + ([rows] if rows else []), [values] * len(columns[0]))
        if rows:
            sums.add_(torch.stack(rows).sum(0))
        return
    extra = () if sums is None else (sums,)
    if path in ("foreach", "stacked"):  # "stacked": columns of stacks (:meth:`_DAdapted._stacked`)
        for bucket in by_device_and_dtype(*local_tensors(*columns)):
            fn(*bucket, *extra, *values)
    else:
        for tensors in zip(*local_tensors(*columns)):
            fn(*tensors, *extra, *values)


def _with_l2(g: ops.Tensors, p: ops.Tensors, l2: float | torch.Tensor) -> ops.Tensors:
    """``g + l2 p`` (new tensors), or ``g`` itself when ``l2`` is the number 0."""
    return g if isinstance(l2, (int, float)) and l2 == 0 else ops.add(g, p, l2)


def _nonzero(x: float | torch.Tensor) -> bool:
    """Whether an op scaled by ``x`` must run (always, for a tensor: the compiled path)."""
    return isinstance(x, torch.Tensor) or x != 0


def _add_sums(sums: torch.Tensor, num: torch.Tensor, l1: torch.Tensor) -> None:
    sums.add_(torch.stack([num, l1]).to(sums.device))


# ------------------------------------------------------------------------------ DAdaptAdam

def dadapt_adam_moments(p, g, m, v, s, sums, eps, num_scale, beta1, m_scale, beta2, one_minus_beta2, root,
                        s_scale, l2, r) -> None:
    """Pass 1 of a DAdaptAdam step of a parameter (or, on lists, of each), in place: with
    ``g <- g + l2 p``, ``sums += [num_scale <g, s / (sqrt(v) + eps)>, r ||s'||_1]`` (old ``s``,
    ``v``), ``m <- beta1 m + m_scale g``, ``v <- beta2 v + (1 - beta2) g^2``, ``s' = root s +
    s_scale g``: the reference's op sequence."""
    g = _with_l2(g, p, l2)
    quotient = ops.div_into(s, ops.add_scalar_(ops.sqrt(v), eps))
    num = ops.total_dot(g, quotient) * num_scale
    ops.mul_(m, beta1)
    ops.add_(m, g, alpha=m_scale)
    ops.mul_(v, beta2)
    ops.addcmul_(v, g, g, one_minus_beta2)
    ops.mul_(s, root)
    ops.add_(s, g, alpha=s_scale)
    _add_sums(sums, num, ops.total_abs(s, into=quotient) * r)


def dadapt_adam_apply(p, m, v, eps, decay) -> None:
    """Pass 2: ``p <- p - decay p - m / (sqrt(v) + eps)`` (``decay = dlr wd lr_scale wd_scale``)."""
    if _nonzero(decay):
        ops.add_(p, p, alpha=ops.negated(decay))
    ops.addcdiv_(p, m, ops.add_scalar_(ops.sqrt(v), eps), value=-1.0)


def dadapt_adam_step(p, g, m, v, s, sums, eps, num_scale, beta1, m_scale, beta2, one_minus_beta2, root, s_scale,
                     l2, r, decay) -> None:
    """Both passes of one parameter (or list) at once: valid once ``d`` has adapted (the update
    uses this step's ``m``, ``v`` and the previous ``d``; see :mod:`.kernels.dadapt`)."""
    dadapt_adam_moments(p, g, m, v, s, sums, eps, num_scale, beta1, m_scale, beta2, one_minus_beta2, root, s_scale,
                        l2, r)
    dadapt_adam_apply(p, m, v, eps, decay)


class DAdaptAdam(_DAdapted):
    """D-Adapted Adam (``dadaptation.DAdaptAdam`` 3.2 arguments and defaults) with muP group scales.

    Paths (:mod:`.dispatch`; ``foreach``/``compiled``/``fused`` choose): on CUDA fp32 the Triton
    kernel, one launch for all tensors with ``d`` on the device, once ``d`` has adapted (the
    first steps, until a gradient is nonzero, take the exact two-pass eager route);
    ``compiled=True``: :func:`dadapt_adam_step` under ``torch.compile`` (the first step costs the
    compile, seconds to minutes).
    """

    family = FAMILIES["adamw"]
    kernels = dispatch.Kernels(dtypes=FUSED_DTYPES, stacked=True)
    shared_keys = ("d", "numerator", "k")

    def __init__(self, params, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decouple: bool = False, use_bias_correction: bool = False,
                 d0: float = 1e-6, growth_rate: float = math.inf, *, foreach: bool | None = None,
                 compiled: bool | None = None, fused: bool | None = None):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        use_bias_correction=use_bias_correction, growth_rate=growth_rate, d=d0, k=0, numerator=0.0,
                        foreach=foreach, compiled=compiled, fused=fused)
        super().__init__(params, defaults, decouple)

    def _update(self, groups: list[dict[str, Any]]) -> None:
        top = self.param_groups[0]
        shared = self._shared()
        one_pass = isinstance(shared["k"], torch.Tensor) or shared["k"] > 0  # d adapted: the update may go first
        gathered = [(group, self._gather(group)) for group in groups]
        gathered = [(group, columns) for group, columns in gathered if columns[0]]
        counted = [columns[0] for _, columns in gathered]
        gathered, stacks = self._stacked(gathered)
        on_device = one_pass and bool(gathered) and all(group["path"] == "fused" for group, _ in gathered)
        if not on_device:
            shared = _host(shared)
        dlr = shared["d"] * self._lr() * _bias_correction(top, shared["k"])
        sums = _sums_buffer(gathered)
        applies = []
        for group, columns in gathered:
            if group["path"] == "fused" and one_pass:
                self._launch(columns, group, dlr, sums)
                continue
            path = "foreach" if group["path"] == "fused" else group["path"]
            values = _adam_values(group, top["betas"], dlr)
            if one_pass:
                _run(dadapt_adam_step, path, columns, values, sums)
            else:
                _run(dadapt_adam_moments, "single" if path == "compiled" else path, columns, values[:-1], sums)
                applies.append((path, [columns[0], columns[2], columns[3]], (values[0], values[-1])))
        new = self._finish(self._advance(shared, self._all_reduce(sums)), on_device)
        if not one_pass and new["k"] > shared["k"]:  # the reference skips the update while every gradient is 0
            for path, columns, values in applies:
                _run(dadapt_adam_apply, "single" if path == "compiled" else path, columns, values)
        for stack in stacks:
            stack.write_back()
        if one_pass or new["k"] > shared["k"]:
            for params in counted:
                self._count(params)

    def _gather(self, group: dict[str, Any]) -> list[list[torch.Tensor]]:
        """The group's ``[params, grads, exp_avgs, exp_avg_sqs, s]`` with a gradient (state made
        on the first step)."""
        columns: list[list[torch.Tensor]] = [[], [], [], [], []]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                for key in ("s", "exp_avg", "exp_avg_sq"):
                    state[key] = torch.zeros_like(p.detach())  # a DTensor for a sharded p (checkpoints)
            for column, t in zip(columns, (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["s"])):
                column.append(t)
        return columns

    def _launch(self, columns: list[list[torch.Tensor]], group: dict[str, Any], dlr: float | torch.Tensor,
                sums: torch.Tensor) -> None:
        from .kernels.dadapt import dadapt_adam
        dispatch.check_fused(type(self).__name__, columns[0], self.kernels)
        row = _adam_kernel_row(group, group["betas"])
        for bucket in by_device_and_dtype(*columns):
            shared = _device_values([dlr], bucket[0][0].device)
            sums.add_(dadapt_adam(*bucket, [row] * len(bucket[0]), shared).to(sums.device))

    def _advance(self, shared: dict[str, Any], sums: torch.Tensor) -> torch.Tensor:
        """The new ``[d, numerator, k]`` on the device from this step's ``[num, den]`` (unchanged
        where ``den`` is 0: the reference skips that step)."""
        top = self.param_groups[0]
        root = math.sqrt(top["betas"][1])
        d, numerator, k = old = self._on_device(shared, sums.device)
        num, den = sums.unbind()
        numerator = root * numerator + (1 - root) * num
        d = torch.maximum(d, torch.minimum(numerator / ((1 - root) * den), d * top["growth_rate"]))
        return torch.where(den > 0, torch.stack([d, numerator, k + 1]), old)


def _adam_values(group: dict[str, Any], betas: tuple[float, float], dlr: float) -> tuple[float, ...]:
    """:func:`dadapt_adam_step`'s values (a frozen group, lr 0: moments and sums left as they are)."""
    beta1, beta2 = betas
    root, r, decay = math.sqrt(beta2), group["r"], group["decay"] * dlr
    if group["lr"] == 0.0:
        return group["eps"], 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, decay
    return (group["eps"], r * dlr, beta1, r * dlr * (1 - beta1), beta2, 1 - beta2, root, dlr * (1 - root),
            group["l2"], r, decay)


def _adam_kernel_row(group: dict[str, Any], betas: tuple[float, float]) -> tuple[float, ...]:
    """The kernel's row (:data:`.kernels.dadapt.DADAPT_ADAM_ROW`): :func:`_adam_values` per unit ``dlr``."""
    beta1, beta2 = betas
    root, r = math.sqrt(beta2), group["r"]
    if group["lr"] == 0.0:
        return group["eps"], 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, group["decay"]
    return group["eps"], r, beta1, r * (1 - beta1), beta2, 1 - beta2, root, 1 - root, group["l2"], group["decay"]


def _sums_buffer(gathered: list[tuple[dict[str, Any], list[list[torch.Tensor]]]], width: int = 2) -> torch.Tensor:
    """Zeros for the step's sums, on the first gradient's (local) device (the CPU for none)."""
    device = local_tensor(gathered[0][1][0][0]).device if gathered else torch.device("cpu")
    return torch.zeros(width, dtype=torch.float64, device=device)


def _device_values(values: list[float | torch.Tensor], device: torch.device) -> torch.Tensor:
    """Numbers or 0-dim tensors as one float64 device array for a kernel's ``shared``."""
    if all(isinstance(v, torch.Tensor) for v in values):
        return torch.stack([v.to(device, torch.float64) for v in values])
    return torch.tensor([float(v) for v in values], dtype=torch.float64).to(device, non_blocking=True)


# ------------------------------------------------------------------------------ Prodigy

def prodigy_sums(p, g, p0, s, sums, l2, num_scale, beta3, s_scale, r) -> None:
    """Pass 1 of a Prodigy step of a (flat, ``slice_p``-sliced) parameter or list, in place: with
    ``g <- g + l2 p``, ``sums += [num_scale <g, p0 - p>, r ||s'||_1]``, ``s' = beta3 s + s_scale g``."""
    g = _with_l2(g, p, l2)
    displacement = ops.sub(p0, p)
    num = ops.total_dot(g, displacement) * num_scale  # weight 1: see the module doc
    ops.mul_(s, beta3)
    ops.add_(s, g, alpha=s_scale)
    _add_sums(sums, num, ops.total_abs(s, into=displacement) * r)


def _prodigy_step(p, g, m, v, l2, beta1, m_scale, beta2, v_scale, eps_d, decay, step) -> None:
    g = _with_l2(g, p, l2)
    if m is not None:
        ops.mul_(m, beta1)
        ops.add_(m, g, alpha=m_scale)
    ops.mul_(v, beta2)
    ops.addcmul_(v, g, g, v_scale)
    denom = ops.add_scalar_(ops.sqrt(v), eps_d)
    if _nonzero(decay):
        ops.add_(p, p, alpha=ops.negated(decay))
    if _nonzero(step):
        ops.addcdiv_(p, g if m is None else m, denom, value=ops.negated(step))


def prodigy_step(p, g, m, v, l2, beta1, m_scale, beta2, v_scale, eps_d, decay, step) -> None:
    """Pass 2 of a Prodigy step of a parameter (or list), in place: with ``g <- g + l2 p``,
    ``m <- beta1 m + m_scale g``, ``v <- beta2 v + v_scale g^2`` (the EMAs use the previous
    ``d``), ``p <- p - decay p - step m / (sqrt(v) + eps_d)`` (``eps_d = d eps`` with the new
    ``d``; ``decay``, ``step`` 0 on a skipped step)."""
    _prodigy_step(p, g, m, v, l2, beta1, m_scale, beta2, v_scale, eps_d, decay, step)


def prodigy_step_without_momentum(p, g, v, l2, beta1, m_scale, beta2, v_scale, eps_d, decay, step) -> None:
    """:func:`prodigy_step` with ``beta1 = 0``: ``p <- p - decay p - step g / (sqrt(v) + eps_d)``."""
    _prodigy_step(p, g, None, v, l2, beta1, m_scale, beta2, v_scale, eps_d, decay, step)


class Prodigy(_DAdapted):
    """Prodigy (``prodigyopt.Prodigy`` 1.1.2 arguments and defaults) with muP group scales.

    Two passes per step: the sums for ``d``, then the update, which needs the new ``d``.
    Paths (:mod:`.dispatch`; ``foreach``/``compiled``/``fused`` choose): on CUDA fp32 with
    ``slice_p=1`` the Triton kernels, one launch per pass for all tensors, ``d`` on the device;
    ``compiled=True`` (``slice_p=1``): both passes' functions under ``torch.compile`` (the first
    step costs the compile, seconds to minutes).
    """

    family = FAMILIES["adamw"]
    kernels = dispatch.Kernels(dtypes=FUSED_DTYPES, stacked=True, takes_group=lambda group: group["slice_p"] == 1)
    shared_keys = ("d", "d_max", "numerator", "k", "d_hat", "d_denom")

    def __init__(self, params, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999), beta3: float | None = None,
                 eps: float = 1e-8, weight_decay: float = 0.0, decouple: bool = True, use_bias_correction: bool = False,
                 safeguard_warmup: bool = False, d0: float = 1e-6, d_coef: float = 1.0, growth_rate: float = math.inf,
                 slice_p: int = 1, *, foreach: bool | None = None, compiled: bool | None = None,
                 fused: bool | None = None):
        if slice_p < 1:
            raise ValueError(f"slice_p={slice_p} must be >= 1")
        if (compiled or fused) and slice_p != 1:
            raise ValueError(f"compiled=True and fused=True support slice_p=1 only, got slice_p={slice_p}")
        defaults = dict(lr=lr, betas=tuple(betas), beta3=beta3, eps=eps, weight_decay=weight_decay,
                        use_bias_correction=use_bias_correction, safeguard_warmup=safeguard_warmup, d=d0, d0=d0,
                        d_max=d0, d_coef=d_coef, growth_rate=growth_rate, slice_p=slice_p, k=0, numerator=0.0,
                        d_hat=0.0, d_denom=0.0, foreach=foreach, compiled=compiled, fused=fused)
        super().__init__(params, defaults, decouple)

    def _update(self, groups: list[dict[str, Any]]) -> None:
        top = self.param_groups[0]
        beta1 = top["betas"][0]
        gathered = [(group, self._gather(group, beta1)) for group in groups]
        gathered = [(group, columns) for group, columns in gathered if columns[0]]
        counted = [columns[0] for _, columns in gathered]
        gathered, stacks = self._stacked(gathered)
        on_device = bool(gathered) and all(group["path"] == "fused" for group, _ in gathered)
        old = self._shared() if on_device else _host(self._shared())
        d, d0 = old["d"], top["d0"]
        dlr = d * self._lr() * _bias_correction(top, old["k"])
        sums = _sums_buffer(gathered)
        for group, columns in gathered:
            if group["lr"] == 0.0:
                continue
            p, g, p0, s = columns[0], columns[1], columns[3], columns[4]
            if group["path"] == "fused":
                self._launch_sums([p, g, p0, s], group, [d / d0 * dlr, d / d0 * d], sums)
                continue
            if group["path"] == "stacked":  # each row is a parameter; a row of 0-dim p0s is one column
                sliced = [[t.flatten(1)[:, ::group["slice_p"]] for t in column] for column in (p, g)]
                p0 = [z.view(-1, 1) if z.dim() == 1 else z for z in p0]
            else:
                sliced = [_sliced(t, group["slice_p"]) for t in (p, g)]
            if group["path"] == "foreach":
                p0 = [z.expand(x.shape) if z.dim() == 0 else z for z, x in zip(p0, local_tensors(sliced[0])[0])]
            s_scale = d / d0 * (d if group["safeguard_warmup"] else dlr)
            _run(prodigy_sums, group["path"], [*sliced, p0, s], (group["l2"], d / d0 * dlr, _beta3(top), s_scale,
                                                               group["r"]), sums)
        new = self._finish(self._advance(old, self._all_reduce(sums)), on_device)
        live = new["k"] > old["k"]  # a tensor on the device: the step gates the update there
        step = dlr * live
        for group, columns in gathered:
            p, g, m, v = columns[0], columns[1], columns[2], columns[5]
            momentum = [m] if beta1 > 0 else []
            fn = prodigy_step if beta1 > 0 else prodigy_step_without_momentum
            if group["path"] == "fused":
                self._launch_step([p, g, m if beta1 > 0 else None, v], group,
                                  [d, new["d"], step, step if beta1 > 0 else step * new["d"]])
            else:
                _run(fn, group["path"], [p, g, *momentum, v], _step_values(group, top, d, new["d"], step))
        for stack in stacks:
            stack.write_back()
        if on_device or live:
            for params in counted:
                self._count(params)

    def _gather(self, group: dict[str, Any], beta1: float) -> list[list[torch.Tensor]]:
        """The group's ``[params, grads, exp_avgs, p0s, s, exp_avg_sqs]`` with a gradient
        (``exp_avg`` None without momentum; state made on the first step, as prodigyopt lays it
        out: ``s`` and ``p0`` flat and sliced by ``slice_p``, ``p0`` 0-dim for a parameter that
        starts all zeros)."""
        columns: list[list[Any]] = [[], [], [], [], [], []]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                local, step = local_tensor(p), group["slice_p"]
                state["step"] = 0
                state["s"] = _flat_state(p, torch.zeros_like(local.flatten()[::step]), step)
                unsharded_zero = not isinstance(p, DTensor or ()) and not local.any()  # the reference's 0-dim p0
                state["p0"] = (local.new_zeros(()) if unsharded_zero else
                               _flat_state(p, local.flatten()[::step].clone(), step))
                if beta1 > 0:
                    state["exp_avg"] = torch.zeros_like(p.detach())
                state["exp_avg_sq"] = torch.zeros_like(p.detach())
            for column, t in zip(columns, (p, p.grad, state.get("exp_avg"), state["p0"], state["s"],
                                           state["exp_avg_sq"])):
                column.append(t)
        return columns

    def _launch_sums(self, columns: list[list[torch.Tensor]], group: dict[str, Any], shared: list,
                     sums: torch.Tensor) -> None:
        from .kernels.dadapt import prodigy_sums as launch
        dispatch.check_fused(type(self).__name__, columns[0], self.kernels)
        row = (group["l2"], _beta3(self.param_groups[0]), float(group["safeguard_warmup"]), group["r"])
        for bucket in by_device_and_dtype(*columns):
            rows = [(*row, float(p0.dim() == 0)) for p0 in bucket[2]]
            sums.add_(launch(*bucket, rows, _device_values(shared, bucket[0][0].device)).to(sums.device))

    def _launch_step(self, columns: list[list[Any]], group: dict[str, Any], shared: list) -> None:
        from .kernels.dadapt import prodigy_update as launch
        dispatch.check_fused(type(self).__name__, columns[0], self.kernels)
        beta1, beta2 = self.param_groups[0]["betas"]
        frozen = group["lr"] == 0.0
        row = (group["l2"], 1.0 if frozen else beta1, 0.0 if frozen else group["r"] * (1 - beta1),
               1.0 if frozen else beta2, 0.0 if frozen else 1 - beta2, group["eps"], group["decay"],
               1.0 if beta1 > 0 else group["r"])
        momentum = columns[2] is not None
        present = columns if momentum else [columns[0], columns[1], columns[3]]
        for bucket in by_device_and_dtype(*present):
            p, g, *rest = bucket
            m, v = (rest[0], rest[1]) if momentum else (None, rest[0])
            launch(p, g, m, v, [row] * len(p), _device_values(shared, p[0].device))

    def _advance(self, old: dict[str, Any], sums: torch.Tensor) -> torch.Tensor:
        """The new ``[d, d_max, numerator, k, d_hat, d_denom]`` on the device from this step's
        ``[delta, den]`` (unchanged where ``den`` is 0: the reference skips that step)."""
        top = self.param_groups[0]
        d, d_max, numerator, k, d_hat, d_denom = before = self._on_device(old, sums.device)
        delta, den = sums.unbind()
        numerator = _beta3(top) * numerator + delta
        d_hat = top["d_coef"] * numerator / den
        d = torch.where(d == top["d0"], torch.maximum(d, d_hat), d)
        d_max = torch.maximum(d_max, d_hat)
        d = torch.minimum(d_max, d * top["growth_rate"])
        return torch.where(den > 0, torch.stack([d, d_max, numerator, k + 1, d_hat, den]), before)


def _beta3(top: dict[str, Any]) -> float:
    return top["beta3"] if top["beta3"] is not None else math.sqrt(top["betas"][1])


def _sliced(column: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    """Each tensor flattened and sliced by ``slice_p`` (views; the DTensor's local shard)."""
    return [t.view(-1) if step == 1 and t.is_contiguous() else local_tensor(t).flatten()[::step] for t in column]


def _step_values(group: dict[str, Any], top: dict[str, Any], d_old: float, d_new: float,
                 step: float) -> tuple[float, ...]:
    """:func:`prodigy_step`'s values (``step``: ``dlr``, 0 on a skipped step; a frozen group's
    moments are left as they are)."""
    beta1, beta2 = top["betas"]
    decay, r = group["decay"] * step, group["r"]
    step = step if beta1 > 0 else r * step * d_new
    if group["lr"] == 0.0:
        return group["l2"], 1.0, 0.0, 1.0, 0.0, d_new * group["eps"], decay, step
    return (group["l2"], beta1, r * d_old * (1 - beta1), beta2, d_old * d_old * (1 - beta2), d_new * group["eps"],
            decay, step)


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


class DAdaptSGD(_DAdapted):
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
                        numerator=0.0, g0_norm=0.0)
        super().__init__(params, defaults, decouple=False)

    def _update(self, groups: list[dict[str, Any]]) -> None:
        top = self.param_groups[0]
        d, k, lr = top["d"], top["k"], top["lr"]
        if k == 0:  # the first gradient's norm fixes the scale of dlr (one reduction)
            # of the raw gradient, without weight decay, as the reference effectively computes it
            live = [(group, p) for group in groups for _, p in self._with_grads(group)]
            terms = [torch.stack([local_tensor(p.grad).square().sum(), torch.zeros((), dtype=p.dtype, device=p.device)])
                     .to(torch.float64) for group, p in live if group["lr"] > 0]
            g_sq, _ = self._reduce(terms, local_tensor(live[0][1].grad) if live else None)
            if g_sq == 0:
                return
            self._store(dict(g0_norm=math.sqrt(g_sq)))
        dlr = d * lr / top["g0_norm"]
        items = [(group, *self._items(group, ("z", "x0", "s"), _sgd_state)) for group in groups]
        terms, like = [], None
        for group, entries, _ in items:
            if group["lr"] > 0.0:
                for p, g, (_, _, s) in entries:
                    g = _with_l2(g, p, group["l2"])
                    num = torch.dot(g.flatten(), s.flatten()) * (group["r"] * dlr)
                    s.add_(g, alpha=dlr)
                    terms.append(torch.stack([num, torch.dot(s.flatten(), s.flatten()) * group["r"]]).to(torch.float64))
                    like = g
        delta, sk_sq = self._reduce(terms, like)
        numerator = top["numerator"] + delta
        if sk_sq == 0:
            return
        d = max(d, min(2 * numerator / math.sqrt(sk_sq), d * top["growth_rate"]))
        self._store(dict(numerator=numerator, d=d, k=k + 1))
        for group, entries, stacks in items:
            for p, _, (z, x0, s) in entries:
                torch.sub(x0, s, alpha=group["r"], out=z)
                p.mul_(group["momentum"]).add_(z, alpha=1 - group["momentum"])
            for stack in stacks:
                stack.write_back()


def _sgd_state(state: dict[str, Any], p: torch.Tensor) -> None:
    state["z"], state["x0"] = p.detach().clone(), p.detach().clone()
    state["s"] = torch.zeros_like(p.detach())


class DAdaptLion(_DAdapted):
    """D-Adapted Lion (``dadaptation.DAdaptLion`` 3.2) with muP group scales.

    ``u = sign(beta1 m + (1 - beta1) g)``; ``p <- p (1 - dlr wd) - r dlr u``; ``m <- beta2 m + (1 -
    beta2) dlr g``; ``num += r dlr <u, s>``; ``s <- sqrt(beta2) s + (1 - sqrt(beta2)) dlr u``;
    ``den += r ||s||_1``; ``d <- max(d, num_w / ((1 - sqrt(beta2)) den))``.
    """

    family = FAMILIES["adamw"]

    def __init__(self, params, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0,
                 d0: float = 1e-6):
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, d=d0, k=0, numerator=0.0)
        super().__init__(params, defaults, decouple=True)

    def _update(self, groups: list[dict[str, Any]]) -> None:
        top = self.param_groups[0]
        beta1, beta2 = top["betas"]
        d, lr = top["d"], top["lr"]
        dlr, root = d * lr, math.sqrt(beta2)
        terms, like = [], None
        for group in groups:
            r = group["r"]
            entries, stacks = self._items(group, ("exp_avg", "s"), _lion_state)
            for p, g, (m, s) in entries:
                if group["decay"]:
                    p.add_(p, alpha=-group["decay"] * dlr)
                update = m.mul(beta1).add_(g, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-r * dlr)
                m.mul_(beta2).add_(g, alpha=(1 - beta2) * dlr)
                num = torch.dot(update.flatten(), s.flatten()) * (r * dlr)
                s.mul_(root).add_(update, alpha=(1 - root) * dlr)
                terms.append(torch.stack([num, s.abs().sum() * r]).to(torch.float64))
                like = g
            for stack in stacks:
                stack.write_back()
        num, den = self._reduce(terms, like)
        numerator = root * top["numerator"] + (1 - root) * num
        if den == 0:
            return
        self._store(dict(numerator=numerator, d=max(d, numerator / ((1 - root) * den)), k=top["k"] + 1))


def _lion_state(state: dict[str, Any], p: torch.Tensor) -> None:
    state["exp_avg"], state["s"] = torch.zeros_like(p.detach()), torch.zeros_like(p.detach())


class DAdaptAdaGrad(_DAdapted):
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
                        k=0, gsq_weighted=0.0, sksq_weighted=0.0, skl1=0.0)
        super().__init__(params, defaults, decouple=False)

    def _update(self, groups: list[dict[str, Any]]) -> None:
        top = self.param_groups[0]
        d = top["d"]
        dlr = d * top["lr"]
        terms, like = [], None
        items = [(group, *self._items(group, ("alphak", "sk", "x0"), _adagrad_state)) for group in groups]
        for group, entries, _ in items:
            for p, g, (a, sk, _) in entries:
                g = _with_l2(g, p, group["l2"])
                old_q = a.sqrt().add_(group["eps"])
                old_sksq, old_l1 = (sk * sk).div(old_q).sum(), sk.abs().sum()
                a.add_(g * g)
                q = a.sqrt().add_(group["eps"])
                g_sq = (g * g).div(q).sum()
                sk.add_(g, alpha=dlr)
                terms.append(torch.stack([g_sq, (sk * sk).div(q).sum() - old_sksq, sk.abs().sum() - old_l1])
                             .to(torch.float64) * group["r"])
                like = g
        g_sq, sksq_change, skl1_change = self._reduce(terms, like, width=3)
        sksq_weighted, skl1 = top["sksq_weighted"] + sksq_change, top["skl1"] + skl1_change
        if skl1 == 0:
            return
        gsq_weighted = top["gsq_weighted"] + dlr * dlr * g_sq
        d = max(d, min((sksq_weighted - gsq_weighted) / skl1, d * top["growth_rate"]))
        self._store(dict(gsq_weighted=gsq_weighted, skl1=skl1, sksq_weighted=sksq_weighted, d=d))
        for group, entries, stacks in items:
            for p, _, (a, sk, x0) in entries:
                z = x0 - group["r"] * sk / a.sqrt().add_(group["eps"])
                p.mul_(group["momentum"]).add_(z, alpha=1 - group["momentum"])
            for stack in stacks:
                stack.write_back()


def _adagrad_state(state: dict[str, Any], p: torch.Tensor) -> None:
    state["alphak"] = torch.full_like(p.detach(), 1e-6)
    state["sk"], state["x0"] = torch.zeros_like(p.detach()), p.detach().clone()


__all__ = ["DAdaptAdaGrad", "DAdaptAdam", "DAdaptLion", "DAdaptSGD", "Prodigy"]
