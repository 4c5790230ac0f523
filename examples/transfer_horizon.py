"""LR transfer across token horizon and batch size: fit on short runs, predict a long run and a wider model.

Data: next-byte prediction on the Python standard library's sources (mupkit.tasks.text_lm).
Model: mupkit's GPT under muP (2 layers, base width 32, 1/d attention), AdamW over
``mupkit.param_groups``, the WSD schedule (20 warmup steps, linear cooldown over the last 20%).

1. Proxy sweep at width 32: the LR grid at horizons T, 2T, 4T (T = 200 steps x 16 x 64 tokens)
   with batch 16, and the same token budgets with batch 32; plus width 64 at T.
2. Fit ``LR* = c * tokens^e_T * batch^e_B * width^e_W`` (bootstrap intervals) and predict the
   optimum at 8T (batch 16) for width 32 and width 128.
3. Held-out: sweep the LR at 8T for both widths and compare the measured optimum with the
   prediction.

Trials go to examples/transfer_horizon.jsonl (a rerun only fits and draws; delete it to retrain)
and run on 2 worker processes through an Optuna study (SQLite next to the results file).

    python examples/transfer_horizon.py [--workers 2] [--out examples/transfer_horizon.png]
"""

from __future__ import annotations

import argparse
import math

import torch

from mupkit.transfer import Sweep, sweep
from mupkit.zoo import BUILTIN

BASE, WIDE, CONTEXT, T_STEPS = 32, 128, 64, 200
PROXY_LRS = [2.0 ** k for k in range(-12, -5)]  # octave grid
RUNS_B16 = [{"steps": T_STEPS * m, "batch": 16, "context": CONTEXT, "schedule": "wsd"} for m in (1, 2, 4)]
RUNS_B32 = [{"steps": T_STEPS * m // 2, "batch": 32, "context": CONTEXT, "schedule": "wsd"} for m in (1, 2, 4)]
TARGET = {"steps": T_STEPS * 8, "batch": 16, "context": CONTEXT, "schedule": "wsd"}
TARGET_LRS = [2.0 ** k for k in range(-11, -5)]  # the held-out grid: 6 octaves around the proxy optima


def tokens(run: dict) -> int:
    return run["steps"] * run["batch"] * run["context"]


def main() -> None:
    torch.set_num_threads(1)  # the machine is shared; the workers take one core each
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="examples/transfer_horizon.jsonl")
    parser.add_argument("--out", default="examples/transfer_horizon.png")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    definition = BUILTIN["transformer"]
    task = definition.transfer
    common = dict(base={"width": BASE}, trainer=task.trainer, parametrizations=["mup"], seeds=args.seeds,
                  results=args.results, kwargs=task.kwargs("mup", BASE), workers=args.workers)
    proxy = sweep(definition.constructor, [BASE], grid={"lr": PROXY_LRS}, runs=RUNS_B16 + RUNS_B32, **common)
    wider = sweep(definition.constructor, [2 * BASE], grid={"lr": PROXY_LRS}, runs=RUNS_B16[:1], **common)
    fit = Sweep(proxy.records + wider.records)
    print(fit.summary())
    law = fit.scaling("mup")
    print("joint fit:", law.describe("lr*"))
    predictions = {w: fit.recommend("mup", width=w, tokens=tokens(TARGET), batch=16) for w in (BASE, WIDE)}
    for w, rec in predictions.items():
        if not TARGET_LRS[0] < rec.value < TARGET_LRS[-1]:
            print(f"note: the prediction for width {w} lies outside the held-out grid; widen TARGET_LRS")
    held_out = sweep(definition.constructor, [BASE, WIDE], grid={"lr": TARGET_LRS}, runs=[TARGET], **common)
    print(held_out.summary())
    measured = {o.size["width"]: o for o in held_out.optima("mup")}
    for w, rec in predictions.items():
        o = measured[w]
        miss = math.log2(o.fitted / rec.value)
        print(f"width {w} at 8T: predicted lr* {rec.value:.3g} [{rec.low:.3g}, {rec.high:.3g}] ({rec.how}); "
              f"measured {o.fitted:.3g} (grid best {o.grid_best:.3g}{', at the edge' if o.at_edge else ''}); "
              f"miss {miss:+.2f} octaves")
    plot(fit, held_out, predictions, args.out)
    print(f"figure: {args.out}")


def plot(fit: Sweep, held_out: Sweep, predictions: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {16: "tab:blue", 32: "tab:orange"}
    for fitted in fit.fits("mup", "tokens"):
        batch = int(fitted.fixed["batch"])
        points = [(fit.axis_value(o, "tokens"), o.fitted) for o in fit.optima("mup")
                  if o.run["batch"] == batch and o.size["width"] == BASE]
        xs, ys = zip(*sorted(points))
        lo, hi = fitted.law.intervals["tokens"]
        left.plot(xs, ys, "o", color=colors[batch], label=f"width {BASE}, batch {batch}: measured optima")
        grid = np.geomspace(min(xs), tokens(TARGET), 50)
        left.plot(grid, [fitted.law(tokens=t) for t in grid], "-", color=colors[batch], alpha=0.6,
                  label=f"fit: tokens^{fitted.law.exponents['tokens']:+.2f} [{lo:+.2f}, {hi:+.2f}]")
    wider = [o for o in fit.optima("mup") if o.size["width"] == 2 * BASE]
    left.plot([fit.axis_value(o, "tokens") for o in wider], [o.fitted for o in wider], "s", color="tab:green",
              label=f"width {2 * BASE}, batch 16")
    for w, marker, color in ((BASE, "*", "tab:blue"), (WIDE, "P", "tab:red")):
        rec = predictions[w]
        t = tokens(TARGET) * (1.04 if w == WIDE else 0.96)
        left.errorbar([t], [rec.value], yerr=[[rec.value - rec.low], [rec.high - rec.value]], fmt="none",
                      color=color, capsize=4)
        left.plot([t], [rec.value], "D", mfc="none", color=color, ms=8, label=f"width {w} at 8T: predicted")
        measured = [o for o in held_out.optima("mup") if o.size["width"] == w][0]
        left.plot([t], [measured.fitted], marker, color=color, ms=13, mec="black", label=f"width {w} at 8T: measured")
    left.set(xscale="log", yscale="log", xlabel="tokens (steps x batch x context)", ylabel="optimal lr",
             title="Optimal LR vs token horizon (muP GPT, WSD)")
    left.set_xscale("log", base=2)
    left.set_yscale("log", base=2)
    left.legend(fontsize=6.5)
    for o in held_out.optima("mup"):
        per = held_out.losses("mup")[[k for k in held_out.losses("mup") if f'"width": {o.size["width"]}' in k][0]]
        xs = sorted(per)
        right.plot(xs, [np.mean(per[x]) for x in xs], "-o", ms=3, label=f"width {o.size['width']} at 8T")
        right.axvline(predictions[o.size["width"]].value, ls="--", color=right.lines[-1].get_color(), alpha=0.7)
    right.set_xscale("log", base=2)
    right.set(xlabel="lr", ylabel="tail training loss", title="Held-out 8T sweep (dashed: predicted optimum)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
