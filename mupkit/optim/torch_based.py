"""muP-aware drop-in replacements for ``torch.optim.Adam``, ``AdamW`` and ``SGD``.

They run torch's own kernels (single-tensor, foreach or fused, chosen by torch's dispatcher
and the usual ``foreach=``/``fused=`` arguments) with each group's ``lr * lr_scale``,
weight decay per policy and ``eps * eps_scale`` (see :mod:`mupkit.optim.scaled`). Pass
``mupkit.param_groups(model)``, or plain parameters (all scales 1: exactly torch's class).
"""

from __future__ import annotations

import torch

from ..rules import FAMILIES
from .scaled import ScaledGroups


class Adam(ScaledGroups, torch.optim.Adam):
    """``torch.optim.Adam`` (L2 weight decay added to the gradient) with muP group scales."""

    family = FAMILIES["adam"]


class AdamW(ScaledGroups, torch.optim.AdamW):
    """``torch.optim.AdamW`` (decoupled weight decay) with muP group scales."""

    family = FAMILIES["adamw"]


class SGD(ScaledGroups, torch.optim.SGD):
    """``torch.optim.SGD`` with muP group scales (TP5 Table 8 SGD column)."""

    family = FAMILIES["sgd"]
