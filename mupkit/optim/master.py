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

from .tensors import LOW_PRECISION, plain_dense


class MasterWeights:
    """Mixin for a ``torch.optim.Optimizer``: the ``master_weights`` option (per group, default
    from the constructor) and :meth:`_master_weights`, the context a step's update runs in."""

    def __init__(self, params, *args, master_weights: bool = False, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.defaults["master_weights"] = master_weights
        for group in self.param_groups:
            group.setdefault("master_weights", master_weights)

    @contextlib.contextmanager
    def _master_weights(self):
        """Within: the low-precision parameters of ``master_weights`` groups hold their fp32
        master copies as data and an fp32 copy of their gradient; after, their own storage and
        gradient again, the storage rounded from the master copy. The copy is out of the state
        meanwhile, so the optimizer sees the state it made itself (empty at its first step)."""
        swapped: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        try:
            for group in self.param_groups:
                if not group.get("master_weights"):
                    continue
                for p in group["params"]:
                    if p.dtype not in LOW_PRECISION or p.grad is None:
                        continue
                    if not plain_dense(p):
                        raise ValueError(f"{type(self).__name__}(master_weights=True): a parameter of shape "
                                         f"{tuple(p.shape)} is a {type(p).__name__}, which cannot swap in an fp32 "
                                         f"copy; with FSDP2 keep fp32 sharded parameters (MixedPrecisionPolicy) "
                                         f"and leave master_weights off.")
                    master = self.state[p].pop("master", None)
                    swapped.append((p, p.data, p.grad))
                    p.data = p.detach().float() if master is None else master
                    p.grad = swapped[-1][2].float()
            yield
        finally:
            for p, storage, grad in reversed(swapped):
                master = p.data
                p.data = storage
                p.grad = grad
                storage.copy_(master)
                self.state[p]["master"] = master


__all__ = ["MasterWeights"]
