"""From a constructor and sizes to a parametrized model: ``infer_plan``, ``parametrize``, ``build``."""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .nn.multipliers import install_input_scale
from .plan import PLAN_ATTR, ParamSpec, Plan, has_plan
from .roles import Role, RoleInfo, assign_roles
from .depth import ABSORBING, base_counterpart, block_counts, depth_kwargs, find_blocks
from .depth import branch_outputs as branch_output_templates
from .rules import FAMILIES, DepthRule, Parametrization, absorbed_init_scale, auto_depth, get_parametrization, scales_for
from .bsh import load_bsh
from .umup import unit_plan
from .shapes import Constructor, ParamShapes, build_on_meta, matches, param_sites, resolve_delta, zip_shapes

Sizes = Mapping[str, Any]


class NoDepthRuleWarning(UserWarning):
    """Base and target differ in depth under a parametrization without a depth rule."""


def _require_width(shapes: Mapping[str, ParamShapes], param: Parametrization, base: Sizes, delta: Sizes,
                   alternative: str) -> None:
    """Raise unless some parameter dim differs between base and delta (scales with width)."""
    if not any(any(s.infinite) for s in shapes.values()):
        raise ValueError(f"no parameter dim differs between base {dict(base)} and delta {dict(delta)}, so nothing "
                         f"scales with width and {param.name!r} would silently be SP. Make base and target differ "
                         f"in the width kwargs (or pass delta=...), {alternative}.")


def infer_plan(constructor: Constructor, *, base: Sizes | None = None, target: Sizes, delta: Sizes | None = None,
               parametrization: str | Parametrization = "mup", readout: Sequence[str] | None = None,
               layouts: Mapping[str, str] | None = None, branch_outputs: Sequence[str] | None = None) -> Plan:
    """Infer the scaling plan for ``constructor(**target)`` relative to ``constructor(**base)``.

    Base, delta and target are built on the meta device; dims that differ between base and
    delta scale with width. If ``delta`` is omitted, every int width kwarg that differs between
    base and target is doubled. The user's own init at the base size is measured (a few cheap
    CPU builds of the base model, with the global RNG left untouched) and is the reference the
    plan's init stds are relative to.

    Depth: a kwarg that changes the parameter names (``depth``, ``n_layer``, ...) may differ
    between base and target; repeated blocks are matched by name (:mod:`mupkit.depth`) and a
    depth parametrization (``"completep"``, ``"depth-mup"``, ``"mup+depth"``) applies its rules.

    ``"umup"`` needs no base (its rules use each weight's own fans) when the model is built from
    :mod:`mupkit.nn.unit` modules, which declare their roles; plain layers need ``base`` (and
    ``delta``) only to infer their roles (:mod:`mupkit.umup`).

    ``readout``: glob patterns naming the readout module(s), when there is more than one.
    ``layouts``: glob -> ``"out_in"`` | ``"in_out"`` for parameters whose fan-in/fan-out axes
    mupkit cannot tell from the module type (e.g. HF ``Conv1D`` is known, a custom one is not).
    ``branch_outputs``: globs of the layers ending each residual branch, when torch.fx cannot
    trace a block to find them.
    """
    param = get_parametrization(parametrization)
    if param.absolute:
        roles = None
        if base is not None:
            delta = resolve_delta(base, target, delta)
            metas = [build_on_meta(constructor, kw) for kw in (base, delta, target)]
            shapes = zip_shapes(*metas)
            _require_width(shapes, param, base, delta, "or build the model from mupkit.nn parts, which need no base")
            roles = assign_roles(shapes, param_sites(metas[2]), readout=readout, layouts=layouts)
        sizes = {"target": dict(target), **({"base": dict(base)} if base is not None else {})}
        return unit_plan(build_on_meta(constructor, target), param, sizes, roles)
    if base is None:
        raise ValueError(f"parametrization {param.name!r} is relative to a base model: pass base=dict(...) (the "
                         f"sizes the hyperparameters were tuned at). Only 'umup' needs no base.")
    depth_keys = depth_kwargs(constructor, base, target)
    if not depth_keys:
        width_target = dict(target)
    else:
        width_target = {**target, **{k: base[k] for k in depth_keys}}
    delta = resolve_delta(base, width_target, None if delta is None else {**delta, **{k: base[k] for k in depth_keys}})
    metas = [build_on_meta(constructor, kw) for kw in (base, delta, width_target)]
    width_shapes = zip_shapes(*metas)
    if param.rescales and not depth_keys:
        _require_width(width_shapes, param, base, delta, "or pass parametrization='sp'")
    deep = build_on_meta(constructor, target) if depth_keys else metas[2]
    sites_in_blocks, counts = {}, {}
    counterpart = {n: n for n in width_shapes}
    if depth_keys:
        base_names = list(width_shapes)
        sites_in_blocks = find_blocks(base_names, [n for n, _ in deep.named_parameters()])
        base_counts = block_counts({n: sites_in_blocks[n] for n in base_names if n in sites_in_blocks})
        counts = {c: (base_counts[c], n) for c, n in block_counts(sites_in_blocks).items()}
        counterpart = {n: base_counterpart(n, sites_in_blocks[n], *counts[sites_in_blocks[n].container])
                       if n in sites_in_blocks else n for n, _ in deep.named_parameters()}
    target_shapes = {n: tuple(p.shape) for n, p in deep.named_parameters()}
    same_depth = {n: tuple(p.shape) for n, p in metas[2].named_parameters()}
    mismatched = [(n, target_shapes[n], counterpart[n], same_depth.get(counterpart[n], "no such parameter"))
                  for n in target_shapes if same_depth.get(counterpart[n]) != target_shapes[n]]
    if mismatched:
        n, shape, other, other_shape = mismatched[0]
        raise ValueError(f"depth kwargs {depth_keys} change the model, but its parameters do not form repeated "
                         f"blocks: {n!r} has shape {shape} in the deeper model while its counterpart {other!r} has "
                         f"{other_shape} at the base depth ({len(mismatched)} such parameters). mupkit matches blocks "
                         f"by name; inserting layers into one nn.Sequential shifts the names. Put the repeated "
                         f"blocks in an nn.ModuleList (or keep depth equal between base and target).")
    shapes = {n: ParamShapes(width_shapes[counterpart[n]].base, target_shapes[n],
                             width_shapes[counterpart[n]].infinite) for n in target_shapes}
    sites = param_sites(deep)
    roles = assign_roles(shapes, sites, readout=readout, layouts=layouts)
    rule, outputs = None, set()
    if depth_keys and param.depth is None and param.rescales:
        warnings.warn(NoDepthRuleWarning(
            f"base and target differ in depth ({', '.join(f'{k}: {base[k]} -> {target[k]}' for k in depth_keys)}) but "
            f"parametrization {param.name!r} has no depth rule: residual branches are not scaled and LRs ignore "
            f"depth, so hyperparameters will not transfer across depth. Use '{param.name}+depth' (CompleteP for "
            f"multi-layer branches such as transformer layers, Depth-muP for one-layer ones) or name the rule "
            f"('{param.name}+completep', '{param.name}+depth-mup')."), stacklevel=2)
    if depth_keys and param.depth is not None:
        outputs = branch_output_templates(deep, list(counts), branch_outputs)
        rule = param.depth if not isinstance(param.depth, str) else auto_depth(_layers_per_branch(deep, counts, outputs))
    elif param.depth is not None:  # equal depths: m_L = 1, so only the width part of the eps rule is left
        rule = param.depth if not isinstance(param.depth, str) else auto_depth(1)
    base_stds = measure_init_stds(constructor, base) if param.rescales else {}
    specs = {}
    for name in shapes:
        site = sites_in_blocks.get(name)
        in_block = site is not None and rule is not None
        module = name.rsplit(".", 1)[0] if "." in name else ""
        ends_branch = in_block and matches(module, sorted(outputs))
        m_depth = counts[site.container][1] / counts[site.container][0] if site is not None else 1.0
        specs[name] = _spec(name, shapes[name], roles[name], param, base_stds.get(counterpart[name]), sites[name],
                            depth=rule, m_depth=m_depth if in_block else 1.0, ends_branch=ends_branch,
                            block=site.template if site is not None else None)
    depth_info = {}
    if depth_keys:
        depth_info = {"kwargs": depth_keys, "blocks": {c: list(v) for c, v in counts.items()},
                      "alpha": None if rule is None else rule.alpha, "branch_outputs": sorted(outputs)}
    return Plan(param.name, specs, _tied_readout_multipliers(specs, param),
                {"base": dict(base), "delta": dict(delta), "target": dict(target)}, depth_info)


def _layers_per_branch(model: nn.Module, counts: Mapping[str, tuple[int, int]], outputs: set[str]) -> int:
    """Weight layers per residual branch in block 0 of each container (the most of any container)."""
    most = 1
    for container in counts:
        block = model.get_submodule(f"{container}.0")
        layers = sum(isinstance(m, ABSORBING) for m in block.modules())
        branches = sum(t.startswith(f"{container}.*.") for t in outputs)
        most = max(most, -(-layers // max(branches, 1)))
    return most


def plan_from_base_shapes(model: nn.Module, base_shapes: Mapping[str, Sequence[int | None]] | str, *,
                          parametrization: str | Parametrization = "mup", readout: Sequence[str] | None = None,
                          layouts: Mapping[str, str] | None = None) -> Plan:
    """A plan for an existing model from mup-style base shapes (a dict or a ``.bsh`` path).

    As in mup, a dim with a base size is infinite even where it equals the model's dim. The
    plan has no base init stds, so apply it with ``parametrize(model, plan, init=False)``
    (e.g. before loading a checkpoint) or initialize those parameters yourself.
    """
    if isinstance(base_shapes, str):
        base_shapes = load_bsh(base_shapes)
    param = get_parametrization(parametrization)
    targets = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if set(targets) != set(base_shapes):
        raise ValueError(f"base shapes and model have different parameters. Only in model: "
                         f"{sorted(set(targets) - set(base_shapes))[:8]}; only in base shapes: "
                         f"{sorted(set(base_shapes) - set(targets))[:8]}.")
    shapes = {}
    for n, t in targets.items():
        dims = list(base_shapes[n])
        if len(dims) != len(t):
            raise ValueError(f"parameter {n!r} has shape {t} but its base shape {dims} has {len(dims)} dims")
        shapes[n] = ParamShapes(tuple(t[i] if b is None else b for i, b in enumerate(dims)), t,
                                tuple(b is not None for b in dims))
    sites = param_sites(model)
    roles = assign_roles(shapes, sites, readout=readout, layouts=layouts)
    specs = {n: _spec(n, shapes[n], roles[n], param, None, sites[n]) for n in shapes}
    return Plan(param.name, specs, _tied_readout_multipliers(specs, param))


def _spec(name: str, shp: ParamShapes, info: RoleInfo, param: Parametrization, base_std: float | None,
          sites, *, depth: DepthRule | None = None, m_depth: float = 1.0, ends_branch: bool = False,
          block: str | None = None) -> ParamSpec:
    """Apply the parametrization's rule to one parameter, absorbing its forward multiplier (and,
    for the last layer of a residual branch, the branch multiplier ``m_L^-alpha``)."""
    rule = param.rules[info.role]
    branch = depth.branch_multiplier(m_depth) if ends_branch else 1.0
    c = rule.forward(info.m_in, info.m_out) * branch
    return ParamSpec(
        name=name, role=info.role, base=shp.base, target=shp.target, infinite=shp.infinite,
        m_in=info.m_in, m_out=info.m_out, init_scale=absorbed_init_scale(rule, info.m_in, info.m_out) * branch,
        scales={f: scales_for(rule, fam, info.m_in, info.m_out, absorbed=c, depth=depth, m_depth=m_depth)
                for f, fam in FAMILIES.items()},
        base_init_std=base_std, fan_out_axis=info.fan_out_axis, fan_in_axis=info.fan_in_axis,
        aliases=tuple(s.name for s in sites if s.name != name), tied_readouts=info.tied_readouts,
        block=block, m_depth=m_depth if block is not None else 1.0, branch_output=ends_branch, absorbed=c)


def _tied_readout_multipliers(specs: Mapping[str, ParamSpec], param: Parametrization) -> dict[str, float]:
    """Readouts sharing an embedding's weight keep the readout multiplier as an input scale.

    The tied weight follows the input rule (so the embedding init stays width-invariant, unlike
    mup's ``MuSharedReadout``, microsoft/mup#55); the two rules must then agree on every LR.
    """
    out_rule = param.rules[Role.OUTPUT]
    mults = {}
    for spec in specs.values():
        for module in spec.tied_readouts:
            m = spec.m_out  # the shared width dim: the embedding's fan-out is the readout's fan-in
            for fname, fam in FAMILIES.items():
                readout_lr = scales_for(out_rule, fam, m, 1.0).lr
                if not abs(readout_lr - spec.scales[fname].lr) <= 1e-12 * max(1.0, readout_lr):
                    raise ValueError(f"parameter {spec.name!r} is tied between an input layer and readout "
                                     f"{module!r}, but {param.name!r} gives them different {fname} LR "
                                     f"multipliers ({spec.scales[fname].lr:g} vs {readout_lr:g}); untie them.")
            mults[module] = out_rule.forward(m, 1.0)
    return {k: v for k, v in mults.items() if v != 1.0}


def measure_init_stds(constructor: Constructor, base: Sizes, *, min_samples: int = 1 << 18,
                      max_builds: int = 64, seconds: float = 2.0) -> dict[str, float | None]:
    """Std of each parameter under the user's own init at the base size, pooled over builds.

    Builds the base model on the CPU with seeds 0, 1, ... until every non-constant parameter
    has ``min_samples`` values (relative std error ``~ 1/sqrt(2 n)``), ``max_builds`` builds,
    or ``seconds`` elapsed. The global RNG state is restored. ``None`` marks a parameter whose
    init is constant (zeros, ones): it is never rescaled.
    """
    count: dict[str, int] = {}
    total: dict[str, torch.Tensor] = {}
    total_sq: dict[str, torch.Tensor] = {}
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for seed in range(max_builds):
            torch.manual_seed(seed)
            with torch.device("cpu"):
                model = constructor(**base)
            for name, p in model.named_parameters():
                x = p.detach().to(torch.float64).flatten()
                count[name] = count.get(name, 0) + x.numel()
                total[name] = total.get(name, 0) + x.sum()
                total_sq[name] = total_sq.get(name, 0) + (x * x).sum()
            done = min(count.values(), default=min_samples) >= min_samples
            if done or (time.perf_counter() - start > seconds and seed >= 1):
                break
    stds: dict[str, float | None] = {}
    for name, n in count.items():
        mean = total[name] / n
        var = float((total_sq[name] / n - mean * mean).clamp_min(0)) * n / max(n - 1, 1)
        stds[name] = var ** 0.5 if var > 1e-30 else None
    return stds


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
    setattr(model, PLAN_ATTR, plan)
    return model


def build(constructor: Constructor, *, base: Sizes | None = None, target: Sizes, delta: Sizes | None = None,
          parametrization: str | Parametrization = "mup", device: torch.device | str | None = None,
          readout: Sequence[str] | None = None, layouts: Mapping[str, str] | None = None,
          zero_init: Sequence[str] = (), branch_outputs: Sequence[str] | None = None) -> nn.Module:
    """Build ``constructor(**target)`` on ``device`` and initialize it per the inferred plan.

    The target consumes the global RNG exactly like ``constructor(**target)`` would, so at the
    base size ``build`` returns the same tensors as the plain constructor (SP == muP).
    """
    plan = infer_plan(constructor, base=base, target=target, delta=delta, parametrization=parametrization,
                      readout=readout, layouts=layouts, branch_outputs=branch_outputs)
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
    return float(p.detach().to(torch.float64).std()) if p.numel() > 1 else 0.0


def _rescale(p: torch.Tensor, spec: ParamSpec) -> None:
    """Give ``p`` the std ``spec.init_std``: the init-std rule scales the deviation from the mean
    (a mean such as a gain's 1 is kept), an absorbed forward multiplier scales the whole tensor."""
    std, c = _std(p), spec.absorbed
    x = p.detach().to(torch.float64)
    if spec.init_std is not None and std > 0.0:
        mean = x.mean()
        x = (x - mean) * (spec.init_std / c / std) + mean
    if c != 1.0 or (spec.init_std is not None and std > 0.0):
        p.copy_((x * c).to(p.dtype))


def _zero(model: nn.Module, plan: Plan, params: Mapping[str, torch.Tensor], patterns: Sequence[str]) -> None:
    if isinstance(patterns, str):
        patterns = (patterns,)
    if not patterns:
        return
    names = [n for n, s in plan.items()
             if matches(n, patterns) or ("readout" in patterns and s.role is Role.OUTPUT)]
    unmatched = [pat for pat in patterns if pat != "readout" and not any(matches(n, [pat]) for n in plan)]
    if unmatched:
        raise ValueError(f"zero_init patterns {unmatched} match no parameter; names look like {list(plan)[:5]}")
    if "readout" in patterns:
        tied = [n for n, s in plan.items() if s.tied_readouts]
        if tied:
            raise ValueError(f"zero_init='readout' would zero {tied}, which is tied to an embedding; untie the "
                             f"readout or drop 'readout' from zero_init.")
        if not any(s.role is Role.OUTPUT for s in plan.values()):
            raise ValueError("zero_init='readout' but the plan has no output-role parameter (is the model SP?)")
    with torch.no_grad():
        for n in names:
            params[n].zero_()
