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

from .tensors import LOW_PRECISION, plain_dense, restore_saved_dtypes


class MasterWeights:
    """Mixin for a ``torch.optim.Optimizer``: the ``master_weights`` option (per group, default
    from the constructor) and :meth:`_master_weights`, the context a step's update runs in."""

    def __init__(self, params, *args, master_weights: bool = False, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.defaults["master_weights"] = master_weights
        for group in self.param_groups:
            group.setdefault("master_weights", master_weights)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, then: groups saved before this option take the constructor's value, and the
        master copies (all state of a ``master_weights`` group) keep their saved fp32 dtype."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.setdefault("master_weights", self.defaults["master_weights"])
        restore_saved_dtypes(self, state_dict, lambda group, key: key == "master" or group["master_weights"])

    @contextlib.contextmanager
    def _master_weights(self):
        """Within: the low-precision parameters of ``master_weights`` groups hold their fp32
        master copies as data and an fp32 copy of their gradient; after, their own storage and
        gradient again, the storage rounded from the master copy. The copy is out of the state
        meanwhile, so the optimizer sees the state it made itself (empty at its first step).

        A parameter changed in place since the last step (``load_state_dict`` of the model, an
        EMA swap, a re-initialization: its version counter or storage moved) gets a fresh master
        copy of its new values instead of the old copy overwriting them."""
        mastered = [p for group in self.param_groups if group.get("master_weights") for p in group["params"]
                    if p.dtype in LOW_PRECISION and p.grad is not None]
        for p in mastered:  # all checked before any is swapped
            if not plain_dense(p):
                raise ValueError(f"{type(self).__name__}(master_weights=True): a parameter of shape "
                                 f"{tuple(p.shape)} is a {type(p).__name__}, which cannot swap in an fp32 copy; "
                                 f"with FSDP2 keep fp32 sharded parameters (MixedPrecisionPolicy) and leave "
                                 f"master_weights off.")
        seen = self.__dict__.setdefault("_master_seen", {})  # id(p) -> (storage, version) after the last step
        swapped: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        try:
            for p in mastered:
                master = self.state[p].pop("master", None)
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
                self.state[p]["master"] = master
                seen[id(p)] = (p.data_ptr(), p._version)  # after the write-back, which leaves the version as is


__all__ = ["MasterWeights"]
