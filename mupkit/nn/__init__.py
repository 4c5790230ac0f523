"""Explicit muP building blocks (forward multipliers that are not absorbed into init and LR)."""

from .multipliers import InputScale, attention_scale, residual, residual_scale

__all__ = ["InputScale", "attention_scale", "residual", "residual_scale"]
