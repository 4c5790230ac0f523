"""Every optimizer and path against its reference and torch's AdamW, at memory-bandwidth terms.

For each size (default 1M, 20M, 100M parameters) and shape regime ("few": ~16 large tensors;
"many": tensors of 4096 elements, i.e. thousands of them), steps each optimizer on the same
parameters with fixed random gradients and prints:

* the median step time over interleaved windows (every optimizer's window in turn, repeated, so
  slow drifts of the machine hit all alike);
* the achieved bandwidth, ``bytes moved per step / step time``, where bytes are the algorithm's
  minimum traffic (e.g. 28 B/param for fp32 Adam: read p, g, m, v; write p, m, v), against a
  streaming-bandwidth measurement (the faster of a copy and ``c = a + b`` over 256 MB arrays)
  taken in the same run;
* the ratio to torch's fused AdamW and to the optimizer's reference package.

"default" rows are what a user gets without choosing a path (on the CPU: torch's fused kernel for
AdamW; the compiled path for a large model's large tensors for the others); "single"/"eager" rows
are the eager paths (``compiled=False``).

Then, at one size: the transient peak memory of one step (each optimizer in a fresh process:
peak RSS minus steady RSS on the CPU, ``max_memory_allocated`` minus allocated on CUDA) and the
cost of 1000 muP param groups against one group.

    python benchmarks/bench_optim.py                       # everything (long on a 2-core CPU)
    python benchmarks/bench_optim.py --sizes 1e6 2e7 --regimes few --only adamw adam-atan2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable

import torch

import mupkit

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def layout(size: int, regime: str) -> tuple[int, int]:
    """(elements per tensor, tensor count): ~16 large tensors ("few") or 4096-element ones ("many")."""
    numel = max(size // 16, 1) if regime == "few" else 4096
    return numel, max(size // numel, 1)


def parameters(size: int, regime: str) -> list[torch.nn.Parameter]:
    """~``size`` fp32 parameters laid out per :func:`layout`, with fixed random gradients."""
    numel, count = layout(size, regime)
    gen = torch.Generator().manual_seed(0)
    params = []
    for _ in range(count):
        p = torch.nn.Parameter((torch.randn(numel, generator=gen) * 0.02).to(DEVICE))
        p.grad = (torch.randn(numel, generator=gen) * 1e-3).to(DEVICE)
        params.append(p)
    return params


def groups(params: list[torch.nn.Parameter], n: int, distinct: int = 7) -> list[dict]:
    """``n`` param groups with muP-like multipliers (lr_scale, eps_scale) taking ``distinct``
    values (a model's layers share a few roles; 7 is a GPT's count)."""
    n = min(n, len(params))
    return [{"params": params[i::n], "lr_scale": 1.0 / (1 + i % distinct), "eps_scale": 1.0 / (1 + i % distinct)}
            for i in range(n)]


#: name -> (bytes per parameter of minimum traffic, reference name, maker(params, groups)); the
#: bytes are docs/kernels.md's fp32 minima for matrices: Adafactor 24 (3 reads of g, 2 of p, 1 write
#: of p), Prodigy 48 (two passes), ScaledAdam 30 (28 on 3 of 4 steps, 36 on size-update steps)
def optimizers() -> dict[str, tuple[int, str | None, Callable]]:
    warnings.filterwarnings("ignore", message="ScaledAdam: parameter")
    out: dict[str, tuple[int, str | None, Callable]] = {
        "torch AdamW fused": (28, None, lambda ps, gs: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
        "torch AdamW foreach": (28, None, lambda ps, gs: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
        "mupkit AdamW default": (28, "torch AdamW fused", lambda ps, gs: mupkit.optim.AdamW(gs, lr=1e-3)),
        "mupkit AdamAtan2 default": (28, "adam-atan2-pytorch", lambda ps, gs: mupkit.optim.AdamAtan2(gs)),
        "mupkit AdamAtan2 single": (28, "adam-atan2-pytorch",
                                    lambda ps, gs: mupkit.optim.AdamAtan2(gs, foreach=False, compiled=False)),
        "torch Adafactor": (24, None, lambda ps, gs: torch.optim.Adafactor(ps)),
        "mupkit Adafactor default": (24, "torch Adafactor", lambda ps, gs: mupkit.optim.Adafactor(gs)),
        "mupkit Adafactor eager": (24, "torch Adafactor", lambda ps, gs: mupkit.optim.Adafactor(gs, compiled=False)),
        "mupkit DAdaptAdam default": (36, "dadaptation DAdaptAdam", lambda ps, gs: mupkit.optim.DAdaptAdam(gs)),
        "mupkit DAdaptAdam eager": (36, "dadaptation DAdaptAdam",
                                    lambda ps, gs: mupkit.optim.DAdaptAdam(gs, compiled=False)),
        "mupkit Prodigy default": (48, "prodigyopt Prodigy", lambda ps, gs: mupkit.optim.Prodigy(gs)),
        "mupkit Prodigy eager": (48, "prodigyopt Prodigy", lambda ps, gs: mupkit.optim.Prodigy(gs, compiled=False)),
        "mupkit ScaledAdam single": (30, None, lambda ps, gs: mupkit.optim.ScaledAdam(gs, foreach=False)),
        "mupkit ScaledAdam foreach": (30, None, lambda ps, gs: mupkit.optim.ScaledAdam(gs, foreach=True)),
    }
    if CUDA:  # the Triton kernels
        out["mupkit AdamW fused"] = (28, "torch AdamW fused",
                                     lambda ps, gs: mupkit.optim.AdamW(gs, lr=1e-3, fused=True))
        out["mupkit AdamAtan2 fused"] = (28, "adam-atan2-pytorch",
                                         lambda ps, gs: mupkit.optim.AdamAtan2(gs, fused=True))
        out["mupkit Adafactor fused"] = (24, "torch Adafactor", lambda ps, gs: mupkit.optim.Adafactor(gs, fused=True))
        out["mupkit ScaledAdam fused"] = (30, None, lambda ps, gs: mupkit.optim.ScaledAdam(gs, fused=True))
        out["mupkit DAdaptAdam fused"] = (36, "dadaptation DAdaptAdam",
                                          lambda ps, gs: mupkit.optim.DAdaptAdam(gs, fused=True))
        out["mupkit Prodigy fused"] = (48, "prodigyopt Prodigy", lambda ps, gs: mupkit.optim.Prodigy(gs, fused=True))
    for name, module, attr, maker in [
            ("adam-atan2-pytorch", "adam_atan2_pytorch", "AdamAtan2", lambda cls: lambda ps, gs: cls(ps)),
            ("dadaptation DAdaptAdam", "dadaptation", "DAdaptAdam", lambda cls: lambda ps, gs: cls(ps)),
            ("prodigyopt Prodigy", "prodigyopt", "Prodigy", lambda cls: lambda ps, gs: cls(ps))]:
        try:
            cls = getattr(__import__(module), attr)
        except ImportError:
            continue
        out[name] = ({"adam-atan2-pytorch": 28, "dadaptation DAdaptAdam": 36, "prodigyopt Prodigy": 48}[name], None,
                     maker(cls))
    return out


def step_time(opt: torch.optim.Optimizer, steps: int) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    sync()
    return (time.perf_counter() - start) / steps


def streaming_bandwidth() -> float:
    """Bytes/s of the fastest of ``c.copy_(a)`` (8 B/element) and ``c = a + b`` (12 B/element)
    on 64M-element fp32 arrays, best of 8 each."""
    n = 1 << 26
    a, b, c = (torch.rand(n, device=DEVICE) for _ in range(3))
    best = 0.0
    for moved, op in ((8 * n, lambda: c.copy_(a)), (12 * n, lambda: torch.add(a, b, out=c))):
        for _ in range(8):
            sync()
            start = time.perf_counter()
            op()
            sync()
            best = max(best, moved / (time.perf_counter() - start))
    return best


def timings(size: int, regime: str, names: list[str], windows: int, steps: int) -> dict[str, float]:
    """Median seconds per step of each optimizer, each measured in interleaved windows against
    torch's fused AdamW on the same parameters (A/B), one optimizer's state alive at a time; times
    are reported relative to that shared baseline's median, so all rows compare."""
    table = optimizers()
    params = parameters(size, regime)
    baseline = table["torch AdamW fused"][2](params, groups(params, 1))
    step_time(baseline, 2)
    base_all: list[float] = []
    out: dict[str, float] = {}
    for name in names:
        opt = baseline if name == "torch AdamW fused" else table[name][2](params, groups(params, 2))
        step_time(opt, 2)  # state, compilation, warm-up
        base, mine = [], []
        for _ in range(windows):
            base.append(step_time(baseline, steps))
            mine.append(step_time(opt, steps))
        base_all += base
        out[name] = statistics.median(mine) / statistics.median(base)  # relative to the baseline
        del opt
    reference = statistics.median(base_all)
    return {n: ratio * reference for n, ratio in out.items()}


def peak_memory(name: str, size: int) -> float:
    """Transient bytes of one step of ``name`` above the memory held before it (parameters,
    gradients, state). On CUDA, ``max_memory_allocated`` minus what is allocated before the step
    (exact, so measured in this process); on the CPU, in a fresh process, the peak of the resident
    set sampled every ~50 us during three steps, with glibc made to return every freed block above
    64 KB at once (``MALLOC_MMAP_THRESHOLD_``), so what is resident is what is live."""
    if CUDA:
        params = parameters(size, "few")
        opt = optimizers()[name][2](params, groups(params, 2))
        step_time(opt, 2)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step_time(opt, 1)
        return float(torch.cuda.max_memory_allocated() - base)
    code = f"""
import json, os, sys, threading, time
sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
import torch, bench_optim as b
params = b.parameters({size}, "few")
opt = b.optimizers()[{name!r}][2](params, b.groups(params, 2))
opt.step(); opt.step()
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
base, peak, done = rss(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss()); time.sleep(5e-5)
thread = threading.Thread(target=sample); thread.start()
for _ in range(3):
    opt.step()
done.set(); thread.join()
print(json.dumps(max(peak[0] - base, 0)))
"""
    env = dict(__import__("os").environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 2e7, 1e8])
    parser.add_argument("--regimes", nargs="+", default=["few", "many"], choices=["few", "many"])
    parser.add_argument("--only", nargs="+", help="optimizer names (substring match)")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20 if CUDA else 3, help="steps per window")
    parser.add_argument("--memory-size", type=float, default=2e7)
    parser.add_argument("--groups-size", type=float, default=2e7)
    parser.add_argument("--sections", nargs="+", default=["time", "memory", "groups"],
                        choices=["time", "memory", "groups"])
    args = parser.parse_args()
    table = optimizers()
    names = [n for n in table if not args.only or any(o in n for o in args.only)]
    # the baselines every ratio needs
    names = list(dict.fromkeys(names + [ref for n in names for ref in [table[n][1], "torch AdamW fused"] if ref in table]))
    device = torch.cuda.get_device_name() if CUDA else f"CPU, {torch.get_num_threads()} threads"
    bandwidth = streaming_bandwidth()
    print(f"torch {torch.__version__}; {device}; streaming bandwidth {bandwidth / 1e9:.1f} GB/s")
    for size in map(int, args.sizes) if "time" in args.sections else []:
        for regime in args.regimes:
            times = timings(size, regime, names, args.windows, args.steps)
            numel, count = layout(size, regime)
            print(f"\n{size / 1e6:g}M params, regime {regime!r} ({count} tensors of {numel}); skipped: "
                  f"{[n for n in names if n not in times] or 'none'}")
            print(f"{'optimizer':30s} {'ms/step':>9s} {'GB/s':>7s} {'% bw':>6s} {'x fused AdamW':>14s} {'x reference':>12s}")
            for name, seconds in times.items():
                moved = table[name][0] * size
                ref = table[name][1]
                vs_ref = f"{times[ref] / seconds:12.2f}" if ref in times else f"{'':12s}"
                print(f"{name:30s} {seconds * 1e3:9.2f} {moved / seconds / 1e9:7.1f} "
                      f"{100 * moved / seconds / bandwidth:6.0f} {seconds / times['torch AdamW fused']:14.2f} {vs_ref}")
    if "memory" in args.sections:
        print(f"\ntransient peak memory of one step, {args.memory_size / 1e6:g}M params (bytes per parameter)")
        for name in names:
            print(f"{name:30s} {peak_memory(name, int(args.memory_size)) / args.memory_size:8.2f}")
    if "groups" not in args.sections:
        return
    size = int(args.groups_size)
    print(f"\n1 vs 1000 param groups, {size / 1e6:g}M params in 4096-element tensors (time / time with 1 group; "
          f"the 1000 groups' multipliers take 7 distinct values, or all 1000 distinct)")
    print(f"{'optimizer':30s} {'7 distinct':>11s} {'1000 distinct':>14s}")
    for name in names:
        if not name.startswith("mupkit"):
            continue
        params = parameters(size, "many")
        opts = {k: table[name][2](params, groups(params, n, distinct))
                for k, (n, distinct) in {"one": (1, 1), "7": (1000, 7), "1000": (1000, 1000)}.items()}
        for opt in opts.values():
            step_time(opt, 2)
        samples: dict[str, list[float]] = {k: [] for k in opts}
        for _ in range(args.windows):  # interleaved
            for k, opt in opts.items():
                samples[k].append(step_time(opt, args.steps))
        one = statistics.median(samples["one"])
        print(f"{name:30s} {statistics.median(samples['7']) / one:11.3f} {statistics.median(samples['1000']) / one:14.3f}")


if __name__ == "__main__":
    main()
