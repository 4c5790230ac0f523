"""The opt-in ``compiled=True`` path: an algorithm's per-tensor update function under ``torch.compile``.

:func:`run_compiled` applies ``fn(*tensors_of_one_parameter, *values_of_its_row)`` to every
parameter of a (device, dtype) bucket as one compiled graph: the per-parameter values (effective
lr, decay, bias corrections) are a table tensor, so new values and more param groups do not
recompile; new shapes do. Inductor fuses each parameter's ops into one loop over it.

The first step costs the compile: seconds to minutes, growing with the number of tensors (a
graph per bucket), and a recompile whenever the set of stepped shapes changes. That is why the
default (:mod:`.dispatch`) never takes this path.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .dispatch import plain_dense
from .tensors import LOW_PRECISION, by_device_and_dtype

#: graphs one update function may compile (one per set of shapes, device and dtype it is called
#: with; torch's default of 8 is too few for a process that steps several models)
RECOMPILE_LIMIT = 64

_COMPILED: dict[Callable, Callable] = {}


def run_compiled(fn: Callable[..., None], columns: Sequence[Sequence[torch.Tensor]],
                 rows: Sequence[Sequence[float]]) -> None:
    """``fn`` over parameters: ``columns[k][i]`` is its ``k``-th tensor argument for parameter
    ``i``, ``rows[i]`` its values (0-dim tensors inside ``fn``). One compiled call per bucket of
    the first column's (device, dtype); the table is fp32 for bf16/fp16 tensors."""
    compiled = _COMPILED.get(fn)
    if compiled is None:
        compiled = _COMPILED[fn] = torch.compile(_apply_each, fullgraph=True, dynamic=False)
    for *bucket, bucket_rows in by_device_and_dtype(*columns, rows):
        bucket = [[_flat(t) for t in column] for column in bucket]
        like = bucket[0][0]
        dtype = torch.float32 if like.dtype in LOW_PRECISION else like.dtype
        table = torch.tensor(bucket_rows, device=like.device, dtype=dtype)
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            compiled(fn, bucket, table)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view sharing ``t``'s storage: fewer shapes to compile for, and 0-dim tensors become
    1-element views (torch 2.13's inductor loses in-place updates of 0-dim graph inputs)."""
    if not plain_dense(t) or not t.is_contiguous():
        raise ValueError(f"compiled=True runs on whole contiguous tensors, got a {type(t).__name__} of shape "
                         f"{tuple(t.shape)} with strides {t.stride()}; use the default path (foreach=None, "
                         f"compiled=None), which takes any layout and FSDP2 shards.")
    return t.view(-1)


def _apply_each(fn: Callable[..., None], columns: list[list[torch.Tensor]], table: torch.Tensor) -> None:
    for i, tensors in enumerate(zip(*columns)):
        fn(*tensors, *table[i].unbind())


__all__ = ["RECOMPILE_LIMIT", "run_compiled"]
