"""Tensor plumbing shared by mupkit's own optimizer implementations.

* Low-precision parameters (bf16/fp16) keep their optimizer state in fp32 and do the update
  math in fp32 (:func:`working_copy`, :func:`write_back`): one rounding per step, at the write
  back, instead of one per op.
* :func:`default_foreach` picks the multi-tensor path the way torch does on CUDA (when every
  tensor is a plain dense CUDA tensor) and by tensor size on the CPU, and
  :func:`by_device_and_dtype` buckets tensors for it.
* :func:`cache_sized` cuts a CPU bucket into chunks of about :data:`CPU_CHUNK` elements: each
  foreach op then sweeps data still in cache from the previous op, instead of streaming every
  parameter through memory once per op (on CUDA one launch for all is what pays).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Sequence

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)

#: elements per CPU foreach chunk (x ~6 live fp32 arrays ~ a few MB: the size of an L2/L3 slice)
CPU_CHUNK = 1 << 17


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


#: mean elements per tensor under which a CPU bucket runs faster through the multi-tensor path,
#: whose per-op cost is shared by the bucket (benchmarks/RESULTS.md: 4096-element tensors run
#: 1.2-2.6x faster that way; tensors of a million elements run faster one at a time, in cache)
CPU_SMALL_TENSOR = 1 << 16


def plain_dense(t: torch.Tensor) -> bool:
    """A plain dense tensor or parameter: no DTensor or other subclass, strided layout."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided


def device_steps(states: list[dict[str, Any]], params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each state's ``step`` as an fp32 0-dim tensor on its parameter's device (torch's layout for
    fused and capturable steps; a step loaded from an unfused run moves there). The kernels'
    launchers advance them in one multi-tensor add and compute the bias corrections from them on
    the device, so the host neither reads nor writes a counter."""
    for state, p in zip(states, params):
        if state["step"].device != p.device or state["step"].dtype != torch.float32:
            state["step"] = state["step"].to(p.device, torch.float32)
    return [state["step"] for state in states]


def default_foreach(params: Sequence[torch.Tensor], cpu: str = "small") -> bool:
    """The multi-tensor path by default? On CUDA torch's rule: yes when all tensors are dense CUDA
    tensors. On the CPU, ``cpu="small"``: when the tensors average under
    :data:`CPU_SMALL_TENSOR` elements; ``"always"``: yes (an optimizer whose multi-tensor path is
    the faster one at every size)."""
    if not params or torch.jit.is_scripting():
        return False
    if all(type(p) is torch.Tensor and p.is_cuda for p in params):
        return True
    if any(p.is_cuda for p in params):
        return False
    return cpu == "always" or sum(p.numel() for p in params) < CPU_SMALL_TENSOR * len(params)


def by_device_and_dtype(*lists: Sequence[torch.Tensor]) -> list[tuple[list[torch.Tensor], ...]]:
    """Split parallel tensor lists into buckets sharing the first list's (device, dtype)."""
    first = lists[0]
    if first and all(t.dtype == first[0].dtype and t.device == first[0].device for t in first):
        return [tuple(list(column) for column in lists)]  # one bucket, the common case: no per-item appends
    buckets: dict[tuple, list[list[torch.Tensor]]] = defaultdict(lambda: [[] for _ in lists])
    for items in zip(*lists):
        bucket = buckets[(items[0].device, items[0].dtype)]
        for column, item in zip(bucket, items):
            column.append(item)
    return [tuple(b) for b in buckets.values()]


def cache_sized(bucket: tuple[list, ...], chunk: int = CPU_CHUNK) -> list[tuple[list, ...]]:
    """Split a bucket (parallel lists; the first holds tensors) into runs of about ``chunk``
    elements when on the CPU; a CUDA bucket is returned whole."""
    first = bucket[0]
    if not first or first[0].is_cuda:
        return [bucket]
    runs, start, size = [], 0, 0
    for i, t in enumerate(first):
        size += t.numel()
        if size >= chunk:
            runs.append(tuple(column[start:i + 1] for column in bucket))
            start, size = i + 1, 0
    if start < len(first):
        runs.append(tuple(column[start:] for column in bucket))
    return runs


def compile_safe(t: torch.Tensor) -> torch.Tensor:
    """A 1-element view of a 0-dim tensor, else ``t``: torch 2.13's inductor loses in-place
    updates (``lerp_``) of 0-dim graph inputs; the view shares storage, so results are exact."""
    return t.view(1) if t.dim() == 0 else t


class KeepsStateDtypes:
    """Mixin for a ``torch.optim.Optimizer`` whose state dtypes are its own choice (fp32 state
    for bf16/fp16 parameters): ``load_state_dict`` keeps each saved floating-point tensor's dtype.

    ``torch.optim.Optimizer.load_state_dict`` casts every floating-point state tensor to its
    parameter's dtype, which would silently turn the fp32 moments of a bf16 parameter into bf16
    after a checkpoint round trip.
    """

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        restore_saved_dtypes(self, state_dict, lambda group, key: True)


def restore_saved_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict,
                         wanted: Callable[[dict[str, Any], str], bool]) -> None:
    """After ``torch.optim.Optimizer.load_state_dict`` (which casts each floating-point state
    tensor to its parameter's dtype), give the entries ``wanted(group, key)`` picks back the
    dtype they were saved with."""
    keys = [k for group in state_dict["param_groups"] for k in group["params"]]  # ints or FQNs
    owners = dict(zip(keys, ((p, group) for group in optimizer.param_groups for p in group["params"])))
    for param_key, saved in state_dict["state"].items():
        p, group = owners[param_key]
        state = optimizer.state[p]
        for key, value in saved.items():
            loaded = state.get(key)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and isinstance(loaded, torch.Tensor) \
                    and loaded.dtype != value.dtype and wanted(group, key):
                state[key] = value.to(device=loaded.device, copy=True)
