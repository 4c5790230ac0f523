"""The plan follows the model through deepcopy, pickle, state_dict, torch.compile, DDP and FSDP2."""

from __future__ import annotations

import copy
import os
import pickle
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import mupkit
from mupkit import models

SIZES = dict(base=dict(width=32, base_width=32), target=dict(width=64, base_width=32))


def make(dtype=torch.float32):
    torch.manual_seed(0)
    return mupkit.build(models.gpt, **SIZES).to(dtype)


def scales(model) -> dict[str, tuple[float, float]]:
    return {n: (g["lr"], g["weight_decay"]) for g in mupkit.param_groups(model, optimizer="adamw", lr=1.0,
                                                                          weight_decay=1.0)
            for n in g["param_names"]}


def strip(name: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        name = name.removeprefix(prefix)
    return name


X = torch.randint(0, 256, (2, 8))


@pytest.mark.parametrize("transform", ["deepcopy", "pickle"])
def test_plan_and_forward_survive_copies(transform):
    model = make()
    other = copy.deepcopy(model) if transform == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert mupkit.plan_of(other) == mupkit.plan_of(model)
    assert scales(other) == scales(model)
    torch.testing.assert_close(other(X), model(X), rtol=0, atol=0)  # readout input scale hook included


def test_state_dict_into_fresh_model_keeps_keys_and_function():
    model = make()
    assert set(model.state_dict()) == set(models.gpt(64, base_width=32).state_dict())  # no renamed keys
    fresh = mupkit.build(models.gpt, **SIZES)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(X), model(X), rtol=0, atol=0)
    assert scales(fresh) == scales(model)


def test_torch_compile_model_keeps_plan_and_matches_eager():
    model = make()
    compiled = torch.compile(model, backend="aot_eager")
    assert mupkit.plan_of(compiled) is mupkit.plan_of(model)
    assert {strip(n): v for n, v in scales(compiled).items()} == scales(model)
    torch.testing.assert_close(compiled(X), model(X))
    opt = mupkit.optim.Adam(mupkit.param_groups(compiled), lr=1e-2)
    compiled(X).square().mean().backward()
    opt.step()


def _worker(rank: int, world: int, path: str, mode: str, out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        model = make(torch.float64)
        if mode == "ddp":
            model = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        opt = mupkit.optim.AdamW(mupkit.param_groups(model), lr=1e-2, weight_decay=0.1)
        torch.manual_seed(1)
        batch = torch.randint(0, 256, (2 * world, 8))
        local = batch[rank * 2:(rank + 1) * 2]
        for _ in range(3):
            opt.zero_grad()
            model(local).square().mean().backward()
            opt.step()
        full = {strip(n): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
                for n, p in model.named_parameters()}
        if rank == 0:
            torch.save({"params": full, "scales": {strip(n): v for n, v in scales(model).items()}}, out)
        dist.barrier()  # no rank tears gloo down while another still uses it
    finally:
        dist.destroy_process_group()


def single_process_reference(world: int) -> dict[str, torch.Tensor]:
    model = make(torch.float64)
    opt = mupkit.optim.AdamW(mupkit.param_groups(model), lr=1e-2, weight_decay=0.1)
    torch.manual_seed(1)
    batch = torch.randint(0, 256, (2 * world, 8))
    for _ in range(3):
        opt.zero_grad()
        # mean over ranks of per-rank means == mean over the global batch (equal shards)
        model(batch).square().mean().backward()
        opt.step()
    return dict(model.named_parameters())


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_distributed_world_size_two_matches_single_process(mode):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        mp.spawn(_worker, args=(2, os.path.join(tmp, "rdzv"), mode, out), nprocs=2, join=True)
        result = torch.load(out)
    assert result["scales"] == scales(make())
    reference = single_process_reference(2)
    for name, p in reference.items():  # float64: only the gradient all-reduce order differs
        torch.testing.assert_close(result["params"][name], p.detach(), rtol=1e-9, atol=1e-10)
