"""Compiled update functions, and the CPU default that decides when to use them.

:class:`ListKernel` applies a per-parameter update function to lists of parameters as one
``torch.compile`` graph per (device, dtype): per-parameter values (effective lr, decay, bias
corrections) come from a table, so neither new values nor the number of param groups recompile
(a change in which tensors are stepped does). On the CPU, inductor fuses each parameter's update
into one loop over it, so a step reads and writes each array once instead of once per eager op,
and the whole list costs one Python call instead of one per tensor.

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
from .tensors import CPU_SMALL_TENSOR, LOW_PRECISION, by_device_and_dtype, plain_dense

#: elements a model's large tensors must hold in all before the CPU default compiles them
#: (~16 MB of fp32: a step of that size takes milliseconds, so a compile of seconds pays back)
AUTO_COMPILE_MIN_NUMEL = 1 << 22

#: most tensors the CPU default puts in one graph (its compile time grows with the count)
AUTO_COMPILE_MAX_TENSORS = 512

#: graphs one :class:`ListKernel` may compile (one per set of tensor shapes, device and dtype that
#: it is called with; torch's default of 8 is too few for a process that steps several models)
RECOMPILE_LIMIT = 64


class ListKernel:
    """``fn(*tensors_of_one_parameter, *values_of_its_row)`` over lists of parameters.

    ``columns[k][i]`` is the ``k``-th tensor argument for parameter ``i`` (passed as a flat view
    that shares its storage, so in-place updates reach it) and ``rows[i]`` its per-step values.
    Parameters are bucketed by the first column's (device, dtype); each bucket is one compiled
    call (``compiled=False``: the same function eagerly, tensor by tensor), with the rows as a
    table of that dtype (fp32 for bf16/fp16). Returns the sum over parameters of what ``fn``
    returns, in float64, or None when it returns nothing.
    """

    def __init__(self, fn: Callable[..., torch.Tensor | None]):
        self.fn = fn
        self._compiled = None
        # a code object of its own: dynamo counts recompiles (one per set of shapes) per code object
        code = _apply_each.__code__.replace(co_name=f"_apply_each_{fn.__name__}")
        self._apply_each = types.FunctionType(code, _apply_each.__globals__, code.co_name)

    def __call__(self, columns: Sequence[Sequence[torch.Tensor]], rows: Sequence[Sequence[float]],
                 compiled: bool | Sequence[bool] = True) -> torch.Tensor | None:
        """``compiled``: for all parameters, or one flag per parameter (the rest run eagerly)."""
        flags = [compiled] * len(rows) if isinstance(compiled, bool) else list(compiled)
        total = None
        for *bucket, bucket_rows, bucket_flags in by_device_and_dtype(*columns, rows, flags):
            for flag in (True, False):
                keep = [f == flag for f in bucket_flags]
                if any(keep):
                    result = self._apply([[t for t, k in zip(column, keep) if k] for column in bucket],
                                         [r for r, k in zip(bucket_rows, keep) if k], flag)
                    if result is not None:
                        result = result.to(torch.float64)
                        total = result if total is None else total + result.to(total.device)
        return total

    def _apply(self, columns: list[list[torch.Tensor]], rows: list[Sequence[float]], compiled: bool):
        flat = [[_flat(t) for t in column] for column in columns]
        like = flat[0][0]
        dtype = torch.float32 if like.dtype in LOW_PRECISION else like.dtype
        table = torch.tensor(rows, device=like.device, dtype=dtype)
        if not compiled:
            return self._apply_each(self.fn, flat, table)
        if self._compiled is None:
            self._compiled = torch.compile(self._apply_each, fullgraph=True, dynamic=False)
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return self._compiled(self.fn, flat, table)


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


__all__ = ["AUTO_COMPILE_MAX_TENSORS", "AUTO_COMPILE_MIN_NUMEL", "ListKernel", "compiled_by_default", "flattenable",
           "inductor_works", "left_to_default"]
