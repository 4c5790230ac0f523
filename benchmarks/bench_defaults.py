"""Every mupkit optimizer's default step against its reference package, on four parameter sets.

The acceptance benchmark of issue 21: a user who constructs ``mupkit.optim.X(params)`` with no
path flag (no ``fused``/``foreach``/``compiled``) gets a step at least as fast as the package the
algorithm comes from, after warm-up, and a first step (state, any compilation) without a stall.

Models (fp32, fixed random gradients, built per :data:`MODELS`):

* ``gpt``: mupkit's muP GPT (width 512, depth 8, vocab 512): 25.5M parameters in 100 tensors;
  mupkit gets its muP param groups, the reference the plain parameter list;
* ``large``: 16 tensors of 1024 x 1024 (16.8M);
* ``small``: 4882 small tensors, the repeating shapes (32, 32), (32,), (32, 128), (128,),
  (128, 32), (32,) of a narrow model with many tiny layers (7.7M);
* ``issue``: 64 tensors of 256 x 512 plus 32 vectors of 512 (8.4M), the first-step check.

Per (model, optimizer): the first step of a fresh mupkit optimizer and of a fresh reference (s),
then 5 warm-up steps each, then ``--windows`` interleaved windows of ``--steps`` steps (mupkit and
reference alternate, the order flipping every window); the reported times are the medians of
the windows' mean step times, ``ratio = reference / mupkit`` (>= 1.0: mupkit at least as fast).
Each model runs in its own process with a fresh Inductor cache, so first steps include any
compilation. The output is a markdown table (``benchmarks/RESULTS.md`` rows), and ``--json``.

    python benchmarks/bench_defaults.py                                  # everything, CPU: ~10 min
    python benchmarks/bench_defaults.py --models large issue --optimizers AdamW Adafactor --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Callable

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the icefall-style ScaledAdam reference

SMALL_SHAPES = [(32, 32), (32,), (32, 128), (128,), (128, 32), (32,)]


def model_parameters(name: str, device: str) -> tuple[list[torch.nn.Parameter], list]:
    """``(params, mupkit_params)``: the model's parameters with fixed random gradients, and what
    mupkit's optimizer is given (muP groups for the GPT, the same list otherwise)."""
    if name == "gpt":
        import mupkit
        from common import gpt_parameters
        model, params = gpt_parameters(512, 8, device)
        return params, mupkit.param_groups(model)
    shapes = {"large": [(1024, 1024)] * 16,
              "small": [SMALL_SHAPES[i % len(SMALL_SHAPES)] for i in range(4882)],
              "issue": [(256, 512)] * 64 + [(512,)] * 32}[name]
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device)) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
    return params, params


MODELS = ("gpt", "large", "small", "issue")


def optimizers() -> dict[str, tuple[Callable, Callable]]:
    """name -> (mupkit default maker, reference maker); both take the params (mupkit: its groups)."""
    import adam_atan2_pytorch
    import dadaptation
    import prodigyopt

    import mupkit.optim as mo
    from test_scaled_adam import IcefallScaledAdam
    return {
        "AdamW": (lambda ps: mo.AdamW(ps, lr=1e-3), lambda ps: torch.optim.AdamW(ps, lr=1e-3)),
        "Adam": (lambda ps: mo.Adam(ps, lr=1e-3), lambda ps: torch.optim.Adam(ps, lr=1e-3)),
        "SGD": (lambda ps: mo.SGD(ps, lr=1e-2, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9)),
        "AdamAtan2": (lambda ps: mo.AdamAtan2(ps), lambda ps: adam_atan2_pytorch.AdamAtan2(ps)),
        "Adafactor": (lambda ps: mo.Adafactor(ps), lambda ps: torch.optim.Adafactor(ps)),
        "DAdaptAdam": (lambda ps: mo.DAdaptAdam(ps), lambda ps: dadaptation.DAdaptAdam(ps)),
        "DAdaptSGD": (lambda ps: mo.DAdaptSGD(ps), lambda ps: dadaptation.DAdaptSGD(ps)),
        "DAdaptLion": (lambda ps: mo.DAdaptLion(ps), lambda ps: dadaptation.DAdaptLion(ps)),
        "DAdaptAdaGrad": (lambda ps: mo.DAdaptAdaGrad(ps), lambda ps: dadaptation.DAdaptAdaGrad(ps)),
        "Prodigy": (lambda ps: mo.Prodigy(ps), lambda ps: prodigyopt.Prodigy(ps)),
        "ScaledAdam": (lambda ps: mo.ScaledAdam(ps), lambda ps: IcefallScaledAdam(ps)),
    }


REFERENCE_NAMES = {"AdamW": "torch.optim.AdamW", "Adam": "torch.optim.Adam", "SGD": "torch.optim.SGD",
                   "AdamAtan2": "adam_atan2_pytorch.AdamAtan2", "Adafactor": "torch.optim.Adafactor",
                   "DAdaptAdam": "dadaptation.DAdaptAdam", "DAdaptSGD": "dadaptation.DAdaptSGD",
                   "DAdaptLion": "dadaptation.DAdaptLion", "DAdaptAdaGrad": "dadaptation.DAdaptAdaGrad",
                   "Prodigy": "prodigyopt.Prodigy", "ScaledAdam": "icefall-style (tests/test_scaled_adam.py)"}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def mean_step(opt: torch.optim.Optimizer, steps: int, device: str) -> float:
    """Seconds per ``opt.step()`` over ``steps`` calls (device work included)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    sync(device)
    return (time.perf_counter() - start) / steps


def compare(name: str, params: list, mupkit_params: list, device: str, warmup: int, windows: int,
            steps: int) -> dict:
    """One row: first steps, then interleaved windows (order flipped every window)."""
    make_mine, make_ref = optimizers()[name]
    row = {"optimizer": name, "reference": REFERENCE_NAMES[name]}
    opts = {}
    for side, make, ps in (("mupkit", make_mine, mupkit_params), ("reference", make_ref, params)):
        opts[side] = make(ps)
        row[f"{side}_first_s"] = mean_step(opts[side], 1, device)
        mean_step(opts[side], warmup, device)
    samples: dict[str, list[float]] = {"mupkit": [], "reference": []}
    for w in range(windows):
        for side in (("mupkit", "reference") if w % 2 == 0 else ("reference", "mupkit")):
            samples[side].append(mean_step(opts[side], steps, device))
    for side, values in samples.items():
        row[f"{side}_ms"] = statistics.median(values) * 1e3
    row["ratio"] = row["reference_ms"] / row["mupkit_ms"]
    return row


def run_model(model: str, names: list[str], args: argparse.Namespace) -> list[dict]:
    warnings.filterwarnings("ignore", message="ScaledAdam: parameter")  # the GPT's zero-initialized biases
    params, mupkit_params = model_parameters(model, args.device)
    rows = []
    for name in names:
        try:
            row = compare(name, params, mupkit_params, args.device, args.warmup, args.windows, args.steps)
        except Exception as e:  # one broken optimizer leaves the others' rows
            row = {"optimizer": name, "reference": REFERENCE_NAMES[name], "error": f"{type(e).__name__}: {e}"}
        row.update(model=model, params=sum(p.numel() for p in params), tensors=len(params))
        rows.append(row)
        print(markdown_row(row), flush=True)
    return rows


HEADER = ("| model | optimizer | mupkit first step s | reference first step s | mupkit ms | reference ms | "
          "ratio (ref/mupkit) |\n|---|---|---|---|---|---|---|")


def markdown_row(row: dict) -> str:
    model = f"{row['model']} ({row['params'] / 1e6:.1f}M, {row['tensors']} tensors)"
    if "error" in row:
        return f"| {model} | {row['optimizer']} | error: {row['error'][:120]} | | | | |"
    return (f"| {model} | {row['optimizer']} | {row['mupkit_first_s']:.2f} | {row['reference_first_s']:.2f} | "
            f"{row['mupkit_ms']:.2f} | {row['reference_ms']:.2f} | {row['ratio']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--optimizers", nargs="+", help="names (default: all of optimizers())")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="steps per window (default: 3 CPU, 20 CUDA)")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--in-process", action="store_true", help="run the models here, not one process each")
    args = parser.parse_args()
    args.steps = args.steps or (20 if args.device == "cuda" else 3)
    torch.set_num_threads(args.threads)
    names = args.optimizers or list(REFERENCE_NAMES)
    unknown = set(names) - set(REFERENCE_NAMES)
    if unknown:
        parser.error(f"unknown optimizers {sorted(unknown)}; choose from {list(REFERENCE_NAMES)}")
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}; {where}; fp32; {args.warmup} warm-up steps, median of {args.windows} "
          f"interleaved windows of {args.steps} steps\n\n{HEADER}", flush=True)
    rows: list[dict] = []
    for model in args.models:
        if args.in_process or len(args.models) == 1:
            rows += run_model(model, names, args)
            continue
        with tempfile.TemporaryDirectory() as tmp:  # a fresh process and Inductor cache per model
            out = pathlib.Path(tmp) / "rows.json"
            command = [sys.executable, __file__, "--models", model, "--optimizers", *names, "--device", args.device,
                       "--threads", str(args.threads), "--warmup", str(args.warmup), "--windows", str(args.windows),
                       "--steps", str(args.steps), "--json", str(out)]
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(pathlib.Path(tmp) / "inductor"))
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            print("\n".join(line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in
                            line and "model |" not in line), flush=True)
            if done.returncode:
                print(f"<!-- {model}: exit {done.returncode}: {done.stderr.strip()[-500:]} -->", flush=True)
            rows += json.loads(out.read_text()) if out.exists() else []
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
