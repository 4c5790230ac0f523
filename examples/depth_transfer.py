"""Learning-rate transfer across depth: a GPT on real text at depths 2 and 16, muP vs CompleteP.

Data: next-byte prediction on the Python standard library's sources (mupkit.data.stdlib_corpus;
deterministic train/val split, nothing downloaded). Width 64 is fixed; the depth-2 model is the
proxy (base) and the depth-16 model is built from it with mupkit.build. For each parametrization
and depth, Adam runs a grid of learning rates (factor 2 apart) and the validation loss after
training is reported; the optimum should stay put under CompleteP (Dey et al. 2025) and drift
under plain muP, whose residual stream grows with depth.

    python examples/depth_transfer.py [--steps 300] [--seeds 2] [--out examples/depth_transfer.png]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

import mupkit
from mupkit import models
from mupkit.data import stdlib_corpus, token_windows
from mupkit.progress import progress

FIXED = dict(width=64, base_width=64, n_head=4, vocab=256, max_len=64)
CONTEXT, BATCH = 64, 16


def run(parametrization: str, depth: int, lr: float, seed: int, steps: int, train: torch.Tensor,
        val: tuple[torch.Tensor, torch.Tensor]) -> float:
    torch.manual_seed(seed)
    model = mupkit.build(models.gpt, base=dict(depth=2, **FIXED), delta=dict(depth=2, **{**FIXED, "width": 128}),
                         target=dict(depth=depth, **FIXED), parametrization=parametrization)
    opt = mupkit.optim.AdamW(mupkit.param_groups(model), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 20))  # short warmup
    gen = torch.Generator().manual_seed(1000 + seed)
    for _ in range(steps):
        x, y = token_windows(train, BATCH, CONTEXT, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        if not torch.isfinite(loss):
            return math.inf
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return F.cross_entropy(model(val[0]).flatten(0, 1), val[1].flatten()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--log2-lrs", type=int, nargs="+", default=list(range(-12, -3)))
    parser.add_argument("--out", default="examples/depth_transfer.png")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train = stdlib_corpus("train")
    val = token_windows(stdlib_corpus("val"), 64, CONTEXT, torch.Generator().manual_seed(7))
    lrs = [2.0 ** k for k in args.log2_lrs]
    jobs = [(p, d, lr, s) for p in ("mup", "completep") for d in args.depths for lr in lrs for s in range(args.seeds)]
    losses: dict[tuple[str, int, float], list[float]] = {}
    start = time.perf_counter()
    for p, d, lr, s in progress(jobs, "depth transfer", label=lambda j: f"{j[0]} depth {j[1]} lr 2^{math.log2(j[2]):.0f}"):
        losses.setdefault((p, d, lr), []).append(run(p, d, lr, s, args.steps, train, val))
    print(f"\n{len(jobs)} runs in {time.perf_counter() - start:.0f} s; validation loss (mean over {args.seeds} seeds)")
    print(f"{'param':10s} {'depth':>5s} " + " ".join(f"{'2^' + str(k):>7s}" for k in args.log2_lrs) + "   optimum")
    optimum = {}
    for p in ("mup", "completep"):
        for d in args.depths:
            row = [sum(losses[p, d, lr]) / len(losses[p, d, lr]) for lr in lrs]
            best = min(range(len(lrs)), key=lambda i: row[i])
            optimum[p, d] = args.log2_lrs[best]
            print(f"{p:10s} {d:5d} " + " ".join(f"{v:7.3f}" for v in row) + f"   2^{optimum[p, d]}")
    for p in ("mup", "completep"):
        shift = optimum[p, args.depths[-1]] - optimum[p, args.depths[0]]
        print(f"{p}: optimum moves {shift:+d} grid points (factor 2 each) from depth {args.depths[0]} to "
              f"{args.depths[-1]}")
    plot(losses, lrs, args, optimum)


def plot(losses, lrs, args, optimum) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, p in zip(axes, ("mup", "completep")):
        for d in args.depths:
            row = [sum(losses[p, d, lr]) / len(losses[p, d, lr]) for lr in lrs]
            line, = ax.plot(lrs, row, marker="o", label=f"depth {d}")
            ax.axvline(2.0 ** optimum[p, d], color=line.get_color(), ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("Adam learning rate")
        ax.set_title(f"{p}: optimum " + ", ".join(f"2^{optimum[p, d]} (depth {d})" for d in args.depths), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel(f"validation loss after {args.steps} steps")
    finite = [v for vs in losses.values() for v in vs if math.isfinite(v)]
    axes[0].set_ylim(min(finite) - 0.05, min(max(finite), min(finite) + 1.5))
    fig.suptitle("GPT on Python stdlib bytes, width 64: learning-rate transfer from depth 2", fontsize=10)
    fig.savefig(args.out, dpi=120)
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
