"""u-muP plans: roles declared by :mod:`mupkit.unit` modules, rules at the model's own fans.

u-muP (Blake et al. 2024) has no base shapes: its multipliers are functions of each weight's
own fans (:data:`mupkit.rules.UMUP`). So the plan records them against a base width of 1:
``m_in``/``m_out`` are the fans themselves and ``m_L`` is the number of layers in a
:class:`~mupkit.unit.DepthModuleList`. Roles come from the modules (``UNIT_ROLES``), not
from shape inference, and each weight's forward multiplier ``A_W`` is applied by its
unit-scaled op (``ParamSpec.op_forward``, shown by :func:`mupkit.explain`), never absorbed.

Plain torch layers (``nn.Linear``, ``nn.Embedding``, convolutions) are accepted when their roles
can be inferred (pass ``base=``, as for muP): their ``A_W`` is absorbed exactly (``W' = A_W W``,
init std ``A_W``, LR and eps mapped by :func:`mupkit.rules.absorb`). What a plain layer cannot
carry is the backward scale of a unit-scaled op; Adam-like updates are invariant to a
constant gradient scale per tensor (up to eps), SGD's are not. The model's other ops (its
nonlinearities, attention, residual adds) stay its own: use :mod:`mupkit.unit.functional` in its
forward to unit-scale them.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .unit.modules import DepthModuleList
from .plan import DepthInfo, ParamSpec, Plan, make_spec
from .roles import Role, RoleInfo
from .rules import Parametrization
from .shapes import ParamShapes


#: roles whose parameters u-muP initializes N(0, 1); biases start at 0 and gains at 1
WEIGHTS = (Role.INPUT, Role.HIDDEN, Role.OUTPUT)


def _fans(role: Role, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[bool, ...], float, float,
                                                        int | None, int | None]:
    """(base, infinite, m_in, m_out, fan_out_axis, fan_in_axis) at base width 1."""
    if role in (Role.HIDDEN, Role.OUTPUT):  # (out, in, *kernel)
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        return (1, 1, *shape[2:]), (True, True) + (False,) * (len(shape) - 2), fan_in, shape[0], 0, 1
    if role is Role.INPUT:  # (vocab, width): the vocabulary is a fixed size
        return (shape[0], 1), (False, True), 1.0, shape[1], 1, None
    return (1,) * len(shape), (True,) * len(shape), 1.0, shape[0] if shape else 1.0, 0 if shape else None, None


def _blocks(model: nn.Module) -> dict[str, tuple[str, int, str]]:
    """Parameter FQN -> (container FQN, L, name template) for parameters in a DepthModuleList."""
    out: dict[str, tuple[str, int, str]] = {}
    for cname, container in model.named_modules():
        if not isinstance(container, DepthModuleList):
            continue
        for pname, _ in container.named_parameters():
            fqn = f"{cname}.{pname}" if cname else pname
            if fqn in out:
                raise ValueError(f"parameter {fqn!r} sits in nested DepthModuleLists ({out[fqn][0]!r} and {cname!r}); "
                                 f"u-muP counts one depth per parameter. Make the inner container an nn.ModuleList.")
            index, _, rest = pname.partition(".")
            out[fqn] = (cname, len(container), f"{cname}.*.{rest}" if cname else f"*.{rest}")
    return out


def unit_plan(model: nn.Module, param: Parametrization, sizes: Mapping[str, Any] | None = None,
              roles: Mapping[str, RoleInfo] | None = None) -> Plan:
    """The u-muP plan of ``model``: roles from unit modules, else from ``roles`` (inferred from
    base and target shapes, see :func:`mupkit.build.infer_plan`), whose ``A_W`` is absorbed."""
    blocks = _blocks(model)
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    specs, plain = {}, []
    for name, p in model.named_parameters():
        module_name, _, local = name.rpartition(".")
        declared = getattr(type(model.get_submodule(module_name)), "UNIT_ROLES", {})
        shape = tuple(p.shape)
        if local in declared:
            role, fan_out_axis = declared[local], None
        elif roles is not None and name in roles and not roles[name].tied_readouts:
            role, fan_out_axis = roles[name].role, roles[name].fan_out_axis
        else:
            plain.append(f"{name} {shape} in {type(model.get_submodule(module_name)).__name__}")
            continue
        # a plain matmul input layer (nn.Linear, a convolution) is a unit-scaled linear with a fixed
        # fan-in: A_W = fan_in^-1/2 and LR fan_in^-1/2, the hidden rule; u-muP's fan_out^-1/2 LR is for
        # embedding lookups only (graphcore's uu.Linear as a first layer; Aleph Alpha's INPUT_WEIGHT)
        as_weight = role is Role.INPUT and local not in declared and local == "weight" \
            and not isinstance(model.get_submodule(module_name), (nn.Embedding, nn.EmbeddingBag))
        rule_role = Role.HIDDEN if as_weight else role
        base, infinite, m_in, m_out, out_axis, in_axis = _fans(rule_role,
                                                               _fan_out_first(shape, fan_out_axis, rule_role))
        if as_weight:
            base, infinite = (1, *shape[1:]), (True,) + (False,) * (len(shape) - 1)  # only fan-out is width
        rule = param.rules[rule_role]
        a_w = rule.forward(m_in, m_out)
        absorbed = 1.0 if local in declared else a_w
        under_weight = 1.0 if local in declared else _weight_multiplier(specs, module_name, local)
        container, depth, template = blocks.get(name, (None, 1, None))
        specs[name] = make_spec(
            name, ParamShapes(base, shape, infinite), role, rule, m_in=m_in, m_out=m_out,
            init_scale=rule.init(m_in, m_out) * absorbed, absorbed=absorbed, lr_absorbed=absorbed * under_weight,
            depth=param.depth if container is not None else None, m_depth=float(depth),
            base_init_std=1.0 if role in WEIGHTS else None,
            fan_out_axis=out_axis if fan_out_axis is None else fan_out_axis, fan_in_axis=in_axis,
            aliases=tuple(a for a in aliases[id(p)] if a != name), block=template,
            op_forward=a_w if local in declared else 1.0,
            role_source="unit module" if local in declared else roles[name].source)
    if plain:
        raise ValueError(f"{param.name!r}: mupkit cannot tell the role of {len(plain)} parameters: {plain[:4]}. "
                         f"Build the model from unit-scaled mupkit.unit parts (Linear, LinearReadout, Embedding, "
                         f"RMSNorm, ...), or pass base=dict(...) so plain layers' roles are inferred from shapes (a "
                         f"readout tied to an embedding cannot absorb u-muP's 1/fan_in: untie it).")
    counts = {c: (1, n) for c, n, _ in blocks.values()}
    depth = DepthInfo(counts, param.depth.alpha, unit_scaled=True) if counts else None
    readouts = tuple(n for n, s in specs.items() if s.role is Role.OUTPUT)
    return Plan(param.name, specs, {}, dict(sizes or {}), depth, readouts=readouts)


def _weight_multiplier(specs: Mapping[str, ParamSpec], module_name: str, local: str) -> float:
    """The ``A_W`` a plain layer's bias sits under: a unit-scaled op scales ``x W^T + b`` as a
    whole (graphcore's ``linear``), so the bias's LR and eps map like its weight's. Its init is
    kept: the user's bias is the layer's effective bias (u-muP starts biases at 0)."""
    weight = specs.get(f"{module_name}.weight" if module_name else "weight")
    return weight.absorbed if local == "bias" and weight is not None else 1.0


def _fan_out_first(shape: tuple[int, ...], fan_out_axis: int | None, role: Role) -> tuple[int, ...]:
    """A 2-D weight stored ``(in, out)`` (HF ``Conv1D``) as ``(out, in)``."""
    if role in (Role.HIDDEN, Role.OUTPUT) and fan_out_axis == 1 and len(shape) == 2:
        return shape[::-1]
    return shape


def tensor_scales(model: nn.Module, inputs: Any, loss_fn) -> list[tuple[str, str, float]]:
    """RMS of every weight, module output, output gradient and weight gradient after one
    forward and backward pass of ``loss_fn(model, inputs)``: ``(kind, name, rms)`` rows with kind
    ``"weight" | "activation" | "activation grad" | "weight grad"``. Unit scaling's promise is that
    all of them are near 1 at init (except by-design ones such as a muP readout's logits)."""
    rows: list[tuple[str, str, float]] = []

    def rms(t: torch.Tensor) -> float:
        return t.detach().float().pow(2).mean().sqrt().item()

    def hook(name: str):
        def record(module, args, out):
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                rows.append(("activation", name, rms(out)))
                if out.requires_grad:
                    out.register_hook(lambda g: rows.append(("activation grad", name, rms(g))))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        model.zero_grad(set_to_none=True)
        loss_fn(model, inputs).backward()
    finally:
        for h in handles:
            h.remove()
    for name, p in model.named_parameters():
        if p.std() > 0:  # constant tensors (zero biases, unit gains) have no scale to report
            rows.append(("weight", name, rms(p)))
        if p.grad is not None:
            rows.append(("weight grad", name, rms(p.grad)))
    return rows
