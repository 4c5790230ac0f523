"""Triton multi-tensor kernels: one launch per (device, dtype) for all of an optimizer's tensors.

Each kernel reads a :class:`~.tables.TensorTable`: device arrays of the tensors' addresses and
sizes and a block map (block ``b`` covers elements ``[start_b, start_b + BLOCK)`` of tensor
``tensor_b``), plus a per-tensor table of this step's values (effective lr, weight decay, eps,
bias corrections), so muP's per-group multipliers cost no extra launches and no host sync.

Kernels use core ``tl`` ops only (``atan2`` is written from them), so the same code runs on the
CPU under ``TRITON_INTERPRET=1``; that is how CI tests them against the single-tensor paths.
"""

from __future__ import annotations

import os

import torch


def triton_available() -> bool:
    """True when Triton is importable."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreted() -> bool:
    """True when Triton runs its kernels on the CPU (``TRITON_INTERPRET=1``, set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_fused(name: str, tensors: list[torch.Tensor],
                dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)) -> None:
    """Refuse ``fused=True`` where the kernels cannot run, saying what to do instead."""
    if not triton_available():
        raise RuntimeError(f"{name}(fused=True) needs Triton (pip install triton, or a CUDA build of torch that "
                           f"ships it); use fused=False.")
    devices = {t.device.type for t in tensors}
    if devices - {"cuda"} and not interpreted():
        raise RuntimeError(f"{name}(fused=True) runs Triton kernels on CUDA tensors; got tensors on {sorted(devices)}. "
                           f"Use fused=False on the CPU (or TRITON_INTERPRET=1, set before importing triton, to run "
                           f"the kernels slowly on the CPU for testing).")
    from ..sharding import DTensor
    for t in tensors:
        if DTensor is not None and isinstance(t, DTensor):
            raise RuntimeError(f"{name}(fused=True) runs on whole tensors, but a parameter of shape {tuple(t.shape)} "
                               f"is sharded (a DTensor); use fused=False, which reduces over the shards.")
        if t.dtype not in dtypes:
            names = "/".join(str(d).removeprefix("torch.") for d in dtypes)
            raise RuntimeError(f"{name}(fused=True) supports {names} parameters, got {t.dtype} "
                               f"(shape {tuple(t.shape)}); use fused=False.")
        if not t.is_contiguous():
            raise RuntimeError(f"{name}(fused=True) needs contiguous tensors, got shape {tuple(t.shape)} with strides "
                               f"{t.stride()}; make the parameter contiguous or use fused=False.")
