"""DAdaptAdam, DAdaptSGD, DAdaptLion and Prodigy: parity with dadaptation 3.2 / prodigyopt 1.1.2, muP scales, fixes.

Parity: float64, 100 steps, shapes (8,16), (16,), (3,4,5), (), a second (8,16) and a frozen
parameter, gradients ``(p - p*) + 0.1 noise`` (so d grows); ``d`` sequence to rtol 1e-12,
parameters to 1e-10.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import mupkit
from mupkit import models
from mupkit.optim import DAdaptAdaGrad, DAdaptAdam, DAdaptLion, DAdaptSGD, Prodigy

SHAPES = [(8, 16), (16,), (3, 4, 5), (), (8, 16)]


def run(make, steps=100, zero_first=False):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in SHAPES]
    frozen = torch.nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))
    targets = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    opt = make(params + [frozen])
    ds = []
    for step in range(steps):
        for p, t in zip(params, targets):
            p.grad = torch.zeros_like(p) if zero_first and step == 0 else \
                (p.detach() - t) + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64)
        opt.step()
        ds.append(opt.param_groups[0]["d"])
    return params + [frozen], ds


def assert_same(ours, ref, growth=5):
    (p1, d1), (p2, d2) = ours, ref
    assert max((a - b).abs().max().item() for a, b in zip(p1, p2)) <= 1e-10
    assert all(abs(x - y) <= 1e-12 * abs(y) for x, y in zip(d1, d2))
    assert d1[-1] > growth * d1[0]  # d adapted (growth_rate=1.02 caps it at 1.02^100 = 7.2x)


@pytest.mark.parametrize("kwargs", [dict(), dict(decouple=True, weight_decay=0.1), dict(weight_decay=0.1),
                                    dict(use_bias_correction=True), dict(growth_rate=1.02)])
def test_dadapt_adam_matches_dadaptation(kwargs):
    dadaptation = pytest.importorskip("dadaptation")
    assert_same(run(lambda ps: DAdaptAdam(ps, **kwargs)), run(lambda ps: dadaptation.DAdaptAdam(ps, **kwargs)))


@pytest.mark.parametrize("kwargs", [dict(), dict(decouple=False, weight_decay=0.1), dict(weight_decay=0.1),
                                    dict(safeguard_warmup=True), dict(use_bias_correction=True), dict(d_coef=0.5),
                                    dict(growth_rate=1.02), dict(slice_p=11), dict(betas=(0.0, 0.999))])
def test_prodigy_matches_prodigyopt(kwargs):
    prodigyopt = pytest.importorskip("prodigyopt")
    assert_same(run(lambda ps: Prodigy(ps, **kwargs)), run(lambda ps: prodigyopt.Prodigy(ps, **kwargs)))


@pytest.mark.parametrize("name,kwargs", [("DAdaptAdam", dict(decouple=True, weight_decay=0.1)),
                                         ("DAdaptAdam", dict(weight_decay=0.1, use_bias_correction=True)),
                                         ("Prodigy", dict(weight_decay=0.1)), ("Prodigy", dict(betas=(0.0, 0.999))),
                                         ("Prodigy", dict(decouple=False, weight_decay=0.1, slice_p=3))])
@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_single_tensor_and_foreach_paths_match_the_reference(name, kwargs, foreach):
    """The per-tensor functions, tensor by tensor and over lists: the d sequence and the
    parameters match the reference (1e-12 / 1e-10, float64, 100 steps)."""
    reference = {"DAdaptAdam": ("dadaptation", "DAdaptAdam"), "Prodigy": ("prodigyopt", "Prodigy")}[name]
    ref_cls = getattr(pytest.importorskip(reference[0]), reference[1])
    ours = run(lambda ps: getattr(mupkit.optim, name)(ps, foreach=foreach, **kwargs))
    assert_same(ours, run(lambda ps: ref_cls(ps, **kwargs)))


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_prodigy_zero_initialized_parameter_matches_prodigyopt_without_resizing_a_temporary(foreach):
    """prodigyopt keeps a 0-dim p0 for a parameter that is all zeros at the start; the step
    broadcasts it over the parameter (tensor by tensor, and over a list beside a full p0) with no
    out= temporary resized on the way (a deprecated torch behaviour, an error here), and the d
    sequence and parameters match prodigyopt (float64, 30 steps: 1e-12 / 1e-10)."""
    prodigyopt = pytest.importorskip("prodigyopt")

    def train(make):
        gen = torch.Generator().manual_seed(4)
        params = [torch.nn.Parameter(torch.zeros(40, dtype=torch.float64)),
                  torch.nn.Parameter(torch.randn(8, 16, generator=gen, dtype=torch.float64))]
        opt, ds = make(params), []
        for _ in range(30):
            for p in params:
                p.grad = (p.detach() - 1.0) + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            opt.step()
            ds.append(opt.param_groups[0]["d"])
        return params, ds
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = train(lambda ps: Prodigy(ps, foreach=foreach))
    assert_same(ours, train(lambda ps: prodigyopt.Prodigy(ps)), growth=1)


@pytest.mark.parametrize("kwargs", [dict(), dict(momentum=0.9), dict(weight_decay=1e-3), dict(growth_rate=1.02)])
def test_dadapt_sgd_matches_dadaptation(kwargs):
    dadaptation = pytest.importorskip("dadaptation")
    assert_same(run(lambda ps: DAdaptSGD(ps, **kwargs)), run(lambda ps: dadaptation.DAdaptSGD(ps, **kwargs)))


@pytest.mark.parametrize("kwargs", [dict(), dict(momentum=0.9), dict(weight_decay=1e-3), dict(growth_rate=1.02)])
def test_dadapt_adagrad_matches_dadaptation(kwargs):
    dadaptation = pytest.importorskip("dadaptation")
    assert_same(run(lambda ps: DAdaptAdaGrad(ps, **kwargs)), run(lambda ps: dadaptation.DAdaptAdaGrad(ps, **kwargs)))


@pytest.mark.parametrize("kwargs", [dict(), dict(weight_decay=0.1)])
def test_dadapt_lion_matches_dadaptation(kwargs):
    dadaptation = pytest.importorskip("dadaptation")
    assert_same(run(lambda ps: DAdaptLion(ps, **kwargs)), run(lambda ps: dadaptation.DAdaptLion(ps, **kwargs)))


def test_layer_scale_groups_and_a_frozen_group_match_the_reference():
    dadaptation = pytest.importorskip("dadaptation")

    def groups(ps):
        return [{"params": ps[:2], "layer_scale": 1.0}, {"params": ps[2:5], "layer_scale": 0.5},
                {"params": ps[5:], "lr": 0.0}]
    assert_same(run(lambda ps: DAdaptAdam(groups(ps))), run(lambda ps: dadaptation.DAdaptAdam(groups(ps))))


def test_lr_scale_acts_like_layer_scale():
    """muP's lr_scale (from mupkit.param_groups) is DAdaptAdam's layer_scale."""
    with_lr_scale = run(lambda ps: DAdaptAdam([{"params": ps[:2], "lr_scale": 0.5}, {"params": ps[2:]}]))
    with_layer_scale = run(lambda ps: DAdaptAdam([{"params": ps[:2], "layer_scale": 0.5}, {"params": ps[2:]}]))
    assert with_lr_scale[1] == with_layer_scale[1]


@pytest.mark.parametrize("cls", [DAdaptAdam, Prodigy, DAdaptSGD, DAdaptLion, DAdaptAdaGrad])
def test_zero_first_gradient_skips_and_grads_are_not_mutated(cls):
    """dadaptation's DAdaptSGD divides by the first gradient's norm: ZeroDivisionError on zeros."""
    params, ds = run(lambda ps: cls(ps), steps=5, zero_first=True)
    assert all(torch.isfinite(p).all() for p in params) and ds[0] == ds[1] == 1e-6 and ds[-1] > 1e-6
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    p.grad = torch.full((3,), 0.5, dtype=torch.float64)
    l2 = {} if cls in (DAdaptSGD, DAdaptLion, DAdaptAdaGrad) else dict(decouple=False)
    cls([p], weight_decay=0.1, **l2).step()
    assert torch.equal(p.grad, torch.full((3,), 0.5, dtype=torch.float64))  # the references add wd * p in place


def test_mup_groups_and_errors():
    torch.manual_seed(0)
    model = mupkit.build(models.mlp, base=dict(width=32), target=dict(width=128))
    opt = Prodigy(mupkit.param_groups(model))
    hidden = next(g for g in opt.param_groups if "2.weight" in g["param_names"])
    assert hidden["lr_scale"] == pytest.approx(0.25) and Prodigy.family.name == "adamw"
    assert DAdaptAdam(mupkit.param_groups(model)).family.name == "adam"  # L2 decay by default (decouple=False)
    with pytest.raises(ValueError, match="share one lr"):
        DAdaptAdam([{"params": [torch.nn.Parameter(torch.ones(2))], "lr": 1.0},
                    {"params": [torch.nn.Parameter(torch.ones(2))], "lr": 0.5}])


@pytest.mark.parametrize("cls", [DAdaptAdam, Prodigy])
def test_adapted_step_size_is_the_same_at_every_width_under_mup(cls):
    """Under muP the estimated d must not depend on width (else the adapted LR would drift):
    the group scales enter d through the change of variables in the module docstring."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 64, generator=g), torch.randint(0, 10, (64,), generator=g)
    ds = {}
    for width in (64, 1024):
        torch.manual_seed(0)
        model = mupkit.build(models.mlp, base=dict(width=64), delta=dict(width=128), target=dict(width=width),
                             zero_init=("readout",))
        opt = cls(mupkit.param_groups(model))
        for _ in range(8):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        ds[width] = opt.param_groups[0]["d"]
    assert ds[64] > 1e-5, ds  # d has grown from d0 = 1e-6
    slope = math.log(ds[1024] / ds[64]) / math.log(16)  # the coordinate check's measure, against width
    assert abs(slope) <= 0.05, ds


@pytest.mark.parametrize("cls,kwargs", [
    (DAdaptAdam, dict(decouple=True, weight_decay=0.1)), (DAdaptAdam, dict(weight_decay=0.05)),
    (Prodigy, dict(weight_decay=0.1)), (Prodigy, dict(betas=(0.0, 0.99), decouple=False, weight_decay=0.05)),
    (Prodigy, dict(use_bias_correction=True, d0=1e-4))])
def test_compiled_path_matches_the_eager_path(cls, kwargs):
    """compiled=True fuses each tensor's update into one compiled pass. In float64 it agrees with the
    eager path to 1e-10 (1e-11 absolute) after 12 steps with muP groups: the same math, summed in another order.
    (In float32 the orders differ by ~1e-7 per sum, and d, a ratio of sums that cancel, then
    differs by ~2e-5; that is roundoff, not the algorithm, so float64 is what this checks.)"""
    def run(compiled):
        torch.manual_seed(0)
        model = mupkit.build(models.mlp, base=dict(width=16), target=dict(width=48)).double()
        opt = cls(mupkit.param_groups(model), compiled=compiled, **kwargs)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(32, 64, generator=gen, dtype=torch.float64), torch.randint(0, 10, (32,), generator=gen)
        for _ in range(12):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return list(model.parameters()), opt.param_groups[0]["d"]
    eager, d_eager = run(False)
    compiled, d_compiled = run(True)
    assert d_compiled == pytest.approx(d_eager, rel=1e-10) and d_eager > opt_d0(kwargs)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


def opt_d0(kwargs) -> float:
    """The initial d of a run (d has grown past it when it adapted)."""
    return kwargs.get("d0", 1e-6)
