"""Adapters for model libraries: :mod:`mupkit.integrations.hf` (HuggingFace transformers)."""
