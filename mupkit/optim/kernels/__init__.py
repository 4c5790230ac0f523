"""Triton multi-tensor kernels: one launch per (device, dtype) for all of an optimizer's tensors.

Each kernel reads a :class:`~.tables.TensorTable`: device arrays of the tensors' addresses and
sizes and a block map (block ``b`` covers elements ``[start_b, start_b + BLOCK)`` of tensor
``tensor_b``), plus a per-tensor table of this step's values (effective lr, weight decay, eps,
bias corrections), so muP's per-group multipliers cost no extra launches and no host sync.

Kernels use core ``tl`` ops only (``atan2`` is written from them), so the same code runs on the
CPU under ``TRITON_INTERPRET=1``; that is how CI tests them against the single-tensor paths.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Sequence

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


#: parameter dtypes the kernels take (fp32 math and state)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_by_default(tensors: Sequence[torch.Tensor], dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES) -> bool:
    """Whether an optimizer left to its default runs these kernels: Triton is present and every
    tensor is a plain dense contiguous CUDA tensor (no DTensor shard) of one of ``dtypes``.

    On an H200 (``benchmarks/RESULTS.md``) the Adam and Adam-atan2 kernels run at 87-91% of the
    copy bandwidth for 100M parameters, and every kernel takes one launch for all param groups
    where the eager paths launch several kernels per tensor: on a 25M-parameter GPT the fused
    step is 3x (AdamAtan2), 17x (DAdaptAdam), 12x (Prodigy) and 1.7-2x (Adafactor) faster than
    mupkit's eager default there."""
    from ..tensors import plain_dense
    return bool(tensors) and all(t.is_cuda and plain_dense(t) and t.is_contiguous() and t.dtype in dtypes
                                 for t in tensors) and triton_available()


@contextlib.contextmanager
def fused_defaults(optimizer: torch.optim.Optimizer, dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES,
                   deterministic: bool = True):
    """Within: the param groups left to the default dispatcher (``fused``, ``foreach`` and
    ``compiled`` not given) have ``fused=True`` when all their parameters pass
    :func:`fused_by_default` (the rule is the optimizer's, so a model split between devices stays
    on its eager default); ``None`` again after. Kernels that are not ``deterministic`` (they sum
    with atomic adds) are not the default under ``torch.use_deterministic_algorithms(True)``.
    Which groups are left to the default is read every step (a path chosen later is respected);
    the per-parameter check is cached until the groups are replaced, added or change their
    choices, or the deterministic mode changes: it would cost ~0.5 us per parameter per step."""
    from ..compiled import left_to_default
    refused = not deterministic and torch.are_deterministic_algorithms_enabled()
    defaulted = [left_to_default(g) for g in optimizer.param_groups]
    key = (id(optimizer.param_groups), tuple(defaulted), dtypes, refused)
    cached = getattr(optimizer, "_fused_defaults", None)
    if cached is None or cached[0] != key:
        params = [p for g, yes in zip(optimizer.param_groups, defaulted) if yes for p in g["params"]]
        cached = (key, not refused and fused_by_default(params, dtypes))
        optimizer._fused_defaults = cached
    groups = [g for g, yes in zip(optimizer.param_groups, defaulted) if yes] if cached[1] else []
    for group in groups:
        group["fused"] = True
    try:
        yield
    finally:
        for group in groups:
            group["fused"] = None


def check_fused(name: str, tensors: list[torch.Tensor], dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES,
                deterministic: bool = True) -> None:
    """Refuse ``fused=True`` where the kernels cannot run, saying what to do instead; kernels that
    are not ``deterministic`` are refused (or warned about, with ``warn_only``) under
    ``torch.use_deterministic_algorithms(True)``, as torch does for its own atomic-add kernels."""
    if not deterministic and torch.are_deterministic_algorithms_enabled():
        message = (f"{name}(fused=True) sums with atomic adds on the GPU, so its roundings vary from run to run, "
                   f"and torch.use_deterministic_algorithms(True) is set; use fused=False (the eager paths are "
                   f"deterministic) or turn the deterministic mode off.")
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError(message)
        warnings.warn(message, UserWarning, stacklevel=3)
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
