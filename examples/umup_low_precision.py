"""u-muP in low precision: the same u-muP transformer trained in float32, bfloat16 and simulated FP8.

Data: next-byte prediction on the Python standard library's sources (mupkit.data.stdlib_corpus,
nothing downloaded). The model is mupkit.unit.TransformerDecoder built with
parametrization="umup"; AdamW at u-muP's default LR 2^-1 (its LR needs no width tuning) with
independent weight decay. Runs, same seed and batches:

* float32;
* bfloat16: ``torch.autocast`` (every matmul and its inputs in bf16, fp32 master weights);
* FP8: bfloat16 plus every matmul input rounded to ``float8_e4m3fn`` (mupkit.unit.fp8.simulate_fp8),
  with no per-tensor scale factors: unit scaling keeps the tensors inside e4m3's range.

It prints the training-loss gap to float32 (mean over the last 50 steps) and the validation
losses, and saves the curves.

    python examples/umup_low_precision.py [--steps 400] [--width 128] [--out examples/umup_low_precision.png]
"""

from __future__ import annotations

import argparse
import contextlib

import torch

import mupkit
from mupkit.data import stdlib_corpus, token_windows
from mupkit.unit.fp8 import simulate_fp8
from mupkit.plotting import plot_loss_curves
from mupkit.progress import progress

CONTEXT, BATCH = 64, 16
PRECISIONS = {
    "float32": lambda: contextlib.nullcontext(),
    "bfloat16": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    "fp8 (e4m3, simulated)": lambda: _fp8(),
}


@contextlib.contextmanager
def _fp8():
    with torch.autocast("cpu", dtype=torch.bfloat16), simulate_fp8():
        yield


def train(precision: str, width: int, steps: int, lr: float, train_data: torch.Tensor,
          val: torch.Tensor) -> tuple[list[float], float]:
    torch.manual_seed(0)
    model = mupkit.build(mupkit.unit.TransformerDecoder, target=dict(width=width, depth=4, heads=4),
                         parametrization="umup")
    opt = mupkit.optim.AdamW(mupkit.param_groups(model), lr=lr, weight_decay=1e-4,
                             weight_decay_policy="independent")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 20) * (1 - t / steps))
    gen, losses = torch.Generator().manual_seed(1), []
    for _ in progress(range(steps), precision):
        ids, _ = token_windows(train_data, BATCH, CONTEXT, gen)
        with PRECISIONS[precision]():
            loss = model.loss(ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    with torch.no_grad(), PRECISIONS[precision]():
        return losses, model.loss(val).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2 ** -1)
    parser.add_argument("--out", default="examples/umup_low_precision.png")
    args = parser.parse_args()
    train_data = stdlib_corpus("train")
    val, _ = token_windows(stdlib_corpus("val"), 64, CONTEXT, torch.Generator().manual_seed(7))
    runs = {p: train(p, args.width, args.steps, args.lr, train_data, val) for p in PRECISIONS}
    ref = runs["float32"][0]
    print(f"u-muP transformer, width {args.width}, depth 4, {args.steps} AdamW steps, lr {args.lr:g}")
    print(f"{'precision':24s} {'val loss':>9s} {'train gap to fp32 (last 50)':>28s}")
    for name, (losses, val_loss) in runs.items():
        gap = sum(a - b for a, b in zip(losses[-50:], ref[-50:])) / 50
        print(f"{name:24s} {val_loss:9.4f} {gap:+28.4f}")
    plot_loss_curves({name: losses for name, (losses, _) in runs.items()}, args.out, smooth=20,
                     title=f"u-muP transformer (width {args.width}) in low precision")
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
