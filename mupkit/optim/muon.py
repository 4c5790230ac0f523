"""Muon for the whole model, with muP: orthogonalized momentum for the hidden matrices, AdamW for
the rest, one optimizer and one ``state_dict``.

For a hidden matrix ``W`` of fan-out ``A`` and fan-in ``B`` (a conv kernel ``(out, in, *k)`` is the
matrix ``(out, in * prod(k))``), with its group's effective ``lr`` (``lr * lr_scale``) and ``wd``::

    m <- lerp(m, g, 1 - momentum)                         (torch.optim.Muon's buffer)
    u <- lerp(g, m, momentum) if nesterov else m
    O <- NS(u)                                            (Newton-Schulz, :mod:`.newton_schulz`)
    W <- W (1 - lr wd) - lr adjust(A, B) O                (adjust: ``adjust_lr_fn``, :mod:`mupkit.spectral`)

the step of ``torch.optim.Muon`` (Jordan 2024; Liu et al. 2025 for ``"match_rms_adamw"``).
``lr_scale`` is the spectral rule of the ``muon`` (``adjust_lr_fn`` None/``"original"``) or
``muon-rms`` (``"match_rms_adamw"``) family: ``[sqrt(A/B)/adjust(A,B)] / [sqrt(A0/B0)/adjust(A0,B0)]``,
1 at the base width, so there this optimizer equals ``torch.optim.Muon``; no Adam rule is ever
applied to these matrices (the double scaling of Megatron-LM #3715).

Which parameters are orthogonalized is the plan's role, not ``ndim``: with
``mupkit.param_groups(model)`` the hidden matrices are; embeddings, readouts, vectors and
scalars are stepped by ``mupkit.optim.AdamW``'s own implementation (same paths, same numbers)
with the ``adamw`` family's muP multipliers, at ``adam_lr`` (or ``lr * adam_lr_ratio``), in the
same param groups list, so any ``torch.optim.lr_scheduler`` scales both parts alike. Plain
parameters (no plan) are all orthogonalized, as ``torch.optim.Muon`` does.

``blocks``: ``{glob: n}`` over parameter names (groups from :func:`mupkit.param_groups` carry
them): a fused matrix such as QKV ``[3h, h]`` is split along its fan-out into ``n`` equal blocks,
each orthogonalized and given its own ``adjust`` (orthogonalized as one, a fused QKV steps
``sqrt(3)`` further than three separate matrices: DeepSpeed #8580).

Paths (:mod:`.dispatch`): ``"foreach"`` stacks the same-shape matrices of a group (blocks
included) and runs each Newton-Schulz product as one batched matmul for all of them;
``"single"`` runs matrix by matrix (a fused parameter's blocks still batched). ``ns_dtype``: the
iteration's precision, bfloat16 by default on every device as ``torch.optim.Muon`` does (bf16
matmuls are also the faster ones on CPUs with AVX512-BF16/AMX); ``torch.float32`` for an exact
orthogonalization. FSDP2 (``fully_shard`` DTensors): each matrix's update is gathered whole
(``full_tensor``), orthogonalized, and the local shard of the result applied, so a sharded run
equals a single-process one.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Mapping

import torch

from ..rules import FAMILIES, MUON_FAMILIES
from ..spectral import adjust
from . import dispatch
from .base import Optimizer
from .groups import resolve_groups
from .newton_schulz import COEFFICIENTS, EPS, STEPS, orthogonalize
from .sharding import DTensor
from .tensors import state_dtype
from .torch_based import AdamW


def _adam_group(group: dict[str, Any]) -> bool:
    return not group.get("orthogonalize", True)


class Muon(Optimizer):
    """Muon with muP group scales; a drop-in for ``torch.optim.Muon`` that also steps the rest.

    ``lr``, ``weight_decay``, ``momentum``, ``nesterov``, ``ns_coefficients``, ``eps``, ``ns_steps``,
    ``adjust_lr_fn``: ``torch.optim.Muon``'s, for the orthogonalized matrices (``adjust_lr_fn``
    also picks the muP family, ``muon`` or ``muon-rms``). The AdamW part: ``adam_lr`` (default
    ``lr * adam_lr_ratio``), ``adam_betas``, ``adam_eps``, ``adam_weight_decay`` (default
    ``weight_decay``). ``blocks``, ``ns_dtype``, ``foreach``: see the module doc.
    """

    family = FAMILIES["muon"]  # the instance's: that of its adjust_lr_fn
    #: the AdamW part takes AdamW's paths (torch's fused CPU kernel, mupkit's Triton kernel on CUDA);
    #: the orthogonalized groups the eager ones (single, or foreach: batched Newton-Schulz)
    kernels = dispatch.Kernels(cpu_fused=True, takes_group=_adam_group)

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = COEFFICIENTS,
                 eps: float = EPS, ns_steps: int = STEPS, adjust_lr_fn: str | None = None, *,
                 adam_lr: float | None = None, adam_lr_ratio: float = 1.0,
                 adam_betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8,
                 adam_weight_decay: float | None = None, blocks: Mapping[str, int] | None = None,
                 ns_dtype: torch.dtype = torch.bfloat16, foreach: bool | None = None,
                 weight_decay_policy: str | None = None, master_weights: bool = False):
        if adjust_lr_fn not in MUON_FAMILIES:
            raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r}; use None, 'original' or 'match_rms_adamw'")
        if not lr >= 0 or not momentum >= 0 or not weight_decay >= 0:
            raise ValueError(f"lr={lr}, momentum={momentum} and weight_decay={weight_decay} must be >= 0")
        if not 0 < ns_steps < 100:
            raise ValueError(f"ns_steps={ns_steps}: use 1..99 Newton-Schulz steps")
        for glob, n in (blocks or {}).items():
            if not (isinstance(n, int) and n >= 1):
                raise ValueError(f"blocks={{{glob!r}: {n!r}}}: the number of blocks must be an integer >= 1")
        self.family = FAMILIES[MUON_FAMILIES[adjust_lr_fn]]
        self.blocks = dict(blocks or {})
        params = list(params)
        self._check_owned(params)
        flat = [p for g in params for p in (list(g["params"]) if isinstance(g, dict) else [g])]
        # the AdamW part's algorithm: mupkit.optim.AdamW itself, run on this optimizer's state and groups
        self._adam = AdamW(flat, lr=lr * adam_lr_ratio if adam_lr is None else adam_lr, betas=adam_betas,
                           eps=adam_eps, weight_decay=weight_decay if adam_weight_decay is None else adam_weight_decay,
                           foreach=foreach)
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                        ns_dtype=ns_dtype, foreach=foreach)
        super().__init__(params, defaults, weight_decay_policy=weight_decay_policy, master_weights=master_weights)
        if not any(g["orthogonalize"] for g in self.param_groups):
            raise ValueError("Muon got no hidden matrix to orthogonalize: the plan gives every parameter the input, "
                             "output, vector or scalar role. A model built at its base size without delta= has no "
                             "roles (all 'scalar'): pass delta= (e.g. the base with the width doubled) to "
                             "mupkit.build; for a model with no hidden layers use mupkit.optim.AdamW.")

    def _check_owned(self, params: list) -> None:
        """Refuse groups whose plan gives a hidden tensor no Muon rule (an expert stack, a matrix
        with its fan-out on axis 1, a table without a Muon column), naming the parameters."""
        for group in params:
            scales = group.get("mupkit_scales") if isinstance(group, dict) else None
            if scales is not None and self.family.name not in scales:
                names = ", ".join(f"{n} {tuple(p.shape)}" for n, p in zip(group.get("param_names", []),
                                                                           group["params"]))
                raise ValueError(f"mupkit.optim.Muon has no {self.family.name!r} rule for {names}: the plan makes "
                                 f"them hidden, but Muon orthogonalizes (fan_out, fan_in) matrices and conv kernels "
                                 f"(fan-out on axis 0) under muP/SP tables with a Muon column. Give these parameters "
                                 f"to another optimizer (e.g. mupkit.optim.AdamW with their own param groups).")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """The base's, after giving an AdamW-part group (``orthogonalize=False``, from the plan)
        the AdamW part's values; then checks the group (matrices, blocks)."""
        if "mupkit_scales" in param_group:
            self._check_owned([param_group])
            param_group = resolve_groups([param_group], self.family)[0]
        if not param_group.get("orthogonalize", True):
            param_group = {**{k: v for k, v in self._adam.defaults.items() if k != "master_weights"}, **param_group}
        param_group.setdefault("orthogonalize", True)
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _check_group(self, group: dict[str, Any]) -> None:
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            name = names[i] if names else f"parameter {i} of group {len(self.param_groups) - 1}"
            n = self._block_count(name) if names else 1
            if not group["orthogonalize"]:
                if n > 1:
                    raise ValueError(f"blocks matches {name!r} (shape {tuple(p.shape)}), which the plan does not "
                                     f"make a hidden matrix (it is stepped by Muon's AdamW part, never "
                                     f"orthogonalized); narrow the glob to the fused hidden matrices.")
                continue
            if p.ndim < 2:
                raise ValueError(f"Muon orthogonalizes matrices, but {name!r} has shape {tuple(p.shape)}; pass "
                                 f"mupkit.param_groups(model) (the plan gives vectors to the AdamW part) or only "
                                 f"2-D parameters and conv kernels.")
            if p.shape[0] % n:
                raise ValueError(f"blocks={n} for {name!r} (shape {tuple(p.shape)}): its fan-out {p.shape[0]} does "
                                 f"not split into {n} equal blocks; fix the glob or the count (e.g. 3 for a fused "
                                 f"QKV [3h, h], 2 for a fused gate-up [2f, h]).")
        if self.blocks and not names and group["orthogonalize"]:
            raise ValueError("blocks= matches parameter names, but a param group has no 'param_names'; pass "
                             "mupkit.param_groups(model), or groups with 'param_names'.")

    def _block_count(self, name: str) -> int:
        return next((n for glob, n in self.blocks.items() if fnmatch.fnmatchcase(name, glob)), 1)

    def _effective_group(self, group: dict[str, Any], path: str) -> dict[str, Any]:
        if not group["orthogonalize"]:
            return self._adam._effective_group(group, path)  # AdamW's values and path flags
        return super()._effective_group(group, path)

    def _update(self, groups: list[dict[str, Any]]) -> None:
        adam = [g for g in groups if not g["orthogonalize"]]
        if adam:
            self._adam.state = self.state  # one state for both parts (reset by load_state_dict)
            self._adam._update(adam)
        for group in groups:
            if group["orthogonalize"]:
                self._orthogonalized_step(group)

    def _orthogonalized_step(self, group: dict[str, Any]) -> None:
        names = group.get("param_names")
        jobs: list[tuple[torch.Tensor, Callable[[torch.Tensor], None]]] = []
        for i, p in self._with_grads(group):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=state_dtype(p),
                                                            memory_format=torch.preserve_format)
            buf, grad = state["momentum_buffer"], p.grad.to(state["momentum_buffer"].dtype)
            buf.lerp_(grad, 1 - group["momentum"])
            update = grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
            jobs.append(_matrix_job(p, update, self._block_count(names[i]) if names else 1, group))
        if group["path"] == "foreach":
            by_shape: dict[tuple, list[int]] = {}
            for k, (x, _) in enumerate(jobs):
                by_shape.setdefault((x.shape[1:], x.dtype, x.device), []).append(k)
            for members in by_shape.values():
                stacked = torch.cat([jobs[k][0] for k in members]) if len(members) > 1 else jobs[members[0]][0]
                ortho = _orthogonalize(stacked, group)
                start = 0
                for k in members:
                    n = jobs[k][0].shape[0]
                    jobs[k][1](ortho[start:start + n])
                    start += n
        else:
            for x, apply in jobs:
                apply(_orthogonalize(x, group))


def _orthogonalize(x: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    """Newton-Schulz of a ``(n, A, B)`` stack (one matrix: the 2-D op sequence of torch.optim.Muon)."""
    args = (group["ns_coefficients"], group["ns_steps"], group["eps"], group["ns_dtype"])
    return orthogonalize(x[0], *args).unsqueeze(0) if x.shape[0] == 1 else orthogonalize(x, *args)


def _matrix_job(p: torch.Tensor, update: torch.Tensor, blocks: int,
                group: dict[str, Any]) -> tuple[torch.Tensor, Callable[[torch.Tensor], None]]:
    """``update`` as a ``(blocks, A / blocks, B)`` stack of whole matrices (gathered from the shards
    of an FSDP2 DTensor), and the function applying its orthogonalization ``O`` to ``p``:
    ``p <- p (1 - lr wd) - lr adjust(A / blocks, B) O`` (on this rank's shard)."""
    whole = update.full_tensor() if DTensor is not None and isinstance(update, DTensor) else update
    rows = p.shape[0]
    matrix = whole.reshape(rows, -1)
    stack = matrix.view(blocks, rows // blocks, matrix.shape[1]) if matrix.is_contiguous() else \
        matrix.reshape(blocks, rows // blocks, matrix.shape[1])
    lr, wd = group["lr"], group["weight_decay"]
    step = lr * adjust(group["adjust_lr_fn"], rows // blocks, matrix.shape[1])

    def apply(ortho: torch.Tensor) -> None:
        ortho = (ortho[0] if blocks == 1 else ortho).reshape(p.shape)
        target = p
        if DTensor is not None and isinstance(p, DTensor):
            from torch.distributed.tensor import Replicate
            ortho = DTensor.from_local(ortho, p.device_mesh, [Replicate()], run_check=False) \
                .redistribute(p.device_mesh, p.placements).to_local()
            target = p.to_local()
        if wd:
            target.mul_(1 - lr * wd)
        target.add_(ortho, alpha=-step)
    return stack, apply


__all__ = ["Muon"]
