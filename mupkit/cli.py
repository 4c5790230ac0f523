"""``mupkit`` command line: ``mupkit coord-check --model mlp`` and ``mupkit transfer --model mlp``.

coord-check exits 0 when the check passes, 1 when it fails (so it can gate a CI job); both exit
2 on bad input.
"""

from __future__ import annotations

import argparse
import ast
import sys

from .coord_check import METRICS, coord_check
from .optim import BY_NAME
from .rules import DEPTH_RULES, PARAMETRIZATIONS, get_parametrization
from .transfer import sweep
from .zoo import BUILTIN, load_definition, load_task, transfer_models


def _kwarg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--kwargs expects key=value, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _layout(text: str) -> tuple[str, object]:
    glob, sep, value = text.rpartition("=")
    if not sep or not glob:
        raise argparse.ArgumentTypeError(f"--layouts expects GLOB=out_in, GLOB=in_out or GLOB=OUT,IN; got {text!r}")
    if "," in value:
        try:
            return glob, tuple(int(a) for a in value.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--layouts {text!r}: axes must be integers, e.g. {glob}=1,2") from None
    return glob, value


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mupkit", description="muP tools for PyTorch models")
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("coord-check", help="check that activation sizes stay flat as width grows",
                       description="Coordinate check: train each width a few steps on one batch, record every "
                                   "module's output size, fit log-log slopes against width, pass when every "
                                   "|slope| <= tolerance.")
    p.add_argument("--model", default="mlp", help=f"{' | '.join(sorted(BUILTIN))} | PATH.py:FUNC (FUNC(width=...) "
                                                  f"builds the model; the file may define batch() and loss())")
    p.add_argument("--widths", type=int, nargs="+", help="target widths (default: the model's 16x range; with "
                                                          "--depths: its smallest width)")
    p.add_argument("--base", type=int, help="base width (default: the smallest width)")
    p.add_argument("--depths", type=int, nargs="+", help="target depths: a depth check (width fixed), or joint "
                                                          "with several --widths")
    p.add_argument("--base-depth", type=int, help="base depth (default: the smallest depth)")
    p.add_argument("--depth-arg", default="depth", help="the constructor kwarg that sets the depth")
    params = f"{' | '.join(sorted(PARAMETRIZATIONS))} | {' | '.join(DEPTH_RULES)} | WIDTH+DEPTH (e.g. mup+completep)"
    p.add_argument("--param", default="mup", help=f"parametrization: {params}")
    p.add_argument("--compare", help="also run this parametrization and draw it above (e.g. sp, or mup for depth)")
    p.add_argument("--optim", default="adam", help=" | ".join(BY_NAME))
    p.add_argument("--lr", type=float, help="learning rate (default: a large per-model value)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--metric", default="l1", choices=METRICS)
    p.add_argument("--tolerance", type=float, default=0.1)
    p.add_argument("--width-arg", default="width", help="the constructor kwarg that sets the width")
    p.add_argument("--kwargs", type=_kwarg, nargs="*", default=[], help="fixed constructor kwargs: key=value")
    p.add_argument("--readout", nargs="+", help="globs naming the readout module(s), when the trace cannot tell")
    p.add_argument("--layouts", type=_layout, nargs="+", default=[],
                   help="GLOB=out_in | GLOB=in_out | GLOB=FAN_OUT_AXIS,FAN_IN_AXIS: a parameter's fan axes")
    p.add_argument("--branch-outputs", nargs="*", help="globs of the layers ending each residual branch (none: the "
                                                        "model scales its branches itself)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="coord_check.png", help="figure path ('' for none)")
    p.add_argument("--csv", help="write the records table here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    t = sub.add_parser("transfer", help="sweep the LR at several widths and find where the optimum sits",
                       description="HP-transfer sweep (muTransfer): train each (parametrization, width, LR, seed) "
                                   "on real data (digits for mlp/cnn, stdlib text for transformers), print the "
                                   "optimum per width, its drift, and the LR to use at --target-width. Trials are "
                                   "appended to --results and skipped on a rerun, so an interrupted sweep resumes.")
    t.add_argument("--model", default="mlp", help=f"{' | '.join(transfer_models())} | PATH.py:FUNC (the file defines "
                                                  f"train(model, hparams, seed) -> losses)")
    t.add_argument("--widths", type=int, nargs="+", help="widths (default: the model's range)")
    t.add_argument("--base", type=int, help="base width (default: the smallest width)")
    t.add_argument("--param", nargs="+", default=["sp", "mup"], help="parametrizations, one panel each")
    t.add_argument("--log2-lrs", type=float, nargs="+", help="LR grid as log2 exponents (default: the model's)")
    t.add_argument("--steps", type=int, default=200, help="training steps per trial")
    t.add_argument("--seeds", type=int, default=2)
    t.add_argument("--results", default="transfer.jsonl", help="JSONL file of trials (resumed from)")
    t.add_argument("--out", default="transfer.png", help="figure path ('' for none)")
    t.add_argument("--target-width", type=int, help="print the recommended LR for this width")
    t.add_argument("--kwargs", type=_kwarg, nargs="*", default=[], help="fixed constructor kwargs: key=value")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    return top


def run_transfer(args: argparse.Namespace) -> int:
    definition = load_task(args.model)
    task = definition.transfer
    widths = sorted(args.widths or task.widths)
    base = args.base or widths[0]
    for name in args.param:
        get_parametrization(name)
    lrs = [2.0 ** e for e in (args.log2_lrs or task.log2_lrs)]
    result = sweep(definition.constructor, widths, base={"width": base}, grid={"lr": lrs},
                   train=task.trainer(args.steps), parametrizations=args.param, seeds=args.seeds,
                   results=args.results or None,
                   kwargs=lambda p: {**task.kwargs(p, base), **dict(args.kwargs)}, tag=f"steps={args.steps}",
                   show_progress=not args.quiet)
    print(result.summary(target=args.target_width))
    if args.out:
        result.plot(args.out)
        print(f"figure: {args.out}")
    return 0


def run_coord_check(args: argparse.Namespace) -> int:
    definition = load_definition(args.model)
    widths = args.widths or (list(definition.widths[:1]) if args.depths else list(definition.widths))
    base = args.base or min(widths)
    for name in (args.param, args.compare):
        if name:
            get_parametrization(name)  # a bad name exits with 2 before any work
    lr = args.lr if args.lr is not None else definition.lr_for(args.optim)
    batch = definition.batch_for(args.optim, depth=bool(args.depths))
    checks = []
    for param in [p for p in (args.compare, args.param) if p]:
        kwargs = {**definition.kwargs(param, base), **dict(args.kwargs)}
        checks.append(coord_check(definition.constructor, widths, base=base, parametrization=param,
                                  optimizer=args.optim, lr=lr, steps=args.steps, seeds=args.seeds, batch=batch,
                                  loss=definition.loss, width_arg=args.width_arg, kwargs=kwargs, device=args.device,
                                  depths=args.depths, base_depth=args.base_depth, depth_arg=args.depth_arg,
                                  updates=bool(args.depths), show_progress=not args.quiet, readout=args.readout,
                                  layouts=dict(args.layouts) or None, branch_outputs=args.branch_outputs))
    main = checks[-1]
    for check in checks:  # along depth also the per-block relative updates, averaged over blocks
        for verdict in check.verdicts(metric=args.metric, tolerance=args.tolerance):
            print(verdict, end="\n\n")
    if args.out:
        main.plot(args.out, compare=checks[0] if len(checks) > 1 else None, metric=args.metric,
                  tolerance=args.tolerance)
        print(f"figure: {args.out}")
    if args.csv:
        for check in checks:
            path = args.csv if check is main else args.csv.replace(".csv", f".{check.parametrization}.csv")
            check.to_csv(path)
            print(f"table: {path}")
    return 0 if all(v.passed for v in main.verdicts(metric=args.metric, tolerance=args.tolerance)) else 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "coord-check":
            return run_coord_check(args)
        if args.command == "transfer":
            return run_transfer(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"mupkit: error: {err}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
