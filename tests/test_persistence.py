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


def make_resmlp(dtype=torch.float32):
    torch.manual_seed(0)
    return mupkit.build(models.resmlp, base=dict(width=32, depth=2), target=dict(width=40, depth=2)).to(dtype)


#: model, and its global batch of 2 * world rows. The residual MLP has no parameter whose
#: gradient is 0 in exact arithmetic (the GPT's key bias is: softmax ignores it), which
#: scale-invariant optimizers would turn from roundoff into full-size, rank-order-dependent steps.
MODELS = {
    "gpt": (make, lambda world: torch.randint(0, 256, (2 * world, 8))),
    "resmlp": (make_resmlp, lambda world: torch.randn(2 * world, 64)),
}

#: optimizers run sharded: elementwise (AdamW, AdamAtan2) and reducing over each tensor (Adafactor)
OPTIMIZERS = {
    "adamw": lambda groups: mupkit.optim.AdamW(groups, lr=1e-2, weight_decay=0.1),
    "adam-atan2": lambda groups: mupkit.optim.AdamAtan2(groups, lr=1e-2, weight_decay=0.1, foreach=True),
    "adafactor": lambda groups: mupkit.optim.Adafactor(groups, lr=0.1, beta1=0.9, weight_decay=0.1, foreach=True),
    "adafactor-single": lambda groups: mupkit.optim.Adafactor(groups, mode="hf", weight_decay=0.1, foreach=False),
    "dadapt-adam": lambda groups: mupkit.optim.DAdaptAdam(groups, decouple=True, weight_decay=0.1, d0=1e-3),
    "prodigy": lambda groups: mupkit.optim.Prodigy(groups, weight_decay=0.1, d0=1e-3),
    "dadapt-sgd": lambda groups: mupkit.optim.DAdaptSGD(groups, momentum=0.9, d0=1e-3),
    "dadapt-adagrad": lambda groups: mupkit.optim.DAdaptAdaGrad(groups, d0=1e-3),
    "dadapt-lion": lambda groups: mupkit.optim.DAdaptLion(groups, d0=1e-4),
    # clipping_scale 0.2: the threshold set at step 10 is 0.4 x the median norm, so the later steps clip
    "scaled-adam": lambda groups: mupkit.optim.ScaledAdam(groups, lr=0.05, clipping_scale=0.2, clipping_scope="all"),
    "scaled-adam-groups": lambda groups: mupkit.optim.ScaledAdam(groups, lr=0.05, clipping_scale=0.2, foreach=True),
    # full-matrix Newton-Schulz on the gathered update, fp32 so roundoff of the gradient all-reduce stays 1e-7
    "muon": lambda groups: mupkit.optim.Muon(groups, lr=0.02, adam_lr=1e-2, ns_dtype=torch.float32),
}

#: steps per run: 3, or enough to reach ScaledAdam's first clipping threshold (step 10) and clip after it
STEPS = {"scaled-adam": 16, "scaled-adam-groups": 16}


def clipping_record(opt) -> list[tuple[float, int]]:
    """ScaledAdam's clipping threshold and clip count per param group ([] for other optimizers)."""
    if not isinstance(opt, mupkit.optim.ScaledAdam):
        return []
    holders = [opt.state[g["params"][0]] for g in opt.param_groups]
    return [(float(h["clip_threshold"]), int(h["clip_count"])) for h in holders if "clip_threshold" in h]


def _worker(rank: int, world: int, path: str, mode: str, arch: str, optim: str, dtype: torch.dtype,
            out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        build, data = MODELS[arch]
        model = build(dtype)
        if mode == "ddp":
            model = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        opt = OPTIMIZERS[optim](mupkit.param_groups(model))
        torch.manual_seed(1)
        batch = data(world).to(dtype) if arch == "resmlp" else data(world)
        local = batch[rank * 2:(rank + 1) * 2]
        for _ in range(STEPS.get(optim, 3)):
            opt.zero_grad()
            model(local).square().mean().backward()
            opt.step()
        full = {strip(n): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
                for n, p in model.named_parameters()}
        torch.save(clipping_record(opt), f"{out}.clipping{rank}")
        if rank == 0:
            torch.save({"params": full, "scales": {strip(n): v for n, v in scales(model).items()}}, out)
        dist.barrier()  # no rank tears gloo down while another still uses it
    finally:
        dist.destroy_process_group()


def single_process_reference(world: int, arch: str, optim: str, dtype: torch.dtype):
    """The parameters after the same steps on the global batch, and the clipping record."""
    build, data = MODELS[arch]
    model = build(dtype)
    opt = OPTIMIZERS[optim](mupkit.param_groups(model))
    torch.manual_seed(1)
    batch = data(world).to(dtype) if arch == "resmlp" else data(world)
    for _ in range(STEPS.get(optim, 3)):
        opt.zero_grad()
        # mean over ranks of per-rank means == mean over the global batch (equal shards)
        model(batch).square().mean().backward()
        opt.step()
    return dict(model.named_parameters()), clipping_record(opt)


@pytest.mark.parametrize("mode,arch,optim,dtype", [
    ("ddp", "gpt", "adamw", torch.float64), ("fsdp2", "gpt", "adamw", torch.float64),
    ("fsdp2", "resmlp", "adam-atan2", torch.float32), ("fsdp2", "resmlp", "adafactor", torch.float32),
    ("fsdp2", "resmlp", "adafactor-single", torch.float32), ("fsdp2", "resmlp", "dadapt-adam", torch.float32),
    ("fsdp2", "resmlp", "prodigy", torch.float32), ("fsdp2", "resmlp", "dadapt-sgd", torch.float32),
    ("fsdp2", "resmlp", "dadapt-adagrad", torch.float32), ("fsdp2", "resmlp", "dadapt-lion", torch.float32),
    ("fsdp2", "resmlp", "scaled-adam", torch.float32), ("fsdp2", "resmlp", "scaled-adam-groups", torch.float32),
    ("ddp", "resmlp", "scaled-adam", torch.float32), ("fsdp2", "resmlp", "muon", torch.float32)])
def test_distributed_world_size_two_matches_single_process(mode, arch, optim, dtype):
    """float64: only the gradient all-reduce order differs (1e-9). float32 Adafactor: its column
    statistics and RMS values are summed over the shards, in a different order (1e-5); so are
    D-Adaptation's and Prodigy's numerator and denominator of the global d, and ScaledAdam's
    parameter RMS, <P, g> and clipping norm (its clipping decisions must be identical)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        mp.spawn(_worker, args=(2, os.path.join(tmp, "rdzv"), mode, arch, optim, dtype, out), nprocs=2, join=True)
        result = torch.load(out)
        clipping = [torch.load(f"{out}.clipping{rank}") for rank in range(2)]
    assert result["scales"] == scales(MODELS[arch][0]())
    if optim.startswith("scaled-adam"):  # resmlp's zero-initialized biases: ScaledAdam says they stay frozen
        with pytest.warns(UserWarning, match="all zeros at their first step"):
            reference, reference_clipping = single_process_reference(2, arch, optim, dtype)
    else:
        reference, reference_clipping = single_process_reference(2, arch, optim, dtype)
    assert clipping[0] == clipping[1]  # every rank made the same clipping decisions
    assert [count for _, count in clipping[0]] == [count for _, count in reference_clipping]
    for (threshold, _), (expected, _) in zip(clipping[0], reference_clipping):
        assert threshold == pytest.approx(expected, rel=1e-5)
    if optim.startswith("scaled-adam"):
        assert reference_clipping and all(count > 0 for _, count in reference_clipping), reference_clipping
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    if optim in ("dadapt-adam", "prodigy"):  # the global d's reduction-order rounding scales every step of
        tol = dict(rtol=1e-5, atol=5e-6)  # the run: 0.7e-6 to 2.5e-6 at most, by init, on weights of ~0.1
    if optim.startswith("scaled-adam"):  # the single process stacks its same-shape tensors (mupkit.optim.stacked):
        tol = dict(rtol=1e-5, atol=5e-6)  # RMS(P) and <P, g> summed in another order again; up to 2.3e-6 seen
    for name, p in reference.items():
        torch.testing.assert_close(result["params"][name], p.detach(), **tol)


def _resume_worker(rank: int, world: int, path: str, optim: str, ckpt: str, out: str) -> None:
    """Train 2 steps sharded, save with torch.distributed.checkpoint, take 1 more step; then load
    the checkpoint into a fresh sharded model and optimizer and take the same step."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        from torch.distributed.fsdp import fully_shard

        def sharded():
            model = make_resmlp()
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
            return model, OPTIMIZERS[optim](mupkit.param_groups(model))

        torch.manual_seed(1)
        x = torch.randn(2 * world, 64)

        def step(model, opt):
            opt.zero_grad()
            model(x[2 * rank:2 * rank + 2]).square().mean().backward()
            opt.step()

        model, opt = sharded()
        for _ in range(2):
            step(model, opt)
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
        step(model, opt)
        straight = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        model2, opt2 = sharded()
        model_sd2, optim_sd2 = get_state_dict(model2, opt2)
        loaded = {"model": model_sd2, "optim": optim_sd2}
        dcp.load(loaded, checkpoint_id=ckpt)
        set_state_dict(model2, opt2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
        step(model2, opt2)
        diff = max((straight[n] - p.full_tensor()).abs().max().item() for n, p in model2.named_parameters())
        if rank == 0:
            torch.save(diff, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("optim", ["adafactor", "prodigy", "dadapt-adam"])
def test_sharded_optimizer_state_resumes_from_a_distributed_checkpoint(optim):
    """State of reducing optimizers is kept as DTensors on the parameter's mesh, so a DCP save
    and load (world size 2, FSDP2) continues exactly where the uninterrupted run goes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "diff.pt")
        mp.spawn(_resume_worker, args=(2, os.path.join(tmp, "rdzv"), optim, os.path.join(tmp, "ckpt"), out),
                 nprocs=2, join=True)
        assert torch.load(out) == 0.0
