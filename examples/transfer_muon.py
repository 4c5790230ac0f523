"""muTransfer with Muon: the optimal LR of a GPT across widths 64..512 under muP and SP.

Data: next-byte prediction on the Python standard library's sources (mupkit.tasks.text_lm;
nothing downloaded), mupkit's GPT (pre-LN, 2 layers; muP with 1/d attention, base width 64).
Optimizer: mupkit.optim.Muon over ``mupkit.param_groups`` (Newton-Schulz for the hidden
matrices, its AdamW part at the same LR for embeddings, norms and biases), 20 warmup steps,
octave-spaced LR grid. Trials go to examples/transfer_muon.jsonl, so a rerun only draws (delete
the file to retrain); an interrupted run resumes.

    python examples/transfer_muon.py [--widths 64 128 256 512] [--steps 150] [--seeds 1] [--params mup sp]

The committed examples/transfer_muon.jsonl holds ``--widths 64 128 256 --steps 100 --params mup``
with widths 64 and 128 complete and 256 begun (a rerun of that command resumes it); the figure
shows the complete widths.
"""

from __future__ import annotations

import argparse

from mupkit.tasks import text_lm
from mupkit.transfer import Sweep, sweep
from mupkit.zoo import BUILTIN

LOG2_LRS = range(-8, -1)  # 2^-8 .. 2^-2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--results", default="examples/transfer_muon.jsonl")
    parser.add_argument("--out", default="examples/transfer_muon.png")
    parser.add_argument("--params", nargs="+", default=["mup", "sp"], choices=["mup", "sp"])
    args = parser.parse_args()
    definition = BUILTIN["transformer"]
    records = []
    for param in args.params:
        result = sweep(definition.constructor, args.widths, base=dict(width=args.widths[0]),
                       grid={"lr": [2.0 ** k for k in LOG2_LRS]}, train=text_lm(steps=args.steps, optimizer="muon"),
                       parametrizations=[param], seeds=args.seeds, results=args.results,
                       kwargs=definition.transfer.kwargs(param, args.widths[0]), tag=f"steps={args.steps} optim=muon")
        records += result.records
    combined = Sweep(records)
    print(combined.summary())
    combined.plot(args.out, title="GPT on stdlib text, Muon: LR vs width (star: optimum)")
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
