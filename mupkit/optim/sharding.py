"""Reductions of per-tensor statistics over sharded parameters (FSDP2 ``fully_shard`` DTensors).

Elementwise optimizers work on each rank's local shard unchanged. Optimizers that reduce over
a tensor (Adafactor's column statistics, the RMS of a parameter or of its update) must sum the
local partial sums over the ranks holding the other shards. :class:`ShardInfo` describes one
parameter: its local tensor, which global dim is split (``None`` when the tensor is whole on
this rank) and the process group to reduce over. Only ``Shard(d)`` or ``Replicate`` on a 1-D
mesh (what ``fully_shard`` makes) is supported; anything else is refused with an error rather
than silently reduced over the wrong ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch without distributed support
    DTensor = None


@dataclass(frozen=True)
class ShardInfo:
    shape: torch.Size  # global shape
    dim: int | None  # the sharded global dim, or None when this rank holds the whole tensor
    group: Any = None  # process group of the shards

    @property
    def numel(self) -> int:
        return self.shape.numel()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local storage of ``t`` (itself unless it is a DTensor); in-place updates reach ``t``."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def local_tensors(*columns: list[torch.Tensor]) -> tuple[list[torch.Tensor], ...]:
    """:func:`local_tensor` of every tensor of parallel lists (the first holds parameters), for an
    elementwise step on plain tensors; the lists themselves when no parameter is a DTensor."""
    if all(type(p) in (torch.Tensor, torch.nn.Parameter) for p in columns[0]):
        return columns
    return tuple([local_tensor(t) for t in column] for column in columns)


def shard_info(name: str, p: torch.Tensor) -> ShardInfo:
    if DTensor is None or not isinstance(p, DTensor):
        return ShardInfo(p.shape, None)
    placements = p.placements
    if p.device_mesh.ndim != 1 or len(placements) != 1:
        raise ValueError(f"parameter {name} (shape {tuple(p.shape)}) is a DTensor on a "
                                  f"{p.device_mesh.ndim}-D mesh with placements {placements}; mupkit's reducing "
                                  f"optimizers support 1-D meshes (fully_shard) only. Use an elementwise optimizer "
                                  f"(Adam, AdamW, AdamAtan2) for this layout.")
    placement = placements[0]
    if placement.is_replicate():
        return ShardInfo(p.shape, None)
    if not placement.is_shard():
        raise ValueError(f"parameter {name} (shape {tuple(p.shape)}) has placement {placement}; "
                                  f"expected Shard(d) or Replicate.")
    return ShardInfo(p.shape, placement.dim % p.dim(), p.device_mesh.get_group())


def all_sum(values: torch.Tensor, infos: Sequence[ShardInfo]) -> torch.Tensor:
    """Sum row ``i`` of ``values`` over the ranks of ``infos[i]`` (rows of unsharded tensors untouched).

    One collective per distinct process group, whatever the number of tensors.
    """
    groups = {id(i.group): i.group for i in infos if i.dim is not None}
    if not groups:
        return values
    import torch.distributed as dist
    values = values.clone()
    for key, group in groups.items():
        rows = [k for k, i in enumerate(infos) if i.dim is not None and id(i.group) == key]
        index = torch.tensor(rows, device=values.device)
        part = values.index_select(0, index)
        dist.all_reduce(part, group=group)
        values.index_copy_(0, index, part)
    return values


def global_rms(tensors: list[torch.Tensor], infos: list[ShardInfo]) -> torch.Tensor:
    """RMS of each global tensor, as one 1-D tensor (one reduction for all sharded ones). Under
    ``torch.compile`` the norms are sums of squares, which inductor fuses into the loops that
    produce the tensors (``_foreach_norm`` is an opaque kernel that needs them stored first)."""
    if torch.compiler.is_compiling():
        norms = torch.stack([t.square().sum().sqrt() for t in tensors])
    else:
        norms = torch.stack(torch._foreach_norm(tensors))
    if all(i.dim is None for i in infos):  # whole tensors: no reduction, no per-step host-to-device copy
        if len(infos) == 1:
            return norms / math.sqrt(infos[0].numel)
        return norms / torch.tensor([math.sqrt(i.numel) for i in infos], dtype=norms.dtype, device=norms.device)
    numel = torch.tensor([i.numel for i in infos], dtype=norms.dtype, device=norms.device)
    return (all_sum(norms.square(), infos) / numel).sqrt()


def rms_values(tensors: list[torch.Tensor], infos: list[ShardInfo]) -> list[float]:
    """:func:`global_rms` as Python floats, read back at once: for CPU tensors, where the read
    costs no device sync and the arithmetic that follows is cheaper on floats than on 0-dim tensors."""
    if any(i.dim is not None for i in infos):
        return global_rms(tensors, infos).tolist()
    norms = torch._foreach_norm(tensors)
    values = [float(norms[0])] if len(norms) == 1 else torch.stack(norms).tolist()
    return [n / math.sqrt(i.numel) for n, i in zip(values, infos)]


def mean_over(x: torch.Tensor, dim: int, info: ShardInfo) -> torch.Tensor:
    """``x.mean(dim, keepdim=True)`` of the global tensor, from this rank's shard ``x``."""
    if info.dim is None or dim % len(info.shape) != info.dim:
        return x.mean(dim, keepdim=True)
    import torch.distributed as dist
    total = x.sum(dim, keepdim=True)
    dist.all_reduce(total, group=info.group)
    return total.div_(info.shape[dim])


def state_like(local: torch.Tensor, p: torch.Tensor, info: ShardInfo, global_shape: tuple[int, ...],
               reduced_dims: tuple[int, ...] = ()) -> torch.Tensor:
    """Optimizer state for ``p`` whose rank-local storage is ``local``: a DTensor on ``p``'s mesh
    when ``p`` is sharded, so distributed checkpoints save and reload it shard by shard.

    ``global_shape``: the state's shape over all ranks; ``reduced_dims``: dims of ``p`` that the
    state reduces to size 1 (Adafactor's factored statistics). A state reduced over the sharded
    dim holds the all-reduced, identical value on every rank (``Replicate``); otherwise it is
    sharded like ``p``.
    """
    if info.dim is None:
        return local
    from torch.distributed.tensor import Replicate, Shard
    ndim = len(info.shape)
    placement = Replicate() if info.dim in {d % ndim for d in reduced_dims} else Shard(info.dim)
    stride = torch.empty(global_shape, device="meta").stride()
    return DTensor.from_local(local, p.device_mesh, [placement], run_check=False, shape=torch.Size(global_shape),
                              stride=stride)
