"""Step time of mupkit's DAdaptAdam and Prodigy against dadaptation 3.2, prodigyopt 1.1.2 and
torch AdamW fused (CPU), on the same ~25M-parameter GPT in ~100 tensors, interleaved windows.

    python benchmarks/bench_dadapt.py [--width 512] [--depth 8] [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch

import mupkit
from common import compare, gpt_parameters


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model, params = gpt_parameters(args.width, args.depth)
    groups = mupkit.param_groups(model)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {sum(p.numel() for p in params) / 1e6:.1f}M "
          f"params in {len(params)} tensors; muP groups: {len(groups)}")
    import dadaptation
    import prodigyopt
    compare("DAdaptAdam", {
        "dadaptation DAdaptAdam": lambda: dadaptation.DAdaptAdam(params),
        "mupkit DAdaptAdam (muP groups)": lambda: mupkit.optim.DAdaptAdam(groups),
        "torch AdamW fused": lambda: torch.optim.AdamW(params, lr=1e-3, fused=True),
    }, "dadaptation DAdaptAdam", args.steps, args.repeats)
    compare("Prodigy", {
        "prodigyopt Prodigy": lambda: prodigyopt.Prodigy(params),
        "mupkit Prodigy (muP groups)": lambda: mupkit.optim.Prodigy(groups),
        "torch AdamW fused": lambda: torch.optim.AdamW(params, lr=1e-3, fused=True),
    }, "prodigyopt Prodigy", args.steps, args.repeats)


if __name__ == "__main__":
    main()
