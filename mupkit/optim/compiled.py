"""Compiled update functions, and the CPU default that decides when to use them.

:class:`ListKernel` applies a per-parameter update function to lists of parameters as one
``torch.compile`` graph per (device, dtype): per-parameter values (effective lr, decay, bias
corrections) come from a table, so neither new values nor the number of param groups recompile
(a change in which tensors are stepped does). On the CPU, inductor fuses each parameter's update
into one loop over it, so a step reads and writes each array once instead of once per eager op,
and the whole list costs one Python call instead of one per tensor. Thousands of small tensors
(too many for one graph of them all) are packed into flat runs instead, each run stepped by one
graph whose length is dynamic, or eagerly in a model too small to compile
(:meth:`ListKernel.packed`, :func:`packed_by_default`).

:func:`compiled_by_default` is the ``compiled=None`` default of mupkit's own optimizers: on the
CPU, a large model goes through the compiled path (2-4x faster than the eager ops there,
``benchmarks/RESULTS.md``), a small one stays eager (a compile costs seconds, which a small
model's steps never earn back).
"""

from __future__ import annotations

import functools
import types
import warnings
from typing import Callable, Sequence

import torch

from .sharding import DTensor
from .tensors import CPU_CHUNK, CPU_SMALL_TENSOR, LOW_PRECISION, by_device_and_dtype, flat_scratch, plain_dense

#: elements a model's large tensors must hold in all before the CPU default compiles them
#: (~16 MB of fp32: a step of that size takes milliseconds, so a compile of seconds pays back)
AUTO_COMPILE_MIN_NUMEL = 1 << 22

#: most tensors the CPU default puts in one graph (its compile time grows with the count)
AUTO_COMPILE_MAX_TENSORS = 512

#: graphs one :class:`ListKernel` may compile (one per set of tensor shapes, device and dtype that
#: it is called with; torch's default of 8 is too few for a process that steps several models)
RECOMPILE_LIMIT = 64


#: scratch slots of the packed runs (one per column, above those the eager steps use)
PACKED_SLOT = 16

#: most elements of one packed run (its columns stay in cache from the copy in to the copy out)
PACKED_RUN = CPU_CHUNK

#: most elements of one packed run stepped eagerly (its temporaries are fresh memory each op: runs
#: of 2^16 measured 10-17 us per small tensor, 2^13 up to 2x that; benchmarks/RESULTS.md)
PACKED_EAGER_RUN = 1 << 16

#: fewest small tensors the CPU default packs (fewer cost little per step on any path)
PACKED_MIN_TENSORS = 64

#: fewest tensors sharing a row that are packed; fewer run eagerly, tensor by tensor (a packed run
#: costs ~150 us, about as much as the eager function on one small tensor)
PACKED_MIN_RUN = 2


class ListKernel:
    """``fn(*tensors_of_one_parameter, *values_of_its_row)`` over lists of parameters.

    ``columns[k][i]`` is the ``k``-th tensor argument for parameter ``i`` (passed as a flat view
    that shares its storage, so in-place updates reach it) and ``rows[i]`` its per-step values;
    ``fn`` is elementwise apart from the sums it returns, and updates the columns listed in
    ``writes`` in place. Parameters are bucketed by the first column's (device, dtype); each
    bucket is one compiled call (``compiled=False``: the same function eagerly, tensor by tensor),
    with the rows as a table of that dtype (fp32 for bf16/fp16). :meth:`packed` runs it over
    small tensors packed into flat runs instead. Returns the sum over parameters of what ``fn``
    returns, in float64, or None when it returns nothing.
    """

    def __init__(self, fn: Callable[..., torch.Tensor | None], writes: Sequence[int]):
        self.fn = fn
        self.writes = tuple(writes)
        self._compiled = None
        self._compiled_run = None
        # code objects of their own: dynamo counts recompiles (one per set of shapes) per code object
        self._apply_each = _renamed(_apply_each, fn)
        self._apply_run = _renamed(_apply_run, fn)

    def __call__(self, columns: Sequence[Sequence[torch.Tensor]], rows: Sequence[Sequence[float]],
                 compiled: bool | Sequence[bool] = True) -> torch.Tensor | None:
        """``compiled``: for all parameters, or one flag per parameter (the rest run eagerly)."""
        flags = [compiled] * len(rows) if isinstance(compiled, bool) else list(compiled)
        total = None
        for *bucket, bucket_rows, bucket_flags in by_device_and_dtype(*columns, rows, flags):
            for flag in (True, False):
                keep = [f == flag for f in bucket_flags]
                if any(keep):
                    total = _plus(total, self._apply([[t for t, k in zip(column, keep) if k] for column in bucket],
                                                     [r for r, k in zip(bucket_rows, keep) if k], flag))
        return total

    def _apply(self, columns: list[list[torch.Tensor]], rows: list[Sequence[float]], compiled: bool):
        flat = [[_flat(t) for t in column] for column in columns]
        like = flat[0][0]
        table = torch.tensor(rows, device=like.device, dtype=_table_dtype(like))
        if not compiled:
            return self._apply_each(self.fn, flat, table)
        if self._compiled is None:
            self._compiled = torch.compile(self._apply_each, fullgraph=True, dynamic=False)
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return self._compiled(self.fn, flat, table)

    def packed(self, columns: Sequence[Sequence[torch.Tensor]], rows: Sequence[Sequence[float]],
               compiled: bool = True) -> torch.Tensor | None:
        """``fn`` over :func:`packable` parameters, once per run of parameters that share a row
        and hold at most :data:`PACKED_RUN` elements together: each column of the run is copied
        into a flat scratch buffer (one multi-tensor copy), one compiled call of ``fn`` (one graph
        for every run length: the length is dynamic) steps the buffers in one loop, and the
        ``writes`` columns are copied back. On thousands of small tensors this costs ~1-2 us per
        tensor and column (the copies) and ~150 us per run, against ~100 us per tensor for ``fn``
        run eagerly tensor by tensor; so a row shared by fewer than :data:`PACKED_MIN_RUN`
        parameters runs eagerly. ``compiled=False``: ``fn`` runs eagerly on runs of at most
        :data:`PACKED_EAGER_RUN` elements (no compile; ~20 ops per run instead of per tensor)."""
        if compiled and self._compiled_run is None:
            self._compiled_run = torch.compile(self._apply_run, fullgraph=True, dynamic=True)
        run_fn, run_size = (self._compiled_run, PACKED_RUN) if compiled else (self._apply_run, PACKED_EAGER_RUN)
        total = None
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            for *bucket, bucket_rows in by_device_and_dtype(*columns, rows):
                by_row: dict[tuple, list[int]] = {}  # a row's parameters run together, wherever they are
                for i, row in enumerate(bucket_rows):
                    by_row.setdefault(tuple(row), []).append(i)
                alone = [i for members in by_row.values() if len(members) < PACKED_MIN_RUN for i in members]
                if alone:  # a run of its own would cost more than the eager function on it
                    total = _plus(total, self([[column[i] for i in alone] for column in bucket],
                                              [bucket_rows[i] for i in alone], compiled=False))
                by_row = {row: members for row, members in by_row.items() if len(members) >= PACKED_MIN_RUN}
                table = torch.tensor(list(by_row), dtype=_table_dtype(bucket[0][0]))
                for values, members in zip(table, by_row.values()):
                    for run in _runs([[column[i] for i in members] for column in bucket], run_size):
                        total = _plus(total, self._step_run(run_fn, run, values))
        return total

    def _step_run(self, run_fn: Callable, run: list[list[torch.Tensor]], values: torch.Tensor) -> torch.Tensor | None:
        """One packed run: its columns copied into flat scratch, ``fn`` on the flat tensors, the
        ``writes`` columns copied back."""
        packed = [flat_scratch(column, PACKED_SLOT + k) for k, column in enumerate(run)]
        for column, (_, views) in zip(run, packed):
            torch._foreach_copy_(views, column)
        result = run_fn(self.fn, [flat for flat, _ in packed], values)
        for k in self.writes:
            torch._foreach_copy_(run[k], packed[k][1])
        return result


def _renamed(function: Callable, fn: Callable) -> Callable:
    """``function`` under a code object named after ``fn``."""
    code = function.__code__.replace(co_name=f"{function.__name__}_{fn.__name__}")
    return types.FunctionType(code, function.__globals__, code.co_name)


def _plus(total: torch.Tensor | None, result: torch.Tensor | None) -> torch.Tensor | None:
    """A running float64 sum of ``fn``'s results (None while there are none)."""
    if result is None:
        return total
    result = result.to(torch.float64)
    return result if total is None else total + result.to(total.device)


def _table_dtype(like: torch.Tensor) -> torch.dtype:
    """The dtype of a table of per-parameter values for tensors like ``like`` (fp32 for bf16/fp16)."""
    return torch.float32 if like.dtype in LOW_PRECISION else like.dtype


def packable(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether one parameter's tensors (one per column) can step packed: small plain dense
    contiguous CPU tensors (no DTensor or other subclass; what the per-tensor path also takes) of
    one size. Each column keeps its own dtype."""
    first = tensors[0]
    n = first.numel()
    return n < CPU_SMALL_TENSOR and first.is_cpu and all(flattenable(t) and t.numel() == n for t in tensors)


def packed_by_default(tensors: Sequence[Sequence[torch.Tensor]]) -> list[bool]:
    """Which parameters (each given by its tensors, one per column) the CPU default steps packed
    (:meth:`ListKernel.packed`): the :func:`packable` ones, when they number at least
    :data:`PACKED_MIN_TENSORS`."""
    if len(tensors) < PACKED_MIN_TENSORS:
        return [False] * len(tensors)
    flags = [packable(ts) for ts in tensors]
    return flags if sum(flags) >= PACKED_MIN_TENSORS else [False] * len(tensors)


def packed_runs_compiled(model_numel: int) -> bool:
    """Whether the CPU default compiles its packed runs: for a model it compiles
    (:data:`AUTO_COMPILE_MIN_NUMEL` elements or more in all: the graph's compile costs seconds
    once per process), when ``torch.compile`` works here; else the runs step eagerly."""
    return model_numel >= AUTO_COMPILE_MIN_NUMEL and inductor_works()


def _runs(columns: list[list[torch.Tensor]], run_size: int) -> list[list[list[torch.Tensor]]]:
    """The columns cut into runs of consecutive parameters holding at most ``run_size`` elements
    together (or one parameter)."""
    runs, start, size = [], 0, 0
    for i, t in enumerate(columns[0]):
        n = t.numel()
        if i > start and size + n > run_size:
            runs.append([column[start:i] for column in columns])
            start, size = i, 0
        size += n
    if columns[0]:
        runs.append([column[start:] for column in columns])
    return runs


def _apply_run(fn: Callable[..., torch.Tensor | None], flats: list[torch.Tensor],
               values: torch.Tensor) -> torch.Tensor | None:
    return fn(*flats, *values.unbind())


def _apply_each(fn: Callable[..., torch.Tensor | None], columns: list[list[torch.Tensor]],
                table: torch.Tensor) -> torch.Tensor | None:
    results = [fn(*tensors, *table[i].unbind()) for i, tensors in enumerate(zip(*columns))]
    return None if results[0] is None else torch.stack(results).sum(0)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view sharing ``t``'s storage (so in-place updates reach it)."""
    if DTensor is not None and isinstance(t, DTensor):
        raise ValueError(f"compiled=True runs on whole tensors, but a tensor of shape {tuple(t.shape)} is sharded "
                         f"(a DTensor); use the default (eager) path, which reduces over the shards.")
    if not t.is_contiguous():
        raise ValueError(f"compiled=True needs contiguous tensors, got one of shape {tuple(t.shape)} with strides "
                         f"{t.stride()}; make the parameter contiguous or use the default (eager) path.")
    return t.view(-1)


def flattenable(t: torch.Tensor) -> bool:
    """A plain dense contiguous tensor or parameter (no DTensor or other subclass): what the
    compiled passes take as a flat view."""
    return plain_dense(t) and t.is_contiguous()


def compiled_by_default(params: Sequence[torch.Tensor]) -> list[bool]:
    """Which of ``params`` the ``compiled=None`` default sends through the compiled path.

    A tensor can go when it is a plain dense contiguous floating-point CPU tensor (not a DTensor
    or other subclass); it is large at :data:`.tensors.CPU_SMALL_TENSOR` elements or more. When
    the large ones hold :data:`AUTO_COMPILE_MIN_NUMEL` elements in all and ``torch.compile`` works
    here (:func:`inductor_works`): every tensor goes if all can and they number at most
    :data:`AUTO_COMPILE_MAX_TENSORS` (small tensors cost less in the same graph than as eager
    ops), else the large ones if they number at most that; otherwise none. (On CUDA the default
    is the Triton kernels: :func:`.kernels.fused_by_default`.)
    """
    if sum(n for n in (p.numel() for p in params) if n >= CPU_SMALL_TENSOR) < AUTO_COMPILE_MIN_NUMEL:
        return [False] * len(params)  # too small a model, decided without the per-tensor checks below
    can = [flattenable(p) and p.device.type == "cpu" and p.is_floating_point() for p in params]
    large = [c and p.numel() >= CPU_SMALL_TENSOR for p, c in zip(params, can)]
    if sum(p.numel() for p, big in zip(params, large) if big) < AUTO_COMPILE_MIN_NUMEL:
        return [False] * len(params)
    if all(can) and len(params) <= AUTO_COMPILE_MAX_TENSORS:
        chosen = can
    elif sum(large) <= AUTO_COMPILE_MAX_TENSORS:
        chosen = large
    else:
        return [False] * len(params)
    return chosen if inductor_works() else [False] * len(params)


def left_to_default(group: dict) -> bool:
    """Whether a param group left the implementation to the default dispatcher (``compiled``,
    ``foreach`` and ``fused`` not given)."""
    return group.get("compiled") is None and group.get("foreach") is None and group.get("fused") is None


@functools.cache
def inductor_works() -> bool:
    """Whether ``torch.compile`` (inductor, which needs a C++ compiler on the CPU) compiles and
    runs a small in-place function here; if not, warn once: the defaults then stay eager."""
    try:
        probe = torch.ones(4)
        torch.compile(_probe, fullgraph=True)(probe, torch.tensor(0.5))
        if not torch.equal(probe, torch.full((4,), 1.5)):
            raise RuntimeError(f"the compiled probe returned {probe.tolist()}, expected 1.5 everywhere")
        return True
    except Exception as exc:  # any failure means: do not compile by default (explicit compiled=True still raises)
        warnings.warn(f"mupkit.optim: torch.compile does not work on this machine ({type(exc).__name__}: {exc}); "
                      f"the optimizers' CPU default stays on the eager path, which is 2-4x slower for large models. "
                      f"Pass compiled=False to choose that path explicitly.", RuntimeWarning, stacklevel=2)
        return False


def _probe(x: torch.Tensor, w: torch.Tensor) -> None:
    x.lerp_(torch.full_like(x, 2.0), w)


__all__ = ["AUTO_COMPILE_MAX_TENSORS", "AUTO_COMPILE_MIN_NUMEL", "ListKernel", "PACKED_MIN_RUN", "PACKED_MIN_TENSORS",
           "PACKED_EAGER_RUN", "PACKED_RUN", "PACKED_SLOT", "compiled_by_default", "flattenable", "inductor_works",
           "left_to_default", "packable", "packed_by_default", "packed_runs_compiled"]
