"""The ``"stacked"`` path: many small parameters of one shape stepped as one tensor.

On the CPU each op on a small tensor costs microseconds of dispatch whichever path calls it (a
multi-tensor op loops over its tensors in C++ there), so a step over thousands of small tensors
costs (ops per parameter) x (parameters) dispatches. Here the parameters of a param group that
share shape, dtype and device (and the shapes of their state) are stepped as one stack
``(n, *shape)``: the algorithm's update runs once per stack (on a list of stacks: one
multi-tensor call per op over a few stacks), so a step costs (ops) x (shapes) dispatches plus
three copies: the parameters and the gradients stacked, the new parameters copied back.

Elementwise ops give each member exactly what they give it alone; sums over every element
(D-Adaptation's and Prodigy's ``d``) add the same terms in another order. Per-tensor statistics
(norms, RMS) are an algorithm's own business (reduce over ``dim=1..``); an algorithm offers this
path only where its update is written for it (``Kernels.stacked``).

The state is stacked once and stays stacked: each parameter's state tensors keep their identity
but alias rows of the stack (``Tensor.set_``), so ``state_dict``, ``load_state_dict`` and the
other paths see the usual per-parameter tensors, and updating the stack updates them. A state
tensor that is no longer the one stacked (a ``load_state_dict``, a parameter that had no
gradient this step and left its stack) is stacked anew at the next step, one copy.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class Stack:
    """One stack of a group's parameters: ``params`` (the members, at ``members`` in the list
    they came from), ``param (their values
    stacked, ``(n, *shape)``; a copy: :meth:`write_back` stores it), ``grad`` (their gradients
    stacked, or None) and ``state`` (one stacked tensor per state column, which the members'
    state tensors alias)."""

    params: list[torch.Tensor]
    members: list[int]
    param: torch.Tensor
    grad: torch.Tensor | None
    state: list[torch.Tensor]
    param_rows: list[torch.Tensor]

    @property
    def row_shape(self) -> tuple[int, ...]:
        """The shape that broadcasts one value per member over the stack: ``(n, 1, ..., 1)``."""
        return (len(self.params),) + (1,) * (self.param.dim() - 1)

    def write_back(self) -> None:
        """Copy the stepped stack into the parameters (one multi-tensor copy)."""
        torch._foreach_copy_(self.params, self.param_rows)


class StackCache:
    """The stacked state of one optimizer. Per call site (keyed by its first parameter's ``id``),
    the last layout: the parameters and state tensors it was made for, their grouping into
    stacks, the stacked state (which they alias), and buffers for the stacked parameters and
    gradients. A call with the same tensors reuses it; otherwise it is made again (stacking,
    and aliasing, the state anew). Layouts a step did not use are dropped at its end
    (:meth:`end_step`): within a step a tensor is in one call, so no tensor is aliased by two
    live layouts."""

    def __init__(self) -> None:
        self.layouts: dict[int, _Layout] = {}
        self.used: set[int] = set()

    def layout(self, params: Sequence[torch.Tensor], state: Sequence[Sequence[torch.Tensor]]) -> _Layout:
        key = id(params[0])
        layout = self.layouts.get(key)
        if layout is None or not layout.made_for(params, state):
            layout = self.layouts[key] = _Layout(params, state)
        self.used.add(key)
        return layout

    def end_step(self) -> None:
        self.layouts = {key: self.layouts[key] for key in self.used}
        self.used = set()


class _Layout:
    """What :class:`StackCache` keeps per call site (its docstring); ``members[k]``: the indices
    of stack ``k``'s parameters in the call's list."""

    def __init__(self, params: Sequence[torch.Tensor], state: Sequence[Sequence[torch.Tensor]]):
        self.params, self.state = list(params), [list(column) for column in state]
        buckets: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            key = (p.shape, p.dtype, p.device, *(column[i].shape for column in state))
            buckets.setdefault(key, []).append(i)
        self.members = list(buckets.values())
        self.stacked_state = [[_alias([column[i] for i in members]) for column in state] for members in self.members]
        self.param = [torch.stack([params[i] for i in members]) for members in self.members]
        self.param_rows = [list(stacked.unbind()) for stacked in self.param]
        self.grad = [torch.empty_like(stacked) for stacked in self.param]

    def made_for(self, params: Sequence[torch.Tensor], state: Sequence[Sequence[torch.Tensor]]) -> bool:
        return len(params) == len(self.params) and len(state) == len(self.state) and \
            all(map(operator.is_, params, self.params)) and \
            all(all(map(operator.is_, new, old)) for new, old in zip(state, self.state))


def stacks(cache: StackCache, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor] | None,
           state: Sequence[Sequence[torch.Tensor]]) -> list[Stack]:
    """``params`` (with their ``grads`` and parallel ``state`` columns) as stacks, one per
    (shape, dtype, device, state shapes)."""
    layout = cache.layout(params, state)
    out = []
    for k, members in enumerate(layout.members):
        ps = [params[i] for i in members]
        torch.stack(ps, out=layout.param[k])
        grad = None if grads is None else torch.stack([grads[i] for i in members], out=layout.grad[k])
        out.append(Stack(ps, members, layout.param[k], grad, layout.stacked_state[k], layout.param_rows[k]))
    return out


def _alias(column: list[torch.Tensor]) -> torch.Tensor:
    """Stack ``column`` and make each of its tensors a view of its row of the stack, in place."""
    stacked = torch.stack(column)
    storage, row = stacked.untyped_storage(), stacked.stride(0)
    for i, t in enumerate(column):
        t.set_(storage, stacked.storage_offset() + i * row, t.shape, stacked.stride()[1:])
    return stacked


__all__ = ["Stack", "StackCache", "stacks"]
