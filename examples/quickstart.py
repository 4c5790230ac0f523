"""Quickstart: a muP MLP trained at two widths with the same hyperparameters, on real text.

Data: next-byte prediction on the Python standard library's own source files (shipped with
the interpreter, so nothing is downloaded): the previous 8 bytes, one-hot, predict the next.
The proxy (width 128) and the 8x wider model use the *same* learning rate; under muP the wide
model trains at least as well, under SP the same LR is too large for it.

    python examples/quickstart.py [--steps 300] [--lr 0.01]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import mupkit
from mupkit import models
from mupkit.data import stdlib_corpus

CONTEXT = 8
FIXED = dict(d_in=CONTEXT * 256, d_out=256)  # constructor kwargs that do not scale


def batches(data: torch.Tensor, batch: int, generator: torch.Generator):
    while True:
        start = torch.randint(0, len(data) - CONTEXT - 1, (batch,), generator=generator)
        window = data[start[:, None] + torch.arange(CONTEXT + 1)]
        x = F.one_hot(window[:, :CONTEXT], 256).flatten(1).float()
        yield x, window[:, CONTEXT]


def train(width: int, param: str, data: torch.Tensor, lr: float, steps: int) -> float:
    torch.manual_seed(0)
    model = mupkit.build(models.mlp, base=dict(width=128, **FIXED), delta=dict(width=256, **FIXED),
                         target=dict(width=width, **FIXED), parametrization=param)
    opt = mupkit.optim.Adam(mupkit.param_groups(model), lr=lr)
    stream = batches(data, 256, torch.Generator().manual_seed(1))
    recent = []
    for step in range(steps):
        x, y = next(stream)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        recent = (recent + [loss.item()])[-50:]
    return sum(recent) / len(recent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()
    data = stdlib_corpus(limit=2_000_000)
    print(f"data: {len(data):,} bytes of Python stdlib source; next-byte prediction from {CONTEXT} bytes")
    print(f"same lr={args.lr} for every width; loss = mean of the last 50 of {args.steps} steps\n")
    print(mupkit.explain(mupkit.infer_plan(models.mlp, base=dict(width=128, **FIXED),
                                           target=dict(width=1024, **FIXED))), "\n")
    print(f"{'param':6s} {'width':>6s} {'train loss':>11s} {'time':>6s}")
    for param in ("mup", "sp"):
        for width in (128, 1024):
            start = time.perf_counter()
            loss = train(width, param, data, args.lr, args.steps)
            print(f"{param:6s} {width:6d} {loss:11.4f} {time.perf_counter() - start:5.1f}s")


if __name__ == "__main__":
    main()
