"""muP training under DDP and FSDP2 (world size 2, gloo on CPU) equals the single-process run.

A width-128 muP GPT (built from a width-64 base) trains on the stdlib text with
mupkit.optim.AdamW over ``mupkit.param_groups``; each of 2 ranks takes half of every global
batch. DDP all-reduces gradients; FSDP2 (``fully_shard`` on every block and the root) shards
parameters, gradients and optimizer state, and mupkit's plan, keyed by parameter name, follows
the DTensor parameters. The loss curves (mean over the global batch) are compared with one
process training on the full batches: they agree to float32 roundoff (the all-reduce sums in a
different order). Prints the largest difference, saves the curves, and exits with status 1 when a
curve differs by more than ``--tolerance`` (default 1e-5).

    python examples/distributed.py [--steps 60] [--out examples/distributed.png] [--tolerance 1e-5]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import mupkit
from mupkit import models
from mupkit.data import stdlib_corpus, token_windows
from mupkit.plotting import plot_loss_curves

WORLD, BATCH, CONTEXT = 2, 16, 32
SIZES = dict(base=dict(width=64, base_width=64, max_len=CONTEXT), target=dict(width=128, base_width=64, max_len=CONTEXT))


def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    corpus, gen = stdlib_corpus("train", limit=500_000), torch.Generator().manual_seed(0)
    return [token_windows(corpus, BATCH, CONTEXT, gen) for _ in range(steps)]


def train(model: torch.nn.Module, data, rank: int = 0, world: int = 1) -> list[float]:
    """AdamW on this rank's slice of every global batch; returns the global mean loss per step."""
    opt = mupkit.optim.AdamW(mupkit.param_groups(model), lr=3e-3, weight_decay=0.1)
    per = BATCH // world
    losses = []
    for x, y in data:
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        losses.append(value.item())
    return losses


def worker(rank: int, mode: str, steps: int, rendezvous: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = mupkit.build(models.gpt, **SIZES)
        if mode == "DDP":
            model = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        losses = train(model, batches(steps), rank, WORLD)
        if rank == 0:
            torch.save(losses, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="examples/distributed.png")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    curves = {"single process": train(mupkit.build(models.gpt, **SIZES), batches(args.steps))}
    for mode in ("DDP", "FSDP2"):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "losses.pt")
            mp.spawn(worker, args=(mode, args.steps, os.path.join(tmp, "rdzv"), out), nprocs=WORLD, join=True)
            curves[mode] = torch.load(out)
    ref = torch.tensor(curves["single process"])
    worst = 0.0
    for mode in ("DDP", "FSDP2"):
        diff = (torch.tensor(curves[mode]) - ref).abs().max().item()
        worst = max(worst, diff)
        print(f"{mode} (world size {WORLD}, gloo): max |loss - single-process loss| over {args.steps} steps = {diff:.2e}")
    plot_loss_curves(curves, args.out, title="muP GPT: single process vs DDP vs FSDP2 (2 ranks)")
    print(f"figure: {args.out}")
    if not worst <= args.tolerance:
        print(f"FAIL: the distributed loss curves differ from the single-process one by {worst:.2e} "
              f"> {args.tolerance:g}")
        return 1
    print(f"PASS: every curve equals the single-process one to {args.tolerance:g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
