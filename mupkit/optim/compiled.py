"""Compiled update functions, and the CPU default that decides when to use them.

:class:`FlatKernel` compiles a function of 1-D tensors and 0-dim scalar tensors with
``torch.compile(dynamic=True)``: every parameter, whatever its shape, runs through the same
graph as a flat view (one compile per dtype, no recompile limit however many tensors or param
groups), and per-step scalars are tensors, so new values never recompile. On the CPU, inductor
fuses each function into one loop over the tensor, so an optimizer step reads and writes each
array once instead of once per eager op.

:func:`compiled_by_default` is the ``compiled=None`` default of mupkit's own optimizers: on the
CPU, large tensors of a large model go through the compiled path (2-4x faster than the eager
ops there, ``benchmarks/RESULTS.md``), everything else stays eager (a compile costs seconds,
which a small model's steps never earn back).
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, Sequence

import torch

from .sharding import DTensor
from .tensors import CPU_SMALL_TENSOR

#: elements a model's large tensors must hold in all before the CPU default compiles them
#: (~16 MB of fp32: a step of that size takes milliseconds, so a compile of seconds pays back)
AUTO_COMPILE_MIN_NUMEL = 1 << 22

#: most tensors the CPU default puts in one whole-list graph (its compile time grows with the count)
AUTO_COMPILE_MAX_TENSORS = 512


class FlatKernel:
    """``fn(*flat_tensors, *scalar_tensors)`` compiled on first use; call with whole tensors."""

    def __init__(self, fn: Callable[..., object]):
        self.fn = fn
        self._compiled = None

    def scalars(self, values: Sequence[float], like: torch.Tensor) -> list[torch.Tensor]:
        """Per-step scalars as 0-dim tensors of ``like``'s dtype and device (make once per step)."""
        return [torch.tensor(v, dtype=like.dtype, device=like.device) for v in values]

    def __call__(self, tensors: Sequence[torch.Tensor], scalars: Sequence[torch.Tensor], compiled: bool = True):
        """Run on flat views of ``tensors``; ``compiled=False`` runs the same function eagerly
        (what the CPU default does for tensors too small to gain from the compiled loop)."""
        fn = self.fn
        if compiled:
            if self._compiled is None:
                self._compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
            fn = self._compiled
        return fn(*(_flat(t) for t in tensors), *scalars)


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
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided and t.is_contiguous()


def compiled_by_default(params: Sequence[torch.Tensor], max_tensors: int | None = None) -> list[bool]:
    """Which of ``params`` the ``compiled=None`` default sends through the compiled path.

    A tensor qualifies when it is a plain dense contiguous floating-point CPU tensor (not a
    DTensor or other subclass) of at least :data:`.tensors.CPU_SMALL_TENSOR` elements. The
    qualifying tensors are compiled when they hold :data:`AUTO_COMPILE_MIN_NUMEL` elements in all,
    number at most ``max_tensors`` (for whole-list graphs) and ``torch.compile`` works on this
    machine (:func:`inductor_works`); otherwise nothing is. On CUDA the default stays eager.
    """
    mask = [flattenable(p) and p.device.type == "cpu" and p.is_floating_point() and p.numel() >= CPU_SMALL_TENSOR
            for p in params]
    chosen = [p for p, m in zip(params, mask) if m]
    if (sum(p.numel() for p in chosen) < AUTO_COMPILE_MIN_NUMEL
            or (max_tensors is not None and len(chosen) > max_tensors) or not inductor_works()):
        return [False] * len(params)
    return mask


def left_to_default(group: dict) -> bool:
    """Whether a param group left the implementation to the default dispatcher (``compiled``,
    ``foreach`` and ``fused`` not given)."""
    return group.get("compiled") is None and group.get("foreach") is None and not group.get("fused")


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


__all__ = ["AUTO_COMPILE_MAX_TENSORS", "AUTO_COMPILE_MIN_NUMEL", "FlatKernel", "compiled_by_default", "flattenable",
           "inductor_works", "left_to_default"]
