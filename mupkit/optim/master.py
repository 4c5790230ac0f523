"""Optional fp32 master copies of bf16/fp16 parameters, for training in low precision without autocast.

A bf16 parameter updated in place loses every change smaller than half its last place,
``2^-9`` of its magnitude: with ``lr = 1e-4`` most of Adam's updates round away. With
``master_weights=True`` each bf16/fp16 parameter of the group keeps an fp32 copy in its optimizer
state (``"master"``, saved with the ``state_dict``). For the update the parameter's data *is* that
copy and its gradient an fp32 copy of its own, so every implementation (single-tensor, foreach,
compiled, Triton) updates fp32 values; the result is rounded into the parameter once, after the
step. fp32 parameters are untouched. The cost: the fp32 copy (4 bytes per parameter) and two
extra passes per step (the gradient to fp32, the copy back).

Only plain dense parameters take a master copy (a DTensor shard of FSDP2 gets the same from
``MixedPrecisionPolicy``, which keeps the sharded parameters in fp32).
"""

from __future__ import annotations

import contextlib

import torch

from .dispatch import plain_dense
from .tensors import LOW_PRECISION


@contextlib.contextmanager
def master_weights(optimizer: torch.optim.Optimizer):
    """Within: the low-precision parameters of ``master_weights`` groups hold their fp32
    master copies as data and an fp32 copy of their gradient; after, their own storage and
    gradient again, the storage rounded from the master copy. The copy is out of the state
    meanwhile, so the optimizer sees the state it made itself (empty at its first step).

    A parameter changed in place since the last step (``load_state_dict`` of the model, an
    EMA swap, a re-initialization: its version counter or storage moved) gets a fresh master
    copy of its new values instead of the old copy overwriting them."""
    mastered = [p for group in optimizer.param_groups if group.get("master_weights") for p in group["params"]
                if p.dtype in LOW_PRECISION and p.grad is not None]
    for p in mastered:  # all checked before any is swapped
        if not plain_dense(p):
            raise ValueError(f"{type(optimizer).__name__}(master_weights=True): a parameter of shape "
                             f"{tuple(p.shape)} is a {type(p).__name__}, which cannot swap in an fp32 copy; "
                             f"with FSDP2 keep fp32 sharded parameters (MixedPrecisionPolicy) and leave "
                             f"master_weights off.")
    seen = optimizer.__dict__.setdefault("_master_seen", {})  # id(p) -> (storage, version) after the last step
    swapped: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    try:
        for p in mastered:
            master = optimizer.state[p].pop("master", None)
            now = (p.data_ptr(), p._version)
            if master is None or seen.get(id(p), now) != now:  # new, or changed since the last step
                master = p.detach().float()
            swapped.append((p, p.data, p.grad))
            p.data = master
            p.grad = swapped[-1][2].float()
        yield
    finally:
        for p, storage, grad in reversed(swapped):
            master = p.data
            p.data = storage
            p.grad = grad
            storage.copy_(master)
            optimizer.state[p]["master"] = master
            seen[id(p)] = (p.data_ptr(), p._version)  # after the write-back, which leaves the version as is


__all__ = ["master_weights"]
