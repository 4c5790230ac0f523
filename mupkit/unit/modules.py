"""u-muP modules: unit-variance parameters and unit-scaled ops (:mod:`mupkit.unit.functional`).

Every weight is initialized ``N(0, 1)``, biases at 0, norm gains at 1 (u-muP's ``B_W = 1``,
Blake et al. 2024, Table 2); the width multipliers of muP live in the ops (``A_W``): hidden
``fan_in^-1/2``, readout ``1/fan_in``. Each module class declares the role of its parameters
(``UNIT_ROLES``, class-level data, never tensor attributes), which :mod:`mupkit.umup` reads
to make the plan; :class:`DepthModuleList` marks repeated blocks, whose parameters get u-muP's
depth LR factor ``L^-1/2`` with ``L`` counted in *layers* (graphcore's unit-scaling; Aleph
Alpha's implementation counts residual branches, ``2 L``).

The five u-muP hyperparameters are constructor arguments, attached to ops, not weights:
``alpha_ffn_act`` (:class:`MLP`), ``alpha_attn_softmax`` (:class:`MHSA`), ``alpha_res`` and
``alpha_res_attn_ratio`` (:class:`TransformerDecoder`'s residual taus) and
``alpha_loss_softmax`` (:meth:`TransformerDecoder.loss`); all default to 1.
"""

from __future__ import annotations

import torch
from torch import nn

from ..roles import Role
from . import functional as U


class Linear(nn.Linear):
    """Hidden linear layer ``x W^T / fan_in^1/2 (+ b)``, ``W ~ N(0, 1)``; no bias by default."""

    UNIT_ROLES = {"weight": Role.HIDDEN, "bias": Role.VECTOR}

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None,
                 constraint: str | None = "to_output_scale") -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.constraint = constraint

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return U.linear(input, self.weight, self.bias, self.constraint)


class LinearReadout(Linear):
    """The readout ``x W^T / fan_in (+ b)`` with unconstrained gradients."""

    UNIT_ROLES = {"weight": Role.OUTPUT, "bias": Role.VECTOR}

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None,
                 constraint: str | None = None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype, constraint)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return U.linear_readout(input, self.weight, self.bias, self.constraint)


class Embedding(nn.Embedding):
    """Lookup table ``N(0, 1)`` with a unit-scaled gradient."""

    UNIT_ROLES = {"weight": Role.INPUT}

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return U.embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


class LayerNorm(nn.LayerNorm):
    """Layer norm; non-parametric by default (u-muP's recommendation, after Lingle 2024)."""

    UNIT_ROLES = {"weight": Role.VECTOR, "bias": Role.VECTOR}

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = False, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return U.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMS norm ``x / sqrt(mean(x^2) + eps) (* g)``; non-parametric by default."""

    UNIT_ROLES = {"weight": Role.VECTOR}

    def __init__(self, normalized_shape: int | tuple[int, ...], eps: float = 1e-5,
                 elementwise_affine: bool = False) -> None:
        super().__init__()
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(self.normalized_shape)) if elementwise_affine else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return U.rms_norm(input, self.normalized_shape, self.weight, self.eps)


class MHSA(nn.Module):
    """Multi-head self-attention: unit-scaled qkv and output projections around
    :func:`~mupkit.unit.functional.scaled_dot_product_attention` (``mult = alpha_attn_softmax``)."""

    def __init__(self, width: int, heads: int, is_causal: bool = True, dropout_p: float = 0.0,
                 alpha_attn_softmax: float = 1.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"MHSA width {width} is not divisible by heads={heads}; pick heads dividing the width")
        self.heads, self.is_causal, self.dropout_p, self.mult = heads, is_causal, dropout_p, alpha_attn_softmax
        self.qkv = Linear(width, 3 * width)
        self.proj = Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = U.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p if self.training else 0.0,
                                             is_causal=self.is_causal, mult=self.mult)
        return self.proj(out.transpose(1, 2).reshape(b, s, d))


class MLP(nn.Module):
    """SwiGLU MLP ``W_2 (W_1 x * silu(W_g x))``; its projections are unconstrained, since their
    forward and backward mismatches cancel (``mult = alpha_ffn_act``)."""

    def __init__(self, width: int, expansion: int = 4, alpha_ffn_act: float = 1.0) -> None:
        super().__init__()
        self.mult = alpha_ffn_act
        self.up = Linear(width, expansion * width, constraint=None)
        self.gate = Linear(width, expansion * width, constraint=None)
        self.down = Linear(expansion * width, width, constraint=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(U.silu_glu(self.up(x), self.gate(x), self.mult))


class TransformerLayer(nn.Module):
    """Pre-norm layer: ``residual_apply`` of (RMSNorm, MHSA, dropout) with ``attn_tau``, then of
    (RMSNorm, MLP, dropout) with ``mlp_tau``."""

    def __init__(self, width: int, heads: int, attn_tau: float, mlp_tau: float, is_causal: bool = True,
                 dropout_p: float = 0.0, alpha_attn_softmax: float = 1.0, alpha_ffn_act: float = 1.0) -> None:
        super().__init__()
        self.attn_tau, self.mlp_tau, self.dropout_p = attn_tau, mlp_tau, dropout_p
        self.attn_norm = RMSNorm(width)
        self.attn = MHSA(width, heads, is_causal, dropout_p, alpha_attn_softmax)
        self.mlp_norm = RMSNorm(width)
        self.mlp = MLP(width, alpha_ffn_act=alpha_ffn_act)

    def _branch(self, norm: nn.Module, f: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return U.dropout(f(norm(x)), self.dropout_p, self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = U.residual_apply(lambda h: self._branch(self.attn_norm, self.attn, h), x, self.attn_tau)
        return U.residual_apply(lambda h: self._branch(self.mlp_norm, self.mlp, h), x, self.mlp_tau)


class DepthModuleList(nn.ModuleList):
    """A list of repeated residual blocks: u-muP scales the LR of every parameter inside by
    ``L^-1/2`` with ``L = len(self)`` (Depth-muP's Adam rule; u-muP Sec. 4.5)."""


class TransformerDecoder(nn.Module):
    """A u-muP decoder-only transformer on token ids ``(batch, seq)``: embedding, ``depth``
    :class:`TransformerLayer` s (residual taus from :func:`~mupkit.unit.functional.residual_taus`),
    final RMSNorm, readout. Positions come from causal attention alone (no position embedding,
    as in graphcore's demo model). :meth:`loss` is next-token unit-scaled cross-entropy.
    """

    def __init__(self, width: int = 64, vocab: int = 256, depth: int = 2, heads: int = 4, dropout_p: float = 0.0,
                 alpha_ffn_act: float = 1.0, alpha_attn_softmax: float = 1.0, alpha_res: float = 1.0,
                 alpha_res_attn_ratio: float = 1.0, alpha_loss_softmax: float = 1.0) -> None:
        super().__init__()
        self.alpha_loss_softmax = alpha_loss_softmax
        taus = U.residual_taus(depth, alpha_res, alpha_res_attn_ratio)
        self.embedding = Embedding(vocab, width)
        self.layers = DepthModuleList(
            TransformerLayer(width, heads, taus[2 * i], taus[2 * i + 1], True, dropout_p, alpha_attn_softmax,
                             alpha_ffn_act) for i in range(depth))
        self.final_norm = RMSNorm(width)
        self.readout = LinearReadout(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids)
        for layer in self.layers:
            x = layer(x)
        return self.readout(self.final_norm(x))

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy, logits times ``alpha_loss_softmax`` (forward only)."""
        logits = self(ids).float()
        return U.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), mult=self.alpha_loss_softmax)
