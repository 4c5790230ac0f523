"""Step-time cost of muP parameter groups on top of torch's AdamW kernels (CPU).

Compares, on the same parameters and gradients, in the same run:
  torch  : torch.optim.AdamW with one group (the SP baseline)
  mupkit : mupkit.optim.AdamW with mupkit.param_groups(model) (a handful of muP groups)
  split  : mupkit.optim.AdamW with one group per tensor (the worst case muP grouping could give)
for foreach and fused implementations. Prints medians of interleaved windows and the ratios.

    python benchmarks/bench_param_groups.py [--width 512] [--depth 8] [--repeats 7]
"""

from __future__ import annotations

import statistics

import torch

import mupkit
from common import setup, timed_steps


def main() -> None:
    args, model, params, groups = setup(__doc__.splitlines()[0], steps=10, repeats=7)
    print(f"{'impl':8s} {'torch 1 group':>14s} {'mupkit':>10s} {'per-tensor':>11s} {'mupkit/torch':>13s} "
          f"{'per-tensor/torch':>17s}")
    for impl in ({"foreach": True}, {"fused": True}):
        opts = {
            "torch": torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, **impl),
            "mupkit": mupkit.optim.AdamW(groups, lr=1e-3, weight_decay=0.1, **impl),
            "split": mupkit.optim.AdamW([{"params": [p]} for p in params], lr=1e-3, weight_decay=0.1, **impl),
        }
        for opt in opts.values():
            timed_steps(opt, 2)  # state init and warm-up
        samples: dict[str, list[float]] = {k: [] for k in opts}
        for _ in range(args.repeats):  # interleaved A/B/C windows
            for key, opt in opts.items():
                samples[key].append(timed_steps(opt, args.steps))
        med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
        name = next(iter(impl))
        print(f"{name:8s} {med['torch']:12.2f}ms {med['mupkit']:8.2f}ms {med['split']:9.2f}ms "
              f"{med['mupkit'] / med['torch']:13.3f} {med['split'] / med['torch']:17.3f}")


if __name__ == "__main__":
    main()
