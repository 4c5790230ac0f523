"""mupkit.optim.Muon vs torch.optim.Muon on the same matrices: the hidden matrices of a muP GPT
(mupkit.models; 4 per layer: qkv, proj, mlp in, mlp out), random gradients, bf16 Newton-Schulz
(both). Rows: torch's, mupkit's default path (dispatch: matrix by matrix on the CPU for tensors
of >= 64K elements, else batched), batched (``foreach=True``: same-shape matrices in one
batched matmul per Newton-Schulz product) and one by one (``foreach=False``). The first step
(state allocation) is timed separately on fresh optimizers; the steady state is the median of
interleaved windows after it.

    python benchmarks/bench_muon.py [--width 256] [--depth 4] [--device cpu|cuda]
"""

from __future__ import annotations

import time

import torch

import mupkit
from common import compare, setup


def first_step_ms(make) -> float:
    opt = make()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    sync()
    start = time.perf_counter()
    opt.step()
    sync()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    args, model, params, groups = setup(__doc__.splitlines()[0], steps=3, repeats=5)
    plan = mupkit.plan_of(model)
    hidden = [p for n, p in model.named_parameters() if plan[n].role is mupkit.Role.HIDDEN]
    print(f"{len(hidden)} hidden matrices, {sum(p.numel() for p in hidden) / 1e6:.1f}M params")
    makers = {
        "torch.optim.Muon": lambda: torch.optim.Muon(hidden, lr=0.02),
        "mupkit Muon (default path)": lambda: mupkit.optim.Muon(hidden, lr=0.02),
        "mupkit Muon (foreach=True: batched)": lambda: mupkit.optim.Muon(hidden, lr=0.02, foreach=True),
        "mupkit Muon (foreach=False: one by one)": lambda: mupkit.optim.Muon(hidden, lr=0.02, foreach=False),
    }
    print("first step (ms): " + ", ".join(f"{name} {first_step_ms(make):.1f}" for name, make in makers.items()))
    compare(f"Muon step, width {args.width}, depth {args.depth}", makers, "torch.optim.Muon", args.steps,
            args.repeats)


if __name__ == "__main__":
    main()
