"""The dispatcher (mupkit.optim.dispatch): which path a step takes when none is chosen.

* The table: on the CPU, torch's fused kernel for Adam/AdamW/SGD, foreach for small tensors,
  single-tensor for large ones; a group's own flag wins; decisions are cached per optimizer and
  remade when the groups or their flags change.
* No optimizer's default ever calls ``torch.compile``.
* mupkit's AdamW/Adam/SGD default is bitwise torch's ``fused=True`` on the CPU.
* Groups of equal values step as one multi-tensor call.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import mupkit
from mupkit.optim import BY_NAME, AdamAtan2, dispatch

SHAPES = [(32, 48), (48, 32), (48,), (5,)]


def run(make, steps=10, shapes=SHAPES):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    opt = make(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return params


def test_cpu_table_follows_tensor_size_and_the_algorithms_kernels():
    small = [torch.zeros(4096) for _ in range(3)]
    large = [torch.zeros(1 << 17), torch.zeros(1 << 16)]
    eager = dispatch.Kernels()
    assert dispatch.default_path(small, eager) == "foreach"
    assert dispatch.default_path(large, eager) == "single"
    assert dispatch.default_path(small, dispatch.Kernels(foreach=False)) == "single"
    assert dispatch.default_path(large, dispatch.Kernels(cpu_fused=True)) == "fused"
    assert dispatch.default_path(small + [torch.zeros(3, dtype=torch.int64)], dispatch.Kernels(cpu_fused=True)) \
        == "foreach"  # torch's fused kernel takes floating-point tensors only


@pytest.mark.parametrize("flags,path", [(dict(fused=True), "fused"), (dict(compiled=True), "compiled"),
                                        (dict(foreach=True), "foreach"), (dict(foreach=False), "single"),
                                        (dict(fused=False), "single")])
def test_a_groups_own_flag_wins(flags, path):
    group = {"params": [torch.zeros(1 << 17)], **flags}
    assert dispatch.chosen_path(group, dispatch.Kernels(cpu_fused=True)) == path


def test_decisions_are_cached_and_remade_when_groups_or_flags_change():
    params = [torch.nn.Parameter(torch.zeros(8)) for _ in range(2)]
    opt = AdamAtan2([{"params": [params[0]]}, {"params": [params[1]], "foreach": False}])
    first = dispatch.group_paths(opt, opt.kernels)
    assert first == ["foreach", "single"]
    assert dispatch.group_paths(opt, opt.kernels) is first  # cached
    opt.param_groups[1]["foreach"] = True
    assert dispatch.group_paths(opt, opt.kernels) == ["foreach", "foreach"]
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1 << 17))]})
    assert dispatch.group_paths(opt, opt.kernels) == ["foreach", "foreach", "single"]


def test_conflicting_flags_are_refused():
    with pytest.raises(ValueError, match="choose one of"):
        AdamAtan2([torch.nn.Parameter(torch.zeros(2))], foreach=True, compiled=True)


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_no_default_ever_compiles(name, monkeypatch):
    """A model of 4M+ elements in large tensors (where the old default compiled) and many small
    ones: the default step of every optimizer runs without ``torch.compile``."""
    def refuse(*args, **kwargs):
        raise AssertionError("the default path called torch.compile")
    monkeypatch.setattr(torch, "compile", refuse)
    shapes = [(1024, 1024)] * 4 + ([] if name == "muon" else [(64,)] * 70)  # Muon without a plan: matrices only
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor a fallback that caught the refusal
        params = run(lambda ps: BY_NAME[name](ps, lr=1e-3), steps=2, shapes=shapes)
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("name,kwargs", [("AdamW", dict(weight_decay=0.1)), ("Adam", dict(weight_decay=0.1)),
                                         ("SGD", dict(lr=0.1, momentum=0.9))])
def test_torch_based_default_is_torchs_fused_cpu_kernel(name, kwargs):
    """Bitwise torch's ``fused=True`` by default, bitwise torch's own default with
    ``fused=False``, and the groups keep ``fused=None`` (state_dict and the user see no change)."""
    ours = run(lambda ps: getattr(mupkit.optim, name)(ps, **kwargs))
    fused = run(lambda ps: getattr(torch.optim, name)(ps, fused=True, **kwargs))
    assert all(torch.equal(a, b) for a, b in zip(ours, fused))
    ours_loop = run(lambda ps: getattr(mupkit.optim, name)(ps, fused=False, **kwargs))
    torch_default = run(lambda ps: getattr(torch.optim, name)(ps, **kwargs))
    assert all(torch.equal(a, b) for a, b in zip(ours_loop, torch_default))
    opt = getattr(mupkit.optim, name)([torch.nn.Parameter(torch.ones(3))], **kwargs)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    assert opt.param_groups[0]["fused"] is None and opt.state_dict()["param_groups"][0]["fused"] is None


def test_groups_of_equal_values_step_as_one_multi_tensor_call(monkeypatch):
    """12 groups, 3 distinct multipliers: 3 multi-tensor calls per step, and the result is bitwise
    that of 12 optimizers stepping one group each (so merging changes only the call count)."""
    import mupkit.optim.adam_atan2 as atan2_module
    calls = []
    original = atan2_module.adam_atan2_update
    monkeypatch.setattr(atan2_module, "adam_atan2_update", lambda p, *a: calls.append(len(p)) or original(p, *a))
    scales = [1.0, 0.5, 0.25]

    def groups(ps):
        return [{"params": [p], "lr_scale": scales[i % 3], "param_names": [f"p{i}"]} for i, p in enumerate(ps)]
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4096, generator=g)) for _ in range(12)]
    alone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    merged = AdamAtan2(groups(params), foreach=True)
    separate = [AdamAtan2([group], foreach=True) for group in groups(alone)]
    for _ in range(3):
        for p, q in zip(params, alone):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        calls.clear()
        merged.step()
        assert sorted(calls) == [4, 4, 4]
        for opt in separate:
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, alone))
    assert len(merged.param_groups) == 12 and merged.param_groups[0]["param_names"] == ["p0"]
