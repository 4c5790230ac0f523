"""Explicit muP building blocks and the unit-scaled u-muP parts.

* :mod:`mupkit.nn.multipliers`: forward multipliers that are not absorbed into init and LR
  (tied-readout input scale, attention scale, residual branch multiplier).
* :mod:`mupkit.nn.functional` and :mod:`mupkit.nn.unit`: u-muP's unit-scaled ops and the
  modules built on them (Blake et al. 2024), for ``parametrization="umup"``.
"""

from . import functional
from .multipliers import InputScale, attention_scale, branch_multiplier, residual, residual_scale
from .unit import (MHSA, MLP, DepthModuleList, Embedding, LayerNorm, Linear, LinearReadout, RMSNorm,
                   TransformerDecoder, TransformerLayer)

__all__ = ["DepthModuleList", "Embedding", "InputScale", "LayerNorm", "Linear", "LinearReadout", "MHSA", "MLP",
           "RMSNorm", "TransformerDecoder", "TransformerLayer", "attention_scale", "branch_multiplier", "functional",
           "residual", "residual_scale"]
