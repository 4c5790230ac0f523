"""Memory traffic of Triton kernels run by Triton's interpreter (``TRITON_INTERPRET=1``), per tensor.

A test helper, not part of the package. Within ``with Traffic({"p": p, "g": g, ...}) as traffic:``

* every kernel launch is recorded (:class:`Launch`: kernel name, grid), and every ``tl.load``,
  ``tl.store`` and atomic of it is mapped back, address by address, to the named tensor whose
  memory ``[data_ptr, data_ptr + numel * itemsize)`` holds it. Per tensor the recorder counts, for
  each element, how often it was read and written (masked-off lanes do not count; an atomic is a
  read and a write), and the bytes; accesses to memory of no named tensor (address tables,
  per-tensor values, partial sums, small statistics) are summed as ``other``;
* every torch op run outside the kernels that takes a named tensor (or a view of one) is recorded
  as a :class:`Launch` named ``aten.<op>`` with ``kernel=False``: each named argument counts as one
  read of the view's elements, and one write where the op's schema marks it written (``Tensor(a!)``).
  Views and allocation-only ops (``zeros_like`` ...) move no data and are not recorded;
* host reads of tensor values (``item()``, ``float()``, ``bool()``, ``tolist()``, ``numpy()``:
  each a host sync on CUDA) outside the kernels are counted in ``host_reads``.

So for a tensor of ``n`` elements and itemsize ``s`` that a step reads ``r`` times and writes
``w`` times, :meth:`Traffic.passes` is ``(r, w)`` and :meth:`Traffic.bytes` is
``(r n s, w n s)``. The hooks are installed with ``pytest.MonkeyPatch`` on
``triton.runtime.interpreter.InterpreterBuilder`` (its masked load/store and atomics, the
narrowest points every ``tl.load``/``tl.store`` reaches as numpy arrays of addresses) and
``GridExecutor.__call__`` (one call per launch), and undone on exit. Triton must have been
imported with ``TRITON_INTERPRET=1`` (``tests/conftest.py`` sets it on a machine without CUDA).
"""

from __future__ import annotations

import os
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: torch ops that read no tensor data (allocation from metadata only)
ALLOCATING = {"empty_like", "zeros_like", "ones_like", "full_like", "new_empty", "new_zeros", "new_ones", "new_full",
              "empty_strided", "empty", "zeros", "ones", "full", "lift_fresh", "detach", "alias"}

#: tensor methods that read a value to the host (a host sync on CUDA); item/float/int/bool reach
#: the dispatcher as ``aten._local_scalar_dense`` and are counted there
HOST_READ_METHODS = ("tolist", "numpy")


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (the only place this recorder works)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass
class Launch:
    """One kernel launch (``kernel``) or one torch op outside the kernels, and its traffic in bytes
    per named tensor (``"other"``: memory of no named tensor; kernels only)."""

    name: str
    grid: tuple[int, ...] = ()
    kernel: bool = True
    read: Counter = field(default_factory=Counter)
    written: Counter = field(default_factory=Counter)

    def tensors(self) -> set[str]:
        return {k for k in (*self.read, *self.written) if k != "other"}


class _Tensor:
    """A named tensor's address range and per-element access counts."""

    def __init__(self, name: str, t: torch.Tensor):
        if not t.is_contiguous():
            raise ValueError(f"{name}: the recorder maps addresses of contiguous tensors only")
        self.name, self.numel, self.itemsize = name, t.numel(), t.element_size()
        self.start = t.data_ptr()
        self.end = self.start + max(self.numel, 1) * self.itemsize
        self.reads = np.zeros(max(self.numel, 1), dtype=np.int64)
        self.writes = np.zeros(max(self.numel, 1), dtype=np.int64)


class Traffic:
    """Records kernel launches and per-tensor traffic within a ``with`` block (see the module)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = sorted((_Tensor(name, t) for name, t in tensors.items()), key=lambda x: x.start)
        for a, b in zip(self._tensors, self._tensors[1:]):
            if b.start < a.end:
                raise ValueError(f"tensors {a.name} and {b.name} share memory; name each buffer once")
        self._starts = np.array([t.start for t in self._tensors], dtype=np.uint64)
        self._by_name = {t.name: t for t in self._tensors}
        self.launches: list[Launch] = []  # kernel launches, in order
        self.torch_ops: list[Launch] = []  # torch ops outside the kernels that touched a named tensor
        self.host_reads = 0
        self.host_read_sites: list[str] = []  # file:line of each host read (outside torch and this module)
        self._current: Launch | None = None
        self._quiet = False
        self._patch: pytest.MonkeyPatch | None = None
        self._mode: _TorchOps | None = None

    # ------------------------------------------------------------------ results

    def kernels(self) -> list[str]:
        """The launched kernels' names, in order."""
        return [launch.name for launch in self.launches]

    def passes(self, name: str) -> tuple[int, int]:
        """``(reads, writes)`` of every element of tensor ``name`` (kernels and torch ops together);
        an AssertionError if its elements were not all accessed equally often."""
        t = self._by_name[name]
        counts = []
        for what, array in (("read", t.reads), ("written", t.writes)):
            lo, hi = int(array.min()), int(array.max())
            if lo != hi:
                raise AssertionError(f"{name}: elements {what} between {lo} and {hi} times (not whole passes)")
            counts.append(lo)
        return counts[0], counts[1]

    def bytes(self, name: str) -> tuple[int, int]:
        """Bytes of tensor ``name`` read and written (kernels and torch ops together)."""
        return (sum(x.read[name] for x in self.launches + self.torch_ops),
                sum(x.written[name] for x in self.launches + self.torch_ops))

    # ------------------------------------------------------------------ recording

    def _record(self, launch: Launch, addresses: np.ndarray, itemsize: int, read: bool, write: bool,
                count_other: bool = True) -> None:
        addresses = addresses.astype(np.uint64, copy=False).ravel()
        if addresses.size == 0:
            return
        slot = np.searchsorted(self._starts, addresses, side="right").astype(np.int64) - 1
        ends = np.array([t.end for t in self._tensors], dtype=np.uint64)
        inside = (slot >= 0) & (addresses < ends[np.maximum(slot, 0)]) if len(self._tensors) else \
            np.zeros(addresses.shape, dtype=bool)
        other = int((~inside).sum()) * itemsize if count_other else 0
        if read and other:
            launch.read["other"] += other
        if write and other:
            launch.written["other"] += other
        for k in np.unique(slot[inside]):
            t = self._tensors[k]
            hit = addresses[inside & (slot == k)]
            index = ((hit - np.uint64(t.start)) // np.uint64(t.itemsize)).astype(np.int64)
            if read:
                launch.read[t.name] += hit.size * itemsize
                np.add.at(t.reads, index, 1)
            if write:
                launch.written[t.name] += hit.size * itemsize
                np.add.at(t.writes, index, 1)

    def _access(self, ptrs, mask, read: bool, write: bool) -> None:
        from triton.runtime import interpreter
        if self._current is None:  # a device function called outside a launch
            return
        itemsize = interpreter._get_np_dtype(ptrs.get_element_ty()).itemsize
        data = np.asarray(ptrs.data)
        live = np.broadcast_to(np.asarray(mask.data, dtype=bool), data.shape) if mask is not None else \
            np.ones(data.shape, dtype=bool)
        self._record(self._current, data[live], itemsize, read, write)

    def _torch_op(self, func, args, kwargs) -> None:
        """Record a torch op outside the kernels if it takes a named tensor (see the module)."""
        if self._current is not None:  # the interpreter's own copies of kernel arguments
            return
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            self._host_read()
            return
        if func.is_view or name.rstrip("_") in ALLOCATING:
            return
        op = Launch(f"aten.{name}", kernel=False)
        for i, arg in enumerate(func._schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            written = arg.alias_info is not None and arg.alias_info.is_write
            for t in tree_flatten(value)[0]:
                if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel():
                    self._record_view(op, t, written)
        if op.tensors():
            self.torch_ops.append(op)

    def _host_read(self) -> None:
        self.host_reads += 1
        for frame in reversed(traceback.extract_stack()):
            if not any(part in frame.filename for part in (f"{os.sep}torch{os.sep}", "kernel_traffic.py")):
                self.host_read_sites.append(f"{frame.filename}:{frame.lineno}")
                return

    def _record_view(self, op: Launch, t: torch.Tensor, written: bool) -> None:
        """Every element of view ``t`` that lies in a named tensor: read once, written if ``written``."""
        size = t.element_size()
        base = t.data_ptr() - t.storage_offset() * size
        offsets = torch.as_strided(torch.arange(t.untyped_storage().nbytes() // size, dtype=torch.int64),
                                   t.shape, t.stride(), t.storage_offset()).reshape(-1)
        self._quiet = True  # our own numpy() below is no host read of the step
        try:
            offsets = offsets.numpy()
        finally:
            self._quiet = False
        addresses = (offsets * size + base).astype(np.uint64)
        self._record(op, addresses, size, read=True, write=written, count_other=False)

    def __enter__(self) -> "Traffic":
        if not interpreted():
            raise RuntimeError("Traffic records kernels run by Triton's interpreter: set TRITON_INTERPRET=1 "
                               "before triton is imported")
        from triton.runtime import interpreter
        builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
        load, store = builder.create_masked_load, builder.create_masked_store
        rmw, cas = builder.create_atomic_rmw, builder.create_atomic_cas
        set_grid_dim, call = builder.set_grid_dim, executor.__call__
        recorder = self

        def create_masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
            recorder._access(ptrs, mask, read=True, write=False)
            return load(self, ptrs, mask, other, cache_policy, is_volatile)

        def create_masked_store(self, ptrs, value, mask, cache_policy):
            recorder._access(ptrs, mask, read=False, write=True)
            return store(self, ptrs, value, mask, cache_policy)

        def create_atomic_rmw(self, rmw_op, ptr, val, mask, sem, scope):
            recorder._access(ptr, mask, read=True, write=True)
            return rmw(self, rmw_op, ptr, val, mask, sem, scope)

        def create_atomic_cas(self, ptr, cmp, val, sem, scope):
            recorder._access(ptr, None, read=True, write=True)
            return cas(self, ptr, cmp, val, sem, scope)

        def record_grid_dim(self, nx, ny, nz):
            if recorder._current is not None:
                recorder._current.grid = tuple(d for d in (nx, ny, nz))
            return set_grid_dim(self, nx, ny, nz)

        def launch(self, *args, **kwargs):
            recorder._current = Launch(getattr(self.fn, "__name__", repr(self.fn)))
            try:
                return call(self, *args, **kwargs)
            finally:
                recorder.launches.append(recorder._current)
                recorder._current = None

        def host_read(method):
            def counted(tensor, *args, **kwargs):
                if recorder._current is None and not recorder._quiet:
                    recorder._host_read()
                return method(tensor, *args, **kwargs)
            return counted

        self._patch = pytest.MonkeyPatch()
        for name, fn in (("create_masked_load", create_masked_load), ("create_masked_store", create_masked_store),
                         ("create_atomic_rmw", create_atomic_rmw), ("create_atomic_cas", create_atomic_cas),
                         ("set_grid_dim", record_grid_dim)):
            self._patch.setattr(builder, name, fn)
        self._patch.setattr(executor, "__call__", launch)
        for name in HOST_READ_METHODS:
            self._patch.setattr(torch.Tensor, name, host_read(getattr(torch.Tensor, name)))
        self._mode = _TorchOps(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._mode.__exit__(*exc)
        finally:
            self._patch.undo()


class _TorchOps(TorchDispatchMode):
    """Passes every torch op to :meth:`Traffic._torch_op`, then runs it."""

    def __init__(self, traffic: Traffic):
        super().__init__()
        self.traffic = traffic

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.traffic._torch_op(func, args, kwargs)
        return func(*args, **kwargs)


__all__ = ["Launch", "Traffic", "interpreted"]
