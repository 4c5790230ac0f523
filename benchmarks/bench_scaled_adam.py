"""Step time of mupkit's ScaledAdam against icefall's bucket-stacked algorithm and torch AdamW
fused (CPU), on the same ~25M-parameter GPT in ~100 tensors, interleaved windows.

icefall is not on PyPI; the baseline is the test suite's independent re-implementation of its
post-#1837 ScaledAdam (``tests/test_scaled_adam.py``), which stacks each same-shape bucket of
parameters and gradients every step as icefall does.

    python benchmarks/bench_scaled_adam.py [--width 512] [--depth 8] [--repeats 5]
"""

from __future__ import annotations

import pathlib
import sys
import warnings

import torch

import mupkit
from common import compare, setup

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from test_scaled_adam import IcefallScaledAdam  # noqa: E402


def main() -> None:
    warnings.filterwarnings("ignore", message="ScaledAdam: parameter")  # the GPT's zero-init biases
    args, model, params, groups = setup(__doc__.splitlines()[0])
    compare("ScaledAdam (clipping_scale=2.0)", {
        "icefall-style ScaledAdam (stacked buckets)": lambda: IcefallScaledAdam(params, clipping_scale=2.0),
        "mupkit ScaledAdam single-tensor (muP groups)": lambda: mupkit.optim.ScaledAdam(
            groups, clipping_scale=2.0, clipping_scope="all", foreach=False),
        "mupkit ScaledAdam foreach (muP groups)": lambda: mupkit.optim.ScaledAdam(
            groups, clipping_scale=2.0, clipping_scope="all", foreach=True),
        **({"mupkit ScaledAdam fused (muP groups)": lambda: mupkit.optim.ScaledAdam(
            groups, clipping_scale=2.0, clipping_scope="all", fused=True)} if args.device == "cuda" else {}),
        "torch AdamW fused": lambda: torch.optim.AdamW(params, lr=1e-3, fused=True),
    }, "icefall-style ScaledAdam (stacked buckets)", args.steps, args.repeats)


if __name__ == "__main__":
    main()
