"""Step time of mupkit's AdamAtan2 and Adafactor against their references and torch AdamW (CPU).

Same parameters and gradients for every optimizer (a GPT from mupkit.models, ~25M params in
~100 tensors), interleaved windows, medians. Ratios are against the reference implementation
of the same algorithm measured in the same run. "default" is what a user gets without choosing a
path (on the CPU: the compiled path for the large tensors of a model this size, the eager
default for the rest).

  AdamAtan2: adam-atan2-pytorch 0.4.1 (per-parameter class; its foreach class too), torch AdamW
  Adafactor: torch.optim.Adafactor (single-tensor and foreach), torch AdamW (fused)

    python benchmarks/bench_scale_invariant.py [--width 512] [--depth 8] [--repeats 5]
"""

from __future__ import annotations

import torch

import mupkit
from common import accelerated, compare, setup


def main() -> None:
    args, model, params, groups = setup(__doc__.splitlines()[0])

    atan2 = {"adam-atan2-pytorch AdamAtan2 (per-parameter)": None}
    try:
        import adam_atan2_pytorch
        from adam_atan2_pytorch.foreach import AdamAtan2 as RefForeach
        atan2 = {
            "adam-atan2-pytorch AdamAtan2 (per-parameter)": lambda: adam_atan2_pytorch.AdamAtan2(params, lr=1e-3),
            "adam-atan2-pytorch foreach.AdamAtan2": lambda: RefForeach(params, lr=1e-3),
        }
    except ImportError:
        print("adam-atan2-pytorch is not installed (pip install '.[test]'); AdamAtan2 has no reference row")
        atan2 = {}
    atan2.update({
        "mupkit AdamAtan2 default (muP groups)": lambda: mupkit.optim.AdamAtan2(groups, lr=1e-3),
        "mupkit AdamAtan2 single-tensor (muP groups)": lambda: mupkit.optim.AdamAtan2(groups, lr=1e-3, foreach=False),
        "mupkit AdamAtan2 foreach (muP groups)": lambda: mupkit.optim.AdamAtan2(groups, lr=1e-3, foreach=True),
        "torch AdamW foreach": lambda: torch.optim.AdamW(params, lr=1e-3, foreach=True),
        "torch AdamW fused": lambda: torch.optim.AdamW(params, lr=1e-3, fused=True),
    })
    atan2.update(accelerated("mupkit AdamAtan2 {} (muP groups)", args.device,
                             lambda **path: mupkit.optim.AdamAtan2(groups, lr=1e-3, **path)))
    if atan2.get("adam-atan2-pytorch AdamAtan2 (per-parameter)"):
        compare("AdamAtan2", atan2, "adam-atan2-pytorch AdamAtan2 (per-parameter)", args.steps, args.repeats)

    compare("Adafactor", {
        "torch Adafactor single-tensor": lambda: torch.optim.Adafactor(params, foreach=False),
        "torch Adafactor foreach": lambda: torch.optim.Adafactor(params, foreach=True),
        "mupkit Adafactor default (muP groups)": lambda: mupkit.optim.Adafactor(groups),
        "mupkit Adafactor single-tensor (muP groups)": lambda: mupkit.optim.Adafactor(groups, foreach=False),
        "mupkit Adafactor foreach (muP groups)": lambda: mupkit.optim.Adafactor(groups, foreach=True),
        **accelerated("mupkit Adafactor {} (muP groups)", args.device,
                      lambda **path: mupkit.optim.Adafactor(groups, **path)),
        "torch AdamW fused": lambda: torch.optim.AdamW(params, lr=1e-3, fused=True),
    }, "torch Adafactor single-tensor", args.steps, args.repeats)


if __name__ == "__main__":
    main()
