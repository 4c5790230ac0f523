"""Tensor plumbing shared by mupkit's own optimizer implementations.

* Low-precision parameters (bf16/fp16) keep their optimizer state in fp32 and do the update
  math in fp32 (:func:`working_copy`, :func:`write_back`): one rounding per step, at the write
  back, instead of one per op.
* :func:`default_foreach` picks the multi-tensor path the way torch does (on CUDA when every
  tensor is a plain dense CUDA tensor), and :func:`by_device_and_dtype` buckets tensors for it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16 parameters, the parameter's dtype otherwise."""
    return torch.float32 if p.dtype in LOW_PRECISION else p.dtype


def working_copy(p: torch.Tensor) -> torch.Tensor:
    """The tensor the update math runs on: ``p`` itself, or an fp32 copy of a low-precision ``p``."""
    return p.float() if p.dtype in LOW_PRECISION else p


def write_back(p: torch.Tensor, work: torch.Tensor) -> None:
    """Round the fp32 working copy into a low-precision parameter (no-op when they are the same)."""
    if work is not p:
        p.copy_(work)


def default_foreach(params: Sequence[torch.Tensor]) -> bool:
    """torch's default: the multi-tensor path when all tensors are dense CUDA tensors."""
    return bool(params) and all(type(p) is torch.Tensor and p.is_cuda for p in params) \
        and not torch.jit.is_scripting()


def by_device_and_dtype(*lists: Sequence[torch.Tensor]) -> list[tuple[list[torch.Tensor], ...]]:
    """Split parallel tensor lists into buckets sharing the first list's (device, dtype)."""
    buckets: dict[tuple, list[list[torch.Tensor]]] = defaultdict(lambda: [[] for _ in lists])
    for items in zip(*lists):
        bucket = buckets[(items[0].device, items[0].dtype)]
        for column, item in zip(bucket, items):
            column.append(item)
    return [tuple(b) for b in buckets.values()]
