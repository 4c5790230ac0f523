"""Forward multipliers that cannot be absorbed into init and LR, installed as visible hooks."""

from __future__ import annotations

import math

from torch import nn


class InputScale:
    """Forward pre-hook multiplying a module's first input by ``scale``.

    Used for a readout whose weight is tied to an embedding: muP's readout multiplier
    ``1/m_in`` (Tensor Programs V, Table 8) cannot be folded into the shared weight without
    changing the embedding, so it is applied to the readout's input, as mup's ``MuReadout``
    does. A plain picklable class, so it survives ``deepcopy``, pickling and ``torch.compile``.
    """

    def __init__(self, scale: float):
        self.scale = float(scale)

    def __call__(self, module: nn.Module, args: tuple):
        return (args[0] * self.scale, *args[1:])

    def __repr__(self) -> str:
        return f"InputScale({self.scale:g})"


def install_input_scale(module: nn.Module, scale: float) -> None:
    module.register_forward_pre_hook(InputScale(scale))


def attention_scale(head_dim: int, base_head_dim: int) -> float:
    """muP attention logit scale ``sqrt(base_head_dim) / head_dim``.

    muP scales attention logits by ``1/d`` instead of ``1/sqrt(d)`` (Tensor Programs V, Sec. 4
    and App. B), because after training query and key are correlated and their dot product
    grows like ``d``. The constant is chosen so that at the base head dim it equals SP's
    ``1/sqrt(d)`` exactly. Use it as ``F.scaled_dot_product_attention(q, k, v,
    scale=attention_scale(head_dim, base_head_dim))``.
    """
    if head_dim <= 0 or base_head_dim <= 0:
        raise ValueError(f"attention_scale needs positive head dims, got head_dim={head_dim}, "
                         f"base_head_dim={base_head_dim}")
    return math.sqrt(base_head_dim) / head_dim


def residual_scale(depth: int, base_depth: int, alpha: float) -> float:
    """The residual-branch multiplier ``(depth / base_depth)^-alpha`` (Depth-muP ``alpha = 1/2``,
    TP VI; CompleteP ``alpha = 1``, Dey et al. 2025). 1 at the base depth."""
    from ..rules import DepthRule
    return DepthRule(alpha).branch_multiplier(depth / base_depth)


def residual(x, branch, scale: float):
    """``x + scale * branch``: a residual add with an explicit depth multiplier, for branches that
    do not end in a Linear/Conv layer (build such models with ``branch_outputs=[]`` so mupkit does
    not also fold the multiplier into a weight)."""
    return x + scale * branch
