"""Depth inference: which parameters sit in repeated residual blocks, and which layers end a branch.

mupkit builds the model at the base depth and at the target depth (on the meta device). A
constructor kwarg is a *depth* kwarg when changing it alone changes the set of parameter
names. Parameters that exist only in the deeper copy belong to repeated blocks: their name has
an integer component (the block index, e.g. ``blocks.7.mlp.0.weight``) whose template
(``blocks.*.mlp.0.weight``) also occurs in the base model. This lifts microsoft/mup's "same
depth, same names" restriction (mup issues #43, #54): block ``i`` of ``L`` is compared with
the base block at the same relative position, ``i * L_base // L``.

A residual branch ``x + f(x)`` whose ``f`` ends in a Linear/Conv layer (pre-LN transformers,
residual MLPs) can take the depth multiplier ``m_L^-alpha`` inside that layer exactly (see
:func:`mupkit.rules.absorb`). :func:`branch_outputs` finds those layers by running block 0
once on the meta device and recording which layer feeds each ``stream + branch`` add;
``branch_outputs=`` globs name them when that is not possible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .shapes import build_on_meta, matches

#: modules a residual branch may end with after its last weight layer (no parameters, no change of scale)
PASS_THROUGH = (nn.Dropout, nn.Identity)
#: layers whose output a branch multiplier can be folded into (weight and bias)
ABSORBING = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class BlockSite:
    """A parameter's place in a repeated block: container FQN, block index, name template."""

    container: str
    index: int
    template: str


def depth_kwargs(constructor: Callable[..., nn.Module], base: Mapping[str, Any],
                 target: Mapping[str, Any]) -> list[str]:
    """The kwargs that differ between base and target and, alone, change the parameter names."""
    names = {n for n, _ in build_on_meta(constructor, base).named_parameters()}
    out = []
    for key in target:
        if target[key] == base.get(key):
            continue
        changed = {n for n, _ in build_on_meta(constructor, {**base, key: target[key]}).named_parameters()}
        if changed != names:
            out.append(key)
    return out


def _parts(name: str) -> list[str]:
    return name.split(".")


def find_blocks(base_names: Sequence[str], target_names: Sequence[str]) -> dict[str, BlockSite]:
    """Target parameter name -> :class:`BlockSite` for every parameter of a repeated block.

    Raises naming the parameters when the deeper model has names that match no base template,
    or lacks names the base model has.
    """
    base_set, target_set = set(base_names), set(target_names)
    gone = sorted(base_set - target_set)
    if gone:
        raise ValueError(f"the target model lacks parameters the base model has: {gone[:6]}. Depth scaling "
                         f"needs the deeper model to repeat the base model's blocks (same names, more indices); "
                         f"make base the shallower size.")
    templates: dict[tuple[str, int], set[str]] = {}  # (template, index position) -> base names
    for name in base_names:
        parts = _parts(name)
        for j, part in enumerate(parts):
            if part.isdigit():
                templates.setdefault((".".join(parts[:j] + ["*"] + parts[j + 1:]), j), set()).add(name)
    positions: dict[str, int] = {}  # container -> index position
    unmatched = []
    for name in sorted(target_set - base_set):
        parts = _parts(name)
        hits = [j for j, part in enumerate(parts)
                if part.isdigit() and (".".join(parts[:j] + ["*"] + parts[j + 1:]), j) in templates]
        if not hits:
            unmatched.append(name)
            continue
        j = hits[-1]  # the innermost index that repeats: stages.0.blocks.5.w -> container stages.0.blocks
        positions.setdefault(".".join(parts[:j]), j)
    if unmatched:
        raise ValueError(f"depth differs between base and target, but these parameters of the deeper model match "
                         f"no repeated block of the base model: {unmatched[:6]}. mupkit matches blocks by name: "
                         f"'<container>.<index>.<rest>' must also exist in the base model for some index (e.g. "
                         f"'blocks.0.mlp.weight' for 'blocks.7.mlp.weight'). Use an nn.ModuleList of identical "
                         f"blocks, or keep depth equal between base and target.")
    sites = {}
    for name in target_names:
        parts = _parts(name)
        for container, j in positions.items():
            if len(parts) > j and ".".join(parts[:j]) == container and parts[j].isdigit():
                sites[name] = BlockSite(container, int(parts[j]), ".".join(parts[:j] + ["*"] + parts[j + 1:]))
    return sites


def block_counts(sites: Mapping[str, BlockSite]) -> dict[str, int]:
    """Container -> number of blocks (highest index + 1)."""
    counts: dict[str, int] = {}
    for s in sites.values():
        counts[s.container] = max(counts.get(s.container, 0), s.index + 1)
    return counts


def base_counterpart(name: str, site: BlockSite, base_depth: int, depth: int) -> str:
    """The base-depth parameter compared with ``name``: the block at the same relative position."""
    return site.template.replace("*", str(site.index * base_depth // depth), 1)


def branch_outputs(model: nn.Module, containers: Sequence[str], patterns: Sequence[str] | None = None) -> set[str]:
    """Module FQN templates (``blocks.*.attn.proj``) of the layers that end a residual branch.

    With ``patterns`` (globs over module templates or names), those are used as given; an empty
    list means the model applies its branch multipliers itself (:func:`mupkit.nn.residual`), so
    none is folded into a weight. Otherwise
    block 0 of each container runs once: for every ``a + b`` where ``a`` is the block input or
    an earlier residual sum, the layer producing ``b`` (through dropout or identity) ends a
    branch; it must be one of :data:`ABSORBING`.
    """
    out = set()
    for container in containers:
        block = model.get_submodule(f"{container}.0")
        names = [n for n, m in block.named_modules() if isinstance(m, ABSORBING)]
        if patterns is not None:
            chosen = [n for n in names if matches(f"{container}.*.{n}", patterns) or matches(f"{container}.0.{n}", patterns)]
        else:
            chosen = _traced_branch_outputs(model, block, container)
        out.update(f"{container}.*.{n}" for n in chosen)
    if patterns is not None and list(patterns) and not out:
        raise ValueError(f"branch_outputs={list(patterns)} match no Linear/Conv layer in the repeated blocks "
                         f"{list(containers)}; use templates like '{containers[0]}.*.mlp.fc2'.")
    return out


class _ResidualAdds(TorchFunctionMode):
    """While block 0 runs (and until block 1 starts), records for every ``stream + branch`` add
    the layer that produced ``branch``; the stream starts at block 0's input."""

    ADDS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__iadd__,
            torch.Tensor.__radd__}

    def __init__(self, producers: dict[int, str]):
        super().__init__()
        self.producers, self.stream, self.keep = producers, set(), []
        self.active = False
        self.next_input = None  # what block 1 receives: must be a residual sum of block 0
        self.branches: list[str | None] = []

    def enter_block(self, x: torch.Tensor) -> None:
        self.active = True
        self.stream.add(id(x))
        self.keep.append(x)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.active and func in self.ADDS and len(args) >= 2 and all(isinstance(a, torch.Tensor) for a in args[:2]):
            a, b = args[:2]
            if id(b) in self.stream and id(a) not in self.stream:
                a, b = b, a
            if id(a) in self.stream:
                self.branches.append(self.producers.get(id(b)))
                self.stream.add(id(out))
                self.keep.append(out)
        return out


def _traced_branch_outputs(model: nn.Module, block: nn.Module, container: str) -> list[str]:
    """Run the (meta) model once on a synthetic batch and see which layer of block 0 feeds each
    residual add, whether the add is inside the block or in the container's own forward."""
    from .data import synthetic_input
    layers = [n for n, m in block.named_modules() if n and isinstance(m, ABSORBING)]
    hint = (f"Name the layer that ends each branch, e.g. branch_outputs=['{container}.*.{layers[-1] if layers else 'fc2'}'] "
            f"(Linear/Conv layers of {container}.0: {', '.join(layers) or 'none'}), or pass branch_outputs=[] and "
            f"scale the branches in forward with mupkit.nn.residual.")
    producers: dict[int, str] = {}
    keep = []
    mode = _ResidualAdds(producers)

    def record(name: str, passes: bool):
        def hook(module, args, out):
            if isinstance(out, torch.Tensor):
                keep.append(out)
                source = producers.get(id(args[0])) if passes and args else name
                if source is not None:
                    producers[id(out)] = source
        return hook

    def stop(module, args):
        mode.active = False
        mode.next_input = args[0]

    handles = [m.register_forward_hook(record(n, isinstance(m, PASS_THROUGH)))
               for n, m in block.named_modules() if n and isinstance(m, ABSORBING + PASS_THROUGH)]
    handles.append(block.register_forward_pre_hook(lambda module, args: mode.enter_block(args[0])))
    following = dict(model.named_modules()).get(f"{container}.1")
    if following is not None:
        handles.append(following.register_forward_pre_hook(stop))
    try:
        x = synthetic_input(model, batch_size=2, seq_len=8, generator=torch.Generator().manual_seed(0))  # not the
        x = x.to(next(model.parameters()).device)  # global RNG: build() must draw exactly like the constructor
        with torch.no_grad(), mode:
            model(x)
    except Exception as err:
        raise ValueError(f"cannot run {type(model).__name__} on a synthetic batch to find the residual branches of "
                         f"{container}.0 ({err.__class__.__name__}: {err}). {hint}") from err
    finally:
        for h in handles:
            h.remove()
    if not mode.branches:
        raise ValueError(f"{container}.0 ({type(block).__name__}) feeds no residual add 'x + f(x)'. {hint}")
    if mode.next_input is not None and id(mode.next_input) not in mode.stream:
        raise ValueError(f"the residual stream of {container}.0 ({type(block).__name__}) passes through another op "
                         f"between branches (post-LN: norm(x + f(x))), so mupkit cannot tell every branch from the "
                         f"adds it sees (found {mode.branches}). {hint}")
    if None in mode.branches:
        raise ValueError(f"a residual branch of {container}.0 ({type(block).__name__}) does not end with a Linear/Conv "
                         f"layer (or passes its output through another op before the add), so its depth multiplier "
                         f"cannot be folded into a weight. {hint}")
    return mode.branches
