"""T5 (``T5ForConditionalGeneration``) for
``mupkit coord-check --model tests/models/cli_models/t5.py:make``.

``make(width, base_width=None)``: the model of ``tests/models/architectures.py`` at depth 2;
``base_width`` applies muP's forward (attention at ``1/d`` pinned at the base). Tied readout by
default (``tie=False`` gives it its own weight); ``zero_query`` zero-initializes the queries.
``batch()``: the inputs and targets the check trains on.
"""

from __future__ import annotations

import pathlib
import sys

_MODELS = str(pathlib.Path(__file__).resolve().parents[1])  # tests/models: architectures.py
if _MODELS not in sys.path:
    sys.path.insert(0, _MODELS)

import architectures  # noqa: E402

DEPTH = 2


def make(width: int = 64, base_width: int | None = None, tie: bool = True, zero_query: bool = False):
    return architectures.t5(width, DEPTH, base_width=base_width, tie=tie, zero_query=zero_query)


def batch():
    return architectures.token_batch()
