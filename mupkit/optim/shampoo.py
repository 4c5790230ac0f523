"""SOAP from heavyball, stepped with the ``shampoo`` muP rule (docs/shampoo.md).

heavyball (``pip install heavyball==3.2.1``, in mupkit's ``test`` extra) is the maintained
implementation: its ``SOAP`` (Vyas et al. 2024) runs Adam in the eigenbasis of Shampoo's two
Kronecker factors and takes per-group ``lr``, ``eps`` and ``weight_decay``. :func:`SOAP` turns
:func:`mupkit.param_groups` groups into concrete heavyball groups:

* ``lr * lr_scale``: the spectral rule (the one-step argument of Ishikawa & Karakida 2024,
  Sec. 4) for Shampoo's ``L^-1/4 G R^-1/4``, whose one-step direction is the gradient's polar factor ``U V^T``:
  ``sqrt(m_out / m_in)`` for input and hidden matrices, ``m_in^-1/2`` for an absorbed readout, 1
  for vectors (which SOAP steps with plain Adam);
* ``eps * eps_scale``: the damping, SOAP's floor on ``sqrt(v)`` in the rotated basis, follows the
  gradient's singular values: ``sqrt(m_in / m_out)`` (input ``m_out^-1/2``, hidden 1, absorbed
  readout ``m_in^1/2``), vectors ``m_out^-1``;
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


def SOAP(params: Iterable[Any], lr: float = 3e-3, *, eps: float = 1e-2, weight_decay: float = 0.0,
         weight_decay_policy: str | None = None, max_precond_dim: int = 2048, compiled: bool = False,
         **kwargs: Any) -> torch.optim.Optimizer:
    """A ``heavyball.SOAP`` over ``params`` (:func:`mupkit.param_groups` groups) with each
    group's muP ``lr``, ``eps`` and ``weight_decay`` (the ``shampoo`` family's multipliers).

    ``eps``: SOAP's damping at the base width. heavyball's default ``1e-8`` is far below the
    gradient's singular values, where SOAP normalizes every rotated coordinate to about 1 as Adam
    does and its width scaling drifts between Shampoo's and Adam's; keep it at a fixed fraction
    (about 0.1..1) of the gradient's size at the base, as the muP rule then keeps that fraction at
    every width. ``compiled=False`` runs heavyball eagerly by setting
    ``heavyball.utils.compile_mode = None`` (heavyball's switch is module-wide). Other
    ``kwargs`` (``betas``, ``shampoo_beta``, ``precondition_frequency``, ...) go to heavyball.
    """
    try:
        import heavyball
    except ImportError as err:
        raise ImportError("mupkit.optim.SOAP steps heavyball's SOAP: pip install 'heavyball==3.2.1' "
                          "(or mupkit[test])") from err
    if weight_decay_policy is not None and weight_decay_policy not in WEIGHT_DECAY_POLICIES:
        raise ValueError(f"weight_decay_policy={weight_decay_policy!r}; use one of {WEIGHT_DECAY_POLICIES}")
    if not compiled:
        heavyball.utils.compile_mode = None
    groups = resolve_groups(params, FAMILY)
    if groups and not isinstance(groups[0], dict):  # plain parameters: one group at the base width
        groups = [{"params": groups}]
    groups = [_concrete(g, lr, eps, weight_decay, weight_decay_policy, max_precond_dim) for g in groups]
    return heavyball.SOAP(groups, lr=lr, eps=eps, weight_decay=weight_decay, max_precond_dim=max_precond_dim,
                          **kwargs)


SOAP.family = FAMILY


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
