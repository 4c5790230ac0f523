"""SOAP from heavyball, stepped with the ``shampoo`` muP rule (docs/shampoo.md).

heavyball (``pip install heavyball==3.2.1``, in mupkit's ``test`` extra) is the maintained
implementation: its ``SOAP`` (Vyas et al. 2024) runs Adam in the eigenbasis of Shampoo's two
Kronecker factors and takes per-group ``lr``, ``eps`` and ``weight_decay``. :func:`SOAP` turns
:func:`mupkit.param_groups` groups into concrete heavyball groups:

* ``lr * lr_scale``: the spectral rule (the one-step argument of Ishikawa & Karakida 2024,
  Sec. 4) for Shampoo's ``L^-1/4 G R^-1/4``, whose one-step direction is the gradient's polar
  factor ``U V^T``: ``sqrt(m_out / m_in)`` for input and hidden matrices, ``m_in^-1/2`` for an
  absorbed readout, 1 for vectors (which SOAP steps with plain Adam);
* the damping, SOAP's floor ``eps`` on ``sqrt(v)`` in the rotated basis, at a fixed ratio to the
  gradient it damps. ``damping="relative"`` (the default) sets it before every step from each
  parameter's own gradient, ``eps_t = eps * ||G_t||_F`` (``RMS(g_t)`` for a vector;
  :func:`gradient_scale`), which holds for every matrix whatever sets its gradient's scale; ``"absolute"`` takes ``eps * eps_scale``,
  the rule's per-role width exponents (what ``param_groups(optimizer=heavyball.SOAP)`` gives);
* ``weight_decay`` per the groups' policy (:func:`mupkit.groups.effective_weight_decay`).

The rule holds for a matrix preconditioned on both sides: a side longer than
``max_precond_dim`` would be left in the standard basis, where SOAP normalizes entrywise as Adam
does, so such a parameter is refused with its name.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ..groups import WEIGHT_DECAY_POLICIES, effective_weight_decay
from ..rules import FAMILIES
from .groups import resolve_groups

FAMILY = FAMILIES["shampoo"]
DAMPING = ("relative", "absolute")
#: the base ``eps`` of each damping: a fraction of the gradient's scale, or heavyball's own floor
DEFAULT_EPS = {"relative": 0.2, "absolute": 1e-2}
#: the smallest relative damping accepted (docs/shampoo.md)
MIN_RELATIVE_EPS = 0.01


def SOAP(params: Iterable[Any], lr: float = 3e-3, *, eps: float | None = None, damping: str = "relative",
         weight_decay: float = 0.0, weight_decay_policy: str | None = None, max_precond_dim: int = 2048,
         compiled: bool = False, **kwargs: Any) -> torch.optim.Optimizer:
    """A ``heavyball.SOAP`` over ``params`` (:func:`mupkit.param_groups` groups) with each
    group's muP ``lr`` and ``weight_decay`` (the ``shampoo`` family's multipliers) and a damping
    that follows the gradient.

    ``damping="relative"`` (default ``eps=0.2``): ``eps`` is a fraction of each parameter's
    gradient scale (:func:`gradient_scale`), set before every step (one heavyball group per
    parameter; :func:`follow_gradient`); call ``step()`` after ``backward()``, without a closure.
    About 0.1 to 0.3 keeps the gradient's strong singular directions normalized and the rotated
    coordinates the eigenbasis does not (yet) capture damped; much smaller fractions let SOAP
    normalize those too, and its steps then grow with width as Adam's do (a fraction below
    :data:`MIN_RELATIVE_EPS` is refused). ``damping="absolute"`` (default ``eps=1e-2``): ``eps`` is
    heavyball's own floor at the base width, times the rule's per-role damping multiplier; right
    only where a layer's role sets its gradient's scale (not for attention's query and key under
    muP's ``1/d`` logits: docs/shampoo.md). A matrix with one side longer than 1 (``(n, 1)``) is
    stepped by heavyball as a vector, with plain Adam, so it takes Adam's muP LR. ``compiled=False``
    runs heavyball eagerly by setting ``heavyball.utils.compile_mode = None`` (heavyball's switch
    is module-wide). Other ``kwargs`` (``betas``, ``shampoo_beta``, ``precondition_frequency``,
    ...) go to heavyball.
    """
    try:
        import heavyball
    except ImportError as err:
        raise ImportError("mupkit.optim.SOAP steps heavyball's SOAP: pip install 'heavyball==3.2.1' "
                          "(or mupkit[test])") from err
    if damping not in DAMPING:
        raise ValueError(f"damping={damping!r}; use one of {DAMPING}")
    eps = DEFAULT_EPS[damping] if eps is None else eps
    if damping == "relative":
        if not eps >= MIN_RELATIVE_EPS:
            raise ValueError(f"eps={eps!r} with damping='relative' is a fraction of each gradient's norm "
                             f"(about 0.1 to 0.3; at least {MIN_RELATIVE_EPS}): below that SOAP normalizes the coordinates "
                             f"its eigenbasis does not capture and steps like Adam. For heavyball's absolute floor pass "
                             f"damping='absolute'.")
        clashing = sorted(k for k in ("gradient_clipping", "mars") if kwargs.get(k))
        if clashing:
            raise ValueError(f"{', '.join(clashing)} with damping='relative': heavyball changes the gradient after the "
                             f"damping was set from it; use damping='absolute' with them.")
    if weight_decay_policy is not None and weight_decay_policy not in WEIGHT_DECAY_POLICIES:
        raise ValueError(f"weight_decay_policy={weight_decay_policy!r}; use one of {WEIGHT_DECAY_POLICIES}")
    if not compiled:
        heavyball.utils.compile_mode = None
    precondition_1d = bool(kwargs.get("precondition_1d", False))
    groups = resolve_groups(_adam_stepped_apart(params, precondition_1d), FAMILY)
    if groups and not isinstance(groups[0], dict):  # plain parameters: one group at the base width
        groups = [{"params": groups}]
    groups = [_concrete(g, lr, eps, weight_decay, weight_decay_policy, max_precond_dim) for g in groups]
    if damping == "relative":
        groups = [one for g in groups for one in _per_parameter(g, eps)]
    optimizer = heavyball.SOAP(groups, lr=lr, eps=eps, weight_decay=weight_decay, max_precond_dim=max_precond_dim,
                               **kwargs)
    if damping == "relative":
        optimizer.register_step_pre_hook(follow_gradient)
    return optimizer


SOAP.family = FAMILY


def preconditioned(p: torch.Tensor, precondition_1d: bool) -> bool:
    """Whether heavyball's SOAP rotates ``p``: two or more sides longer than 1 (heavyball merges
    away sides of 1, so an ``(n, 1)`` matrix is a vector to it), or any tensor with
    ``precondition_1d``."""
    return sum(side > 1 for side in p.shape) >= 2 or (precondition_1d and p.numel() > 1)


def gradient_scale(grad: torch.Tensor, preconditioned: bool) -> torch.Tensor:
    """The size the damping is a fraction of: ``||G||_F`` for a preconditioned tensor, the RMS of
    the entries for a vector stepped by plain Adam.

    ``||G||_F`` is the root-sum-square of the singular values, the coordinates the eigenbasis
    normalizes. With ``eps_t = eps * ||G||_F`` at most ``1 / eps^2`` of them can exceed the
    damping, so at most that many directions are normalized (spectral norm ``lr``) and the rest
    are damped into a step of Frobenius norm at most ``lr / eps``: the update's size is bounded
    free of the width even when the gradient's rank grows with it (more rows per step than the
    width). Relative to ``sigma_1`` instead, a full-rank gradient's many comparable directions
    would all be normalized, Adam-like."""
    norm = torch.linalg.vector_norm(grad.detach().float())
    return norm if preconditioned else norm / grad.numel() ** 0.5


def follow_gradient(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Step pre-hook of a relatively damped :func:`SOAP`: every group holding ``eps_relative``
    (one parameter each) gets ``eps = eps_relative * gradient_scale(grad)``, read in one host
    transfer per device. A zero gradient keeps the group's last ``eps`` (its step is the
    momentum's, damped as before). A closure is refused: its gradients exist only inside the step."""
    closure = args[1] if len(args) > 1 else kwargs.get("closure")  # args[0]: the optimizer (torch passes it)
    if closure is not None:
        raise ValueError("SOAP with damping='relative' sets each parameter's damping from its gradient before the "
                         "step: call loss.backward() and then step() without a closure, or use damping='absolute'.")
    groups = [g for g in optimizer.param_groups if "eps_relative" in g and g["params"][0].grad is not None]
    by_device: dict[torch.device, list[dict[str, Any]]] = {}
    for g in groups:
        by_device.setdefault(g["params"][0].grad.device, []).append(g)
    for members in by_device.values():
        scales = torch.stack([gradient_scale(g["params"][0].grad,
                                             preconditioned(g["params"][0], g.get("precondition_1d", False)))
                              for g in members]).tolist()
        for g, scale in zip(members, scales):
            if scale > 0:
                g["eps"] = g["eps_relative"] * scale


def _adam_stepped_apart(params: Iterable[Any], precondition_1d: bool) -> list[Any]:
    """``params`` with the matrices heavyball steps as vectors (an ``(n, 1)`` input layer) in
    groups of their own that take the ``adam`` family's scales: SOAP runs plain Adam on them."""
    out = []
    for group in params:
        if not isinstance(group, dict) or "mupkit_scales" not in group:
            out.append(group)
            continue
        scales = group["mupkit_scales"]
        members = _members(group)
        is_vector = [p.ndim >= 2 and not preconditioned(p, precondition_1d) for p, _ in members]
        as_vector = [m for m, v in zip(members, is_vector) if v]
        rest = [m for m, v in zip(members, is_vector) if not v]
        out += [_subgroup(group, part, mupkit_scales=part_scales)
                for part, part_scales in ((rest, scales), (as_vector, {**scales, FAMILY.name: scales["adam"]}))
                if part]
    return out


def _per_parameter(group: dict[str, Any], eps: float) -> list[dict[str, Any]]:
    """``group`` split into one group per parameter (each damped by its own gradient), the
    fraction kept as ``eps_relative`` (so ``state_dict`` carries it)."""
    return [_subgroup(group, [member], eps_relative=eps, eps=eps) for member in _members(group)]


def _members(group: dict[str, Any]) -> list[tuple[torch.Tensor, str | None]]:
    """``(parameter, name or None)`` of a group."""
    return list(zip(group["params"], group.get("param_names", [None] * len(group["params"]))))


def _subgroup(group: dict[str, Any], members: list[tuple[torch.Tensor, str | None]], **values: Any) -> dict[str, Any]:
    """``group``'s settings over ``members`` (their names kept where the group has names), with ``values``."""
    named = "param_names" in group
    shared = {k: v for k, v in group.items() if k not in ("params", "param_names")}
    return {**shared, "params": [p for p, _ in members], **({"param_names": [n for _, n in members]} if named else {}),
            **values}


def _concrete(group: Any, lr: float, eps: float, weight_decay: float, policy: str | None,
              max_precond_dim: int) -> dict[str, Any]:
    """One heavyball group: the base values times the group's ``shampoo`` multipliers (1, the
    base width, for a group without them, as for every mupkit optimizer), which it keeps, with the
    parameters' names, for inspection."""
    for name, p in zip(group.get("param_names", [""] * len(group["params"])), group["params"]):
        if p.ndim >= 2 and max(p.shape) > max_precond_dim:
            raise ValueError(f"parameter {name!r} (shape {tuple(p.shape)}) has a side longer than "
                             f"max_precond_dim={max_precond_dim}; SOAP would leave that side unpreconditioned, "
                             f"where the shampoo muP rule does not hold. Pass max_precond_dim={max(p.shape)}.")
    policy = group.get("weight_decay_policy") or policy or group.get("plan_weight_decay_policy", "coupled")
    lr_scale, eps_scale, wd_scale = (group.get(key, 1.0) for key in ("lr_scale", "eps_scale", "wd_scale"))
    kept = {key: group[key] for key in ("param_names",) if key in group}  # heavyball keeps extra keys
    return {"params": group["params"], **kept, "lr_scale": lr_scale, "eps_scale": eps_scale, "wd_scale": wd_scale,
            "lr": lr * lr_scale, "eps": eps * eps_scale,
            "weight_decay": effective_weight_decay(weight_decay, policy, wd_scale=wd_scale, lr_scale=lr_scale,
                                                   reference_lr=lr)}
