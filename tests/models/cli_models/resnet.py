"""ResNet (``ResNetForImageClassification``) for
``mupkit coord-check --model tests/models/cli_models/resnet.py:make``.

``make(width, base_width=None)``: the model of ``tests/models/architectures.py`` at depth 2;
``base_width`` applies muP's forward (attention at ``1/d`` pinned at the base). No attention:
``base_width`` changes nothing. ``batch()``: the inputs and targets the check trains on.
"""

from __future__ import annotations

import pathlib
import sys

_MODELS = str(pathlib.Path(__file__).resolve().parents[1])  # tests/models: architectures.py
if _MODELS not in sys.path:
    sys.path.insert(0, _MODELS)

import architectures  # noqa: E402

DEPTH = 2


def make(width: int = 64, base_width: int | None = None):
    return architectures.resnet(width, DEPTH, base_width=base_width)


def batch():
    return architectures.image_batch()
