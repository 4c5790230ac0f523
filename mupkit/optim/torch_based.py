"""muP-aware drop-in replacements for ``torch.optim.Adam``, ``AdamW`` and ``SGD``.

They run torch's own kernels (single-tensor, foreach or fused, chosen by the usual
``foreach=``/``fused=`` arguments) with each group's ``lr * lr_scale``, weight decay per policy
and ``eps * eps_scale`` (see :mod:`mupkit.optim.scaled`). Pass ``mupkit.param_groups(model)``,
or plain parameters (all scales 1: torch's class, up to the rounding of its fused CPU kernel;
``fused=False`` gives torch's CPU default bitwise).

``fused=True`` with CUDA parameters runs mupkit's Triton kernel instead (when Triton is
installed): one launch per (device, dtype) for every group, where torch's fused kernels launch
once per group; the state layout is torch's fused one (``step`` on the device). ``amsgrad``,
``capturable`` and ``differentiable`` keep torch's kernels. By default (no ``fused``/``foreach``
given) a step is fused: torch's kernel on the CPU, the Triton kernel on CUDA
(:func:`group_fused_by_default`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..rules import FAMILIES
from .master import MasterWeights
from .scaled import ScaledGroups
from .tensors import by_device_and_dtype, device_steps, plain_dense


def triton_route(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``step()`` takes the Triton kernel: ``fused=True`` on CUDA tensors, Triton present,
    and none of the options only torch's kernels implement."""
    from . import kernels
    groups = optimizer.param_groups
    if not all(g.get("fused") for g in groups) or any(g.get(k) for g in groups
                                                       for k in ("amsgrad", "capturable", "differentiable")):
        return False
    return kernels.triton_available() and all(p.is_cuda for g in groups for p in g["params"])


def group_fused_by_default(group: dict[str, Any]) -> bool:
    """Whether a group that chose no implementation (``fused`` and ``foreach`` None, no
    ``differentiable`` or ``capturable`` step) runs fused: on the CPU torch's fused kernel, when
    all its parameters are plain dense floating-point CPU tensors (one pass over each tensor,
    4.5x faster than torch's default for-loop there: 25M-parameter GPT, 2 threads; the results
    differ from the for-loop's only by rounding); on CUDA the Triton kernel, when
    :func:`.kernels.fused_by_default` holds for them (or, with groups that chose another path,
    torch's fused CUDA kernel)."""
    if group.get("fused") is not None or group.get("foreach") is not None or group.get("differentiable") \
            or group.get("capturable"):
        return False
    params = group["params"]
    if all(plain_dense(p) and p.device.type == "cpu" and p.is_floating_point() for p in params):
        return True
    from . import kernels
    return kernels.fused_by_default(params)


class TritonFused:
    """Mixin: the default and Triton routes of ``step()``; subclasses define
    ``_group_inputs(group, params)`` -> the kernel's tensor lists after params and grads, then the
    value rows (one per parameter), and ``_launch`` (one launch per device and dtype).

    Default (``fused=None``, ``foreach=None``): fused (:func:`group_fused_by_default`), else torch's own
    default. ``fused=True`` on CUDA: the Triton kernel (:func:`triton_route`)."""

    def step(self, closure=None):
        loss = self._loss(closure)  # on the model's own parameters, before any master copy is swapped in
        defaulted = [group for group, yes in zip(self.param_groups, self._fused_by_default()) if yes]
        for group in defaulted:
            group["fused"] = True
        try:
            with self._master_weights():
                self._triton_step() if triton_route(self) else super().step()
        finally:
            for group in defaulted:
                group["fused"] = None
        return loss

    def _triton_step(self) -> None:
        with torch.no_grad(), self._merged_groups(), self._effective_hyperparameters():  # equal groups: one row
            columns: list[list[Any]] = []
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                if params:
                    lists = (params, [p.grad for p in params], *self._group_inputs(group, params))
                    columns = columns or [[] for _ in lists]
                    for column, new in zip(columns, lists):
                        column.extend(new)
            if columns:
                from . import kernels
                kernels.check_fused(type(self).__name__, columns[0])
                for bucket in by_device_and_dtype(*columns):
                    self._launch(*bucket)

    def _fused_by_default(self) -> list[bool]:
        """:func:`group_fused_by_default` per group, decided when the groups are first stepped and
        again whenever they are replaced (``load_state_dict``), added (``add_param_group``) or
        change their choice of path: a per-step check of every parameter would cost ~5 us per
        group."""
        key = (id(self.param_groups), tuple((g.get("fused"), g.get("foreach"), g.get("differentiable"),
                                             g.get("capturable")) for g in self.param_groups))
        if getattr(self, "_fused_default_key", None) != key:
            self._fused_default_key, self._fused_default = key, [group_fused_by_default(g) for g in self.param_groups]
        return self._fused_default


class _AdamKernel(TritonFused):
    """The Triton route's inputs for Adam (``decoupled = False``) and AdamW (``True``)."""

    decoupled: bool

    def _group_inputs(self, group: dict[str, Any], params: list[torch.Tensor]):
        from .kernels.elementwise import adam_row
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        row = adam_row(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                       decoupled=self.decoupled, maximize=group["maximize"])
        return ([s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], device_steps(states, params),
                [row] * len(params))

    @staticmethod
    def _launch(params, grads, exp_avgs, exp_avg_sqs, steps, rows):
        from .kernels.elementwise import adam
        # one launch per state dtype too (a checkpoint can hold fp32 moments for some bf16 parameters)
        for ms, ps, gs, vs, ss, rs in by_device_and_dtype(exp_avgs, params, grads, exp_avg_sqs, steps, rows):
            adam(ps, gs, ms, vs, ss, rs)


class Adam(_AdamKernel, MasterWeights, ScaledGroups, torch.optim.Adam):
    """``torch.optim.Adam`` (L2 weight decay added to the gradient) with muP group scales."""

    family = FAMILIES["adam"]
    decoupled = False


class AdamW(_AdamKernel, MasterWeights, ScaledGroups, torch.optim.AdamW):
    """``torch.optim.AdamW`` (decoupled weight decay) with muP group scales."""

    family = FAMILIES["adamw"]
    decoupled = True


class SGD(TritonFused, MasterWeights, ScaledGroups, torch.optim.SGD):
    """``torch.optim.SGD`` with muP group scales (TP5 Table 8 SGD column)."""

    family = FAMILIES["sgd"]

    def _group_inputs(self, group: dict[str, Any], params: list[torch.Tensor]):
        from .kernels.elementwise import sgd_row
        buffers, rows = [], []
        for p in params:
            state = self.state[p]
            first = group["momentum"] != 0 and state.get("momentum_buffer") is None
            if first:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buffers.append(state["momentum_buffer"] if group["momentum"] else None)
            rows.append(sgd_row(lr=group["lr"], weight_decay=group["weight_decay"], momentum=group["momentum"],
                                dampening=group["dampening"], nesterov=group["nesterov"], first=first,
                                maximize=group["maximize"]))
        return buffers, rows

    @staticmethod
    def _launch(params, grads, buffers, rows):
        from .kernels.elementwise import sgd
        if any(b is None for b in buffers) and not all(b is None for b in buffers):
            raise ValueError("SGD(fused=True) groups mixing momentum 0 and momentum > 0 on one device and dtype "
                             "are not supported by the Triton kernel; give them the same momentum.")
        if buffers[0] is None:
            sgd(params, grads, None, rows)
            return
        for bs, ps, gs, rs in by_device_and_dtype(buffers, params, grads, rows):  # one launch per buffer dtype too
            sgd(ps, gs, bs, rs)
