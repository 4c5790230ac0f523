"""The torch route equals mupkit's: ``torch.optim.X(param_groups(model, optimizer=X, lr=...))``
steps like ``mupkit.optim.X(param_groups(model), lr=...)`` when eps/weight_decay are left to the
class's defaults (which param_groups fills in and scales per group)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import mupkit
from mupkit import models

TOL = 1e-7  # max abs parameter difference after STEPS fp32 steps
STEPS = 10


def untied_gpt():
    """Untied readout: absorbed, so its Adam eps_scale is 4 (width 128 over base 32)."""
    torch.manual_seed(0)
    return mupkit.build(models.gpt, base=dict(width=32, tie=False, base_width=32),
                        target=dict(width=128, tie=False, base_width=32))


def umup_mlp():
    """u-muP: AdamW's weight decay follows the independent policy, every eps_scale is != 1."""
    torch.manual_seed(0)
    return mupkit.build(models.mlp, base=dict(width=32), target=dict(width=128), parametrization="umup")


def batch_and_loss(model):
    torch.manual_seed(1)
    if isinstance(model, models.GPT):
        x = torch.randint(0, 256, (4, 16))
    else:
        x = torch.randn(8, 64)
    return lambda m: m(x).square().mean()


def max_diff_after_steps(model, torch_cls, mupkit_cls, lr):
    assert model.training and all(p.dtype == torch.float32 for p in model.parameters())
    loss = batch_and_loss(model)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ref = torch_cls(mupkit.param_groups(a, optimizer=torch_cls, lr=lr))  # no eps, no weight_decay
    ours = mupkit_cls(mupkit.param_groups(b), lr=lr, foreach=False, fused=False)
    for _ in range(STEPS):
        for m, opt in ((a, ref), (b, ours)):
            opt.zero_grad()
            loss(m).backward()
            opt.step()
    moved = max((p - q).abs().max().item() for p, q in zip(model.parameters(), a.parameters()))
    assert moved > 100 * TOL, "the runs barely moved; the comparison would be vacuous"
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def scales(model, family):
    return {g["eps_scale"] for g in mupkit.param_groups(model, optimizer=family, lr=1.0)}


def test_torch_adam_with_default_eps_equals_mupkit_adam():
    model = untied_gpt()
    assert scales(model, "adam") - {1.0}, "the model needs a group with eps_scale != 1 for this test to mean anything"
    diff = max_diff_after_steps(model, torch.optim.Adam, mupkit.optim.Adam, lr=1e-3)
    assert diff <= TOL, f"max abs parameter difference {diff:.3g} after {STEPS} steps exceeds {TOL:g}"


@pytest.mark.parametrize("make", [untied_gpt, umup_mlp])
def test_torch_adamw_with_default_eps_and_weight_decay_equals_mupkit_adamw(make):
    model = make()
    groups = mupkit.param_groups(model, optimizer="adamw", lr=1.0)
    assert {g["eps_scale"] for g in groups} - {1.0} and {g["wd_scale"] for g in groups} - {1.0}
    diff = max_diff_after_steps(model, torch.optim.AdamW, mupkit.optim.AdamW, lr=1e-2)
    assert diff <= TOL, f"max abs parameter difference {diff:.3g} after {STEPS} steps exceeds {TOL:g}"


@pytest.mark.parametrize("make", [untied_gpt, umup_mlp])
@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_filled_eps_and_weight_decay_are_the_class_defaults_scaled_per_group(make, cls):
    model = make()
    lr = 1e-3
    defaults = {k: inspect.signature(cls).parameters[k].default for k in ("eps", "weight_decay")}
    assert defaults["eps"] == 1e-8 and defaults["weight_decay"] == (0.01 if cls is torch.optim.AdamW else 0)
    filled = mupkit.param_groups(model, optimizer=cls, lr=lr)
    explicit = mupkit.param_groups(model, optimizer=cls, lr=lr, **defaults)
    umup_adamw = make is umup_mlp and cls is torch.optim.AdamW  # independent decay: wd / (lr * lr_scale)
    assert any(g["eps_scale"] != 1 for g in filled)
    for g, e in zip(filled, explicit, strict=True):
        assert g["param_names"] == e["param_names"]
        assert g["eps"] == pytest.approx(defaults["eps"] * g["eps_scale"], rel=1e-12)
        wd = defaults["weight_decay"] / (lr * g["lr_scale"]) if umup_adamw else defaults["weight_decay"] * g["wd_scale"]
        assert g["weight_decay"] == pytest.approx(wd, rel=1e-12)
        assert (g["eps"], g["weight_decay"]) == (e["eps"], e["weight_decay"])
    # an instance reads its class's defaults too
    instance = cls([torch.nn.Parameter(torch.zeros(1))])
    assert [g["eps"] for g in mupkit.param_groups(model, optimizer=instance, lr=lr)] == [g["eps"] for g in filled]


def test_explicit_values_win_and_names_and_eps_free_classes_fill_nothing():
    model = untied_gpt()
    groups = mupkit.param_groups(model, optimizer=torch.optim.AdamW, lr=1e-3, eps=1e-6, weight_decay=0.1)
    assert [g["eps"] / g["eps_scale"] for g in groups] == pytest.approx([1e-6] * len(groups))
    assert [g["weight_decay"] / g["wd_scale"] for g in groups] == pytest.approx([0.1] * len(groups))
    by_name = mupkit.param_groups(model, optimizer="adamw", lr=1e-3)  # no class to read defaults from
    assert all("eps" not in g and "weight_decay" not in g for g in by_name)
    sgd = mupkit.param_groups(model, optimizer=torch.optim.SGD, lr=1e-1)  # SGD has no eps; its default wd is 0
    assert all("eps" not in g and g["weight_decay"] == 0 for g in sgd)


def test_a_default_that_is_not_a_number_is_an_error_naming_it():
    class AutoEps(torch.optim.Adam):
        family = mupkit.rules.FAMILIES["adam"]  # a third-party class names its family

        def __init__(self, params, lr=1e-3, eps=None, **kwargs):  # None: "chosen later"
            super().__init__(params, lr=lr, eps=1e-8 if eps is None else eps, **kwargs)

    model = untied_gpt()
    with pytest.raises(ValueError, match=r"default eps=None .* pass eps=\.\.\. to param_groups"):
        mupkit.param_groups(model, optimizer=AutoEps, lr=1e-3)
    groups = mupkit.param_groups(model, optimizer=AutoEps, lr=1e-3, eps=1e-8)  # given: no default needed
    assert [g["eps"] / g["eps_scale"] for g in groups] == pytest.approx([1e-8] * len(groups))
