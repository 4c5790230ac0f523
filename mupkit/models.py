"""Built-in model constructors for examples, coordinate checks and tests.

Plain PyTorch models with their ordinary init: mupkit turns them into muP models by
``mupkit.build(constructor, base=..., target=...)``; nothing here knows about muP except the
transformer's attention scale, which takes the base head dim (see
:func:`mupkit.nn.attention_scale`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .nn import attention_scale


def mlp(width: int = 128, *, d_in: int = 64, d_out: int = 10, depth: int = 3, bias: bool = True,
        norm: str | None = None) -> nn.Sequential:
    """``depth`` Linear layers with ReLU; ``norm`` in ``{None, "layer", "batch"}`` after each hidden."""
    layers: list[nn.Module] = []
    dims = [d_in] + [width] * (depth - 1)
    for fan_in, fan_out in zip(dims[:-1], dims[1:]):
        layers.append(nn.Linear(fan_in, fan_out, bias=bias))
        if norm == "layer":
            layers.append(nn.LayerNorm(fan_out))
        elif norm == "batch":
            layers.append(nn.BatchNorm1d(fan_out))
        layers.append(nn.ReLU())
    layers.append(nn.Linear(dims[-1], d_out, bias=bias))
    return nn.Sequential(*layers)


def cnn(width: int = 16, *, in_channels: int = 3, n_classes: int = 10, batch_norm: bool = False) -> nn.Sequential:
    """Two conv blocks (channels ``width``, ``2 width``), global pooling, a conv-free linear readout."""
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), *([nn.BatchNorm2d(c_out)] if batch_norm else []),
                nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*block(in_channels, width), *block(width, 2 * width),
                         nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, n_classes))


class ResidualMLP(nn.Module):
    """Pre-LN residual MLP: ``x + W2 relu(W1 LN(x))`` per block, between an input layer and a readout.

    The depth-scaling test bed (one linear pair per residual branch, like Bordelon et al. 2023).
    """

    def __init__(self, width: int = 128, *, depth: int = 4, d_in: int = 64, d_out: int = 10, expansion: int = 1):
        super().__init__()
        self.input = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, expansion * width), nn.ReLU(),
                          nn.Linear(expansion * width, width)) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.readout = nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input(x)
        for block in self.blocks:
            x = x + block(x)
        return self.readout(self.norm(x))


def resmlp(width: int = 128, **kwargs) -> ResidualMLP:
    return ResidualMLP(width, **kwargs)


class Attention(nn.Module):
    def __init__(self, width: int, n_head: int, scale: float):
        super().__init__()
        self.n_head, self.scale = n_head, scale
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_head)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))


class Block(nn.Module):
    def __init__(self, width: int, n_head: int, scale: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, n_head, scale)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Pre-LN decoder-only transformer with tied input/output embeddings.

    Attention logits use ``attention_scale(head_dim, base_head_dim)``: ``1/sqrt(d)`` when
    ``base_width`` is None (SP), muP's ``1/d`` law pinned to SP at ``base_width`` otherwise.
    ``tie``: share the readout weight with the token embedding (GPT-2 style).
    ``emb_mult`` multiplies the embedding output (the width-independent input multiplier of
    Tensor Programs V, App. F.4; Cerebras-GPT uses 10). Init follows GPT-2: N(0, 0.02) for
    weights and embeddings, zero biases.
    """

    def __init__(self, width: int = 128, *, depth: int = 2, n_head: int = 4, vocab: int = 256,
                 max_len: int = 128, base_width: int | None = None, emb_mult: float = 1.0, tie: bool = True):
        super().__init__()
        self.emb_mult = emb_mult
        if width % n_head:
            raise ValueError(f"width={width} must be divisible by n_head={n_head}")
        head_dim = width // n_head
        scale = attention_scale(head_dim, head_dim if base_width is None else base_width // n_head)
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(max_len, width)
        self.blocks = nn.ModuleList(Block(width, n_head, scale) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = (self.wte(idx) + self.wpe(pos)) * self.emb_mult
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def gpt(width: int = 128, **kwargs) -> GPT:
    return GPT(width, **kwargs)
