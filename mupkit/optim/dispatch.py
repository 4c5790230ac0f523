"""Which implementation runs a param group's step: the one place that decides.

Paths: ``"single"`` (the algorithm's per-tensor update function, tensor by tensor), ``"foreach"``
(the same function over lists, one ``torch._foreach_*`` call per op), ``"stacked"`` (the same
function over stacks of the same-shape tensors, :mod:`.stacked`), ``"fused"`` (one Triton
launch for every fused group's tensors; for ``Adam``/``AdamW``/``SGD`` on the CPU, torch's fused
CPU kernel) and ``"compiled"`` (``torch.compile`` of the per-tensor function).

A group's own ``fused``/``compiled``/``foreach`` (given to the constructor or set on the group)
wins; ``fused=False`` only rules the kernel out. Otherwise:

================================  ==========================================================
parameters of the group           default path
================================  ==========================================================
CUDA, plain dense contiguous,     ``"fused"`` when the algorithm has a kernel for their
Triton installed                  dtype (and, for kernels that sum with atomic adds, torch's
                                  deterministic mode is off)
CUDA otherwise (DTensor shards)   ``"foreach"`` (torch's own CUDA default)
CPU, algorithm with a CPU kernel  ``"fused"`` (torch's fused CPU kernel: Adam, AdamW, SGD)
CPU, tensors of < 2^16 elements   ``"stacked"`` where the algorithm offers it and the tensors
on average                        come in at most ``len / 4`` shapes (each op runs once per
                                  shape), else ``"foreach"`` (the per-op cost is shared by
                                  the list)
CPU otherwise                     ``"single"`` (each tensor's ops run while it is in cache)
================================  ==========================================================

The default never compiles: ``torch.compile`` costs seconds to minutes at the first step and
recompiles when shapes change (torch keeps it opt-in for its own optimizers for that reason).

Decisions are cached per optimizer (:func:`group_paths`) and made again when the groups are
replaced (``load_state_dict``), added, or change their flags, or the deterministic mode changes:
checking every tensor each step would cost ~0.5 us per tensor.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch

PATHS = ("single", "foreach", "stacked", "fused", "compiled")

#: mean elements per tensor under which a CPU group defaults to the multi-tensor (or stacked) path
CPU_SMALL_TENSOR = 1 << 16

#: tensors per shape (on average) from which a small-tensor CPU group defaults to ``"stacked"``
STACK_PER_SHAPE = 4

#: the flags a group may carry to choose its path
FLAGS = ("fused", "compiled", "foreach")


@dataclass(frozen=True)
class Kernels:
    """What an algorithm offers besides its eager update function.

    ``dtypes``: parameter dtypes its Triton kernel takes (empty: no kernel); ``deterministic``:
    whether the kernel's sums are (False: atomic adds, not a default under torch's deterministic
    mode); ``cpu_fused``: a fused CPU kernel exists (torch's, for the torch-based optimizers);
    ``foreach``: the multi-tensor path exists; ``stacked``: the update takes stacks of
    same-shape tensors (:mod:`.stacked`); ``takes_group``: whether the kernel takes a group's
    hyperparameters (None: every group's; a group it does not take gets the eager default)."""

    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    deterministic: bool = True
    cpu_fused: bool = False
    foreach: bool = True
    stacked: bool = False
    takes_group: Callable[[dict[str, Any]], bool] | None = None


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """Triton runs its kernels on the CPU (``TRITON_INTERPRET=1``, set before importing triton)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def plain_dense(t: torch.Tensor) -> bool:
    """A plain dense tensor or parameter: no DTensor or other subclass, strided layout."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided


def kernel_device(t: torch.Tensor) -> bool:
    """Whether ``t`` lives where the Triton kernels run by default (CUDA; tests make it hold for
    CPU tensors to run the kernels in Triton's interpreter)."""
    return t.is_cuda


def default_path(params: Sequence[torch.Tensor], kernels: Kernels) -> str:
    """The table above, for a group that chose nothing."""
    if not params:
        return "single"
    if all(kernel_device(p) for p in params):
        if kernels.dtypes and triton_available() and all(
                plain_dense(p) and p.is_contiguous() and p.dtype in kernels.dtypes for p in params) and (
                kernels.deterministic or not torch.are_deterministic_algorithms_enabled()):
            return "fused"
        return "foreach" if kernels.foreach else "single"
    if kernels.cpu_fused and all(p.device.type == "cpu" and plain_dense(p) and p.is_floating_point() for p in params):
        return "fused"
    if sum(p.numel() for p in params) >= CPU_SMALL_TENSOR * len(params):
        return "single"
    if kernels.stacked and all(plain_dense(p) for p in params) and \
            len({(p.shape, p.dtype) for p in params}) * STACK_PER_SHAPE <= len(params):
        return "stacked"
    return "foreach" if kernels.foreach else "single"


def chosen_path(group: dict[str, Any], kernels: Kernels) -> str:
    """The path a group asked for (its flags), else :func:`default_path`."""
    if group.get("fused"):
        return "fused"
    if group.get("compiled"):
        return "compiled"
    if group.get("foreach") is not None:
        return "foreach" if group["foreach"] and kernels.foreach else "single"
    if group.get("fused") is False or (kernels.takes_group is not None and not kernels.takes_group(group)):
        kernels = replace(kernels, dtypes=(), cpu_fused=False)
    return default_path(group["params"], kernels)


def group_paths(optimizer: torch.optim.Optimizer, kernels: Kernels) -> list[str]:
    """:func:`chosen_path` of each of ``optimizer``'s param groups, cached (see the module doc)."""
    groups = optimizer.param_groups
    key = (id(groups), len(groups), tuple(tuple(g.get(f) for f in FLAGS) for g in groups),
           torch.are_deterministic_algorithms_enabled())
    cached = optimizer.__dict__.get("_paths")
    if cached is None or cached[0] != key:
        cached = optimizer.__dict__["_paths"] = (key, [chosen_path(g, kernels) for g in groups])
    return cached[1]


def check_flags(foreach: bool | None, compiled: bool | None, fused: bool | None) -> None:
    if sum(map(bool, (foreach, compiled, fused))) > 1:
        raise ValueError("choose one of foreach=True, compiled=True and fused=True")


def check_fused(name: str, tensors: Sequence[torch.Tensor], kernels: Kernels) -> None:
    """Refuse a Triton launch where it cannot run, saying what to do instead; kernels that are not
    deterministic are refused (or warned about, with ``warn_only``) under
    ``torch.use_deterministic_algorithms(True)``, as torch does for its own atomic-add kernels."""
    if not kernels.deterministic and torch.are_deterministic_algorithms_enabled():
        message = (f"{name}(fused=True) sums with atomic adds on the GPU, so its roundings vary from run to run, "
                   f"and torch.use_deterministic_algorithms(True) is set; use fused=False (the eager paths are "
                   f"deterministic) or turn the deterministic mode off.")
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError(message)
        warnings.warn(message, UserWarning, stacklevel=3)
    if not kernels.dtypes:
        raise RuntimeError(f"{name} has no fused kernel; use fused=False.")
    if not triton_available():
        raise RuntimeError(f"{name}(fused=True) needs Triton (pip install triton, or a CUDA build of torch that "
                           f"ships it); use fused=False.")
    devices = {t.device.type for t in tensors}
    if devices - {"cuda"} and not interpreted():
        raise RuntimeError(f"{name}(fused=True) runs Triton kernels on CUDA tensors; got tensors on {sorted(devices)}. "
                           f"Use fused=False on the CPU (or TRITON_INTERPRET=1, set before importing triton, to run "
                           f"the kernels slowly on the CPU for testing).")
    for t in tensors:
        if not plain_dense(t):
            raise RuntimeError(f"{name}(fused=True) runs on whole dense tensors, but a parameter of shape "
                               f"{tuple(t.shape)} is a {type(t).__name__} (e.g. an FSDP2 shard); use fused=False, "
                               f"which reduces over the shards.")
        if t.dtype not in kernels.dtypes:
            names = "/".join(str(d).removeprefix("torch.") for d in kernels.dtypes)
            raise RuntimeError(f"{name}(fused=True) supports {names} parameters, got {t.dtype} "
                               f"(shape {tuple(t.shape)}); use fused=False.")
        if not t.is_contiguous():
            raise RuntimeError(f"{name}(fused=True) needs contiguous tensors, got shape {tuple(t.shape)} with strides "
                               f"{t.stride()}; make the parameter contiguous or use fused=False.")


__all__ = ["CPU_SMALL_TENSOR", "FLAGS", "Kernels", "PATHS", "STACK_PER_SHAPE", "check_flags", "check_fused",
           "chosen_path", "default_path", "group_paths", "interpreted", "kernel_device", "plain_dense", "triton_available"]
