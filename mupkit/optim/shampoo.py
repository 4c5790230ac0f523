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
  parameter's own gradient, ``eps_t = eps * scale(G_t)`` (:func:`gradient_scale`), which holds
  for every matrix whatever sets its gradient's scale; ``"absolute"`` takes ``eps * eps_scale``,
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


def SOAP(params: Iterable[Any], lr: float = 3e-3, *, eps: float = 0.2, damping: str = "relative",
         weight_decay: float = 0.0, weight_decay_policy: str | None = None, max_precond_dim: int = 2048,
         compiled: bool = False, **kwargs: Any) -> torch.optim.Optimizer:
    """A ``heavyball.SOAP`` over ``params`` (:func:`mupkit.param_groups` groups) with each
    group's muP ``lr`` and ``weight_decay`` (the ``shampoo`` family's multipliers) and a damping
    that follows the gradient.

    ``damping="relative"``: ``eps`` is a fraction of each parameter's gradient scale, set before
    every step (one heavyball group per parameter; :func:`follow_gradient`). About 0.1 to 0.3 keeps
    the gradient's singular directions normalized and the rotated coordinates the eigenbasis does
    not (yet) capture damped; much smaller fractions let SOAP normalize those too, and its steps
    then grow with width as Adam's do. ``damping="absolute"``: ``eps`` is heavyball's own floor at
    the base width, times the rule's per-role damping multiplier; right only where a layer's role
    sets its gradient's scale (not for attention's query and key under muP's ``1/d`` logits:
    docs/shampoo.md). ``compiled=False`` runs heavyball eagerly by setting
    ``heavyball.utils.compile_mode = None`` (heavyball's switch is module-wide). Other ``kwargs``
    (``betas``, ``shampoo_beta``, ``precondition_frequency``, ...) go to heavyball.
    """
    try:
        import heavyball
    except ImportError as err:
        raise ImportError("mupkit.optim.SOAP steps heavyball's SOAP: pip install 'heavyball==3.2.1' "
                          "(or mupkit[test])") from err
    if damping not in DAMPING:
        raise ValueError(f"damping={damping!r}; use one of {DAMPING}")
    if weight_decay_policy is not None and weight_decay_policy not in WEIGHT_DECAY_POLICIES:
        raise ValueError(f"weight_decay_policy={weight_decay_policy!r}; use one of {WEIGHT_DECAY_POLICIES}")
    if not compiled:
        heavyball.utils.compile_mode = None
    groups = resolve_groups(params, FAMILY)
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


def gradient_scale(grad: torch.Tensor, preconditioned: bool) -> torch.Tensor:
    """The size of the coordinates SOAP normalizes: ``||G||_F`` for a preconditioned matrix (the
    root-sum-square of its singular values, which the eigenbasis turns into coordinates; for a
    rank-``r`` gradient, between ``sigma_1`` and ``sqrt(r) sigma_1``, free of the width), the RMS
    of the entries for a vector stepped by plain Adam."""
    norm = torch.linalg.vector_norm(grad.float())
    return norm if preconditioned else norm / grad.numel() ** 0.5


def follow_gradient(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Step pre-hook of a relatively damped :func:`SOAP`: every group holding ``eps_relative``
    (one parameter each) gets ``eps = eps_relative * gradient_scale(grad)``, read in one host
    transfer per device. A zero gradient keeps the group's last ``eps`` (its step is the
    momentum's, damped as before)."""
    groups = [g for g in optimizer.param_groups if "eps_relative" in g and g["params"][0].grad is not None]
    by_device: dict[torch.device, list[dict[str, Any]]] = {}
    for g in groups:
        by_device.setdefault(g["params"][0].grad.device, []).append(g)
    for members in by_device.values():
        scales = torch.stack([gradient_scale(g["params"][0].grad, g["params"][0].ndim >= 2 or g.get("precondition_1d"))
                              for g in members]).tolist()
        for g, scale in zip(members, scales):
            if scale > 0:
                g["eps"] = g["eps_relative"] * scale


def _per_parameter(group: dict[str, Any], eps: float) -> list[dict[str, Any]]:
    """``group`` split into one group per parameter (each damped by its own gradient), the
    fraction kept as ``eps_relative`` (so ``state_dict`` carries it)."""
    names = group.get("param_names", [None] * len(group["params"]))
    shared = {k: v for k, v in group.items() if k not in ("params", "param_names")}
    return [{**shared, "params": [p], **({"param_names": [n]} if n is not None else {}), "eps_relative": eps,
             "eps": eps} for p, n in zip(group["params"], names)]


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
