"""What ``mupkit.build`` costs on top of the user's own constructor, on a GPT base/target pair.

The target (default: width 1024, 8 layers, ~100M parameters) is built three ways, interleaved,
each a few times on the CPU:

* ``constructor``: ``models.gpt(**target)``, the plain model (the reference);
* ``build``: ``mupkit.build(models.gpt, base=..., target=...)`` (the copies, the traces, the plan,
  the init rescaling); its ratio to the constructor is the overhead the README quotes;
* ``infer_plan``: the plan alone.

The first build is reported separately (imports and allocator warm-up), then medians. Constructor
calls per build are counted.

    python benchmarks/bench_build.py [--width 1024] [--base 256] [--depth 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mupkit
from mupkit import models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--base", type=int, default=256)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    fixed = dict(depth=args.depth, base_width=args.base, vocab=512, max_len=64)
    base, target = dict(width=args.base, **fixed), dict(width=args.width, **fixed)
    calls = []

    def make(**kwargs):
        calls.append(kwargs)
        return models.gpt(**kwargs)

    runs = {
        "constructor": lambda: make(**target),
        "build": lambda: mupkit.build(make, base=base, target=target),
        "infer_plan": lambda: mupkit.infer_plan(make, base=base, target=target, quiet=True),
    }
    first = {}
    for name, run in runs.items():
        calls.clear()
        start = time.perf_counter()
        run()
        first[name] = (time.perf_counter() - start, len(calls))
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    n = sum(p.numel() for p in models.gpt(**target).parameters())
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads; target {n / 1e6:.1f}M parameters "
          f"(width {args.width}, base {args.base}, depth {args.depth})")
    reference = statistics.median(samples["constructor"])
    print(f"{'what':14s} {'first s':>8s} {'median s':>9s} {'x constructor':>14s} {'constructor calls':>18s}")
    for name in runs:
        med = statistics.median(samples[name])
        print(f"{name:14s} {first[name][0]:8.2f} {med:9.2f} {med / reference:14.2f} {first[name][1]:18d}")


if __name__ == "__main__":
    main()
