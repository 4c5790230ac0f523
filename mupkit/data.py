"""Synthetic data for checks when the user gives none: inferred from the model's first layer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

Batch = tuple[Any, Any]

#: spatial size of synthetic inputs per conv rank
SPATIAL = {1: (64,), 2: (16, 16), 3: (8, 8, 8)}


def synthetic_input(model: nn.Module, *, batch_size: int = 32, seq_len: int = 16,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """An input batch for ``model`` from its first layer (see :func:`synthetic_batch`), on the CPU."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Embedding, nn.Linear, nn.Conv1d, nn.Conv2d,
                                                                  nn.Conv3d))), None)
    if isinstance(first, nn.Embedding):
        return torch.randint(0, first.num_embeddings, (batch_size, seq_len), generator=generator)
    if isinstance(first, nn.Linear):
        return torch.randn(batch_size, first.in_features, generator=generator)
    if isinstance(first, nn.modules.conv._ConvNd):
        return torch.randn(batch_size, first.in_channels, *SPATIAL[len(first.kernel_size)], generator=generator)
    raise ValueError(f"cannot infer an input for {type(model).__name__}: its first layer is not an Embedding, "
                     f"Linear or Conv. Pass batch=(inputs, targets) (CLI: define batch() in the model file).")


def synthetic_batch(model: nn.Module, *, batch_size: int = 32, seq_len: int = 16, seed: int = 0,
                    device: str | torch.device = "cpu") -> Batch:
    """``(inputs, targets)`` for ``model``: the input kind comes from its first layer.

    Embedding -> random token ids ``(batch, seq_len)``; Linear -> N(0, 1) features; ConvNd ->
    N(0, 1) images. Targets: random class ids over the output's last dim (token ids for a
    language model), or N(0, 1) regression targets when the output has a single channel.
    The same seed gives the same inputs at every width (only hidden sizes change).
    """
    gen = torch.Generator().manual_seed(seed)
    x = synthetic_input(model, batch_size=batch_size, seq_len=seq_len, generator=gen).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        model.train(was_training)
    if isinstance(out, (tuple, list)):
        out = out[0]
    classes = out.shape[-1]
    y = torch.randn(out.shape, generator=gen) if classes == 1 else \
        torch.randint(0, classes, out.shape[:-1], generator=gen)
    return x, y.to(device)
