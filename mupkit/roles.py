"""Roles: classify each parameter from its infinite dims and its fan-in/fan-out layout.

Tensor Programs V (Yang et al. 2022), Sec. 4 and Table 3, sorts weights by which of fan-in
and fan-out grow with width:

* ``input``  -- fan-out infinite, fan-in finite (first layer, embeddings);
* ``hidden`` -- both infinite;
* ``output`` -- fan-in infinite, fan-out finite (the readout);
* ``vector`` -- a 1-D parameter over a width dim (bias, norm gain);
* ``scalar`` -- no infinite dim.

The layout (which axis is fan-out, which fan-in) comes from the owning module's type:
``nn.Linear`` and ``nn.ConvNd`` store ``(out, in, *kernel)``; ``nn.Embedding``,
``nn.ConvTransposeNd`` and HuggingFace ``Conv1D`` store ``(in, out, ...)``. A raw
``nn.Parameter`` with one infinite dim is vector-like (``input``), as in mup's Table 8 form;
``layouts={"glob": "in_out"}`` overrides any of this.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Mapping, Sequence

from .shapes import ParamShapes, ParamSite, matches


class Role(str, Enum):
    INPUT = "input"
    HIDDEN = "hidden"
    OUTPUT = "output"
    VECTOR = "vector"
    SCALAR = "scalar"


#: (fan_out axis, fan_in axis) per layout name
LAYOUT_AXES = {"out_in": (0, 1), "in_out": (1, 0)}

#: module type name -> {parameter attribute -> layout}
MODULE_LAYOUTS: dict[str, dict[str, str]] = {
    **{t: {"weight": "out_in"} for t in ("Linear", "Conv1d", "Conv2d", "Conv3d", "LazyLinear",
                                           "NonDynamicallyQuantizableLinear")},
    **{t: {"weight": "in_out"} for t in ("ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
                                           "Embedding", "EmbeddingBag", "Conv1D")},
    "MultiheadAttention": {a: "out_in" for a in ("in_proj_weight", "q_proj_weight", "k_proj_weight",
                                                  "v_proj_weight")},
}

@dataclass(frozen=True)
class RoleInfo:
    """A parameter's role and the multipliers of its fan-in and fan-out (1.0 when finite)."""

    role: Role
    m_in: float
    m_out: float
    fan_out_axis: int | None = None
    fan_in_axis: int | None = None
    tied_readouts: tuple[str, ...] = ()  # readout modules sharing an input weight (need fwd 1/m_in)


def site_layout(site: ParamSite, layouts: Mapping[str, str]) -> str | None:
    """The layout of a parameter at one site: user override by glob, else the module table."""
    for pattern, layout in layouts.items():
        if matches(site.name, [pattern]):
            if layout not in LAYOUT_AXES:
                raise ValueError(f"layouts[{pattern!r}] = {layout!r}; use one of {sorted(LAYOUT_AXES)}")
            return layout
    return MODULE_LAYOUTS.get(site.module_type, {}).get(site.attr)


def _describe(name: str, shapes: ParamShapes) -> str:
    return f"parameter {name!r} (base shape {shapes.base}, target shape {shapes.target}, infinite dims " \
           f"{[i for i, inf in enumerate(shapes.infinite) if inf]})"


def assign_roles(shapes: Mapping[str, ParamShapes], sites: Mapping[str, Sequence[ParamSite]], *,
                 readout: Sequence[str] | None = None,
                 layouts: Mapping[str, str] | None = None) -> dict[str, RoleInfo]:
    """Classify every parameter. ``readout``: glob patterns of readout module names (default: auto).

    Auto readout detection accepts a single module whose weight maps a width-sized fan-in to a
    finite fan-out; two or more such modules are ambiguous and raise, listing them.
    """
    layouts = dict(layouts or {})
    infos: dict[str, RoleInfo] = {}
    readout_like: dict[str, list[str]] = {}  # param name -> readout-like module names
    for name, shp in shapes.items():
        inf = shp.infinite
        mults = shp.multipliers
        ninf = sum(inf)
        if ninf > 2:
            raise ValueError(f"{_describe(name, shp)} has {ninf} infinite dims; muP rules are defined for at most "
                             f"two (fan-in and fan-out). Keep the other dims fixed across base and delta, or "
                             f"reshape the parameter to (fan_out, fan_in, ...).")
        if ninf == 0:
            infos[name] = RoleInfo(Role.SCALAR, 1.0, 1.0)
            continue
        if len(inf) == 1:
            infos[name] = RoleInfo(Role.VECTOR, 1.0, mults[0])
            continue
        inf_axes = {i for i, x in enumerate(inf) if x}
        kinds: dict[str, list[str]] = {"input": [], "readout": []}
        axes = None
        for site in sites[name]:
            layout = site_layout(site, layouts)
            if layout is None:
                if ninf == 2:
                    layout = "out_in"  # torch convention for raw matrices
                else:
                    kinds["input"].append(site.module)
                    continue
            fan_out, fan_in = LAYOUT_AXES[layout]
            axes = (fan_out, fan_in)
            if ninf == 2:
                if inf_axes != {fan_out, fan_in}:
                    raise ValueError(f"{_describe(name, shp)} in module {site.module!r} ({site.module_type}): "
                                     f"fan-out is dim {fan_out} and fan-in dim {fan_in}, but the infinite dims "
                                     f"are {sorted(inf_axes)}. Keep kernel dims fixed, or pass "
                                     f"layouts={{{site.name!r}: 'in_out' or 'out_in'}}.")
                continue
            (axis,) = inf_axes
            if axis == fan_out:
                kinds["input"].append(site.module)
            elif axis == fan_in:
                kinds["readout"].append(site.module)
            else:
                raise ValueError(f"{_describe(name, shp)} in module {site.module!r}: only dim {axis} scales, "
                                 f"which is neither fan-out (dim {fan_out}) nor fan-in (dim {fan_in}).")
        if ninf == 2:
            fan_out, fan_in = axes or LAYOUT_AXES["out_in"]
            infos[name] = RoleInfo(Role.HIDDEN, mults[fan_in], mults[fan_out], fan_out, fan_in)
            continue
        (m,) = [mults[i] for i in inf_axes]
        if kinds["readout"]:
            readout_like[name] = kinds["readout"]
        if kinds["input"]:
            infos[name] = RoleInfo(Role.INPUT, 1.0, m, *(axes or (None, None)),
                                   tied_readouts=tuple(kinds["readout"]))
        else:
            infos[name] = RoleInfo(Role.OUTPUT, m, 1.0, *(axes or (None, None)))
    _check_readouts(readout_like, shapes, sites, readout)
    return infos


def _check_readouts(readout_like: Mapping[str, list[str]], shapes: Mapping[str, ParamShapes],
                    sites: Mapping[str, Sequence[ParamSite]], readout: Sequence[str] | None) -> None:
    """Every width-to-finite mapping must be a readout: the single auto-detected one, or named."""
    modules = sorted({m for mods in readout_like.values() for m in mods})
    if readout is None:
        if len(modules) <= 1:
            return
        raise ValueError(f"modules {modules} each map a width-sized input to a fixed-size output. Only the "
                         f"readout (output head) may do that under muP. If several are readouts, pass "
                         f"readout=[...] with their module names; otherwise the fixed dim of the others should "
                         f"scale with width (check the delta kwargs).")
    for name, mods in readout_like.items():
        for mod in mods:
            if not matches(mod, readout):
                site = next(s for s in sites[name] if s.module == mod)
                raise ValueError(f"{_describe(name, shapes[name])} in module {mod!r} ({site.module_type}) maps a "
                                 f"width-sized fan-in to a fixed fan-out but is not in readout={list(readout)}. "
                                 f"Add it to readout=[...] if it is an output head; otherwise its fan-out should "
                                 f"scale with width (check the delta kwargs).")
