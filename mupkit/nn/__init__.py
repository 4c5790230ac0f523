"""Explicit muP building blocks: forward multipliers that are not absorbed into init and LR
(:mod:`mupkit.nn.multipliers`: tied-readout input scale, attention scale, residual branch
multiplier), for ordinary ``torch.nn`` models built with :func:`mupkit.build`.

u-muP's unit-scaled ops and modules (``Linear`` with no bias and ``N(0, 1)`` init,
``TransformerDecoder``, ...) are in :mod:`mupkit.unit`.
"""

from . import multipliers
from .multipliers import InputScale, attention_scale, branch_multiplier, residual, residual_scale

__all__ = ["InputScale", "attention_scale", "branch_multiplier", "multipliers", "residual", "residual_scale"]

#: names that moved to :mod:`mupkit.unit` (u-muP's unit-scaled modules and ops) -> what they are
_MOVED = {**dict.fromkeys(["Linear", "LinearReadout"], "u-muP unit-scaled: no bias by default, N(0, 1) init, "
                                                       "fan_in scaling in the op"),
          **dict.fromkeys(["DepthModuleList", "Embedding", "LayerNorm", "MHSA", "MLP", "RMSNorm", "TransformerDecoder",
                           "TransformerLayer"], "u-muP unit-scaled: N(0, 1) init, width scaling in the ops"),
          **dict.fromkeys(["functional", "scale", "fp8"], "u-muP's unit-scaled ops"),
          "unit": "u-muP's unit-scaled modules"}


def __getattr__(name: str):
    if name in _MOVED:
        target = "mupkit.unit.modules" if name == "unit" else f"mupkit.unit.{name}"
        raise AttributeError(f"mupkit.nn.{name} moved to {target} ({_MOVED[name]}); mupkit.nn keeps only the muP "
                             f"multipliers ({', '.join(__all__)})")
    raise AttributeError(f"module 'mupkit.nn' has no attribute {name!r}")
