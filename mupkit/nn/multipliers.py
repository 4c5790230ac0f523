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


def branch_multiplier(plan_or_model, container: str | None = None) -> float:
    """``(L / L_base)^-alpha`` of ``container`` (default: the only block container) from a
    :class:`~mupkit.plan.Plan`, or from the model carrying one (:func:`mupkit.build`)."""
    from ..plan import Plan, plan_of
    plan = plan_or_model if isinstance(plan_or_model, Plan) else plan_of(plan_or_model)
    depth = plan.depth
    if depth is None or depth.alpha is None:
        raise ValueError(f"the plan ({plan.parametrization!r}) has no depth rule for repeated blocks; build the "
                         f"model with base and target depths and a depth parametrization (e.g. 'mup+completep').")
    if depth.branch_outputs:
        raise ValueError(f"the plan already folds the branch multiplier into {list(depth.branch_outputs)}; adding it in "
                         f"the forward too would apply it twice. Build with branch_outputs=[] to scale explicitly.")
    containers = depth.blocks
    if container is None:
        if len(containers) != 1:
            raise ValueError(f"the plan has several block containers {sorted(containers)}; pass container=...")
        container = next(iter(containers))
    if container not in containers:
        raise ValueError(f"container={container!r} is not a block container of the plan: {sorted(containers)}")
    base_depth, depth_now = containers[container]
    return residual_scale(depth_now, base_depth, depth.alpha)


def residual(x, branch, scale, container: str | None = None):
    """``x + scale * branch``: a residual add with an explicit depth multiplier, for branches that
    do not end in a Linear/Conv layer (build such models with ``branch_outputs=[]`` so mupkit does
    not also fold the multiplier into a weight). ``scale``: a number (e.g. :func:`residual_scale`),
    or the built model (or its plan), whose depth rule gives ``(L / L_base)^-alpha`` for
    ``container`` (:func:`branch_multiplier`)."""
    if not isinstance(scale, (int, float)):
        scale = branch_multiplier(scale, container)
    return x + scale * branch


class OutputScale:
    """Forward hook multiplying a module's output (a tensor, or the first item of a tuple, list or
    dict) by ``scale``: muP's readout multiplier for a readout computed by an op on an embedding's
    weight (``einsum(h, emb.weight)``) inside the module's forward. Picklable, like :class:`InputScale`."""

    def __init__(self, scale: float):
        self.scale = float(scale)

    def __call__(self, module: nn.Module, args: tuple, out):
        if isinstance(out, (tuple, list)):
            return type(out)((out[0] * self.scale, *out[1:]))
        if isinstance(out, dict):
            key = next(iter(out))
            out[key] = out[key] * self.scale
            return out
        return out * self.scale

    def __repr__(self) -> str:
        return f"OutputScale({self.scale:g})"


def install_output_scale(module: nn.Module, scale: float) -> None:
    module.register_forward_hook(OutputScale(scale))
