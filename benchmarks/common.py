"""Shared benchmark plumbing: the parameter set every optimizer benchmark steps, and a timer."""

from __future__ import annotations

import time

import torch

import mupkit
from mupkit import models


def gpt_parameters(width: int, depth: int) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """A muP GPT from mupkit.models (vocab 512, base width 64) with random gradients set."""
    torch.manual_seed(0)
    sizes = dict(depth=depth, base_width=64, vocab=512)
    model = mupkit.build(models.gpt, base=dict(width=64, **sizes), target=dict(width=width, **sizes))
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return model, params


def timed_steps(opt: torch.optim.Optimizer, steps: int) -> float:
    """Seconds per ``opt.step()``, averaged over ``steps`` calls."""
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - start) / steps
