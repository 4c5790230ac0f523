"""Shape inference: which parameter dimensions scale with width.

The user's constructor is called with the base, delta and target keyword arguments on the
``meta`` device (no memory is allocated), and the parameter shapes of the three copies are
zipped by fully qualified name (FQN). Following microsoft/mup (``mup/shape.py``), a dimension
is *infinite* when it differs between base and delta; its width multiplier is
``m = target_dim / base_dim`` (Tensor Programs V, Sec. 3 and App. J).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

Constructor = Callable[..., nn.Module]


@dataclass(frozen=True)
class ParamShapes:
    """Shapes of one parameter at the base and target sizes, and which dims scale with width.

    ``infinite[i]`` is true when dim ``i`` differs between the base and delta models (or, for
    shapes read from a mup ``.bsh`` file, when the file gives it a base dim).
    """

    base: tuple[int, ...]
    target: tuple[int, ...]
    infinite: tuple[bool, ...]

    @property
    def multipliers(self) -> tuple[float, ...]:
        return width_multipliers(self.base, self.target, self.infinite)


def width_multipliers(base: tuple[int, ...], target: tuple[int, ...], infinite: tuple[bool, ...]) -> tuple[float, ...]:
    """Per dim: ``m = target / base`` for infinite dims, 1.0 for finite ones (TP5, App. J)."""
    return tuple(t / b if inf else 1.0 for b, t, inf in zip(base, target, infinite))


@dataclass(frozen=True)
class ParamSite:
    """Where a parameter is used: the owning module's FQN, its type name, the attribute name."""

    module: str
    module_type: str
    attr: str

    @property
    def name(self) -> str:
        return f"{self.module}.{self.attr}" if self.module else self.attr


def resolve_delta(base: Mapping[str, Any], target: Mapping[str, Any],
                  delta: Mapping[str, Any] | None) -> dict[str, Any]:
    """The delta kwargs: given, or ``base`` with every kwarg that differs from target doubled.

    Only integer kwargs can be doubled; a differing non-integer kwarg needs an explicit delta.
    """
    if delta is not None:
        return dict(delta)
    missing = set(target) ^ set(base)
    if missing:
        raise ValueError(f"base and target must name the same constructor kwargs; only in one of them: "
                         f"{sorted(missing)}. Give both the same keys.")
    out = dict(base)
    for key, value in target.items():
        if value == base[key]:
            continue
        if not isinstance(base[key], int) or isinstance(base[key], bool):
            raise ValueError(f"kwarg {key!r} differs between base ({base[key]!r}) and target ({value!r}) "
                             f"but is not an int, so its delta cannot be inferred by doubling; pass delta=... "
                             f"explicitly.")
        out[key] = 2 * base[key]
    return out


def build_on_meta(constructor: Constructor, kwargs: Mapping[str, Any]) -> nn.Module:
    """Call ``constructor(**kwargs)`` with ``meta`` as the default device (allocates nothing)."""
    try:
        with torch.device("meta"):
            model = constructor(**kwargs)
    except Exception as err:  # the user's constructor failed: say where and how to fix it
        raise RuntimeError(f"building the model on the meta device with {dict(kwargs)} failed: {err!r}. "
                           f"mupkit builds cheap copies with `with torch.device('meta'):`; make the "
                           f"constructor avoid data-dependent ops (e.g. .item()) at construction.") from err
    if not isinstance(model, nn.Module):
        raise TypeError(f"the constructor returned {type(model).__name__}, expected an nn.Module")
    return model


def param_sites(model: nn.Module) -> dict[str, list[ParamSite]]:
    """Canonical FQN -> every place the parameter is registered (tied weights have several).

    The canonical name is the one ``named_parameters()`` reports (the first registration).
    """
    canonical = {id(p): name for name, p in model.named_parameters()}
    sites: dict[str, list[ParamSite]] = {name: [] for name in canonical.values()}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False):
            sites[canonical[id(p)]].append(ParamSite(mod_name, type(module).__name__, attr))
    for name in sites:  # keep each site once (a module reachable by two paths shows twice)
        sites[name] = list(dict.fromkeys(sites[name]))
    return sites


def zip_shapes(base: nn.Module, delta: nn.Module, target: nn.Module) -> dict[str, ParamShapes]:
    """Zip the three copies' parameter shapes by FQN; raise naming the names that do not match."""
    shapes = [{n: tuple(p.shape) for n, p in m.named_parameters()} for m in (base, delta, target)]
    names = set(shapes[0])
    for label, other in (("delta", shapes[1]), ("target", shapes[2])):
        if set(other) != names:
            only_base = sorted(names - set(other))
            only_other = sorted(set(other) - names)
            raise ValueError(
                f"base and {label} models have different parameter names. Only in base: {only_base[:8]}"
                f"{' ...' if len(only_base) > 8 else ''}; only in {label}: {only_other[:8]}"
                f"{' ...' if len(only_other) > 8 else ''}. Width scaling needs the same modules at every "
                f"size: keep depth and structure kwargs equal between base, delta and target.")
    out = {}
    for name in shapes[0]:
        b, d, t = shapes[0][name], shapes[1][name], shapes[2][name]
        if not len(b) == len(d) == len(t):
            raise ValueError(f"parameter {name!r} has shapes {b} (base), {d} (delta), {t} (target) of different "
                             f"ranks; a parameter must keep its number of dims across sizes.")
        for i, (bi, di, ti) in enumerate(zip(b, d, t)):
            if bi == di and ti != bi:
                raise ValueError(f"parameter {name!r} dim {i} is {bi} in base and delta but {ti} in target: it "
                                 f"scales in target but not in delta, so mupkit cannot tell it is a width dim. "
                                 f"Pass a delta that changes the kwarg controlling it.")
        out[name] = ParamShapes(b, t, tuple(bi != di for bi, di in zip(b, d)))
    return out


def matches(name: str, patterns) -> bool:
    """True when ``name`` matches one of the glob ``patterns`` (fnmatch syntax)."""
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
