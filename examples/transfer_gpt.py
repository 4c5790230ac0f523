"""muTransfer on real text: the optimal Adam LR of a GPT across widths 64..512, SP vs muP vs u-muP.

Data: next-byte prediction on the Python standard library's sources (mupkit.tasks.text_lm;
nothing downloaded). SP and muP train mupkit's GPT (pre-LN, 2 layers, GPT-2 init; muP with
1/d attention, base width 64); u-muP trains mupkit.unit.TransformerDecoder. AdamW over
``mupkit.param_groups``, 20 warmup steps, octave-spaced LR grids, 2 seeds; the loss is the mean
training loss over the last 10% of steps. Trials go to examples/transfer_gpt.jsonl, so a rerun
only draws (delete the file to retrain); an interrupted run resumes.

    python examples/transfer_gpt.py [--steps 150] [--params sp mup umup] [--out examples/transfer_gpt.png]
"""

from __future__ import annotations

import argparse

from mupkit.transfer import Sweep, sweep
from mupkit.zoo import BUILTIN

WIDTHS = [64, 128, 256, 512]
MODELS = {"sp": "transformer", "mup": "transformer", "umup": "umup-transformer"}  # in mupkit.zoo
GRIDS = {"sp": range(-12, -5), "mup": range(-12, -5), "umup": range(-5, 2)}  # log2 LR, 7 points each


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--results", default="examples/transfer_gpt.jsonl")
    parser.add_argument("--out", default="examples/transfer_gpt.png")
    parser.add_argument("--params", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    args = parser.parse_args()
    records = []
    for param in args.params:
        grid, definition = GRIDS[param], BUILTIN[MODELS[param]]
        task = definition.transfer  # its trainer (mupkit.tasks.text_lm) and fixed kwargs
        train, kwargs = task.trainer(args.steps), task.kwargs(param, WIDTHS[0])
        result = sweep(definition.constructor, WIDTHS, base=dict(width=WIDTHS[0]),
                       grid={"lr": [2.0 ** k for k in grid]}, train=train, parametrizations=[param],
                       seeds=args.seeds, results=args.results, kwargs=kwargs, tag=f"steps={args.steps}")
        records += result.records
    combined = Sweep(records)
    print(combined.summary(target=4096))
    combined.plot(args.out, title="GPT on stdlib text: Adam LR vs width (star: optimum)")
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
