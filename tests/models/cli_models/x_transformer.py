"""x-transformers (``TransformerWrapper(Decoder)``) for
``mupkit coord-check --model tests/models/cli_models/x_transformer.py:make``.

``make(width, base_width=None, tie=True)``: the model of ``tests/models/architectures.py`` at
depth 2, inside a one-attribute wrapper (``net``). With ``tie=True`` the logits are
``x @ emb.weight.t() * scale`` in the wrapper's forward, made by no module; the coordinate check
records module outputs and not the root's, so without the wrapper the tied logits would go
unmeasured; with it they are ``net``'s output. ``base_width`` applies muP's forward (attention at
``1/d`` pinned at the base; positions' and tied logits' ``dim**-0.5`` pinned at the base).
``batch()``: the inputs and targets the check trains on.
"""

from __future__ import annotations

import pathlib
import sys

from torch import nn

_MODELS = str(pathlib.Path(__file__).resolve().parents[1])  # tests/models: architectures.py
if _MODELS not in sys.path:
    sys.path.insert(0, _MODELS)

import architectures  # noqa: E402

DEPTH = 2


class Logits(nn.Module):
    """``ids -> logits`` of the wrapped model, so its output is a recorded module's output."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, ids):
        return self.net(ids)


def make(width: int = 64, base_width: int | None = None, tie: bool = True):
    return Logits(architectures.x_transformer(width, DEPTH, base_width=base_width, tie=tie))


def batch():
    return architectures.token_batch()
