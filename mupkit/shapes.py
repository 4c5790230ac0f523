"""Shapes: which parameter dimensions scale with width, and where parameters are registered.

The parameter shapes of the base, delta and target copies (:mod:`mupkit.copies`) are zipped by
fully qualified name (FQN). Following microsoft/mup (``mup/shape.py``), a dimension is
*infinite* when it differs between base and delta; its width multiplier is ``m = target_dim /
base_dim`` (Tensor Programs V, Sec. 3 and App. J).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

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


def doubles(value: Any) -> bool:
    """Whether a kwarg's delta can be inferred by doubling it (an int, not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def resolve_delta(base: Mapping[str, Any], target: Mapping[str, Any],
                  delta: Mapping[str, Any] | None) -> dict[str, Any]:
    """The delta kwargs: given, or ``base`` with every kwarg that differs from target doubled.

    Only integer kwargs can be doubled; a differing non-integer kwarg needs an explicit delta.
    ``base`` and ``target`` name the same kwargs (:func:`mupkit.copies.make_copies` checks).
    """
    if delta is not None:
        return dict(delta)
    out = dict(base)
    for key, value in target.items():
        if value == base[key]:
            continue
        if not doubles(base[key]):
            raise ValueError(f"kwarg {key!r} differs between base ({base[key]!r}) and target ({value!r}) "
                             f"but is not an int, so its delta cannot be inferred by doubling; pass delta=... "
                             f"explicitly.")
        out[key] = 2 * base[key]
    return out


def check_same_names(first: Mapping[str, Any], second: Mapping[str, Any], labels: tuple[str, str], fix: str) -> None:
    """Raise naming the parameters only one of two models has (up to 6 of each), and ``fix``."""
    only_first, only_second = sorted(set(first) - set(second)), sorted(set(second) - set(first))
    if only_first or only_second:
        raise ValueError(f"{labels[0]} and {labels[1]} have different parameter names (only in {labels[0]}: "
                         f"{only_first[:6]}; only in {labels[1]}: {only_second[:6]}). {fix}")


def name_template(name: str) -> str:
    """``blocks.3.attn`` -> ``blocks.*.attn``: one name for every block's copy of a module."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", name)


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


def matches(name: str, patterns) -> bool:
    """True when ``name`` matches one of the glob ``patterns`` (fnmatch syntax)."""
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
