"""muTransfer on real images: the optimal Adam LR of an MLP and a CNN on the scikit-learn digits.

Data: the 1797 8x8 digits shipped with scikit-learn (``pip install -e '.[examples]'``; nothing
downloaded), standardized per pixel. Models: mupkit's 3-layer MLP (widths 64..1024) and
2-block CNN (channels 16..128), SP vs muP (base: the smallest width). AdamW over
``mupkit.param_groups``, 100 steps of batch 64, an octave-spaced LR grid, 2 seeds; the loss is
the mean training loss over the last 10 steps. Trials go to examples/transfer_digits.jsonl, so
a rerun only draws (delete the file to retrain).

    python examples/transfer_digits.py [--steps 100]
"""

from __future__ import annotations

import argparse

from mupkit.transfer import sweep
from mupkit.zoo import BUILTIN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--results", default="examples/transfer_digits.jsonl")
    args = parser.parse_args()
    for name in ("mlp", "cnn"):
        definition = BUILTIN[name]
        task = definition.transfer
        base = task.widths[0]
        result = sweep(definition.constructor, list(task.widths), base={"width": base},
                       grid={"lr": [2.0 ** k for k in task.log2_lrs]}, train=task.trainer(args.steps),
                       parametrizations=["sp", "mup"], seeds=args.seeds, results=args.results,
                       kwargs=lambda p: task.kwargs(p, base), tag=f"steps={args.steps}")
        print(f"== {name} on digits ==")
        print(result.summary(target=8 * task.widths[-1]))
        out = f"examples/transfer_digits_{name}.png"
        result.plot(out, title=f"{name} on digits: Adam LR vs width (star: optimum)")
        print(f"figure: {out}")


if __name__ == "__main__":
    main()
