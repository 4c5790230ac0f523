"""Optimizers that read mupkit's per-group muP multipliers."""

from .adafactor import Adafactor
from .adam_atan2 import AdamAtan2
from .dadapt import DAdaptAdaGrad, DAdaptAdam, DAdaptLion, DAdaptSGD, Prodigy
from .muon import Muon
from .scaled_adam import ScaledAdam
from .shampoo import SOAP
from .schedules import Eden, Eden2
from .torch_based import SGD, Adam, AdamW

#: the names the CLI and :func:`mupkit.coord_check` accept
BY_NAME = {"adam": Adam, "adamw": AdamW, "sgd": SGD, "adam-atan2": AdamAtan2, "adafactor": Adafactor,
           "dadapt-adam": DAdaptAdam, "dadapt-sgd": DAdaptSGD, "dadapt-lion": DAdaptLion,
           "dadapt-adagrad": DAdaptAdaGrad, "prodigy": Prodigy,
           "scaled-adam": ScaledAdam, "muon": Muon, "shampoo": SOAP, "soap": SOAP}


def get_optimizer(name: str) -> type:
    """A mupkit optimizer class from its name (case-insensitive; ``adamatan2`` = ``adam-atan2``)."""
    key = name.lower().replace("_", "-")
    key = {"adamatan2": "adam-atan2", "dadaptadam": "dadapt-adam", "scaledadam": "scaled-adam"}.get(key, key)
    if key not in BY_NAME:
        raise ValueError(f"unknown optimizer {name!r}; use one of {sorted(BY_NAME)}, a mupkit.optim class or a "
                         f"torch.optim class")
    return BY_NAME[key]


__all__ = ["Adafactor", "Adam", "AdamAtan2", "AdamW", "BY_NAME", "DAdaptAdaGrad", "DAdaptAdam", "DAdaptLion",
           "DAdaptSGD", "Eden", "Eden2", "Muon", "Prodigy", "SGD", "SOAP", "ScaledAdam", "get_optimizer"]
