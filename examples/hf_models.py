"""HuggingFace GPT-2 and Llama (built from configs, no weights) under muP with mupkit.build.

``mupkit.integrations.hf`` turns a transformers config into a constructor of width; mupkit
infers the shapes (GPT-2's Conv1D keeps weights as (in, out)), sets every attention module's
``scaling`` to muP's 1/d law pinned at the base width, and handles GPT-2's tied embeddings.
For each model this example

1. runs the coordinate check under muP and under SP (widths 64..512, 4 Adam steps, 1 seed;
   the readout untied so it can be zero-initialized, as in microsoft/mup's own checks), prints
   both verdicts and saves the figure (``examples/hf_<model>_coord_check.png``): muP passes,
   SP fails;
2. trains the muP model (tied embeddings, as the configs default) on the stdlib text at widths
   64 and 256 with the same AdamW LR, tuned for nothing but the base width: the wider model
   reaches the lower loss, as muTransfer needs.

    python examples/hf_models.py [--steps 150] [--lr 3e-3]
"""

from __future__ import annotations

import argparse

import mupkit
from mupkit import tasks
from mupkit.integrations import hf
from mupkit.zoo import BUILTIN

WIDTHS = (64, 128, 256, 512)


def coord_check(name: str, parametrization: str) -> "mupkit.CoordCheck":
    d = BUILTIN[f"hf-{name}"]
    return mupkit.coord_check(d.constructor, list(WIDTHS), parametrization=parametrization, optimizer="adam",
                              lr=d.lr_for("adam"), steps=4, seeds=1, batch=d.batch_for("adam"),
                              kwargs=d.kwargs(parametrization, WIDTHS[0]), show_progress=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default="examples", help="folder for the figures")
    args = parser.parse_args(argv)
    ok = True
    for name, constructor in (("gpt2", hf.gpt2), ("llama", hf.llama)):
        mup, sp = coord_check(name, "mup"), coord_check(name, "sp")
        mup_verdict, sp_verdict = mup.verdict(steps=range(1, 5)), sp.verdict(steps=range(1, 5))
        print(f"HF {name}: {mup_verdict.summary()}\nHF {name}: {sp_verdict.summary()}")
        mup.plot(f"{args.out}/hf_{name}_coord_check.png", compare=sp)
        ok &= mup_verdict.passed and not sp_verdict.passed
        train = tasks.text_lm(steps=args.steps)
        final = {}
        for width in (64, 256):
            model = mupkit.build(constructor, base=dict(width=64, base_width=64), delta=dict(width=128, base_width=64),
                                 target=dict(width=width, base_width=64))
            losses = train(model, {"lr": args.lr}, 0)
            final[width] = sum(losses[-10:]) / 10
        print(f"HF {name} muP, AdamW lr={args.lr:g}, {args.steps} steps on stdlib text: mean loss of the last 10 "
              f"steps {final[64]:.3f} at width 64, {final[256]:.3f} at width 256")
        ok &= final[256] < final[64]
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
