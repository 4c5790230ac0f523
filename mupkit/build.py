"""From a constructor and sizes to a parametrized model: ``parametrize`` and ``build``.

The plan itself is inferred by :func:`mupkit.infer.infer_plan`; :func:`parametrize` applies it
to a model built at the target size (init rescaled, multipliers that cannot be absorbed
installed as visible hooks) and attaches it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .bsh import load_bsh
from .copies import Constructor
from .infer import infer_plan, readout_params, spec_for, std_mean, tied_readout_multipliers
from .nn.multipliers import install_input_scale, install_output_scale
from .plan import PLAN_ATTR, ParamSpec, Plan, has_plan
from .roles import Role, assign_roles
from .rules import Parametrization, get_parametrization
from .shapes import ParamShapes, check_same_names, matches, param_sites

Sizes = Mapping[str, Any]


def plan_from_base_shapes(model: nn.Module, base_shapes: Mapping[str, Sequence[int | None]] | str, *,
                          parametrization: str | Parametrization = "mup", readout: Sequence[str] | None = None,
                          layouts: Mapping[str, Any] | None = None) -> Plan:
    """A plan for an existing model from mup-style base shapes (a dict or a ``.bsh`` path).

    As in mup, a dim with a base size is infinite even where it equals the model's dim. Roles
    come from module types and shapes (no trace: the model is not run). The plan has no base
    init stds, so apply it with ``parametrize(model, plan, init=False)`` (e.g. before loading a
    checkpoint) or initialize those parameters yourself.
    """
    if isinstance(base_shapes, str):
        base_shapes = load_bsh(base_shapes)
    param = get_parametrization(parametrization)
    targets = {n: tuple(p.shape) for n, p in model.named_parameters()}
    check_same_names(targets, base_shapes, ("the model", "the base shapes"),
                     "Save the base shapes from a model built by the same constructor.")
    shapes = {}
    for n, t in targets.items():
        dims = list(base_shapes[n])
        if len(dims) != len(t):
            raise ValueError(f"parameter {n!r} has shape {t} but its base shape {dims} has {len(dims)} dims")
        shapes[n] = ParamShapes(tuple(t[i] if b is None else b for i, b in enumerate(dims)), t,
                                tuple(b is not None for b in dims))
    sites = param_sites(model)
    roles = assign_roles(shapes, sites, modules=dict(model.named_modules()), readout=readout, layouts=layouts)
    specs = {n: spec_for(n, shapes[n], roles[n], param, None, sites[n]) for n in shapes}
    inputs, outputs = tied_readout_multipliers(specs, param, None, sites)
    return Plan(param.name, specs, inputs, output_multipliers=outputs,
                readouts=readout_params(roles, sites, None, readout))


def parametrize(model: nn.Module, plan: Plan, *, init: bool = True, zero_init: Sequence[str] = ()) -> nn.Module:
    """Apply ``plan`` to a model built at the target size; returns ``model`` with the plan attached.

    * ``init``: rescale each parameter so its std is ``base_init_std * init_scale`` (the user's
      init distribution is kept, only its scale changes; constant inits are left alone). At the
      base size nothing changes, so muP equals SP exactly there.
    * ``zero_init``: glob patterns of parameter names to zero (``"readout"`` names every
      output-role parameter), e.g. ``("readout", "*.q_proj.weight")`` for muP's readout and
      query zero-init (Tensor Programs V, App. D.2).
    * Forward multipliers that could not be absorbed are installed as visible forward hooks.
    """
    if has_plan(model):
        raise RuntimeError(f"{type(model).__name__} already has a mupkit plan; applying one twice would rescale "
                           f"its init twice. Build a fresh model, or load weights into this one instead.")
    _check_matches(model, plan)
    params = dict(model.named_parameters())
    if init and not plan.at_base:
        missing = [n for n, s in plan.items() if s.base_init_std is None and s.init_scale != 1.0
                   and _std(params[n]) > 0]
        if missing:
            raise ValueError(f"the plan has no base init std for {missing[:5]} (it was made from base shapes, "
                             f"not a constructor), so mupkit cannot rescale their init. Use mupkit.infer_plan"
                             f"(constructor, ...), or pass init=False and initialize them yourself.")
        with torch.no_grad():
            for name, spec in plan.items():
                _rescale(params[name], spec)
    _zero(model, plan, params, zero_init)
    for module, scale in plan.input_multipliers.items():
        install_input_scale(model.get_submodule(module), scale)
    for module, scale in plan.output_multipliers.items():
        install_output_scale(model.get_submodule(module), scale)
    setattr(model, PLAN_ATTR, plan)
    return model


def build(constructor: Constructor, *, base: Sizes | None = None, target: Sizes, delta: Sizes | None = None,
          parametrization: str | Parametrization = "mup", device: torch.device | str | None = None,
          readout: Sequence[str] | None = None, layouts: Mapping[str, Any] | None = None,
          zero_init: Sequence[str] = (), branch_outputs: Sequence[str] | None = None,
          example_inputs: Any = None) -> nn.Module:
    """Build ``constructor(**target)`` on ``device`` and initialize it per the inferred plan.

    The target consumes the global RNG exactly like ``constructor(**target)`` would, so at the
    base size ``build`` returns the same tensors as the plain constructor (SP == muP).
    """
    plan = infer_plan(constructor, base=base, target=target, delta=delta, parametrization=parametrization,
                      readout=readout, layouts=layouts, branch_outputs=branch_outputs, example_inputs=example_inputs,
                      quiet=True)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = constructor(**target)
    return parametrize(model, plan, zero_init=zero_init)


def _check_matches(model: nn.Module, plan: Plan) -> None:
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if set(shapes) != set(plan):
        raise ValueError(f"model and plan have different parameters. Only in model: "
                         f"{sorted(set(shapes) - set(plan))[:8]}; only in plan: {sorted(set(plan) - set(shapes))[:8]}. "
                         f"Build the plan from the same constructor.")
    bad = [(n, shapes[n], plan[n].target) for n in plan if shapes[n] != plan[n].target]
    if bad:
        n, got, want = bad[0]
        raise ValueError(f"parameter {n!r} has shape {got} but the plan's target shape is {want} "
                         f"({len(bad)} mismatches). Infer the plan with target= the sizes this model was built with.")


def _std(p: torch.Tensor) -> float:
    return std_mean(p)[0]


def _rescale(p: torch.Tensor, spec: ParamSpec) -> None:
    """Give ``p`` the std ``spec.init_std``: the init-std rule scales the deviation from the mean
    (a mean such as a gain's 1 is kept), an absorbed forward multiplier ``c`` scales the whole
    tensor: ``p <- c ((p - mean) k + mean) = c k p + c (1 - k) mean`` with ``k = init_std / (c std)``,
    in place in two passes."""
    std, mean = std_mean(p)
    c = spec.absorbed
    k = spec.init_std / c / std if spec.init_std is not None and std > 0.0 else 1.0
    if c == 1.0 and k == 1.0:
        return
    p.detach().mul_(c * k)
    if k != 1.0 and mean != 0.0:
        p.detach().add_(c * (1.0 - k) * mean)


def _biases(plan: Plan, weight: str) -> list[str]:
    """1-D parameters beside ``weight`` in its module over its fan-out (its bias)."""
    spec = plan[weight]
    owner = weight.rpartition(".")[0]
    if spec.fan_out_axis is None:
        return []
    size = spec.target[spec.fan_out_axis]
    return [n for n, s in plan.items() if n != weight and n.rpartition(".")[0] == owner and s.target == (size,)]


def _zero(model: nn.Module, plan: Plan, params: Mapping[str, torch.Tensor], patterns: Sequence[str]) -> None:
    """Zero the parameters matching ``patterns``; ``"readout"`` names the plan's readouts (the
    parameters whose contraction produces the model's output) and their biases."""
    if isinstance(patterns, str):
        patterns = (patterns,)
    if not patterns:
        return
    names = [n for n in plan if matches(n, patterns) or ("readout" in patterns and n in plan.readouts)]
    if "readout" in patterns:  # and each readout's bias, as mup's MuReadout does
        names += [n for r in plan.readouts for n in _biases(plan, r) if n not in names]
    unmatched = [pat for pat in patterns if pat != "readout" and not any(matches(n, [pat]) for n in plan)]
    if unmatched:
        raise ValueError(f"zero_init patterns {unmatched} match no parameter; names look like {list(plan)[:5]}")
    if "readout" in patterns:
        tied = [n for n in plan.readouts if plan[n].tied_readouts]
        if tied:
            raise ValueError(f"zero_init='readout' would zero {tied}, which is tied to an embedding; untie the "
                             f"readout or drop 'readout' from zero_init.")
        if not any(plan[n].role is Role.OUTPUT for n in plan.readouts):
            raise ValueError("zero_init='readout' but the plan has no output-role readout (is the model SP?)")
    with torch.no_grad():
        for n in names:
            params[n].zero_()
