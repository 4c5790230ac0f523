"""The device arrays a multi-tensor kernel reads: addresses, sizes, a block map, per-tensor values.

A launch covers every tensor of one (device, dtype) bucket. Program ``b`` of the 1-D grid
handles ``BLOCK`` elements of tensor ``tensor[b]`` from offset ``start[b]``; small tensors take
one block and big ones many, so thousands of small tensors cost no more programs than their
elements need. The block map depends only on the sizes and is cached; addresses (gradients are
reallocated by ``zero_grad``) and the per-tensor values are rebuilt each step, one host-to-device
copy each, with no host sync.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

#: elements per program
BLOCK = 1024


@dataclass(frozen=True)
class BlockMap:
    tensor: torch.Tensor  # int32 (blocks,): which tensor each program works on
    start: torch.Tensor  # int64 (blocks,): its first element
    numel: torch.Tensor  # int64 (tensors,): each tensor's size

    @property
    def blocks(self) -> int:
        return self.tensor.numel()


@functools.lru_cache(maxsize=64)
def block_map(numels: tuple[int, ...], device: torch.device, block: int = BLOCK) -> BlockMap:
    """The cached block map of tensors of these sizes."""
    tensor, start = [], []
    for i, n in enumerate(numels):
        for offset in range(0, max(n, 1), block):
            tensor.append(i)
            start.append(offset)
    return BlockMap(torch.tensor(tensor, dtype=torch.int32, device=device),
                    torch.tensor(start, dtype=torch.int64, device=device),
                    torch.tensor(numels, dtype=torch.int64, device=device))


def addresses(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The tensors' data pointers as an int64 device array."""
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64).to(device, non_blocking=True)


def values(rows: Sequence[Sequence[float]], device: torch.device) -> torch.Tensor:
    """Per-tensor values of this step, one row per tensor, as a float32 device array."""
    return torch.tensor(rows, dtype=torch.float32).to(device, non_blocking=True)


def blocks_for(tensors: Sequence[torch.Tensor], block: int = BLOCK) -> BlockMap:
    return block_map(tuple(t.numel() for t in tensors), tensors[0].device, block)


def packed(tables: Sequence[Sequence[torch.Tensor]], rows: Sequence[Sequence[float]],
           device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The address tables and the value rows in one host-to-device copy: an int64 buffer of
    ``len(tables) * n`` addresses followed by the ``n x NV`` float32 values; returns views of the
    device copy (one int64 address array per table, the float32 values)."""
    n, width = len(tables[0]), len(rows[0])
    host = torch.empty(len(tables) * n + (n * width + 1) // 2, dtype=torch.int64)
    host[:len(tables) * n] = torch.tensor([t.data_ptr() for ts in tables for t in ts], dtype=torch.int64)
    host[len(tables) * n:].view(torch.float32)[:n * width] = torch.tensor(rows, dtype=torch.float32).view(-1)
    dev = host.to(device, non_blocking=True)
    return [dev[i * n:(i + 1) * n] for i in range(len(tables))], dev[len(tables) * n:].view(torch.float32)


def launch(kernel, tables: Sequence[Sequence[torch.Tensor]], rows: Sequence[Sequence[float]], *,
           reduce: str | None = None, block: int = BLOCK, **kwargs) -> torch.Tensor | None:
    """Run ``kernel`` over every tensor of ``tables[0]`` (one device), one program per block.

    The kernel takes one address table per list in ``tables``, then the sizes, the block map,
    the per-tensor values (``NV`` columns), and with ``reduce`` an fp32 array of partial sums it
    adds into: ``"blocks"``: ``(blocks, 2)``, returned summed over blocks in float64;
    ``"tensors"``: ``(tensors, 2)`` (zeroed, added to atomically), returned as is. The tables and
    values reach the device in one copy (:func:`packed`); nothing is read back to the host.
    ``block``: elements per program; ``kwargs``: further arguments by name (constexprs, and launch
    options such as ``num_warps``).
    """
    params = tables[0]
    if not params:
        return torch.zeros(2, dtype=torch.float64) if reduce else None
    device = params[0].device
    blocks = blocks_for(params, block)
    address_tables, vals = packed(tables, rows, device)
    args = [*address_tables, blocks.numel, blocks.tensor, blocks.start, vals]
    partials = None
    if reduce == "blocks":
        partials = torch.empty(blocks.blocks, 2, dtype=torch.float32, device=device)
    elif reduce == "tensors":
        partials = torch.zeros(len(params), 2, dtype=torch.float32, device=device)
    if partials is not None:
        args.append(partials)
    kernel[(blocks.blocks,)](*args, NV=len(rows[0]), BLOCK=block, **kwargs)
    return partials.sum(0, dtype=torch.float64) if reduce == "blocks" else partials


__all__ = ["BLOCK", "BlockMap", "addresses", "block_map", "blocks_for", "launch", "packed", "values"]
