"""Step time of mupkit's DAdaptAdam and Prodigy against dadaptation 3.2, prodigyopt 1.1.2 and
torch AdamW fused (CPU), on the same ~25M-parameter GPT in ~100 tensors, interleaved windows.

    python benchmarks/bench_dadapt.py [--width 512] [--depth 8] [--repeats 5]
"""

from __future__ import annotations

import torch

import mupkit
from common import accelerated, compare, setup


def main() -> None:
    args, model, params, groups = setup(__doc__.splitlines()[0])
    import dadaptation
    import prodigyopt
    compare("DAdaptAdam", {
        "dadaptation DAdaptAdam": lambda: dadaptation.DAdaptAdam(params),
        "mupkit DAdaptAdam default (muP groups)": lambda: mupkit.optim.DAdaptAdam(groups),
        "mupkit DAdaptAdam eager (muP groups)": lambda: mupkit.optim.DAdaptAdam(groups, compiled=False),
        **accelerated("mupkit DAdaptAdam {} (muP groups)", args.device,
                      lambda **path: mupkit.optim.DAdaptAdam(groups, **path)),
        "torch AdamW fused": lambda: torch.optim.AdamW(params, lr=1e-3, fused=True),
    }, "dadaptation DAdaptAdam", args.steps, args.repeats)
    compare("Prodigy", {
        "prodigyopt Prodigy": lambda: prodigyopt.Prodigy(params),
        "mupkit Prodigy default (muP groups)": lambda: mupkit.optim.Prodigy(groups),
        "mupkit Prodigy eager (muP groups)": lambda: mupkit.optim.Prodigy(groups, compiled=False),
        **accelerated("mupkit Prodigy {} (muP groups)", args.device,
                      lambda **path: mupkit.optim.Prodigy(groups, **path)),
        "torch AdamW fused": lambda: torch.optim.AdamW(params, lr=1e-3, fused=True),
    }, "prodigyopt Prodigy", args.steps, args.repeats)


if __name__ == "__main__":
    main()
