"""Per-tensor update functions compiled once and reused for every tensor of a model.

:class:`FlatKernel` compiles a function of 1-D tensors and 0-dim scalar tensors with
``torch.compile(dynamic=True)``: every parameter, whatever its shape, runs through the same
graph as a flat view (one compile per dtype, no recompile limit however many tensors or param
groups), and per-step scalars are tensors, so new values never recompile. On the CPU, inductor
fuses each function into one loop over the tensor, so an optimizer step reads and writes each
array once instead of once per eager op.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .sharding import DTensor


class FlatKernel:
    """``fn(*flat_tensors, *scalar_tensors)`` compiled on first use; call with whole tensors."""

    def __init__(self, fn: Callable[..., object]):
        self.fn = fn
        self._compiled = None

    def scalars(self, values: Sequence[float], like: torch.Tensor) -> list[torch.Tensor]:
        """Per-step scalars as 0-dim tensors of ``like``'s dtype and device (make once per step)."""
        return [torch.tensor(v, dtype=like.dtype, device=like.device) for v in values]

    def __call__(self, tensors: Sequence[torch.Tensor], scalars: Sequence[torch.Tensor]):
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
        return self._compiled(*(_flat(t) for t in tensors), *scalars)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view sharing ``t``'s storage (so in-place updates reach it)."""
    if DTensor is not None and isinstance(t, DTensor):
        raise ValueError(f"compiled=True runs on whole tensors, but a tensor of shape {tuple(t.shape)} is sharded "
                         f"(a DTensor); use the default (eager) path, which reduces over the shards.")
    if not t.is_contiguous():
        raise ValueError(f"compiled=True needs contiguous tensors, got one of shape {tuple(t.shape)} with strides "
                         f"{t.stride()}; make the parameter contiguous or use the default (eager) path.")
    return t.view(-1)


__all__ = ["FlatKernel"]
