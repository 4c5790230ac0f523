"""Launch configurations of the elementwise Triton kernels on a CUDA GPU, against the HBM copy
bandwidth and ``torch._fused_adamw_`` on the same tensors (the data for :data:`.tables.BLOCK`).

For ``--size`` fp32 parameters in ``--tensors`` equal tensors, times one Adam and one
Adam-atan2 kernel launch (``triton.testing.do_bench``: median of CUDA-event timings) for each
(elements per program, warps) pair and prints bytes moved (28 per parameter: read p, g, m, v;
write p, m, v) per second, as GB/s and as a percentage of the copy bandwidth measured in the
same run (``torch`` device-to-device copy of 1 GB, read + write counted).

    python benchmarks/tune_kernels.py [--size 1e8] [--tensors 16]
"""

from __future__ import annotations

import argparse
import itertools

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=1e8)
    parser.add_argument("--tensors", type=int, default=16)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tune_kernels.py times Triton kernels on a CUDA GPU; this machine has none")
    import triton.testing

    from mupkit.optim.kernels import elementwise, tables

    numel = int(args.size) // args.tensors
    p, g, m, v = ([torch.rand(numel, device="cuda") for _ in range(args.tensors)] for _ in range(4))
    moved = 28 * numel * args.tensors
    src, dst = torch.empty(1 << 28, device="cuda"), torch.empty(1 << 28, device="cuda")
    copy = 2 * src.numel() * 4 / (triton.testing.do_bench(lambda: dst.copy_(src)) * 1e-3)
    print(f"torch {torch.__version__}; {torch.cuda.get_device_name()}; {args.tensors} x {numel} fp32 params; "
          f"copy bandwidth {copy / 1e9:.0f} GB/s")

    def report(name: str, ms: float) -> None:
        print(f"{name:44s} {ms * 1e3:9.1f} us {moved / ms / 1e6:8.0f} GB/s {100 * moved / ms / 1e-3 / copy:6.1f} %")

    steps = [torch.tensor(1.0, device="cuda") for _ in p]
    report("torch._fused_adamw_", triton.testing.do_bench(lambda: torch._fused_adamw_(
        p, g, m, v, [], steps, lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=False,
        maximize=False)))
    adam_rows = [elementwise.adam_row(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                                      decoupled=True)] * len(p)
    atan2_rows = [elementwise.adam_atan2_row(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.01, a=1.27, b=1.0,
                                             formulation="lucidrains", maximize=False)] * len(p)
    fp32 = elementwise.TL_DTYPES[torch.float32]
    for block, warps in itertools.product([1024, 2048, 4096, 8192], [4, 8, 16]):
        for name, kernel, rows, dtypes in [("adam", elementwise._adam_kernel, adam_rows, dict(S_DTYPE=fp32)),
                                           ("adam_atan2", elementwise._adam_atan2_kernel, atan2_rows, {})]:
            ms = triton.testing.do_bench(lambda: tables.launch(kernel, [p, g, m, v, steps], rows, block=block,
                                                               num_warps=warps, P_DTYPE=fp32, **dtypes))
            report(f"{name} block {block} warps {warps}", ms)


if __name__ == "__main__":
    main()
