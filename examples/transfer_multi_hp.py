"""Several HPs at once, as Tensor Programs V tuned them: a random search over LR, init multiplier,
output multiplier and weight decay for the muP MLP on the digits, at widths 64 and 256.

Same task as examples/transfer_digits.py (100 AdamW steps of batch 64, 2 seeds, mean loss of the
last 10 steps). The points are drawn by Optuna's RandomSampler from octave grids (the LR grid is
transfer_digits'), 2 worker processes run them. Prints each HP's optimum and sensitivity (the
loss lost one grid step from the best), compares the LR optimum with the one of the LR-only
sweep in examples/transfer_digits.jsonl, and draws the loss profile per HP. Trials go to
examples/transfer_multi_hp.jsonl (a rerun only reports).

    python examples/transfer_multi_hp.py [--trials 48] [--workers 2]
"""

from __future__ import annotations

import argparse
import math

import torch

from mupkit.transfer import Sweep, load_records, sweep
from mupkit.zoo import BUILTIN

WIDTHS = [64, 256]
STEPS = 100


def grid() -> dict[str, list[float]]:
    return {"lr": [2.0 ** k for k in BUILTIN["mlp"].transfer.log2_lrs],
            "init_mult": [2.0 ** k for k in range(-2, 3)],
            "output_mult": [2.0 ** k for k in range(-2, 3)],
            "weight_decay": [2.0 ** k for k in range(-10, 0, 2)]}


def main() -> None:
    torch.set_num_threads(1)  # the machine is shared; the workers take one core each
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=48)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--results", default="examples/transfer_multi_hp.jsonl")
    parser.add_argument("--out", default="examples/transfer_multi_hp.png")
    args = parser.parse_args()
    task = BUILTIN["mlp"].transfer
    result = sweep(BUILTIN["mlp"].constructor, WIDTHS, base={"width": WIDTHS[0]}, grid=grid(),
                   train=task.trainer(STEPS), parametrizations=["mup"], seeds=2, results=args.results,
                   kwargs=task.kwargs("mup", WIDTHS[0]), tag=f"steps={STEPS}", search="random", trials=args.trials,
                   workers=args.workers)
    print(result.summary())
    lr_only = Sweep([r for r in load_records("examples/transfer_digits.jsonl")
                     if r["model"] == "mupkit.models.mlp" and r["parametrization"] == "mup"])
    reference = {o.size["width"]: o for o in lr_only.optima("mup")}
    for o in result.optima("mup"):
        ref = reference[o.size["width"]]
        print(f"width {o.size['width']}: random-search lr* {o.grid_best:.3g} (others {dict(o.others)}), LR-only "
              f"sweep lr* {ref.grid_best:.3g}: {abs(math.log2(o.grid_best / ref.grid_best)):.0f} grid step(s) apart")
    result.plot(args.out, title="muP MLP on digits: random search over 4 HPs (top: lr; bottom: loss profile per HP)")
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
