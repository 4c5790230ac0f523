"""The ``shampoo`` muP family (Ishikawa & Karakida 2024, Table 1; docs/shampoo.md) with heavyball's SOAP."""

import heavyball
import pytest
import torch

import mupkit
from mupkit import models
from mupkit.rules import FAMILIES, MUP, scales_for
from mupkit.roles import Role

heavyball.utils.compile_mode = None  # eager on the CPU: a few steps never earn back a compile


def mlp(width=64):
    torch.manual_seed(0)
    return mupkit.build(lambda width: models.mlp(width, d_in=8, d_out=4), base=dict(width=16),
                        target=dict(width=width))


def test_multipliers_at_width_x4_follow_the_formula():
    """m = 4: LR sqrt(m_out/m_in) and damping sqrt(m_in/m_out) for matrices (the readout's 1/m_in
    forward multiplier absorbed: LR m^-1/2, damping m^1/2), vectors LR 1 and damping m_out^-1."""
    plan = mupkit.plan_of(mlp(64))
    expected = {"0.weight": (2.0, 0.5), "2.weight": (1.0, 1.0), "4.weight": (0.5, 2.0),
                "0.bias": (1.0, 0.25), "2.bias": (1.0, 0.25), "4.bias": (1.0, 1.0)}
    for name, (lr, eps) in expected.items():
        s = plan[name].scales["shampoo"]
        assert (s.lr, s.eps) == pytest.approx((lr, eps)), name
        assert s.wd == pytest.approx(1 / lr), name  # coupled: lr * wd as at the base
    # a hidden matrix whose fans scale differently (m_in = 4, m_out = 16): sqrt(4) and sqrt(1/4)
    s = scales_for(MUP.rules[Role.HIDDEN], FAMILIES["shampoo"], 4.0, 16.0)
    assert (s.lr, s.eps) == pytest.approx((2.0, 0.5))


def test_param_groups_for_heavyball_soap_are_concrete_and_heavyball_steps_with_them():
    model = mlp(64)
    groups = mupkit.param_groups(model, optimizer=heavyball.SOAP, lr=1e-2, eps=1e-3, weight_decay=0.0)
    plan = mupkit.plan_of(model)
    for g in groups:
        s = plan[g["param_names"][0]].scales["shampoo"]
        assert g["mupkit_family"] == "shampoo"
        assert (g["lr"], g["eps"]) == pytest.approx((1e-2 * s.lr, 1e-3 * s.eps))
    assert len({g["lr"] for g in groups}) == 3 and len({g["eps"] for g in groups}) == 4

    twin = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    reference = heavyball.SOAP([{"params": [twin[n]], "lr": g["lr"], "eps": g["eps"]}
                                for g in groups for n in g["param_names"]], weight_decay=0.0)
    unscaled = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    plain = heavyball.SOAP(list(unscaled.values()), lr=1e-2, eps=1e-3, weight_decay=0.0)
    opt = heavyball.SOAP(groups)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # SOAP's first step only sets up its preconditioner
        for n, p in model.named_parameters():
            p.grad = torch.randn(p.shape, generator=gen)
            twin[n].grad, unscaled[n].grad = p.grad.clone(), p.grad.clone()
        for o in (opt, reference, plain):
            o.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, twin[n], rtol=0, atol=0, msg=n)
    assert not torch.allclose(model.get_parameter("0.weight"), unscaled["0.weight"])


def test_mupkit_soap_factory_equals_the_torch_route():
    model = mlp(64)
    twin = mlp(64)
    ours = mupkit.optim.SOAP(mupkit.param_groups(model), lr=1e-2, eps=1e-3, weight_decay=0.1)
    theirs = heavyball.SOAP(mupkit.param_groups(twin, optimizer=heavyball.SOAP, lr=1e-2, eps=1e-3,
                                                weight_decay=0.1))
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for m, o in ((model, ours), (twin, theirs)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    assert mupkit.optim.get_optimizer("shampoo") is mupkit.optim.SOAP


def test_plain_parameters_step_at_the_base_width():
    """Like every mupkit optimizer: no muP groups, every multiplier 1 (heavyball's own values)."""
    plain = mupkit.optim.SOAP(list(mlp(64).parameters()), lr=1e-2, eps=1e-3, weight_decay=0.1)
    assert [(g["lr"], g["eps"], g["weight_decay"]) for g in plain.param_groups] == [(1e-2, 1e-3, 0.1)]


def test_clear_errors():
    model = mlp(64)
    with pytest.raises(ValueError, match="needs lr="):
        mupkit.param_groups(model, optimizer=heavyball.SOAP)
    with pytest.raises(ValueError, match="already has concrete lr"):
        mupkit.optim.SOAP(mupkit.param_groups(model, optimizer=heavyball.SOAP, lr=1e-2))
    with pytest.raises(ValueError, match=r"'0.weight' \(shape \(64, 8\)\).*max_precond_dim=64"):
        mupkit.optim.SOAP(mupkit.param_groups(model), max_precond_dim=32)
    with pytest.raises(ValueError, match="weight_decay_policy="):
        mupkit.optim.SOAP(mupkit.param_groups(model), weight_decay_policy="sometimes")
    umup = mupkit.build(lambda width: models.mlp(width, d_in=8, d_out=4), base=dict(width=16),
                        target=dict(width=64), parametrization="umup")
    with pytest.raises(ValueError, match="no muP scales for family 'shampoo'"):
        mupkit.optim.SOAP(mupkit.param_groups(umup))


@pytest.mark.parametrize("parametrization,passes", [("mup", True), ("sp", False)])
def test_coordinate_check_passes_under_mup_and_fails_under_sp(parametrization, passes):
    def make(width):
        return models.mlp(width, d_in=16, d_out=4)

    check = mupkit.coord_check(make, [16, 32, 64, 128], parametrization=parametrization, optimizer="shampoo",
                               lr=1e-2, steps=4, seeds=2, show_progress=False)
    verdict = check.verdict(metric="delta_rms")
    assert verdict.passed is passes, str(verdict)
