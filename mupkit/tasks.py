"""Small real-data training tasks for HP-transfer sweeps (nothing is downloaded).

* :func:`text_lm`: next-byte prediction on the Python standard library's sources
  (:func:`mupkit.data.stdlib_corpus`), for token models (``model(ids) -> logits``, or a
  ``model.loss(ids)`` such as :class:`mupkit.unit.TransformerDecoder`).
* :func:`digits`: the scikit-learn 8x8 digits (1797 images, shipped with scikit-learn; install
  the ``examples`` extra), flattened to 64 features for an MLP or as ``1x8x8`` images for a CNN.

Each returns ``train(model, hparams, seed) -> training losses`` for :func:`mupkit.transfer.sweep`:
a mupkit optimizer over ``mupkit.param_groups(model)`` with ``hparams["lr"]`` (and optional
``"weight_decay"``), a linear warmup, and a fixed batch order per seed. Which built-in model
trains on which (widths, LR grid, fixed kwargs) is in the registry, :data:`mupkit.zoo.BUILTIN`.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .data import stdlib_corpus, token_windows
from .groups import param_groups
from .optim import get_optimizer

TrainFn = Callable[[nn.Module, Mapping[str, float], int], list[float]]


def _train_loop(model: nn.Module, hparams: Mapping[str, float], seed: int, steps: int, warmup: int,
                optimizer: str, next_loss: Callable[[torch.Generator], torch.Tensor]) -> list[float]:
    if "lr" not in hparams:
        raise ValueError(f"the task needs hparams['lr'], got {dict(hparams)}; sweep with grid={{'lr': [...]}}")
    opt = get_optimizer(optimizer)(param_groups(model), lr=hparams["lr"],
                                   weight_decay=hparams.get("weight_decay", 0.0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / max(warmup, 1)))
    gen, losses = torch.Generator().manual_seed(10_000 + seed), []
    model.train()
    for _ in range(steps):
        loss = next_loss(gen)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break  # diverged: the sweep records it as inf
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return losses


def text_lm(*, steps: int = 200, batch: int = 16, context: int = 64, warmup: int = 20,
            optimizer: str = "adamw", limit: int = 4_000_000) -> TrainFn:
    """Train on random ``batch x context`` byte windows of the stdlib corpus; returns the losses."""
    corpus = stdlib_corpus("train", limit=limit)

    def train(model: nn.Module, hparams: Mapping[str, float], seed: int) -> list[float]:
        def next_loss(gen: torch.Generator) -> torch.Tensor:
            x, y = token_windows(corpus, batch, context, gen)
            if hasattr(model, "loss"):
                return model.loss(torch.cat([x, y[:, -1:]], dim=1))
            return F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        return _train_loop(model, hparams, seed, steps, warmup, optimizer, next_loss)
    return train


@functools.cache
def digits_data(images: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 digits, pixels scaled to [0, 1] then standardized per pixel (constant pixels 0):
    ``(N, 64)`` or ``(N, 1, 8, 8)`` float32, labels ``(N,)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits task needs scikit-learn: pip install -e '.[examples]'") from e
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-3)
    y = torch.tensor(data.target, dtype=torch.long)
    return (x.view(-1, 1, 8, 8) if images else x), y


def digits(*, steps: int = 300, batch: int = 64, warmup: int = 20, optimizer: str = "adamw",
           images: bool = False) -> TrainFn:
    """Train a classifier on random minibatches of the digits (``images``: 1x8x8 for a CNN)."""
    x, y = digits_data(images)

    def train(model: nn.Module, hparams: Mapping[str, float], seed: int) -> list[float]:
        def next_loss(gen: torch.Generator) -> torch.Tensor:
            idx = torch.randint(0, len(y), (batch,), generator=gen)
            return F.cross_entropy(model(x[idx]), y[idx])
        return _train_loop(model, hparams, seed, steps, warmup, optimizer, next_loss)
    return train
