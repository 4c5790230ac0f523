"""Simulated FP8 matmuls: round every matmul input to an 8-bit float format in the forward pass.

Unit scaling's point is that tensors of unit scale fit a low-precision format's range without
per-tensor scale factors (Blake et al. 2023, Sec. 1; u-muP Sec. 4.6). :class:`simulate_fp8`
checks that on any hardware: inside the context, the inputs of ``F.linear``, ``torch.matmul``
/ ``@`` and ``F.scaled_dot_product_attention`` are cast to ``torch.float8_e4m3fn`` (values
saturate at the format's largest finite value, as a saturating hardware cast does) and back,
so the matmul sees exactly the FP8 values. Gradients pass straight through in the compute
dtype: only the forward pass is simulated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class _RoundTo(torch.autograd.Function):
    """Forward: round to ``dtype`` (saturating) and back; backward: identity."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        limit = torch.finfo(dtype).max
        return x.clamp(-limit, limit).to(dtype).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


#: function -> how many leading tensor arguments are matmul operands
_OPERANDS = {F.linear: 2, torch.matmul: 2, torch.Tensor.matmul: 2, torch.Tensor.__matmul__: 2,
             F.scaled_dot_product_attention: 3}


class simulate_fp8(TorchFunctionMode):
    """Context manager: ``with simulate_fp8(): loss = model(x)`` rounds matmul inputs to FP8.

    ``dtype``: an 8-bit float format of this torch build (default ``torch.float8_e4m3fn``).
    """

    def __init__(self, dtype: torch.dtype = torch.float8_e4m3fn) -> None:
        super().__init__()
        if not dtype.is_floating_point or dtype.itemsize != 1:
            raise ValueError(f"simulate_fp8(dtype={dtype}) needs an 8-bit float format such as torch.float8_e4m3fn")
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        n = _OPERANDS.get(func, 0)
        if n:
            args = tuple(_RoundTo.apply(a, self.dtype) if i < n and isinstance(a, torch.Tensor)
                         and a.is_floating_point() else a for i, a in enumerate(args))
        return func(*args, **kwargs)
