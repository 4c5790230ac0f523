"""A minimal coordinate check for the tests (the full tool is mupkit.coord_check, a later issue).

Records mean |output| of every leaf module (and of Attention/Block containers) at init (step 0)
and after each optimizer step, for every width and seed, then fits the slope of
log(mean |output|) against log(width) per (module, step), averaged over seeds.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

import mupkit


def record(model: nn.Module, batch, loss_fn, optimizer, steps: int) -> dict[tuple[str, int], float]:
    sizes: dict[tuple[str, int], float] = {}
    step = [0]

    def hook(name):
        def fn(module, args, out):
            if isinstance(out, torch.Tensor) and out.is_floating_point() and out.abs().max() > 0:
                sizes[(name, step[0])] = out.detach().abs().mean().item()
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        for step[0] in range(steps + 1):
            out = model(batch[0])
            loss = loss_fn(out, batch[1])
            if step[0] == steps:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        for h in handles:
            h.remove()
    return sizes


def slopes(constructor, widths, *, base, param, optim="adam", lr=1e-2, steps=4, seeds=(0, 1), batch, loss_fn,
           width_key="width", **extra):
    """{(module, step): slope of log mean|out| vs log width}, averaged over seeds."""
    logs: dict[tuple[str, int], list[list[float]]] = {}
    for seed in seeds:
        for w in widths:
            torch.manual_seed(seed)
            model = mupkit.build(constructor, base={width_key: base, **extra}, target={width_key: w, **extra},
                                 delta={width_key: 2 * base, **extra}, parametrization=param)
            opt = {"adam": mupkit.optim.Adam, "sgd": mupkit.optim.SGD}[optim](mupkit.param_groups(model), lr=lr)
            for key, v in record(model, batch, loss_fn, opt, steps).items():
                logs.setdefault(key, [[] for _ in seeds])[seeds.index(seed)].append(math.log(v))
    x = np.log(np.asarray(widths, dtype=float))
    return {key: float(np.mean([np.polyfit(x, np.asarray(ys), 1)[0] for ys in per_seed]))
            for key, per_seed in logs.items()}
