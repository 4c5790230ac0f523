"""``mupkit`` command line: ``mupkit coord-check --model mlp`` and ``mupkit transfer --model mlp``.

coord-check exits 0 when the check passes, 1 when it fails (so it can gate a CI job); both exit
2 on bad input.
"""

from __future__ import annotations

import argparse
import ast
import sys

from .coord_check import METRICS, coord_check
from .groups import resolve_family
from .optim import BY_NAME, get_optimizer
from .rules import DEPTH_RULES, PARAMETRIZATIONS, get_parametrization
from .sweep_plan import SEARCHES
from .tasks import HPARAMS, SCHEDULES
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

    t = sub.add_parser("transfer", help="sweep HPs at several widths, horizons and batch sizes; fit the optimum",
                       description="HP-transfer sweep (muTransfer and beyond): train each (parametrization, width, "
                                   "steps, batch, hyperparameters, seed) on real data (digits for mlp/cnn, stdlib "
                                   "text for transformers), print the optimum per point, its drift, its power law "
                                   "along each varied axis with a bootstrap interval, per-HP sensitivity, and the LR "
                                   "to use at the --target-* values. Trials are appended to --results and skipped on "
                                   "a rerun, so an interrupted sweep resumes. --workers/--storage run trials in "
                                   "parallel through an Optuna study (pip install 'mupkit[sweep]').")
    t.add_argument("--model", default="mlp", help=f"{' | '.join(transfer_models())} | PATH.py:FUNC (the file defines "
                                                  f"train(model, hparams, seed) -> losses)")
    t.add_argument("--widths", type=int, nargs="+", help="widths (default: the model's range)")
    t.add_argument("--base", type=int, help="base width (default: the smallest width)")
    t.add_argument("--param", nargs="+", default=["sp", "mup"], help="parametrizations, one panel each")
    t.add_argument("--log2-lrs", type=float, nargs="+", help="LR grid as log2 exponents (default: the model's)")
    t.add_argument("--hparam", type=_hparam, nargs="*", default=[], metavar="NAME=E1,E2,...",
                   help=f"another swept hyperparameter as log2 exponents, e.g. init_mult=-1,0,1 "
                        f"({', '.join(HPARAMS[1:])}; weight_decay as its log2 too)")
    t.add_argument("--search", choices=SEARCHES, default="grid", help="grid: every combination; random: --trials "
                                                                      "points drawn by Optuna's RandomSampler")
    t.add_argument("--trials", type=int, help="random search: how many hyperparameter points")
    t.add_argument("--steps", type=int, nargs="+", default=[200], help="training steps per trial; several values "
                                                                       "sweep the token horizon")
    t.add_argument("--batches", type=int, nargs="+", help="batch sizes (default: the task's); several sweep it")
    t.add_argument("--optim", help=f"the optimizer of every trial (built-in tasks; default adamw): "
                                   f"{' | '.join(BY_NAME)}; muon: Newton-Schulz for the hidden matrices, its AdamW "
                                   f"part for the rest")
    t.add_argument("--schedule", choices=SCHEDULES, default="constant",
                   help="LR schedule after warmup; with power the swept lr is the Power scheduler's a")
    t.add_argument("--seeds", type=int, default=2)
    t.add_argument("--results", default="transfer.jsonl", help="JSONL file of trials (resumed from)")
    t.add_argument("--workers", type=int, default=1, help="trials at once (one per GPU, else CPU processes with the "
                                                          "cores split); >1 runs through an Optuna study")
    t.add_argument("--storage", help="Optuna storage URL shared by every process of the sweep (default with "
                                     "--workers > 1: sqlite next to --results); e.g. postgresql://host/db on a cluster")
    t.add_argument("--study-name", help="the Optuna study (default: a digest of the sweep's trials)")
    t.add_argument("--out", default="transfer.png", help="figure path ('' for none)")
    t.add_argument("--target-width", type=int, help="print the recommended LR for this width")
    t.add_argument("--target-steps", type=int, help="... at this many steps (with --target-batch: tokens)")
    t.add_argument("--target-batch", type=int, help="... at this batch size")
    t.add_argument("--kwargs", type=_kwarg, nargs="*", default=[], help="fixed constructor kwargs: key=value")
    t.add_argument("--quiet", action="store_true", help="no progress")
    return top


def _hparam(text: str) -> tuple[str, list[float]]:
    name, sep, values = text.partition("=")
    if not sep or name not in HPARAMS[1:]:
        raise argparse.ArgumentTypeError(f"--hparam expects NAME=E1,E2,... with NAME in {HPARAMS[1:]}, got {text!r}")
    try:
        return name, [2.0 ** float(e) for e in values.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hparam {text!r}: the values are log2 exponents, e.g. {name}=-1,0,1") \
            from None


def _optimizer_knobs(name: str | None, parametrizations: list[str]) -> dict[str, str]:
    """The trainer knob for ``--optim``, its name as :data:`~mupkit.optim.BY_NAME` spells it (none
    when not given: the task's default, AdamW), after checking that every swept parametrization
    has an LR rule for each role the optimizer's family steps itself (u-muP's table has no Muon
    column, so Muon would refuse its matrices)."""
    if name is None:
        return {}
    cls = get_optimizer(name)
    family = resolve_family(cls)
    for p in parametrizations:
        missing = [role.value for role, rule in get_parametrization(p).rules.items()
                   if family.steps(role) and family.update not in rule.lr]
        if missing:
            raise ValueError(f"--optim {name}: the {p!r} parametrization has no {family.name!r} LR rule for its "
                             f"{', '.join(missing)} parameters; use another --param (mup, sp) or --optim (adamw, "
                             f"adam, sgd, adafactor)")
    return {"optimizer": next(key for key, value in BY_NAME.items() if value is cls)}


def run_transfer(args: argparse.Namespace) -> int:
    definition = load_task(args.model)
    task = definition.transfer
    widths = sorted(args.widths or task.widths)
    base = args.base or widths[0]
    for name in args.param:
        get_parametrization(name)
    knobs = _optimizer_knobs(args.optim, args.param)
    grid = {"lr": [2.0 ** e for e in (args.log2_lrs or task.log2_lrs)], **dict(args.hparam)}
    if len(args.steps) > 1 and not args.batches:
        raise ValueError("several --steps sweep the token horizon (tokens = steps x batch): give --batches too")
    one_run = len(args.steps) == 1 and not args.batches and args.schedule == "constant"
    if one_run:  # the classic sweep: its trials (tag steps=N) resume from results written before runs existed
        optim = f" optim={knobs['optimizer']}" if knobs.get("optimizer", "adamw") != "adamw" else ""  # AdamW: old tag
        plan = dict(train=task.trainer(args.steps[0], **knobs), tag=f"steps={args.steps[0]}{optim}")
    else:
        runs = [{"steps": s, **({"batch": b} if b else {}), "schedule": args.schedule, **knobs}
                for s in args.steps for b in (args.batches or [None])]
        plan = dict(trainer=task.trainer, runs=runs)
    result = sweep(definition.constructor, widths, base={"width": base}, grid=grid, parametrizations=args.param,
                   seeds=args.seeds, results=args.results or None,
                   kwargs=lambda p: {**task.kwargs(p, base), **dict(args.kwargs)}, search=args.search,
                   trials=args.trials, workers=args.workers, storage=args.storage, study_name=args.study_name,
                   show_progress=not args.quiet, **plan)
    axes = {"batch": args.target_batch} if args.target_batch else {}
    if args.target_steps:
        batches = [args.target_batch] if args.target_batch else args.batches or []
        if len(batches) != 1:
            raise ValueError("--target-steps needs the target's batch to count tokens (steps x batch): give "
                             "--target-batch, or sweep one --batches value")
        axes["tokens"] = args.target_steps * batches[0]
    print(result.summary(args.target_width, **axes))
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
                                  show_progress=not args.quiet, readout=args.readout,
                                  layouts=dict(args.layouts) or None, branch_outputs=args.branch_outputs))
    main = checks[-1]
    for check in checks:  # also the relative updates: per block along depth, against Muon's laws along width
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
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"mupkit: error: {err}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
