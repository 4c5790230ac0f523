"""u-muP's unit-scaled ops and the modules built on them (Blake et al. 2024), for ``parametrization="umup"``.

These are *not* plain layers: every weight is initialized ``N(0, 1)`` and the width multipliers
live in the ops, so :class:`Linear` computes ``x W^T / fan_in^1/2`` and has no bias by default.
For muP on ordinary ``torch.nn`` layers use :func:`mupkit.build` (its explicit forward
multipliers are in :mod:`mupkit.nn`).

* :mod:`mupkit.unit.scale`: ``scale(x, fwd, bwd)``, separate forward and backward scales, the
  primitive of unit scaling.
* :mod:`mupkit.unit.functional`: unit-scaled ops (linear, activations, softmax, attention, norms,
  residual split/add, losses).
* :mod:`mupkit.unit.modules`: modules on those ops (:class:`Linear`, :class:`LinearReadout`,
  :class:`Embedding`, norms, :class:`MHSA`, :class:`MLP`, :class:`TransformerDecoder`), each
  declaring its parameters' roles, and :class:`DepthModuleList` for repeated blocks.
* :mod:`mupkit.unit.fp8`: :class:`~mupkit.unit.fp8.simulate_fp8`, matmul inputs rounded to FP8
  (unit scaling's claim: unit-scale tensors fit a low-precision format without scale factors).
"""

from . import functional, scale
from .modules import (MHSA, MLP, DepthModuleList, Embedding, LayerNorm, Linear, LinearReadout, RMSNorm,
                      TransformerDecoder, TransformerLayer)

__all__ = ["DepthModuleList", "Embedding", "LayerNorm", "Linear", "LinearReadout", "MHSA", "MLP", "RMSNorm",
           "TransformerDecoder", "TransformerLayer", "functional", "scale"]
