"""Optimizers that read mupkit's per-group muP multipliers."""

from .torch_based import SGD, Adam, AdamW

__all__ = ["Adam", "AdamW", "SGD"]
