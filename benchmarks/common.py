"""Shared benchmark plumbing: the parameter set every optimizer benchmark steps, and a timer.

The GPT lives on CUDA when there is a device (``--device`` chooses); the timer synchronizes it."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

import mupkit
from mupkit import models


def gpt_parameters(width: int, depth: int, device: str = "cpu",
                   vocab: int = 512) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """A muP GPT from mupkit.models (base width 64) on ``device`` with random gradients set."""
    torch.manual_seed(0)
    sizes = dict(depth=depth, base_width=64, vocab=vocab)
    model = mupkit.build(models.gpt, base=dict(width=64, **sizes), target=dict(width=width, **sizes)).to(device)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return model, params


def timed_steps(opt: torch.optim.Optimizer, steps: int) -> float:
    """Seconds per ``opt.step()``, averaged over ``steps`` calls (CUDA work included)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    sync()
    return (time.perf_counter() - start) / steps


def accelerated(title: str, device: str, make: Callable[..., torch.optim.Optimizer]) -> dict[str, Callable]:
    """The row of the device's fast explicit path: ``compiled=True`` on the CPU, the Triton
    kernels (``fused=True``) on CUDA; ``title`` has a ``{}`` for the path's name."""
    path = "fused" if device == "cuda" else "compiled"
    return {title.format(path): lambda: make(**{path: True})}


def compare(title: str, makers: dict[str, Callable[[], torch.optim.Optimizer]], reference: str, steps: int,
            repeats: int) -> None:
    opts = {name: make() for name, make in makers.items()}
    for opt in opts.values():
        timed_steps(opt, 2)  # state init, compilation, warm-up
    samples: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(repeats):  # interleaved windows: slow drifts of the machine hit all alike
        for name, opt in opts.items():
            samples[name].append(timed_steps(opt, steps))
    med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    print(f"\n{title}  (ratio = {reference} time / this time; > 1 is faster than {reference})")
    print(f"{'implementation':44s} {'ms/step':>9s} {'ratio':>7s}")
    for name, ms in med.items():
        print(f"{name:44s} {ms:9.2f} {med[reference] / ms:7.2f}")


def setup(description: str, steps: int = 5,
          repeats: int = 5) -> tuple[argparse.Namespace, torch.nn.Module, list[torch.Tensor], list[dict]]:
    """Parse the common flags (--width, --depth, --vocab, --steps, --repeats, --device), build the GPT, print
    the header."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=512,
                        help="vocabulary size (50304: a GPT-2-sized embedding and unembedding)")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    model, params = gpt_parameters(args.width, args.depth, args.device, args.vocab)
    groups = mupkit.param_groups(model)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; {sum(p.numel() for p in params) / 1e6:.1f}M "
          f"params in {len(params)} tensors; muP groups: {len(groups)}")
    return args, model, params, groups
