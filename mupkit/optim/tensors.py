"""Tensor plumbing shared by mupkit's own optimizer implementations.

* Low-precision parameters (bf16/fp16) keep their optimizer state in fp32 and do the update
  math in fp32 (:func:`working_copy`, :func:`write_back`): one rounding per step, at the write
  back, instead of one per op.
* :func:`default_foreach` picks the multi-tensor path the way torch does on CUDA (when every
  tensor is a plain dense CUDA tensor) and by tensor size on the CPU, and
  :func:`by_device_and_dtype` buckets tensors for it.
* :func:`cache_sized` cuts a CPU bucket into chunks of about :data:`CPU_CHUNK` elements: each
  foreach op then sweeps data still in cache from the previous op, instead of streaming every
  parameter through memory once per op (on CUDA one launch for all is what pays). With
  ``cut=True`` (elementwise updates) a large tensor is cut into flat pieces to fit.
* :func:`scratch` hands an eager CPU step its temporaries as views of reused buffers: a fresh
  CPU tensor of a megabyte or more is memory the OS maps anew, a page fault per 4 KB on first
  touch, every step.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any, Callable, Sequence

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)

#: elements per CPU foreach chunk (x ~6 live fp32 arrays ~ a few MB: the size of an L2/L3 slice)
CPU_CHUNK = 1 << 17

#: most elements per run of an elementwise CPU step cut into flat pieces, and so per scratch
#: buffer (4 MB in fp32). Smaller pieces cost a thread fork/join per op each (2^17: 0.8x the
#: speed on a 25M-param GPT); larger scratch buffers would only hold more memory.
CPU_PIECE = 1 << 20


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16 parameters, the parameter's dtype otherwise."""
    return torch.float32 if p.dtype in LOW_PRECISION else p.dtype


def working_copy(p: torch.Tensor) -> torch.Tensor:
    """The tensor the update math runs on: ``p`` itself, or an fp32 copy of a low-precision ``p``."""
    return p.float() if p.dtype in LOW_PRECISION else p


def working_copies(ps: list[torch.Tensor], slot: int) -> list[torch.Tensor]:
    """:func:`working_copy` of each tensor, the fp32 copies in :func:`scratch` buffer ``slot``."""
    if all(p.dtype not in LOW_PRECISION for p in ps):
        return ps
    works = scratch(ps, slot, torch.float32)
    torch._foreach_copy_(works, ps)
    return [w if p.dtype in LOW_PRECISION else p for p, w in zip(ps, works)]


def as_dtype(ts: list[torch.Tensor], dtype: torch.dtype, slot: int) -> list[torch.Tensor]:
    """The tensors in ``dtype``: themselves when they have it, else copies in :func:`scratch`
    buffer ``slot``."""
    if all(t.dtype == dtype for t in ts):
        return ts
    copies = scratch(ts, slot, dtype)
    torch._foreach_copy_(copies, ts)
    return copies


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


def advance_steps(steps: list[torch.Tensor]) -> list[float]:
    """Add one to each 0-dim step counter and return the new values: one multi-tensor add and one
    host read for all, instead of an op and a read per counter (~4 us each, 20 ms per step for
    5000 tensors)."""
    if not steps:
        return []
    if any(s.device != steps[0].device for s in steps):
        return [float(s.add_(1)) for s in steps]
    torch._foreach_add_(steps, 1.0)
    return torch.stack(steps).tolist()


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


def foreach_scalar(value: float, like: Sequence[torch.Tensor]) -> float | torch.Tensor:
    """``value`` as the scalar operand of a multi-tensor op over ``like``: a 0-dim tensor of
    their dtype for fp32/fp64 CPU tensors, else the number itself. torch's CPU foreach ops wrap
    a Python number into a tensor once per tensor: 1.6 us against 0.4 us per 1024-element tensor
    (benchmarks/RESULTS.md); the results are bitwise the same."""
    first = like[0]
    if first.is_cpu and first.dtype in (torch.float32, torch.float64):
        return torch.tensor(value, dtype=first.dtype)
    return value


def foreach_scalars(values: Sequence[float], like: Sequence[torch.Tensor]) -> list | float | torch.Tensor:
    """Per-tensor ``values`` as the scalar operands of a multi-tensor op over ``like``: one
    :func:`foreach_scalar` when they are all equal; for fp32/fp64 CPU tensors 0-dim tensors
    (a list of numbers takes the slow path too: 2.7 against 1.7 us per tensor); else the list."""
    if all(v == values[0] for v in values):
        return foreach_scalar(values[0], like)
    first = like[0]
    if first.is_cpu and first.dtype in (torch.float32, torch.float64):
        return list(torch.tensor(values, dtype=first.dtype).unbind())
    return list(values)


def subset(column: list, keep: list[bool]) -> list:
    """The items of ``column`` whose flag in ``keep`` is set."""
    return [item for item, k in zip(column, keep) if k]


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


def cache_sized(bucket: tuple[list, ...], chunk: int | None = None, *, cut: bool = False) -> list[tuple[list, ...]]:
    """Split a CPU bucket (parallel lists; the first holds tensors) into runs of about ``chunk``
    elements (default :data:`CPU_CHUNK`, with ``cut``: :data:`CPU_PIECE`); a CUDA bucket is
    returned whole.

    ``cut=False``: whole tensors, a run closing once it holds ``chunk`` elements or more (for
    per-tensor statistics). ``cut=True``, for elementwise updates: each run holds at most
    ``chunk`` elements, a contiguous tensor too large for what is left of a run being cut into
    flat pieces (views, so in-place ops reach the tensor). The columns whose items are tensors
    of the first column's size are cut alike; the other columns' items (per-tensor values)
    repeat for each piece. A non-contiguous tensor is never cut.
    """
    first = bucket[0]
    if not first or first[0].is_cuda:
        return [bucket]
    chunk = chunk or (CPU_PIECE if cut else CPU_CHUNK)
    runs: list[tuple[list, ...]] = []
    run: tuple[list, ...] = tuple([] for _ in bucket)
    size = 0
    for items in zip(*bucket):
        n = items[0].numel()
        if cut and size + n > chunk and all(_flat_viewable(item, n) for item in items):
            start = 0
            while start < n:
                end = start + min(n - start, chunk - size)
                for column, item in zip(run, items):
                    column.append(_piece(item, n, start, end))
                size, start = size + end - start, end
                if size >= chunk:
                    runs.append(run)
                    run, size = tuple([] for _ in bucket), 0
            continue
        for column, item in zip(run, items):
            column.append(item)
        size += n
        if size >= chunk:
            runs.append(run)
            run, size = tuple([] for _ in bucket), 0
    if run[0]:
        runs.append(run)
    return runs


def _flat_viewable(item: Any, numel: int) -> bool:
    """A per-tensor value (not a tensor of this size), or a tensor of this size with a flat view."""
    return not (isinstance(item, torch.Tensor) and item.numel() == numel) or item.is_contiguous()


def _piece(item: Any, numel: int, start: int, end: int) -> Any:
    if isinstance(item, torch.Tensor) and item.numel() == numel:
        return item.view(-1)[start:end]
    return item


def flat_pieces(*tensors: torch.Tensor, chunk: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    """Parallel same-size tensors as flat views of at most ``chunk`` (default :data:`CPU_PIECE`)
    elements each, in order; the tensors whole on CUDA, when they fit, or when one is not
    contiguous."""
    n, chunk = tensors[0].numel(), chunk or CPU_PIECE
    if n <= chunk or tensors[0].is_cuda or not all(t.is_contiguous() for t in tensors):
        return [tensors]
    flats = [t.view(-1) for t in tensors]
    return [tuple(f[i:i + chunk] for f in flats) for i in range(0, n, chunk)]


_SCRATCH = threading.local()


def scratch(like: Sequence[torch.Tensor], slot: int, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Uninitialized tensors shaped like ``like``'s (of ``dtype``, default theirs), for use as
    temporaries of an eager step: the views of :func:`flat_scratch`."""
    return flat_scratch(like, slot, dtype)[1]


def scratch_like(t: torch.Tensor, slot: int) -> torch.Tensor:
    """One :func:`scratch` tensor shaped like ``t``."""
    return _views(_buffer([t], slot, None), [t])[0]


#: most sets of shapes whose views :func:`flat_scratch` keeps per reused buffer
VIEWS_KEPT = 1024


def flat_scratch(like: Sequence[torch.Tensor], slot: int,
                 dtype: torch.dtype | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A flat tensor and views of it, back to back, shaped like ``like``'s tensors (of ``dtype``,
    default theirs): the temporaries of an eager step, for ``out=`` and in-place ops, and the flat
    tensor to run one op over all of them. On the CPU they live in this thread's reused buffer
    number ``slot`` per dtype, so views from one slot alias the previous call's: temporaries alive
    at the same time take different slots. CUDA tensors (whose caching allocator already reuses
    memory) and requests over :data:`CPU_PIECE` elements get a fresh flat tensor.

    The views of a reused buffer are kept per set of shapes (at most :data:`VIEWS_KEPT`): a step
    asks for the same ones every time, and a view costs ~1 us, as much as copying a
    4096-element tensor in cache."""
    buffer = _buffer(like, slot, dtype)
    flat = buffer[:sum(t.numel() for t in like)]
    if like[0].is_cuda or flat.numel() > CPU_PIECE:  # a fresh buffer: nothing to keep
        return flat, _views(buffer, like)
    kept = _SCRATCH.__dict__.setdefault("views", {})
    key = (slot, buffer.dtype, buffer.device)
    owner, by_shapes = kept.get(key, (None, None))
    if owner is not buffer or len(by_shapes) >= VIEWS_KEPT:  # a grown buffer: the old views are stale
        owner, by_shapes = kept[key] = (buffer, {})
    shapes = tuple(t.shape for t in like)
    views = by_shapes.get(shapes)
    if views is None:
        views = by_shapes[shapes] = _views(buffer, like)
    return flat, views


def _buffer(like: Sequence[torch.Tensor], slot: int, dtype: torch.dtype | None) -> torch.Tensor:
    """A flat tensor of at least ``like``'s total size: this thread's buffer ``slot`` on the CPU
    (grown when too small), or a fresh one (see :func:`flat_scratch`)."""
    dtype = dtype or like[0].dtype
    total, device = sum(t.numel() for t in like), like[0].device
    if like[0].is_cuda or total > CPU_PIECE:
        return torch.empty(total, dtype=dtype, device=device)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buffer = buffers.get((slot, dtype, device))
    if buffer is None or buffer.numel() < total:
        buffer = buffers[(slot, dtype, device)] = torch.empty(total, dtype=dtype, device=device)
    return buffer


def _views(buffer: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous views of ``buffer`` shaped like ``like``'s tensors, back to back from its start
    (``as_strided``: a third of the cost of a slice and a view, ~2 us per op here)."""
    views, offset = [], buffer.storage_offset()
    for t in like:
        views.append(buffer.as_strided(t.shape, _contiguous_strides(t.shape), offset))
        offset += t.numel()
    return views


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape``."""
    strides, stride = [], 1
    for size in reversed(shape):
        strides.append(stride)
        stride *= size
    return tuple(reversed(strides))


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
