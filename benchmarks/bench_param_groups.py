"""Step-time cost of muP parameter groups on top of torch's AdamW kernels (CPU).

Compares, on the same parameters and gradients, in the same run:
  torch  : torch.optim.AdamW with one group (the SP baseline)
  mupkit : mupkit.optim.AdamW with mupkit.param_groups(model) (a handful of muP groups)
  split  : mupkit.optim.AdamW with one group per tensor (the worst case muP grouping could give)
for foreach and fused implementations. Prints medians of interleaved windows and the ratios.

    python benchmarks/bench_param_groups.py [--width 512] [--depth 8] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics

import torch

import mupkit
from common import gpt_parameters, timed_steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    model, params = gpt_parameters(args.width, args.depth)
    n = sum(p.numel() for p in params)
    groups = mupkit.param_groups(model)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {n / 1e6:.1f}M params in {len(params)} "
          f"tensors; muP groups: {len(groups)}")
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
