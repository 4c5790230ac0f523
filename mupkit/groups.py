"""Optimizer parameter groups carrying each parameter's muP multipliers."""

from __future__ import annotations

import inspect
import numbers
from typing import Any, Callable

import torch
from torch import nn

from .plan import plan_of, plan_owner
from .rules import FAMILIES, MUON_FAMILIES, PARAMETRIZATIONS, Family

#: torch optimizer classes -> family (entrywise-normalized ones are "adam"-like; see mup/optim.py)
TORCH_FAMILIES = {
    "Adam": "adam", "Adamax": "adam", "NAdam": "adam", "RAdam": "adam", "RMSprop": "adam",
    "Adagrad": "adam", "AdamW": "adamw", "SGD": "sgd", "ASGD": "sgd", "Muon": "muon",
    "SOAP": "shampoo",  # heavyball.SOAP: Adam in Shampoo's eigenbasis (docs/shampoo.md)
}

WEIGHT_DECAY_POLICIES = ("coupled", "independent")


def effective_weight_decay(weight_decay: float, policy: str, *, wd_scale: float, lr_scale: float,
                           reference_lr: float) -> float:
    """The coefficient to hand a torch optimizer whose per-step decay is ``lr * lr_scale * coefficient``.

    ``coupled``: ``weight_decay * wd_scale`` (mup semantics; ``wd_scale = 1 / lr_scale`` keeps
    ``lr * wd`` width-invariant). ``independent``: ``weight_decay / (reference_lr * lr_scale)``,
    so the per-step decay is ``weight_decay * lr_t / reference_lr`` at every width (Wortsman
    et al. 2023).
    """
    if policy == "coupled":
        return weight_decay * wd_scale
    return weight_decay / (reference_lr * lr_scale)


def _default_weight_decay_policy(parametrization: str) -> str:
    """The plan's default policy for decoupled decay: its width table's (u-muP: independent);
    ``coupled`` for a custom table, which is not registered by name."""
    width_rules = PARAMETRIZATIONS.get(parametrization.partition("+")[0])
    return width_rules.weight_decay_policy if width_rules is not None else "coupled"


def resolve_family(optimizer: Any) -> Family:
    """A family from its name, a mupkit optimizer class (``family`` attribute) or a torch class
    (or an instance of one)."""
    cls = optimizer if isinstance(optimizer, (str, type)) else type(optimizer)
    if isinstance(optimizer, str):
        key = optimizer.lower()
    elif isinstance(getattr(optimizer, "family", None), Family):
        return optimizer.family
    elif isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
        key = TORCH_FAMILIES.get(cls.__name__, "")
    else:
        key = ""
    if key not in FAMILIES and getattr(cls, "__name__", "") == "Adafactor":
        raise ValueError(f"{optimizer!r} takes its group lr only as the cap of its relative step, so a muP LR "
                         f"multiplier would vanish after 1/lr^2 steps; use mupkit.optim.Adafactor (mode='torch' or "
                         f"mode='hf'), which applies it to every step.")
    if key not in FAMILIES:
        raise ValueError(f"cannot tell the optimizer family of {optimizer!r}; pass optimizer= one of "
                         f"{sorted(FAMILIES)} (entrywise-normalized updates like Adam/RMSprop/Lion are 'adam', "
                         f"decoupled-decay ones 'adamw', gradient-proportional ones 'sgd').")
    return FAMILIES[key]


def param_groups(model: nn.Module, *, optimizer: Any = None, lr: float | None = None,
                 weight_decay: float | None = None, eps: float | None = None,
                 weight_decay_policy: str | None = None) -> list[dict[str, Any]]:
    """Parameter groups for ``model``'s trainable parameters, one per distinct set of multipliers.

    * ``optimizer=None`` (for ``mupkit.optim``): each group carries ``mupkit_scales``, the
      multipliers for every family; the mupkit optimizer picks its own and applies
      ``lr * lr_scale`` each step, so LR schedulers work unchanged.
    * ``optimizer=`` a family name or optimizer class (for torch and third-party optimizers):
      ``lr`` is required; each group gets concrete ``lr = lr * lr_scale``, ``weight_decay`` per
      the policy and, for Adam-like families, ``eps = eps * eps_scale``.
      ``lr_scale``/``wd_scale``/``eps_scale`` are kept for reference. With a class (or an
      instance), a ``weight_decay``/``eps`` not given is the class's own default (its
      ``__init__`` signature: torch Adam ``eps = 1e-8``, AdamW ``weight_decay = 0.01``), scaled
      the same way, so the groups step as ``mupkit.optim`` would; group values win over the
      constructor's, so pass them here, not to the optimizer. With a family name there is no
      class to read: an omitted ``weight_decay``/``eps`` stays unset (the optimizer's own,
      unscaled value).

    Weight-decay policies: ``coupled`` (mup semantics; ``wd * wd_scale`` keeps the per-step
    decay ``lr * wd`` width-invariant) and ``independent`` (decoupled-decay families only: the
    per-step decay is ``weight_decay`` at the initial LR and follows the schedule, independent
    of width and of the peak LR; Wortsman et al. 2023, used by u-muP and CompleteP). Default
    (``None``): ``independent`` for a u-muP plan with a decoupled-decay optimizer (u-muP's rule,
    Blake et al. 2024, Sec. 4.4), else ``coupled``; for mupkit optimizers the groups carry the
    plan's default and the optimizer applies it when its decay is decoupled.

    Never mutates anything it is given; never emits an empty group; every trainable parameter
    appears exactly once (tied weights once).
    """
    if weight_decay_policy is not None and weight_decay_policy not in WEIGHT_DECAY_POLICIES:
        raise ValueError(f"weight_decay_policy={weight_decay_policy!r}; use one of {WEIGHT_DECAY_POLICIES}")
    plan = plan_of(model)
    family = None if optimizer is None else resolve_family(optimizer)
    if family is not None and not isinstance(optimizer, str):  # a class or an instance: fill its defaults
        cls = optimizer if isinstance(optimizer, type) else type(optimizer)
        weight_decay = _class_default(cls, "weight_decay") if weight_decay is None else weight_decay
        eps = _class_default(cls, "eps") if eps is None and family.has_eps else eps
    plan_policy = _default_weight_decay_policy(plan.parametrization)
    if weight_decay_policy is None and family is not None:
        weight_decay_policy = plan_policy if family.decoupled_wd else "coupled"
    if family is None and (lr is not None or weight_decay is not None or eps is not None):
        raise ValueError("lr/weight_decay/eps were given without optimizer=..., so mupkit cannot tell how to "
                         "scale them. Pass optimizer='adam'|'adamw'|'sgd' (or the optimizer class), or drop "
                         "them and pass the groups to a mupkit.optim optimizer, which scales them itself.")
    if family is not None and family.roles is not None:
        raise ValueError(f"param_groups(optimizer={optimizer!r}): torch.optim.Muon steps 2-D hidden matrices only, "
                         f"and the rest of the model (embeddings, readout, vectors) needs another optimizer with its "
                         f"own muP rule. Use muon_groups, adam_groups = mupkit.muon_param_groups(model, lr=..., "
                         f"adam_lr=...) and give each set to its optimizer, or mupkit.optim.Muon("
                         f"mupkit.param_groups(model), lr=...), which steps both.")
    if family is not None and lr is None:
        raise ValueError(f"param_groups(optimizer={optimizer!r}) needs lr=...: a torch or third-party optimizer "
                         f"ignores 'lr_scale', so mupkit must write each group's concrete lr (otherwise every "
                         f"parameter would silently get the same SP learning rate).")
    if weight_decay_policy == "independent" and family is not None and not family.decoupled_wd:
        raise ValueError(f"weight_decay_policy='independent' needs decoupled weight decay, but family "
                         f"{family.name!r} adds weight decay to the gradient; use an AdamW-like optimizer or "
                         f"weight_decay_policy='coupled'.")

    return _grouped(model, family, lr, weight_decay, eps, weight_decay_policy)


def _grouped(model: nn.Module, family: Family | None, lr, weight_decay, eps, weight_decay_policy: str | None,
             select: Callable[[Any], bool] | None = None) -> list[dict[str, Any]]:
    """The groups of :func:`param_groups` (of the parameters whose spec ``select`` accepts)."""
    plan = plan_of(model)
    plan_policy = _default_weight_decay_policy(plan.parametrization)
    groups: dict[tuple, dict[str, Any]] = {}
    for name, p in plan_owner(model).named_parameters():
        if not p.requires_grad:
            continue
        if name not in plan:
            raise ValueError(f"parameter {name!r} (shape {tuple(p.shape)}) is not in the model's mupkit plan; it was "
                             f"added after the plan was made. Rebuild the model with mupkit.build.")
        spec = plan[name]
        if select is not None and not select(spec):
            continue
        if family is None:
            key = tuple(sorted((f, s.lr, s.wd, s.eps, _steps_itself(f, spec)) for f, s in spec.scales.items()))
        else:
            s = spec.scales[family.name]
            key = (s.lr, s.wd, s.eps)
        group = groups.get(key)
        if group is None:
            group = groups[key] = _new_group(spec, family, lr, weight_decay, eps, weight_decay_policy)
            if family is None and weight_decay_policy is not None:
                group["weight_decay_policy"] = weight_decay_policy
            elif family is None:  # the mupkit optimizer applies it if its decay is decoupled
                group["plan_weight_decay_policy"] = plan_policy
        group["params"].append(p)
        group["param_names"].append(name)
    return list(groups.values())


def muon_param_groups(model: nn.Module, *, lr: float, adam_lr: float, adjust_lr_fn: str | None = None,
                      weight_decay: float | None = None, adam: Any = torch.optim.AdamW,
                      adam_weight_decay: float | None = None, adam_eps: float | None = None,
                      weight_decay_policy: str | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Concrete groups for ``torch.optim.Muon`` and its companion: ``(muon_groups, adam_groups)``.

    ``muon_groups``: the hidden matrices (roles from the plan, not ``ndim``), each group with
    ``lr = lr * mult`` from the spectral rule of ``adjust_lr_fn``'s family (:mod:`mupkit.spectral`;
    1 at the base width, so the groups equal plain ``torch.optim.Muon`` there), ``weight_decay``
    per policy (default: ``torch.optim.Muon``'s 0.1) and ``adjust_lr_fn`` itself. ``adam_groups``:
    every other trainable parameter (embeddings, readouts, vectors, scalars) with ``adam``'s
    family rule at ``adam_lr`` (``adam``: a class or family name; its defaults fill
    ``adam_weight_decay``/``adam_eps`` as in :func:`param_groups`)::

        muon_groups, adam_groups = mupkit.muon_param_groups(model, lr=0.02, adam_lr=3e-4)
        opts = [torch.optim.Muon(muon_groups), torch.optim.AdamW(adam_groups)]

    ``torch.optim.Muon`` takes 2-D parameters and reads ``(fan_out, fan_in)`` from ``shape[:2]``,
    so a hidden conv kernel or an ``(in, out)`` matrix (HF ``Conv1D``) is refused: use
    :class:`mupkit.optim.Muon`, which reshapes kernels and reads the plan's fan axes.
    """
    if adjust_lr_fn not in MUON_FAMILIES:
        raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r}; use None, 'original' or 'match_rms_adamw'")
    if weight_decay_policy is not None and weight_decay_policy not in WEIGHT_DECAY_POLICIES:
        raise ValueError(f"weight_decay_policy={weight_decay_policy!r}; use one of {WEIGHT_DECAY_POLICIES}")
    family = FAMILIES[MUON_FAMILIES[adjust_lr_fn]]
    plan = plan_of(model)
    plan_policy = _default_weight_decay_policy(plan.parametrization)
    if weight_decay is None:
        weight_decay = _class_default(torch.optim.Muon, "weight_decay")
    muon_groups = _grouped(model, family, lr, weight_decay, None, weight_decay_policy or plan_policy,
                           select=lambda spec: family.steps(spec.role))
    for group in muon_groups:
        group["adjust_lr_fn"] = adjust_lr_fn
        for name, p in zip(group["param_names"], group["params"]):
            spec = plan[name]
            if p.ndim != 2 or spec.fan_out_axis != 0:
                raise ValueError(f"parameter {name!r} (shape {tuple(p.shape)}, fan-out axis {spec.fan_out_axis}) is "
                                 f"a hidden matrix, but torch.optim.Muon takes 2-D (fan_out, fan_in) parameters only "
                                 f"(it reads its adjust_lr_fn fans from shape[:2]); use mupkit.optim.Muon, which "
                                 f"reshapes conv kernels to (out, in*k*k) and reads the plan's fan axes.")
    adam_family = resolve_family(adam)
    if adam_family.roles is not None:
        raise ValueError(f"adam={adam!r} must be an Adam-family optimizer (the companion of Muon), e.g. "
                         f"torch.optim.AdamW")
    if not isinstance(adam, str):
        cls = adam if isinstance(adam, type) else type(adam)
        adam_weight_decay = _class_default(cls, "weight_decay") if adam_weight_decay is None else adam_weight_decay
        adam_eps = _class_default(cls, "eps") if adam_eps is None and adam_family.has_eps else adam_eps
    adam_policy = weight_decay_policy or (plan_policy if adam_family.decoupled_wd else "coupled")
    adam_groups = _grouped(model, adam_family, adam_lr, adam_weight_decay, adam_eps, adam_policy,
                           select=lambda spec: not family.steps(spec.role))
    return muon_groups, adam_groups


def _steps_itself(family: str, spec) -> bool | None:
    """For a family that steps some roles only (Muon: hidden matrices): whether it steps ``spec``
    with its own rule (else its companion, AdamW, does); None for families that step every role."""
    fam = FAMILIES[family]
    return None if fam.roles is None else fam.steps(spec.role)


def _class_default(cls: type, name: str) -> float | None:
    """The value of ``name`` that ``cls(...)`` uses when not given: the default in the first
    ``__init__`` along the MRO that declares it (a ``**kwargs`` one passes it on); ``None`` when
    ``cls`` takes no such argument or requires it. A default that is not a number (``None`` for
    "computed later", a tensor, a tuple) cannot be multiplied by a muP scale, and leaving it
    unscaled would silently differ from ``mupkit.optim``: ``ValueError``."""
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        try:
            params = inspect.signature(vars(klass)["__init__"]).parameters
        except (TypeError, ValueError):  # a builtin without a signature
            return None
        arg = params.get(name)
        if arg is not None and arg.kind in (arg.POSITIONAL_OR_KEYWORD, arg.KEYWORD_ONLY):
            if arg.default is arg.empty:
                return None
            if isinstance(arg.default, numbers.Real) and not isinstance(arg.default, bool):
                return float(arg.default)
            raise ValueError(f"{cls.__name__}'s default {name}={arg.default!r} is not a number, so mupkit cannot "
                             f"scale it per group (by the muP multiplier); pass {name}=... to param_groups "
                             f"explicitly.")
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return None
    return None


def _new_group(spec, family: Family | None, lr, weight_decay, eps, policy: str) -> dict[str, Any]:
    group: dict[str, Any] = {"params": [], "param_names": []}
    if family is None:
        group["mupkit_scales"] = {f: {"lr_scale": s.lr, "wd_scale": s.wd, "eps_scale": s.eps}
                                  for f, s in spec.scales.items()}
        for f, entry in group["mupkit_scales"].items():
            if FAMILIES[f].roles is not None:
                entry["orthogonalize"] = _steps_itself(f, spec)
        return group
    s = spec.scales[family.name]
    group.update(lr_scale=s.lr, wd_scale=s.wd, eps_scale=s.eps, mupkit_family=family.name, mupkit_concrete=True)
    group["lr"] = lr * s.lr
    if weight_decay is not None:
        group["weight_decay"] = effective_weight_decay(weight_decay, policy, wd_scale=s.wd, lr_scale=s.lr,
                                                       reference_lr=lr)
    if eps is not None and family.has_eps:
        group["eps"] = eps * s.eps
    return group
