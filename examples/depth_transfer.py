"""Learning-rate transfer across depth: a GPT on real text at depths 2 and 16, muP vs CompleteP.

Data: next-byte prediction on the Python standard library's sources (mupkit.data.stdlib_corpus;
deterministic train/val split, nothing downloaded). Width 64 is fixed; the depth-2 model is the
proxy (base) and the depth-16 model is built from it with mupkit.build. For each parametrization
and depth, AdamW runs a grid of learning rates (factor 2 apart) through mupkit.transfer.sweep and
the validation loss after training is reported; the optimum should stay put under CompleteP (Dey
et al. 2025). Every run is appended to the results file (resumable; the committed file holds the
figure's numbers), and the table, the drift and the figure are printed and saved.

    python examples/depth_transfer.py [--steps 200] [--seeds 2] [--results examples/depth_transfer.jsonl]
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import mupkit
from mupkit import models
from mupkit.data import stdlib_corpus, token_windows
from mupkit.transfer import sweep

FIXED = dict(width=64, base_width=64, n_head=4, vocab=256, max_len=64)
CONTEXT, BATCH = 64, 16


def validation_loss(steps: int):
    """``train(model, hparams, seed) -> [validation loss]``: AdamW with a 20-step warmup on random
    stdlib windows, then the loss on 64 fixed validation windows (inf if training diverged)."""
    corpus = stdlib_corpus("train")
    val = token_windows(stdlib_corpus("val"), 64, CONTEXT, torch.Generator().manual_seed(7))

    def train(model: torch.nn.Module, hparams, seed: int) -> list[float]:
        opt = mupkit.optim.AdamW(mupkit.param_groups(model), lr=hparams["lr"], weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 20))
        gen = torch.Generator().manual_seed(1000 + seed)
        for _ in range(steps):
            x, y = token_windows(corpus, BATCH, CONTEXT, gen)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            if not torch.isfinite(loss):
                return [math.inf]
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            return [F.cross_entropy(model(val[0]).flatten(0, 1), val[1].flatten()).item()]
    return train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--log2-lrs", type=int, nargs="+", default=list(range(-11, -3)))
    parser.add_argument("--results", default="examples/depth_transfer.jsonl")
    parser.add_argument("--out", default="examples/depth_transfer.png")
    args = parser.parse_args()
    result = sweep(models.gpt, [dict(depth=d, **FIXED) for d in args.depths], base=dict(depth=2, **FIXED),
                   delta=dict(depth=2, **{**FIXED, "width": 128}), grid={"lr": [2.0 ** k for k in args.log2_lrs]},
                   train=validation_loss(args.steps), parametrizations=["mup", "completep"], seeds=args.seeds,
                   results=args.results, tag=f"steps={args.steps}")
    result.metric = "final_loss"  # the validation loss
    print(result.summary())
    result.plot(args.out, title=f"GPT on stdlib bytes, width 64: Adam LR transfer from depth {args.depths[0]} "
                                f"(validation loss after {args.steps} steps; star: optimum)")
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
