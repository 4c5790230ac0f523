"""muP-aware drop-in replacements for ``torch.optim.Adam``, ``AdamW`` and ``SGD``.

They run torch's own kernels (single-tensor, foreach or fused, chosen by the usual
``foreach=``/``fused=`` arguments; by default torch's fused kernel on the CPU, torch's own
choice elsewhere) with each group's ``lr * lr_scale``,
weight decay per policy and ``eps * eps_scale`` (see :mod:`mupkit.optim.scaled`). Pass
``mupkit.param_groups(model)``, or plain parameters (all scales 1: torch's class, up to the
rounding of its fused CPU kernel; ``fused=False`` gives torch's CPU default bitwise).

``fused=True`` with CUDA parameters runs mupkit's Triton kernel instead (when Triton is
installed): one launch per (device, dtype) for every group, where torch's fused kernels launch
once per group; the state layout is torch's. ``amsgrad``, ``capturable`` and ``differentiable``
keep torch's kernels.
"""

from __future__ import annotations

from typing import Any

import torch

from ..rules import FAMILIES
from .scaled import ScaledGroups
from .tensors import by_device_and_dtype, plain_dense


def triton_route(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``step()`` takes the Triton kernel: ``fused=True`` on CUDA tensors, Triton present,
    and none of the options only torch's kernels implement."""
    from . import kernels
    groups = optimizer.param_groups
    if not all(g.get("fused") for g in groups) or any(g.get(k) for g in groups
                                                       for k in ("amsgrad", "capturable", "differentiable")):
        return False
    return kernels.triton_available() and all(p.is_cuda for g in groups for p in g["params"])


def cpu_fused_by_default(group: dict[str, Any]) -> bool:
    """Whether a group that chose no implementation (``fused`` and ``foreach`` None) runs torch's
    fused CPU kernel: all its parameters are plain dense floating-point CPU tensors and no
    ``differentiable`` or ``capturable`` step is asked for. That kernel is one pass over each
    tensor, 4.5x faster on the CPU than torch's default for-loop there (25M-parameter GPT, 2
    threads); the results differ from the for-loop's only by rounding."""
    if group.get("fused") is not None or group.get("foreach") is not None or group.get("differentiable") \
            or group.get("capturable"):
        return False
    return all(plain_dense(p) and p.device.type == "cpu" and p.is_floating_point() for p in group["params"])


class TritonFused:
    """Mixin: the default and Triton routes of ``step()``; subclasses define
    ``_kernel_inputs(group, p)`` -> ``(tensors for the kernel after p and grad, value row)``.

    Default (``fused=None``, ``foreach=None``): torch's fused kernel on the CPU
    (:func:`cpu_fused_by_default`), torch's own default elsewhere. ``fused=True`` on CUDA: the
    Triton kernel (:func:`triton_route`)."""

    def step(self, closure=None):
        if not triton_route(self):
            defaulted = [group for group, yes in zip(self.param_groups, self._cpu_fused_groups()) if yes]
            for group in defaulted:
                group["fused"] = True
            try:
                return super().step(closure)
            finally:
                for group in defaulted:
                    group["fused"] = None
        loss = self._loss(closure)
        with torch.no_grad(), self._effective_hyperparameters():
            columns: list[list[Any]] = []
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    tensors, row = self._kernel_inputs(group, p)
                    columns.append([p, p.grad, *tensors, row])
            if columns:
                for bucket in by_device_and_dtype(*zip(*columns)):
                    self._launch(*bucket)
        return loss

    def _cpu_fused_groups(self) -> list[bool]:
        """:func:`cpu_fused_by_default` per group, decided when the groups are first stepped and
        again whenever they are replaced (``load_state_dict``) or added (``add_param_group``): a
        per-step check of every parameter would cost ~5 us per group."""
        key = (id(self.param_groups), len(self.param_groups))
        if getattr(self, "_cpu_fused_key", None) != key:
            self._cpu_fused_key, self._cpu_fused = key, [cpu_fused_by_default(g) for g in self.param_groups]
        return self._cpu_fused


class _AdamKernel(TritonFused):
    """The Triton route's inputs for Adam (``decoupled = False``) and AdamW (``True``)."""

    decoupled: bool

    def _kernel_inputs(self, group: dict[str, Any], p: torch.Tensor):
        from .kernels.elementwise import adam_row
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        row = adam_row(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                       decoupled=self.decoupled, step=int(state["step"]), maximize=group["maximize"])
        return (state["exp_avg"], state["exp_avg_sq"]), row

    @staticmethod
    def _launch(params, grads, exp_avgs, exp_avg_sqs, rows):
        from .kernels.elementwise import adam
        adam(params, grads, exp_avgs, exp_avg_sqs, rows)


class Adam(_AdamKernel, ScaledGroups, torch.optim.Adam):
    """``torch.optim.Adam`` (L2 weight decay added to the gradient) with muP group scales."""

    family = FAMILIES["adam"]
    decoupled = False


class AdamW(_AdamKernel, ScaledGroups, torch.optim.AdamW):
    """``torch.optim.AdamW`` (decoupled weight decay) with muP group scales."""

    family = FAMILIES["adamw"]
    decoupled = True


class SGD(TritonFused, ScaledGroups, torch.optim.SGD):
    """``torch.optim.SGD`` with muP group scales (TP5 Table 8 SGD column)."""

    family = FAMILIES["sgd"]

    def _kernel_inputs(self, group: dict[str, Any], p: torch.Tensor):
        from .kernels.elementwise import sgd_row
        state = self.state[p]
        first = group["momentum"] != 0 and state.get("momentum_buffer") is None
        if first:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        row = sgd_row(lr=group["lr"], weight_decay=group["weight_decay"], momentum=group["momentum"],
                      dampening=group["dampening"], nesterov=group["nesterov"], first=first,
                      maximize=group["maximize"])
        return ((state["momentum_buffer"] if group["momentum"] else None),), row

    @staticmethod
    def _launch(params, grads, buffers, rows):
        from .kernels.elementwise import sgd
        if any(b is None for b in buffers) and not all(b is None for b in buffers):
            raise ValueError("SGD(fused=True) groups mixing momentum 0 and momentum > 0 on one device and dtype "
                             "are not supported by the Triton kernel; give them the same momentum.")
        sgd(params, grads, None if buffers[0] is None else list(buffers), rows)
