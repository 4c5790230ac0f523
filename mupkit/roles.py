"""Roles: classify each parameter from its width dims and how the forward uses it.

Tensor Programs V (Yang et al. 2022), Sec. 4 and Table 3, sorts weights by which of fan-in
and fan-out grow with width:

* ``input``  -- fan-out infinite, fan-in finite (first layer, embeddings);
* ``hidden`` -- both infinite (3-D expert stacks too: the expert axis is a batch axis);
* ``output`` -- fan-in infinite, fan-out finite (the readout; an MoE router);
* ``vector`` -- a 1-D parameter over a width dim (bias, norm gain);
* ``scalar`` -- no infinite dim.

Which axis is fan-in and which fan-out comes, in this order, from:

1. ``layouts=`` (glob over parameter or site names -> ``"out_in"``, ``"in_out"``, or a pair
   ``(fan_out_axis, fan_in_axis)`` for any axes of an N-d tensor);
2. the usage trace (:mod:`mupkit.trace`): the axis a contraction sums over is fan-in, the
   axis it keeps is fan-out; a lookup's indexed axis is fan-in. A parameter looked up *and*
   contracted over its width axis is an embedding tied to a readout;
3. the owning module's type, matched through subclasses: ``nn.Linear`` and ``nn.ConvNd`` store
   ``(out, in, *kernel)``; ``nn.Embedding``, ``nn.ConvTransposeNd`` and HF ``Conv1D``
   ``(in, out, ...)``;
4. otherwise a 1-D parameter is a vector, a matrix with two width dims ``(out, in)``, and one
   with a single width dim input-like (mup's Table 8 form).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Mapping, Sequence

from torch import nn

from .shapes import ParamShapes, ParamSite, matches
from .trace import CONTRACTED, KEPT, LOOKUP, Use


class Role(str, Enum):
    INPUT = "input"
    HIDDEN = "hidden"
    OUTPUT = "output"
    VECTOR = "vector"
    SCALAR = "scalar"


#: (fan_out axis, fan_in axis) per layout name
LAYOUT_AXES = {"out_in": (0, 1), "in_out": (1, 0)}


def _module_types(*names: str) -> tuple[type, ...]:
    return tuple(getattr(nn, n) for n in names)


#: module classes (matched with isinstance, so subclasses count) -> {parameter attribute -> layout}
MODULE_LAYOUTS: tuple[tuple[tuple[type, ...], dict[str, str]], ...] = (
    (_module_types("ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"), {"weight": "in_out"}),
    (_module_types("Linear", "Conv1d", "Conv2d", "Conv3d"), {"weight": "out_in"}),
    (_module_types("Embedding", "EmbeddingBag"), {"weight": "in_out"}),
    (_module_types("MultiheadAttention"), {a: "out_in" for a in ("in_proj_weight", "q_proj_weight", "k_proj_weight",
                                                                   "v_proj_weight")}),
)
#: module type names whose classes mupkit does not import (HF transformers' GPT-2 ``Conv1D``)
NAMED_LAYOUTS = {"Conv1D": {"weight": "in_out"}}


@dataclass(frozen=True)
class RoleInfo:
    """A parameter's role, the multipliers of its fan-in and fan-out (1.0 when finite), its axes,
    the modules where it is used as a tied readout, and where the role came from."""

    role: Role
    m_in: float
    m_out: float
    fan_out_axis: int | None = None
    fan_in_axis: int | None = None
    tied_readouts: tuple[str, ...] = ()  # modules using an input weight as a readout (need fwd 1/m_in)
    source: str = "trace"  # "layouts=" | "trace" | "module type" | "shape"


def _layout_axes(layout, name: str, ndim: int) -> tuple[int, int]:
    if isinstance(layout, str) and layout in LAYOUT_AXES:
        return LAYOUT_AXES[layout]
    if isinstance(layout, (tuple, list)) and len(layout) == 2 and all(isinstance(a, int) for a in layout):
        out_axis, in_axis = (a + ndim if a < 0 else a for a in layout)
        if 0 <= out_axis < ndim and 0 <= in_axis < ndim and out_axis != in_axis:
            return out_axis, in_axis
    raise ValueError(f"layouts[...] = {layout!r} for parameter {name!r} ({ndim}-d); use 'out_in', 'in_out', or a "
                     f"pair (fan_out_axis, fan_in_axis) of two different axes in range(-{ndim}, {ndim}).")


def _table_layout(site: ParamSite, module: nn.Module | None) -> str | None:
    if module is not None:
        for types, attrs in MODULE_LAYOUTS:
            if isinstance(module, types) and site.attr in attrs:
                return attrs[site.attr]
    return NAMED_LAYOUTS.get(site.module_type, {}).get(site.attr)


def _describe(name: str, shapes: ParamShapes) -> str:
    return f"parameter {name!r} (base shape {shapes.base}, target shape {shapes.target}, infinite dims " \
           f"{[i for i, inf in enumerate(shapes.infinite) if inf]})"


@dataclass(frozen=True)
class _Reading:
    """One way a parameter is read: its fan-out and fan-in axes, and the module doing it."""

    fan_out: tuple[int, ...]
    fan_in: tuple[int, ...]
    module: str
    source: str


def _readings(name: str, shp: ParamShapes, sites: Sequence[ParamSite], uses: Sequence[Use],
              layouts: Mapping[str, object], modules: Mapping[str, nn.Module]) -> list[_Reading]:
    ndim = len(shp.base)
    for pattern, layout in layouts.items():
        if matches(name, [pattern]) or any(matches(s.name, [pattern]) for s in sites):
            out_axis, in_axis = _layout_axes(layout, name, ndim)
            return [_Reading((out_axis,), (in_axis,), sites[0].module if sites else "", "layouts=")]
    traced = [u for u in uses if u.kind != "elementwise"]
    if traced:
        return [_Reading(u.axes(KEPT), u.axes(CONTRACTED) + u.axes(LOOKUP), u.module, "trace") for u in traced]
    if uses:  # only elementwise uses: a gain, a bias, an added table
        return []
    readings = []
    for site in sites:
        layout = _table_layout(site, modules.get(site.module))
        if layout is not None:
            out_axis, in_axis = LAYOUT_AXES[layout]
            readings.append(_Reading((out_axis,), (in_axis,), site.module, "module type"))
    return readings


def assign_roles(shapes: Mapping[str, ParamShapes], sites: Mapping[str, Sequence[ParamSite]], *,
                 uses: Mapping[str, Sequence[Use]] | None = None, modules: Mapping[str, nn.Module] | None = None,
                 readout: Sequence[str] | None = None, layouts: Mapping[str, object] | None = None
                 ) -> dict[str, RoleInfo]:
    """Classify every parameter (see the module docstring for where its axes come from).

    ``readout``: glob patterns of readout modules; a parameter of a matching module that maps a
    width fan-in to a finite fan-out is its readout even where the trace does not show it (and a
    pattern that matches no such module is an error).
    """
    layouts, uses, modules = dict(layouts or {}), dict(uses or {}), dict(modules or {})
    infos: dict[str, RoleInfo] = {}
    named_readouts = set()
    for name, shp in shapes.items():
        inf, mults = shp.infinite, shp.multipliers
        ninf = sum(inf)
        if ninf > 2:
            raise ValueError(f"{_describe(name, shp)} has {ninf} infinite dims; muP rules are defined for at most "
                             f"two (fan-in and fan-out). Keep the other dims fixed across base and delta, or "
                             f"reshape the parameter to (fan_out, fan_in, ...).")
        if ninf == 0:
            infos[name] = RoleInfo(Role.SCALAR, 1.0, 1.0, source="shape")
            continue
        readings = _readings(name, shp, sites.get(name, ()), uses.get(name, ()), layouts, modules)
        if readout is not None:
            named_readouts |= {s.module for s in sites.get(name, ()) if matches(s.module, readout)}
        if not readings:
            infos[name] = _untraced(name, shp, uses.get(name, ()))
            continue
        inputs, outputs, hidden = [], [], []
        for r in readings:
            wide_in = [a for a in r.fan_in if inf[a]]
            wide_out = [a for a in r.fan_out if inf[a]]
            if wide_in and wide_out:
                hidden.append((r, wide_out[0], wide_in[0]))
            elif wide_out:
                inputs.append((r, wide_out[0], r.fan_in[0] if r.fan_in else None))
            elif wide_in:
                outputs.append((r, r.fan_out[0] if r.fan_out else None, wide_in[0]))
            else:
                raise ValueError(f"{_describe(name, shp)}: {r.module or 'the model'} reads it with fan-out axes "
                                 f"{list(r.fan_out)} and fan-in axes {list(r.fan_in)} ({r.source}), none of which "
                                 f"scales with width. Pass layouts={{{name!r}: (fan_out_axis, fan_in_axis)}}.")
        if hidden:
            r, out_axis, in_axis = hidden[0]
            infos[name] = RoleInfo(Role.HIDDEN, mults[in_axis], mults[out_axis], out_axis, in_axis, source=r.source)
        elif inputs:
            r, out_axis, in_axis = inputs[0]
            infos[name] = RoleInfo(Role.INPUT, 1.0, mults[out_axis], out_axis, in_axis,
                                   tied_readouts=tuple(dict.fromkeys(o[0].module for o in outputs)), source=r.source)
        else:
            r, out_axis, in_axis = outputs[0]
            infos[name] = RoleInfo(Role.OUTPUT, mults[in_axis], 1.0, out_axis, in_axis, source=r.source)
    if readout is not None:
        _check_readouts(infos, sites, readout, named_readouts)
    return infos


def _untraced(name: str, shp: ParamShapes, uses: Sequence[Use]) -> RoleInfo:
    """A parameter no contraction reads (a gain, a bias, an added table) or that the trace never
    saw and no module type explains: its role follows from its shape."""
    inf, mults = shp.infinite, shp.multipliers
    axes = [i for i, x in enumerate(inf) if x]
    if len(axes) == 1:
        role = Role.VECTOR if len(inf) == 1 else Role.INPUT
        return RoleInfo(role, 1.0, mults[axes[0]], axes[0] if len(inf) > 1 else None, None,
                        source="trace" if uses else "shape")
    if uses:
        raise ValueError(f"{_describe(name, shp)} is used only elementwise ({', '.join(sorted({u.op for u in uses}))} "
                         f"in {uses[0].module or 'the model'}), with two width dims, so it has no fan-in to scale by. "
                         f"Pass layouts={{{name!r}: (fan_out_axis, fan_in_axis)}} if it acts as a matrix.")
    out_axis, in_axis = LAYOUT_AXES["out_in"]  # torch's convention for a raw matrix the trace did not see
    return RoleInfo(Role.HIDDEN, mults[in_axis], mults[out_axis], out_axis, in_axis, source="shape")


def _check_readouts(infos: Mapping[str, RoleInfo], sites: Mapping[str, Sequence[ParamSite]],
                    readout: Sequence[str], named: set[str]) -> None:
    """Every ``readout=`` pattern must name a module holding an output-role parameter."""
    for pattern in readout:
        holders = [n for n, info in infos.items() if info.role is Role.OUTPUT or info.tied_readouts
                   for s in sites.get(n, ()) if matches(s.module, [pattern])]
        if not holders:
            found = sorted({s.module for n, info in infos.items() if info.role is Role.OUTPUT for s in sites.get(n, ())})
            raise ValueError(f"readout={list(readout)}: {pattern!r} matches no module that maps a width-sized input "
                             f"to a fixed-size output (modules that do: {found or 'none'}; modules named: "
                             f"{sorted(m for m in named if matches(m, [pattern])) or 'none'}). Check the module "
                             f"name, or the delta kwargs if its fan-in should scale with width.")
