"""From a constructor and sizes to a :class:`~mupkit.plan.Plan`, in steps.

1. **copies** (:mod:`mupkit.copies`): the base model (real, CPU), the delta model (real, CPU)
   and the target model (meta); which kwargs set the depth;
2. **traces** (:mod:`mupkit.trace`): one forward of the base and of the delta model on a small
   batch (``example_inputs``, or one synthesized from the first layer);
3. **width shapes and depth layout**: dims that differ between base and delta scale with width
   (microsoft/mup's rule); parameters of a deeper target map to base parameters block by block
   (:mod:`mupkit.depth`);
4. **roles** (:mod:`mupkit.roles`) from the shapes and the trace;
5. **depth rule**: the parametrization's, or ``"+depth"``'s choice from the branch structure,
   and the layers that end each residual branch;
6. **specs**: each role's rule (:mod:`mupkit.rules`) at its width and depth multipliers, with
   the user's init std measured on the base model;
7. **forward**: where a tied readout's multiplier goes, and what the traces say about the
   forward itself (:mod:`mupkit.forward_checks`), as warnings and plan notes.
"""

from __future__ import annotations

import statistics
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .copies import Constructor, Copies, make_copies
from .data import synthetic_input
from .depth import block_counts, branch_outputs as find_branch_outputs, counterparts, find_blocks, repeated_blocks
from .forward_checks import ForwardScalingWarning, forward_notes
from .plan import DepthInfo, ParamSpec, Plan, make_spec
from .roles import Role, RoleInfo, assign_roles
from .rules import FAMILIES, DepthRule, Parametrization, absorbed_init_scale, auto_depth, get_parametrization, \
    scales_for
from .shapes import ParamShapes, check_same_names, matches, param_sites
from .trace import Trace, run_trace
from .umup import unit_plan

Sizes = Mapping[str, Any]


class NoDepthRuleWarning(UserWarning):
    """Base and target differ in depth under a parametrization without a depth rule."""


class TraceWarning(UserWarning):
    """mupkit could not run the base model, so roles come from module types and shapes only."""


def infer_plan(constructor: Constructor, *, base: Sizes | None = None, target: Sizes, delta: Sizes | None = None,
               parametrization: str | Parametrization = "mup", readout: Sequence[str] | None = None,
               layouts: Mapping[str, Any] | None = None, branch_outputs: Sequence[str] | None = None,
               example_inputs: Any = None, quiet: bool = False) -> Plan:
    """Infer the scaling plan for ``constructor(**target)`` relative to ``constructor(**base)``.

    If ``delta`` is omitted, every int width kwarg that differs between base and target is
    doubled. A kwarg that changes the parameter names (``depth``, ``n_layer``, ...) may differ
    too: repeated blocks are matched (:mod:`mupkit.depth`) and a depth parametrization
    (``"completep"``, ``"depth-mup"``, ``"mup+depth"``) applies its rules. ``target == base``
    gives a plan whose multipliers are all 1 (pass ``delta`` to see the roles too).

    ``example_inputs``: what the model is called with for the usage trace (a tensor, a tuple of
    positional args or a dict of kwargs); default: a small batch synthesized from the first
    Embedding / Linear / Conv layer. ``readout``: globs naming the model's readout module(s),
    when the trace cannot tell (it finds the contraction that produces the output).
    ``layouts``: glob -> ``"out_in"`` | ``"in_out"`` | ``(fan_out_axis, fan_in_axis)``,
    overriding the trace for a parameter's axes. ``branch_outputs``: globs of the layers ending
    each residual branch, when the trace cannot find them. ``quiet``: silence every constructor
    call (:func:`mupkit.build` does, and shows its own final call).

    ``"umup"`` needs no base (its rules use each weight's own fans) when the model is built from
    :mod:`mupkit.unit` modules, which declare their roles; plain layers need ``base`` to infer
    their roles (:mod:`mupkit.umup`).
    """
    param = get_parametrization(parametrization)
    if param.absolute:
        return _unit_plan(constructor, param, base, target, delta, readout, layouts, example_inputs, quiet)
    if base is None:
        raise ValueError(f"parametrization {param.name!r} is relative to a base model: pass base=dict(...) (the "
                         f"sizes the hyperparameters were tuned at). Only 'umup' needs no base.")
    copies = make_copies(constructor, base, target, delta, quiet=quiet)
    base_trace, delta_trace = _traces(copies, example_inputs)
    layout = _layout(copies)
    if param.rescales and not copies.depth_keys and (dict(target) != dict(base) or delta is not None) and \
            not any(any(s.infinite) for s in layout.shapes.values()):
        _require_width(param, copies)
    uses = {n: base_trace.uses_of(layout.counterpart[n]) for n in layout.shapes} if base_trace else None
    sites = param_sites(copies.target)
    roles = assign_roles(layout.shapes, sites, uses=uses, modules=dict(copies.target.named_modules()),
                         readout=readout, layouts=layouts)
    rule, depth = _depth_rule(param, copies, layout, base_trace, branch_outputs)
    stds = init_stds(copies.base) if param.rescales else {}
    specs = {}
    for name, shapes in layout.shapes.items():
        site = layout.blocks.get(name)
        in_block = site is not None and rule is not None
        ends_branch = in_block and depth is not None and matches(site.template, depth.branch_outputs)
        m_depth = layout.counts[site.container][1] / layout.counts[site.container][0] if site is not None else 1.0
        specs[name] = spec_for(name, shapes, roles[name], param, stds.get(layout.counterpart[name]), sites[name],
                            depth=rule, m_depth=m_depth if in_block else 1.0, ends_branch=ends_branch,
                            block=site.template if site is not None else None)
    inputs, outputs = tied_readout_multipliers(specs, param, base_trace, sites)
    notes = forward_notes(base_trace, delta_trace, _width_ratio(layout.shapes, copies)) \
        if param.rescales and base_trace is not None and delta_trace is not None else []
    for note in notes:
        warnings.warn(ForwardScalingWarning(note), stacklevel=3)
    readouts = readout_params(roles, sites, base_trace, readout)
    return Plan(param.name, specs, inputs, {"base": dict(base), "delta": copies.delta_kwargs, "target": dict(target)},
                depth, outputs, readouts,
                base_trace.output_modules if base_trace else tuple(s.module for n in readouts for s in sites[n]),
                base_trace.constant_modules if base_trace else (), tuple(notes))


def _unit_plan(constructor, param, base, target, delta, readout, layouts, example_inputs, quiet) -> Plan:
    roles = None
    if base is not None:
        copies = make_copies(constructor, base, target, delta, quiet=quiet)
        base_trace, _ = _traces(copies, example_inputs, delta=False)
        layout = _layout(copies)
        if copies.delta is None:
            raise ValueError(f"no parameter dim differs between base {dict(base)} and delta {copies.delta_kwargs}, so "
                             f"mupkit cannot infer plain layers' roles; make base and target differ in the width "
                             f"kwargs, or build the model from mupkit.unit parts, which need no base.")
        uses = {n: base_trace.uses_of(layout.counterpart[n]) for n in layout.shapes} if base_trace else None
        roles = assign_roles(layout.shapes, param_sites(copies.target), uses=uses,
                             modules=dict(copies.target.named_modules()), readout=readout, layouts=layouts)
        model = copies.target
    else:
        model = make_copies(constructor, target, target, quiet=quiet).target
    sizes = {"target": dict(target), **({"base": dict(base)} if base is not None else {})}
    return unit_plan(model, param, sizes, roles)


# ---------------------------------------------------------------------------------- steps

def example_batch(model: nn.Module, example_inputs: Any = None) -> Any:
    """What the trace calls the model with: ``example_inputs``, else a small synthetic batch
    (fixed generator: the global RNG is not touched)."""
    if example_inputs is not None:
        return example_inputs
    return synthetic_input(model, batch_size=2, seq_len=8, generator=torch.Generator().manual_seed(0))


def _traces(copies: Copies, example_inputs: Any, delta: bool = True) -> tuple[Trace | None, Trace | None]:
    """The base and delta traces; on failure a :class:`TraceWarning` says why and how to fix it,
    and roles fall back to module types and shapes."""
    try:
        inputs = example_batch(copies.base, example_inputs)
        base_trace = run_trace(copies.base, inputs)
    except Exception as err:  # noqa: BLE001 - any failure of the user's forward is reported, not hidden
        how = "pass example_inputs=... to build / infer_plan (CLI: define batch() in the model file)" \
            if example_inputs is None else "check example_inputs"
        warnings.warn(TraceWarning(
            f"mupkit could not run {type(copies.base).__name__} (base size {copies.base_kwargs}) to see how its forward "
            f"uses each parameter ({type(err).__name__}: {err}); roles now come from module types and shapes only, "
            f"which can be wrong for raw parameters, einsums and fused experts. To fix: {how}."), stacklevel=4)
        return None, None
    if not delta or copies.delta is None:
        return base_trace, None
    try:
        return base_trace, run_trace(copies.delta, inputs)
    except Exception:  # noqa: BLE001 - the delta trace only adds warnings about the forward
        return base_trace, None


@dataclass
class _Layout:
    """Target parameter -> its width shapes, its base counterpart, and its block (if in one)."""

    shapes: dict[str, ParamShapes]
    counterpart: dict[str, str]
    blocks: dict
    counts: dict[str, tuple[int, int]]


def _layout(copies: Copies) -> _Layout:
    """Width shapes (base vs delta vs target) of every target parameter, through its base counterpart."""
    base = {n: tuple(p.shape) for n, p in copies.base.named_parameters()}
    delta = {n: tuple(p.shape) for n, p in copies.delta.named_parameters()} if copies.delta is not None else base
    target = {n: tuple(p.shape) for n, p in copies.target.named_parameters()}
    check_same_names(base, delta, ("the base model", "the delta model"),
                     "Width scaling needs the same modules at every width: keep structure kwargs equal.")
    blocks, counts, counterpart = {}, {}, {n: n for n in target}
    if copies.depth_keys:
        blocks = find_blocks(list(base), list(target))
        if any(s.container == "" for s in blocks.values()):
            grown = sorted(set(target) - set(base))
            raise ValueError(f"depth kwargs {copies.depth_keys} change the model, but its parameters do not form repeated "
                             f"blocks: the model itself is a list of layers that grows ({grown[:3]} are new), so its "
                             f"first and last layers sit in the same list as the repeated ones and inserting layers "
                             f"shifts the names. Put the repeated blocks in an nn.ModuleList of their own (or keep "
                             f"depth equal between base and target).")
        base_counts = block_counts({n: blocks[n] for n in base if n in blocks})
        counts = {c: (base_counts[c], n) for c, n in block_counts(blocks).items()}
        counterpart.update(counterparts(blocks, target, counts))
    else:
        check_same_names(base, target, ("the base model", "the target model"),
                         "No kwarg alone changes them; keep structure kwargs equal between base and target.")
    shapes = {}
    for name, t in target.items():
        c = counterpart[name]
        b, d, tc = base[c], delta[c], target[c]
        if t != tc:
            raise ValueError(f"depth kwargs {copies.depth_keys} change the model, but its parameters do not form "
                             f"repeated blocks: {name!r} has shape {t} in the deeper model while its counterpart {c!r} "
                             f"has {tc}; the depth kwargs change more than the number of blocks.")
        if not len(b) == len(d) == len(t):
            raise ValueError(f"parameter {name!r} has shapes {b} (base), {d} (delta), {t} (target) of different "
                             f"ranks; a parameter must keep its number of dims across sizes.")
        for i, (bi, di, ti) in enumerate(zip(b, d, t)):
            if bi == di and ti != bi:
                raise ValueError(f"parameter {name!r} dim {i} is {bi} in base and delta but {ti} in target: it "
                                 f"scales in target but not in delta, so mupkit cannot tell it is a width dim. "
                                 f"Pass a delta that changes the kwarg controlling it.")
        shapes[name] = ParamShapes(b, t, tuple(bi != di for bi, di in zip(b, d)))
    return _Layout(shapes, counterpart, blocks, counts)


def _require_width(param: Parametrization, copies: Copies) -> None:
    raise ValueError(f"no parameter dim differs between base {copies.base_kwargs} and delta {copies.delta_kwargs}, so "
                     f"nothing scales with width and {param.name!r} would silently be SP. Make base and target differ "
                     f"in the width kwargs (or pass delta=...), or pass parametrization='sp'.")


def _width_ratio(shapes: Mapping[str, ParamShapes], copies: Copies) -> float:
    """The delta's width multiplier: the median ratio of delta to base over the width dims."""
    delta = {n: tuple(p.shape) for n, p in copies.delta.named_parameters()}
    ratios = [d / b for n, s in shapes.items() if n in delta for b, d, inf in zip(s.base, delta[n], s.infinite) if inf]
    return statistics.median(ratios) if ratios else 1.0


def _depth_rule(param: Parametrization, copies: Copies, layout: _Layout, trace: Trace | None,
                branch_outputs: Sequence[str] | None) -> tuple[DepthRule | None, DepthInfo | None]:
    """The depth rule and the plan's :class:`DepthInfo` (None when depths are equal)."""
    if not copies.depth_keys:  # equal depths: m_L = 1, so only the width part of the eps rule is left
        rule = param.depth if not isinstance(param.depth, str) else auto_depth(1)
        return rule, None
    base, target = copies.base_kwargs, copies.target_kwargs
    if param.depth is None:
        if param.rescales:
            warnings.warn(NoDepthRuleWarning(
                f"base and target differ in depth ({', '.join(f'{k}: {base[k]} -> {target[k]}' for k in copies.depth_keys)}) "
                f"but parametrization {param.name!r} has no depth rule: residual branches are not scaled and LRs "
                f"ignore depth, so hyperparameters will not transfer across depth. Use '{param.name}+depth' "
                f"(CompleteP for multi-layer branches such as transformer layers, Depth-muP for one-layer ones) or "
                f"name the rule ('{param.name}+completep', '{param.name}+depth-mup')."), stacklevel=4)
        return None, DepthInfo(dict(layout.counts), None, (), tuple(copies.depth_keys))
    target_shapes = {n: tuple(p.shape) for n, p in copies.target.named_parameters()}
    blocks = repeated_blocks(layout.blocks, target_shapes, layout.counts)
    outputs, layers = find_branch_outputs(trace, copies.base, blocks, branch_outputs)
    rule = param.depth if not isinstance(param.depth, str) else auto_depth(layers)
    return rule, DepthInfo(dict(layout.counts), rule.alpha, tuple(sorted(outputs)), tuple(copies.depth_keys))


def spec_for(name: str, shp: ParamShapes, info: RoleInfo, param: Parametrization, base_std: float | None,
          sites, *, depth: DepthRule | None = None, m_depth: float = 1.0, ends_branch: bool = False,
          block: str | None = None) -> ParamSpec:
    """Apply the parametrization's rule to one parameter, absorbing its forward multiplier (and,
    for the last layer of a residual branch, the branch multiplier ``m_L^-alpha``)."""
    rule = param.rules[info.role]
    branch = depth.branch_multiplier(m_depth) if ends_branch else 1.0
    c = rule.forward(info.m_in, info.m_out) * branch
    return make_spec(name, shp, info.role, rule, m_in=info.m_in, m_out=info.m_out,
                     init_scale=absorbed_init_scale(rule, info.m_in, info.m_out) * branch, absorbed=c, depth=depth,
                     m_depth=m_depth if block is not None else 1.0, base_init_std=base_std,
                     fan_out_axis=info.fan_out_axis, fan_in_axis=info.fan_in_axis,
                     aliases=tuple(s.name for s in sites if s.name != name), tied_readouts=info.tied_readouts,
                     block=block, branch_output=ends_branch, role_source=info.source)


def tied_readout_multipliers(specs: Mapping[str, ParamSpec], param: Parametrization, trace: Trace | None,
                             sites: Mapping) -> tuple[dict[str, float], dict[str, float]]:
    """Where each readout tied to an embedding takes muP's ``1/m_in``: module -> factor on its
    first input (the readout is a layer holding the shared weight, e.g. a tied ``nn.Linear``),
    and module -> factor on its output (the readout is an op such as ``einsum(h, emb.weight)``
    in a module's forward: the innermost module returning its result).

    The tied weight follows the input rule (so the embedding init stays width-invariant, unlike
    mup's ``MuSharedReadout``, microsoft/mup#55); the two rules must then agree on every LR.
    """
    out_rule = param.rules[Role.OUTPUT]
    inputs, outputs = {}, {}
    for spec in specs.values():
        for module in spec.tied_readouts:
            m = spec.m_out  # the shared width dim: the embedding's fan-out is the readout's fan-in
            for fname, fam in FAMILIES.items():
                stepped_by = fam if fam.steps(Role.OUTPUT) else FAMILIES[fam.companion]  # Muon: its AdamW part
                if fname not in spec.scales or stepped_by.update not in out_rule.lr:
                    continue
                readout_lr = scales_for(out_rule, stepped_by, m, 1.0).lr
                if not abs(readout_lr - spec.scales[fname].lr) <= 1e-12 * max(1.0, readout_lr):
                    raise ValueError(f"parameter {spec.name!r} is tied between an input layer and readout "
                                     f"{module!r}, but {param.name!r} gives them different {fname} LR "
                                     f"multipliers ({spec.scales[fname].lr:g} vs {readout_lr:g}); untie them.")
            factor = out_rule.forward(m, 1.0)
            if factor == 1.0:
                continue
            if any(s.module == module for s in sites[spec.name]):
                inputs[module] = factor
                continue
            holder = _output_module(spec.name, module, trace)
            if holder is None:
                raise ValueError(f"parameter {spec.name!r} is an embedding also used as a readout inside "
                                 f"{module or 'the model'}'s forward, but that result is not what any module returns, so "
                                 f"mupkit has nowhere to apply muP's readout multiplier {factor:g}. Compute the logits "
                                 f"in a module of their own (e.g. an nn.Linear sharing the weight), or untie them.")
            outputs[holder] = factor
    return inputs, outputs


def _output_module(param: str, module: str, trace: Trace | None) -> str | None:
    """The innermost module, ``module`` or one around it, whose output is the readout use's result."""
    if trace is None:
        return None
    used = {u.index for u in trace.uses_of(param) if u.kind == "contraction"}
    if not used & set(trace.output_uses):
        return None
    around = [m for m in trace.output_modules if m == "" or module == m or module.startswith(m + ".")]
    return max(around, key=len) if around else None


def readout_params(roles: Mapping[str, RoleInfo], sites: Mapping, trace: Trace | None,
                   readout: Sequence[str] | None) -> tuple[str, ...]:
    """The parameters that produce the model's output: named by ``readout=``, else seen by the
    trace, else every output-role parameter (and tied embeddings)."""
    candidates = [n for n, r in roles.items() if r.role is Role.OUTPUT or r.tied_readouts]
    if readout is not None:
        return tuple(n for n in candidates if any(matches(s.module, readout) for s in sites[n]))
    if trace is not None and trace.output_uses:
        produced = {trace.use_at(i).param for i in trace.output_uses}
        seen = tuple(n for n in candidates if n in produced)
        if seen:
            return seen
    return tuple(candidates)


#: elements a tensor's std and mean are measured on: a strided sample of larger tensors (relative
#: error ~ 1/sqrt(2 n) = 0.07%, a fraction of the sampling spread of the user's own init)
STAT_SAMPLES = 1 << 20


def std_mean(p: torch.Tensor) -> tuple[float, float]:
    """Std and mean of a tensor's values in fp64 (the same at any thread count), on at most
    :data:`STAT_SAMPLES` evenly strided values; ``(0, 0)`` for fewer than two values."""
    x = p.detach().flatten()
    if x.numel() < 2:
        return 0.0, 0.0
    if x.numel() > STAT_SAMPLES:
        x = x[:: x.numel() // STAT_SAMPLES]
    std, mean = torch.std_mean(x.double())
    return float(std), float(mean)


def init_stds(model: nn.Module) -> dict[str, float | None]:
    """Std of each parameter of the base model as the user's constructor initialized it
    (``None`` for a constant init, e.g. zeros or ones: it is never rescaled).

    One build: the sample std of ``n`` values has a relative error ``~ 1/sqrt(2 n)`` (1% for
    a 64 x 64 matrix, 9% for a 64-vector), the same spread the user's own base model has from
    seed to seed.
    """
    stds: dict[str, float | None] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = std_mean(p)[0]
            stds[name] = std if std > 1e-15 else None
    return stds
