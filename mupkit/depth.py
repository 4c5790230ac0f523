"""Depth inference: which parameters sit in repeated residual blocks, and which layers end a branch.

A constructor kwarg is a *depth* kwarg when changing it alone changes the set of parameter
names (:mod:`mupkit.copies`). Parameters that exist only in the deeper copy belong to repeated
blocks: their name has an integer component (the block index, e.g. ``blocks.7.mlp.0.weight``)
whose template (``blocks.*.mlp.0.weight``) also occurs in the base model. This lifts
microsoft/mup's "same depth, same names" restriction (mup issues #43, #54): block ``i`` of ``L``
is compared with a base block of the same structure at the same relative position
(:func:`counterparts`), so stages whose first block downsamples and interleaved
attention / feed-forward lists match too.

A residual branch ``x + f(x)`` whose ``f`` ends in a weight contraction (pre-LN transformers,
residual MLPs) can take the depth multiplier ``m_L^-alpha`` inside that weight exactly (see
:func:`mupkit.rules.absorb`). :func:`branch_outputs` finds those layers in the base model's
usage trace (:mod:`mupkit.trace`, one CPU forward) by following which contraction feeds each
``stream + branch`` add; ``branch_outputs=`` globs name them when that is not possible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from torch import nn

from .shapes import matches
from .trace import Trace


@dataclass(frozen=True)
class BlockSite:
    """A parameter's place in a repeated block: container FQN, block index, name template."""

    container: str
    index: int
    template: str


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



def _signature(sites: Mapping[str, BlockSite], shapes: Mapping[str, tuple[int, ...]], container: str,
               index: int) -> frozenset:
    """A block's structure: its parameters' names within the block and their shapes."""
    return frozenset((s.template, shapes[n]) for n, s in sites.items() if s.container == container and s.index == index)


def _groups(sites: Mapping[str, BlockSite], shapes: Mapping[str, tuple[int, ...]], container: str,
            depth: int) -> dict[frozenset, list[int]]:
    """Block indices of ``container`` grouped by structure."""
    groups: dict[frozenset, list[int]] = {}
    for i in range(depth):
        groups.setdefault(_signature(sites, shapes, container, i), []).append(i)
    return groups


def counterparts(sites: Mapping[str, BlockSite], shapes: Mapping[str, tuple[int, ...]],
                 counts: Mapping[str, tuple[int, int]]) -> dict[str, str]:
    """Target parameter name -> the base-depth parameter it is compared with.

    Blocks are grouped by structure (:func:`_signature`, at the target width): a ResNet stage's
    downsampling first block and its plain blocks, or the attention and feed-forward entries of
    an interleaved list, form different groups. Within a group, the target's ``p``-th block
    takes the base's block at the same relative position, ``p * n_base // n``.
    """
    out = {}
    for container, (base_depth, depth) in counts.items():
        for signature, indices in _groups(sites, shapes, container, depth).items():
            base_indices = [i for i in indices if i < base_depth]
            if not base_indices:
                first = indices[0]
                near = _signature(sites, shapes, container, min(first, base_depth - 1))
                extra = sorted(f"{t} {shape}" for t, shape in signature - near)[:4]
                raise ValueError(f"block {container}.{first} of the deeper model matches no block of the base depth "
                                 f"({container}.0..{base_depth - 1}): it has {extra} that block "
                                 f"{container}.{min(first, base_depth - 1)} lacks (or with other shapes). Each kind "
                                 f"of block in {container} must occur at the base depth too; raise the base depth.")
            for p, i in enumerate(indices):
                j = base_indices[p * len(base_indices) // len(indices)]
                for name, s in sites.items():
                    if s.container == container and s.index == i:
                        out[name] = s.template.replace("*", str(j), 1)
    return out


def repeated_blocks(sites: Mapping[str, BlockSite], shapes: Mapping[str, tuple[int, ...]],
                    counts: Mapping[str, tuple[int, int]]) -> dict[str, list[int]]:
    """Container -> the base-depth indices of one block of each kind that repeats more at the
    target depth (a stage's plain blocks, not its downsampling first block; the attention and
    the feed-forward entry of an interleaved list)."""
    out = {}
    for container, (base_depth, depth) in counts.items():
        out[container] = sorted(indices[0] for indices in _groups(sites, shapes, container, depth).values()
                                if sum(i < base_depth for i in indices) < len(indices))
    return out


def branch_outputs(trace: Trace | None, model: nn.Module, blocks: Mapping[str, Sequence[int]],
                   patterns: Sequence[str] | None = None) -> tuple[set[str], int]:
    """Parameter templates (``blocks.*.attn.proj.weight``) that carry each residual branch's
    multiplier, and the most weight layers any branch has.

    With ``patterns`` (globs over module or parameter templates or names), the parameters of
    matching modules are used as given; an empty list means the model applies its branch
    multipliers itself (:func:`mupkit.nn.residual`), so none is folded into a weight. Otherwise
    the base model's trace (:mod:`mupkit.trace`) is read over one repeated block of each kind
    (``blocks``): for every ``a + b`` where ``a`` is the block's input or an earlier residual
    sum (through parameter-free elementwise ops such as a ReLU), ``b`` is a branch, and the
    parameters it is linear in (its last contraction's weight and bias, or the gain and bias of
    a norm that ends it) take the multiplier ``m_L^-alpha``.
    """
    out, layers = set(), 1
    for container, indices in blocks.items():
        for index in indices:
            block = model.get_submodule(f"{container}.{index}")
            prefix = f"{container}.{index}."
            params = [n for n, _ in block.named_parameters()]
            if patterns is not None:
                chosen = {n for n in params if any(matches(x, patterns) for x in _names_of(container, index, n))}
            else:
                branches = _traced_branches(trace, container, index, params)
                chosen = {p[len(prefix):] for b in branches for p in b}
                contractions = sum(1 for name, uses in trace.uses.items()
                                   if name.startswith(prefix) and any(u.kind == "contraction" for u in uses))
                layers = max(layers, -(-contractions // len(branches)))
            out.update(f"{container}.*.{n}" for n in chosen)
    if patterns is not None and list(patterns) and not out:
        raise ValueError(f"branch_outputs={list(patterns)} match no layer with parameters in the repeated blocks "
                         f"{list(blocks)}; use templates like '{next(iter(blocks))}.*.mlp.fc2'.")
    return out, layers


def _names_of(container: str, index: int, param: str) -> list[str]:
    """The names a ``branch_outputs`` glob may use for a block parameter: its module's template
    and name, and its own template and name."""
    module = param.rpartition(".")[0]
    names = [f"{container}.*.{param}", f"{container}.{index}.{param}"]
    names += [f"{container}.*.{module}", f"{container}.{index}.{module}"] if module else \
        [f"{container}.*", f"{container}.{index}"]
    return names


def _traced_branches(trace: Trace | None, container: str, index: int, params: Sequence[str]) -> list[frozenset]:
    """The parameter sets the residual branches of block ``index`` are linear in."""
    modules = list(dict.fromkeys(p.rpartition(".")[0] for p in params))
    example = next((m for m in reversed(modules) if m), "fc2")
    hint = (f"Name the layer that ends each branch, e.g. branch_outputs=['{container}.*.{example}'] (modules with "
            f"parameters in {container}.{index}: {', '.join(m or '(the block itself)' for m in modules) or 'none'}), "
            f"or pass branch_outputs=[] and scale the branches in forward with mupkit.nn.residual.")
    if trace is None:
        raise ValueError(f"mupkit could not run the base model to find the residual branches of {container}.{index} "
                         f"(see the warning above: pass example_inputs=...). {hint}")
    begin = _entry(trace, f"{container}.{index}")
    if begin is None:
        raise ValueError(f"{container}.{index} was not called in the traced forward, so its residual branches are "
                         f"unknown. {hint}")
    following = _entry(trace, f"{container}.{index + 1}")
    end = following[1] if following else math.inf
    stream, branches = {begin[0]}, []
    prefix = f"{container}.{index}."

    def in_stream(x: int) -> bool:
        while x not in stream and x in trace.unary:
            x = trace.unary[x]
        return x in stream

    for a, b, out, at in trace.adds:
        if not begin[1] < at <= end:
            continue
        if in_stream(b) and not in_stream(a):
            a, b = b, a
        if not in_stream(a):
            continue
        params_of_branch = trace.branch_params.get(b, frozenset())
        inside = frozenset(p for p in params_of_branch if p.startswith(prefix))
        branches.append(inside if inside and inside == params_of_branch else None)
        stream.add(out)
    if not branches:
        raise ValueError(f"{container}.{index} feeds no residual add 'x + f(x)'. {hint}")
    if following and not in_stream(following[0]):
        raise ValueError(f"the residual stream of {container}.{index} passes through another op between branches "
                         f"(post-LN: norm(x + f(x))), so mupkit cannot tell every branch from the adds it sees. {hint}")
    if None in branches:
        raise ValueError(f"a residual branch of {container}.{index} is not linear in weights of the block (its last "
                         f"op is not a Linear, conv, matmul or norm of the block, or it passes through another op "
                         f"before the add), so its depth multiplier cannot be folded into weights. {hint}")
    return list(dict.fromkeys(branches))


def _entry(trace: Trace, block: str) -> tuple[int, int] | None:
    """(input id, op index) of the first call of ``block`` or, when the block itself is never
    called (a ModuleList entry whose children the container calls), of its first called child."""
    calls = [c for name, cs in trace.entered.items() if name == block or name.startswith(block + ".") for c in cs]
    return min(calls, key=lambda c: c[1]) if calls else None
