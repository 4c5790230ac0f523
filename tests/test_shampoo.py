"""The ``shampoo`` muP family (the one-step argument of Ishikawa & Karakida 2024, Sec. 4; docs/shampoo.md)
with heavyball's SOAP, damped relative to each gradient or per role."""

import io

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


def test_absolutely_damped_mupkit_soap_equals_the_torch_route():
    model = mlp(64)
    twin = mlp(64)
    ours = mupkit.optim.SOAP(mupkit.param_groups(model), lr=1e-2, eps=1e-3, damping="absolute", weight_decay=0.1)
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
    plain = mupkit.optim.SOAP(list(mlp(64).parameters()), lr=1e-2, eps=1e-3, damping="absolute", weight_decay=0.1)
    assert [(g["lr"], g["eps"], g["weight_decay"]) for g in plain.param_groups] == [(1e-2, 1e-3, 0.1)]


def loss_of(model, seed=1):
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(seed))
    return model(x).square().mean()


def test_relative_damping_sets_each_parameters_eps_from_its_own_gradient_before_the_step():
    """eps_t = eps * ||G_t||_F per parameter (eps * RMS(g_t) for a vector);
    heavyball then steps exactly as with those values written into per-parameter groups by hand."""
    model, twin = mlp(64), mlp(64)
    ours = mupkit.optim.SOAP(mupkit.param_groups(model), lr=1e-2, eps=0.2, weight_decay=0.1)
    assert len(ours.param_groups) == len(list(model.parameters()))  # one group per parameter
    groups = mupkit.param_groups(twin, optimizer=heavyball.SOAP, lr=1e-2, weight_decay=0.1)
    by_name = {n: g for g in groups for n in g["param_names"]}
    theirs = heavyball.SOAP([{**by_name[n], "params": [p], "param_names": [n]} for n, p in twin.named_parameters()])
    for _ in range(4):
        for m, o in ((model, ours), (twin, theirs)):
            o.zero_grad()
            loss_of(m).backward()
        for g in theirs.param_groups:
            grad = g["params"][0].grad
            g["eps"] = 0.2 * (grad.norm() if grad.ndim == 2 else grad.norm() / grad.numel() ** 0.5).item()
        ours.step()
        theirs.step()
        theirs_by_name = {h["param_names"][0]: h for h in theirs.param_groups}
        for g in ours.param_groups:
            h = theirs_by_name[g["param_names"][0]]
            assert g["eps"] == pytest.approx(h["eps"], rel=1e-6), g["param_names"]
            assert (g["lr"], g["weight_decay"]) == (h["lr"], h["weight_decay"])
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=n)  # float eps vs the hook's float32 norm


def test_relative_damping_bounds_the_step_free_of_the_width_for_full_rank_gradients():
    """Full-rank (Gaussian) gradients, rank growing with the width: damped relative to ``||G||_F``,
    every step's Frobenius norm stays under ``lr / eps`` and is the same at widths 32, 128 and 512
    (within 10%); relative to ``sigma_1`` the many comparable directions would all be normalized."""
    sizes = {}
    for n in (32, 128, 512):
        w = torch.nn.Parameter(torch.zeros(n, n))
        opt = mupkit.optim.SOAP([w], lr=1.0, eps=0.2)
        gen = torch.Generator().manual_seed(1)
        for step in range(6):
            w.grad = torch.randn(n, n, generator=gen)
            before = w.detach().clone()
            opt.step()
            sizes[n, step] = (w.detach() - before).norm().item()
    assert max(sizes.values()) <= (1 / 0.2) * (1 + 1e-4)
    for step in range(1, 6):  # the first step only builds the preconditioner
        assert sizes[512, step] == pytest.approx(sizes[32, step], rel=0.1), sizes


def test_a_matrix_heavyball_steps_as_a_vector_takes_adams_rule_and_an_rms_damping():
    """``nn.Linear(1, width)``: heavyball merges the side of 1 away and steps it with plain Adam,
    so its LR multiplier is Adam's (1 for an input layer), not the spectral ``m_out^1/2``."""
    torch.manual_seed(0)
    model = mupkit.build(lambda width: models.mlp(width, d_in=1, d_out=4), base=dict(width=16), target=dict(width=64))
    assert mupkit.plan_of(model)["0.weight"].scales["shampoo"].lr == pytest.approx(2.0)
    opt = mupkit.optim.SOAP(mupkit.param_groups(model), lr=1e-2, eps=0.2)
    group = next(g for g in opt.param_groups if g["param_names"] == ["0.weight"])
    assert group["lr"] == pytest.approx(1e-2 * mupkit.plan_of(model)["0.weight"].scales["adam"].lr)
    model(torch.randn(6, 1)).square().mean().backward()
    grad = model.get_parameter("0.weight").grad.clone()  # heavyball consumes the gradient
    opt.step()
    assert group["eps"] == pytest.approx(0.2 * grad.square().mean().sqrt().item(), rel=1e-5)


@pytest.mark.parametrize("damping,eps", [("relative", 0.2), ("absolute", 1e-2)])
def test_relative_damping_makes_the_step_free_of_the_gradients_scale(damping, eps):
    """Whatever sets a layer's gradient scale (here: the loss times 1e-3), a relatively damped run
    moves every parameter as far (within 5%: heavyball's eigenbasis of a rank-deficient factor
    depends on rounding); with a fixed eps the smaller gradient is damped to under a tenth of the
    distance (the failure on attention's q and k, whose gradients shrink with width)."""
    nets = [mlp(64), mlp(64)]
    start = [p.detach().clone() for p in nets[0].parameters()]
    opts = [mupkit.optim.SOAP(mupkit.param_groups(m), lr=1e-2, eps=eps, damping=damping) for m in nets]
    for step in range(4):
        for m, o, factor in zip(nets, opts, (1.0, 1e-3)):
            o.zero_grad()
            (factor * loss_of(m, seed=step)).backward()
            o.step()
    ratios = torch.stack([(q - w).norm() / (p - w).norm() for p, q, w in zip(*(m.parameters() for m in nets), start)])
    if damping == "relative":
        torch.testing.assert_close(ratios, torch.ones_like(ratios), rtol=0, atol=0.05)
    else:
        assert (ratios < 0.1).all(), ratios


def test_relative_damping_survives_state_dict_and_resumes_exactly():
    model, twin = mlp(64), mlp(64)
    opt = mupkit.optim.SOAP(mupkit.param_groups(model), lr=1e-2, eps=0.2)
    for step in range(3):
        opt.zero_grad()
        loss_of(model, seed=step).backward()
        opt.step()
    twin.load_state_dict(model.state_dict())
    resumed = mupkit.optim.SOAP(mupkit.param_groups(twin), lr=1e-2, eps=0.05)  # a different fraction ...
    saved = io.BytesIO()  # through a file, as a resume does (heavyball's state_dict hands out its live counters)
    torch.save(opt.state_dict(), saved)
    saved.seek(0)
    resumed.load_state_dict(torch.load(saved, weights_only=False))  # ... replaced by the saved one
    assert {g["eps_relative"] for g in resumed.param_groups} == {0.2}
    for step in range(3, 6):
        for m, o in ((model, opt), (twin, resumed)):
            o.zero_grad()
            loss_of(m, seed=step).backward()
            o.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_clear_errors():
    model = mlp(64)
    with pytest.raises(ValueError, match="needs lr="):
        mupkit.param_groups(model, optimizer=heavyball.SOAP)
    with pytest.raises(ValueError, match="already has concrete lr"):
        mupkit.optim.SOAP(mupkit.param_groups(model, optimizer=heavyball.SOAP, lr=1e-2))
    with pytest.raises(ValueError, match=r"'0.weight' \(shape \(64, 8\)\).*max_precond_dim=64"):
        mupkit.optim.SOAP(mupkit.param_groups(model), max_precond_dim=32)
    with pytest.raises(ValueError, match=r"damping='sometimes'; use one of \('relative', 'absolute'\)"):
        mupkit.optim.SOAP(mupkit.param_groups(model), damping="sometimes")
    with pytest.raises(ValueError, match=r"eps=1e-08 with damping='relative' is a fraction.*damping='absolute'"):
        mupkit.optim.SOAP(mupkit.param_groups(model), eps=1e-8)
    with pytest.raises(ValueError, match="gradient_clipping with damping='relative'"):
        mupkit.optim.SOAP(mupkit.param_groups(model), gradient_clipping=heavyball.utils.l2_clip_)
    opt = mupkit.optim.SOAP(mupkit.param_groups(model))
    with pytest.raises(ValueError, match="without a closure, or use damping='absolute'"):
        opt.step(lambda: loss_of(model))
    with pytest.raises(ValueError, match="weight_decay_policy="):
        mupkit.optim.SOAP(mupkit.param_groups(model), weight_decay_policy="sometimes")
    umup = mupkit.build(lambda width: models.mlp(width, d_in=8, d_out=4), base=dict(width=16),
                        target=dict(width=64), parametrization="umup")
    with pytest.raises(ValueError, match="no muP scales for family 'shampoo'"):
        mupkit.optim.SOAP(mupkit.param_groups(umup))


@pytest.mark.parametrize("parametrization,passes", [("mup", True), ("sp", False)])
def test_coordinate_check_passes_under_mup_and_fails_under_sp(parametrization, passes):
    """Relative damping (the default: eps 0.2 of each gradient's scale)."""
    def make(width):
        return models.mlp(width, d_in=16, d_out=4)

    check = mupkit.coord_check(make, [16, 32, 64, 128], parametrization=parametrization, optimizer="shampoo",
                               lr=1e-2, steps=4, seeds=2, show_progress=False)
    verdict = check.verdict(metric="delta_rms")
    assert verdict.passed is passes, str(verdict)
