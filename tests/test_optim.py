"""param_groups and the muP-aware torch optimizers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mupkit
from mupkit import models


def gpt(width=64):
    torch.manual_seed(0)
    return mupkit.build(models.gpt, base=dict(width=32, base_width=32), target=dict(width=width, base_width=32))


def test_param_groups_cover_every_trainable_parameter_once_and_merge_equal_scales():
    model = gpt()
    model.wpe.weight.requires_grad_(False)
    groups = mupkit.param_groups(model)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(id(p) for p in trainable) and len(ids) == len(set(ids))
    assert all(g["params"] for g in groups)
    assert len(groups) == 3  # hidden matrices, the embedding (its own Shampoo rule), the vector-like rest


def test_param_groups_for_torch_need_lr_and_carry_concrete_values():
    model = gpt()
    with pytest.raises(ValueError, match="needs lr="):
        mupkit.param_groups(model, optimizer=torch.optim.Adam)
    with pytest.raises(ValueError, match="without optimizer="):
        mupkit.param_groups(model, lr=1e-3)
    groups = mupkit.param_groups(model, optimizer=torch.optim.AdamW, lr=1e-2, weight_decay=0.1, eps=1e-8)
    hidden = next(g for g in groups if "blocks.0.mlp.0.weight" in g["param_names"])
    assert hidden["lr"] == pytest.approx(1e-2 / 2) and hidden["weight_decay"] == pytest.approx(0.2)
    torch.optim.AdamW(groups)  # torch accepts them as they are


def test_mupkit_optimizers_reject_concrete_groups():
    model = gpt()
    with pytest.raises(ValueError, match="without lr"):
        mupkit.optim.Adam(mupkit.param_groups(model, optimizer="adam", lr=1e-3))


def test_param_groups_and_optimizers_never_mutate_the_callers_dicts():
    model = gpt()
    groups = mupkit.param_groups(model)
    before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in groups])
    opt = mupkit.optim.AdamW(groups, lr=1e-3, weight_decay=0.1)
    assert [{k: v for k, v in g.items() if k != "params"} for g in groups] == before
    assert {g["lr_scale"] for g in opt.param_groups} == {1.0, 0.5}


@pytest.mark.parametrize("cls", [mupkit.optim.Adam, mupkit.optim.AdamW, mupkit.optim.SGD])
@pytest.mark.parametrize("impl", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_mupkit_optimizer_equals_torch_with_concrete_groups(cls, impl):
    if cls is mupkit.optim.SGD and "fused" in impl:
        impl = {"fused": True}  # torch SGD has a fused CPU kernel too
    torch_cls = next(c for c in cls.__mro__ if c.__module__.startswith("torch.optim"))
    a, b = gpt(), gpt()
    kw = dict(lr=3e-3, weight_decay=0.05, **({"momentum": 0.9} if cls is mupkit.optim.SGD else {}))
    ours = cls(mupkit.param_groups(a), **impl, **kw)
    family = cls.family.name
    ref = torch_cls(mupkit.param_groups(b, optimizer=family, lr=kw["lr"], weight_decay=kw["weight_decay"],
                                        eps=1e-8), **impl, **{k: v for k, v in kw.items() if k not in ("lr", "weight_decay")})
    x = torch.randint(0, 256, (2, 8))
    for _ in range(3):
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert all(g["lr"] == 3e-3 for g in ours.param_groups)  # the base lr is what schedulers see


def test_schedulers_scale_every_groups_lr_relatively():
    model = gpt()
    opt = mupkit.optim.Adam(mupkit.param_groups(model), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    seen = []
    hidden = next(g for g in opt.param_groups if g["lr_scale"] != 1.0)
    real_step = torch.optim.Adam.step

    def spy(self, closure=None):  # torch's step sees the effective groups
        seen.append(next(g["lr"] for g in self.param_groups if g["params"][0] is hidden["params"][0]))
        return real_step(self, closure)

    torch.optim.Adam.step = spy
    try:
        for _ in range(3):
            model(torch.randint(0, 256, (1, 4))).sum().backward()
            opt.step()
            sched.step()
    finally:
        torch.optim.Adam.step = real_step
    assert seen == pytest.approx([1e-2 * 0.5, 0.5e-2 * 0.5, 0.25e-2 * 0.5])
    assert hidden["lr"] == pytest.approx(1e-2 / 8)


def test_state_dict_round_trip_continues_identically():
    def run(split):
        model = gpt()
        opt = mupkit.optim.AdamW(mupkit.param_groups(model), lr=1e-2, weight_decay=0.1)
        x = torch.randint(0, 256, (2, 8))
        for step in range(6):
            if step == split:
                saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
                model = gpt()
                model.load_state_dict(saved_model)
                opt = mupkit.optim.AdamW(mupkit.param_groups(model), lr=1e-2, weight_decay=0.1)
                opt.load_state_dict(saved_opt)
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]
    for p, q in zip(run(split=3), run(split=-1)):
        assert torch.equal(p, q)


@pytest.mark.parametrize("policy", ["coupled", "independent"])
def test_per_step_weight_decay_is_width_invariant(policy):
    """With zero gradients only decay acts: the relative shrink of each weight per step."""
    shrink = {}
    for width in (64, 256):
        model = gpt(width)
        opt = mupkit.optim.AdamW(mupkit.param_groups(model), lr=2e-2, weight_decay=0.5,
                                 weight_decay_policy=policy)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        shrink[width] = {n: float(1 - p.detach().double().norm() / before[n].double().norm())
                         for n, p in model.named_parameters() if before[n].norm() > 0}
    expected = 2e-2 * 0.5 if policy == "coupled" else 0.5
    for name in shrink[64]:  # float32 parameters: 1e-4 relative on a 1e-2 shrink is ~10 ulp
        assert shrink[64][name] == pytest.approx(shrink[256][name], rel=1e-4), name
        assert shrink[256][name] == pytest.approx(expected, rel=1e-4), name


def test_independent_weight_decay_needs_decoupled_decay():
    model = gpt()
    with pytest.raises(ValueError, match="needs decoupled decay"):
        mupkit.optim.Adam(mupkit.param_groups(model), lr=1e-3, weight_decay=0.1, weight_decay_policy="independent")
    with pytest.raises(ValueError, match="needs decoupled weight decay"):
        mupkit.param_groups(model, optimizer="sgd", lr=0.1, weight_decay=0.1, weight_decay_policy="independent")


def test_first_adam_step_moves_hidden_weights_by_lr_over_m():
    """mup's measured first step: max |dW| = lr / m_in for hidden and lr for vector-like params."""
    model = gpt(128)  # m = 4
    opt = mupkit.optim.Adam(mupkit.param_groups(model), lr=1e-2, eps=1e-12)  # eps out of the way: |step| = lr
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randint(0, 256, (2, 8))).square().mean().backward()
    opt.step()
    dw = {n: (p - before[n]).abs().max().item() for n, p in model.named_parameters()}
    assert dw["blocks.0.mlp.0.weight"] == pytest.approx(1e-2 / 4, rel=1e-3)
    assert dw["blocks.0.ln1.weight"] == pytest.approx(1e-2, rel=1e-3)


def test_plain_parameters_behave_exactly_like_torch():
    torch.manual_seed(0)
    a = nn.Linear(4, 3)
    b = copy.deepcopy(a)
    ours, ref = mupkit.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), torch.optim.SGD(b.parameters(), lr=0.1,
                                                                                         momentum=0.9)
    for _ in range(3):
        for m, o in ((a, ours), (b, ref)):
            o.zero_grad()
            m(torch.ones(2, 4)).sum().backward()
            o.step()
    assert torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("impl", [{"foreach": True}, {"fused": True}])
def test_groups_with_equal_multipliers_share_one_kernel_call(impl, monkeypatch):
    """12 groups with 3 distinct lr_scale values: torch's kernels see 3 groups, the result is
    bitwise torch's with 12 concrete groups, and the user's groups are untouched."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(12)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    scales = [1.0, 0.5, 0.25]
    ours = mupkit.optim.AdamW([{"params": [p], "lr_scale": scales[i % 3]} for i, p in enumerate(params)], lr=1e-2,
                              weight_decay=0.1, **impl)
    theirs = torch.optim.AdamW([{"params": [p], "lr": 1e-2 * scales[i % 3], "weight_decay": 0.1}
                                for i, p in enumerate(ref)], lr=1e-2, **impl)
    groups_seen = []
    init_group = torch.optim.AdamW._init_group
    monkeypatch.setattr(torch.optim.AdamW, "_init_group",
                        lambda self, group, *a, **k: groups_seen.append(len(group["params"])) or init_group(
                            self, group, *a, **k))
    before = [g for g in ours.param_groups]
    for _ in range(3):
        for p, q in zip(params, ref):
            p.grad = torch.randn(5, 3)
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
    assert groups_seen[:3] == [4, 4, 4]  # ours: 3 merged groups of 4 (then theirs: 12 groups of 1)
    assert ours.param_groups == before and all(len(g["params"]) == 1 for g in ours.param_groups)
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_many_small_cpu_tensors_step_in_one_multi_tensor_call(monkeypatch):
    """The CPU default for small tensors (mupkit.optim.dispatch) is the multi-tensor path: one
    call of the update function over the list, not one per tensor."""
    import mupkit.optim.adafactor as adafactor_module
    params = [torch.nn.Parameter(torch.randn(4096)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn(4096)
    calls = []
    original = adafactor_module.adafactor_update
    monkeypatch.setattr(adafactor_module, "adafactor_update",
                        lambda p, *a, **k: calls.append(len(p) if isinstance(p, list) else 1) or original(p, *a, **k))
    mupkit.optim.Adafactor(params).step()
    assert calls == [3]


def test_merge_equal_groups_joins_only_groups_with_the_same_keys_and_values():
    from mupkit.optim.groups import merge_equal_groups
    a, b, c, d, e = (nn.Parameter(torch.zeros(2)) for _ in range(5))
    groups = [{"params": [a], "param_names": ["a"], "lr": 1.0},
              {"params": [b], "param_names": ["b"], "lr": 1.0},
              {"params": [c], "lr": 1.0, "x": 0},  # as many keys, but not param_names: its own group
              {"params": [d], "param_names": ["d"], "lr": 2.0},
              {"params": [e], "param_names": ["e"], "lr": 1.0, "tags": ["unhashable"]}]
    merged = merge_equal_groups(groups)
    assert [(len(g["params"]), g.get("param_names")) for g in merged] == [(2, ["a", "b"]), (1, None), (1, ["d"]),
                                                                          (1, ["e"])]
    assert merged[0]["params"][0] is a and merged[0]["params"][1] is b
    assert groups[0]["params"] == [a] and groups[0]["param_names"] == ["a"]  # the inputs are not modified
    distinct = groups[2:]
    assert merge_equal_groups(distinct) is distinct  # no two equal: the list itself, no copies
