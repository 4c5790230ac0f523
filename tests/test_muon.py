"""mupkit.optim.Muon: parity with torch.optim.Muon and mupkit.optim.AdamW, ownership by role,
per-block and batched orthogonalization, resume, schedules, the spectral rule, and its errors."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import mupkit
from mupkit import models
from mupkit.cli import main as cli
from mupkit.coord_check import UpdateRegimeWarning
from mupkit.optim.newton_schulz import orthogonalize
from mupkit.spectral import relative_update_factor, spectral_multiplier


def gpt(width=32, base=32):
    torch.manual_seed(0)
    return mupkit.build(models.gpt, base=dict(width=base, base_width=base, max_len=16),
                        target=dict(width=width, base_width=base, max_len=16),
                        delta=dict(width=2 * base, base_width=base, max_len=16))


def mlp(width=32, base=32):
    """At the base width too with its roles (``delta``: the width probe)."""
    torch.manual_seed(0)
    return mupkit.build(models.mlp, base=dict(width=base), target=dict(width=width), delta=dict(width=2 * base))


def grads(model, step: int) -> None:
    """Seeded gradients of a real loss, the same for every copy of ``model``."""
    g = torch.Generator().manual_seed(step)
    if isinstance(model, models.GPT):
        x = torch.randint(0, 256, (2, 16), generator=g)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
    else:
        loss = model(torch.randn(8, 64, generator=g)).square().mean()
    model.zero_grad(set_to_none=True)
    loss.backward()


def run(model, opt, steps, start=0, sched=None):
    for t in range(start, start + steps):
        grads(model, t)
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_base_width_equals_torch_muon_for_matrices_and_adamw_for_the_rest(adjust_lr_fn, nesterov):
    """At the base width: the hidden matrices step as torch.optim.Muon (via the torch route's
    groups), everything else as mupkit.optim.AdamW; 20 fp32 steps with weight decay."""
    ours, theirs = mlp(), mlp()
    opt = mupkit.optim.Muon(mupkit.param_groups(ours), lr=0.02, weight_decay=0.1, nesterov=nesterov,
                            adjust_lr_fn=adjust_lr_fn, adam_lr=3e-3, adam_weight_decay=0.01)
    muon_groups, adam_groups = mupkit.muon_param_groups(theirs, lr=0.02, adam_lr=3e-3, adjust_lr_fn=adjust_lr_fn,
                                                        weight_decay=0.1, adam_weight_decay=0.01)
    assert {n for g in muon_groups for n in g["param_names"]} == {"2.weight"}  # hidden only
    torch_muon = torch.optim.Muon(muon_groups, nesterov=nesterov)
    adamw = mupkit.optim.AdamW([{k: v for k, v in g.items() if not k.startswith("mupkit")} for g in adam_groups])
    run(ours, opt, 20)
    for t in range(20):
        grads(theirs, t)
        torch_muon.step()
        adamw.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_roles_decide_ownership_an_embedding_never_goes_to_newton_schulz(monkeypatch):
    model = gpt(64)
    opt = mupkit.optim.Muon(mupkit.param_groups(model), lr=0.02)
    owned = {n for g in opt.param_groups if g["orthogonalize"] for n in g["param_names"]}
    hidden = {n for n, s in mupkit.plan_of(model).items() if s.role is mupkit.Role.HIDDEN}
    assert owned == hidden and "wte.weight" not in owned and model.wte.weight.ndim == 2  # tied embedding: AdamW
    orthogonalized = []
    import mupkit.optim.muon as muon_module
    monkeypatch.setattr(muon_module, "orthogonalize",
                        lambda x, *a: orthogonalized.append(1 if x.ndim == 2 else len(x)) or orthogonalize(x, *a))
    run(model, opt, 1)
    assert sum(orthogonalized) == len(hidden)  # every hidden matrix once, nothing else
    assert set(opt.state[model.wte.weight]) == {"step", "exp_avg", "exp_avg_sq"}  # stepped by the AdamW part


def test_the_adam_part_follows_the_schedule_at_its_ratio():
    model, reference = mlp(64), mlp(64)
    opt = mupkit.optim.Muon(mupkit.param_groups(model), lr=0.02, adam_lr_ratio=0.25)
    assert {g["orthogonalize"]: g["lr"] for g in opt.param_groups} == {True: 0.02, False: 0.005}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5)
    assert {g["orthogonalize"]: g["lr"] for g in opt.param_groups} == {True: 0.01, False: 0.0025}
    run(model, opt, 3, sched=sched)
    run(reference, mupkit.optim.Muon(mupkit.param_groups(reference), lr=0.01, adam_lr=0.0025), 3)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_fused_qkv_blocks_equal_three_separate_matrices():
    torch.manual_seed(0)
    h = 24
    fused = nn.Parameter(torch.randn(3 * h, h) / h ** 0.5)
    parts = [nn.Parameter(w.detach().clone()) for w in fused.detach().chunk(3)]
    for adjust_lr_fn in (None, "match_rms_adamw"):
        a = mupkit.optim.Muon([{"params": [fused], "param_names": ["blocks.0.attn.qkv.weight"]}], lr=0.02,
                              blocks={"*.qkv.weight": 3}, adjust_lr_fn=adjust_lr_fn)
        b = mupkit.optim.Muon(parts, lr=0.02, adjust_lr_fn=adjust_lr_fn)
        for t in range(5):
            g = torch.randn(3 * h, h, generator=torch.Generator().manual_seed(t))
            fused.grad = g.clone()
            for p, gp in zip(parts, g.chunk(3)):
                p.grad = gp.clone()
            a.step()
            b.step()
        torch.testing.assert_close(fused.detach(), torch.cat([p.detach() for p in parts]), rtol=0, atol=1e-6)


def test_batched_equals_one_by_one():
    model, other = gpt(64), gpt(64)
    batched = mupkit.optim.Muon(mupkit.param_groups(model), lr=0.02, foreach=True, blocks={"*.qkv.weight": 3})
    single = mupkit.optim.Muon(mupkit.param_groups(other), lr=0.02, foreach=False, blocks={"*.qkv.weight": 3})
    run(model, batched, 3)
    run(other, single, 3)
    for (name, a), b in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_state_dict_resume_is_exact():
    model = gpt(64)
    make = lambda m: mupkit.optim.Muon(mupkit.param_groups(m), lr=0.02, adam_lr=3e-3)  # noqa: E731
    opt = make(model)
    run(model, opt, 5)
    resumed_model = copy.deepcopy(model)
    resumed = make(resumed_model)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    run(model, opt, 5, start=5)
    run(resumed_model, resumed, 5, start=5)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_multipliers_at_a_wider_model_follow_the_spectral_formula():
    """GPT 32 -> 128 (m = 4): qkv (3h, h), proj (h, h), mlp (4h, h) and (h, 4h)."""
    model = gpt(128)
    plan = mupkit.plan_of(model)
    for name in ("blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp.0.weight",
                 "blocks.0.mlp.2.weight"):
        s = plan[name].scales
        assert s["muon"].lr == pytest.approx(1.0)  # "original": no width factor at a fixed aspect ratio
        assert s["muon-rms"].lr == pytest.approx(0.5)  # "match_rms_adamw": m^-1/2
        assert s["muon"].wd == pytest.approx(1.0) and s["muon-rms"].wd == pytest.approx(2.0)  # coupled: 1/lr
    for name in ("wte.weight", "ln_f.weight", "blocks.0.attn.qkv.bias"):  # AdamW part: adamw's scales
        assert plan[name].scales["muon"] == plan[name].scales["adamw"]
    # groups carry them; Muon applies them (the orthogonalized groups' effective lr)
    opt = mupkit.optim.Muon(mupkit.param_groups(model), lr=0.02, adjust_lr_fn="match_rms_adamw")
    assert [g["lr_scale"] for g in opt.param_groups if g["orthogonalize"]] == [pytest.approx(0.5)]
    # an aspect ratio that changes with width: (64, 128) -> (256, 128) under "original"
    assert spectral_multiplier(None, (64, 128), (256, 128)) == pytest.approx(1 / math.sqrt(0.5))
    # a conv kernel is the matrix (out, in*k*k): CNN 32 -> 128, conv (64, 32, 3, 3) -> (256, 128, 3, 3)
    torch.manual_seed(0)
    cnn = mupkit.plan_of(mupkit.build(models.cnn, base=dict(width=32), target=dict(width=128)))
    assert cnn["3.weight"].scales["muon-rms"].lr == pytest.approx((5 * 256 ** 0.5 / 1152) / (5 * 64 ** 0.5 / 288))


def test_clear_errors():
    torch.manual_seed(0)
    no_roles = mupkit.build(models.mlp, base=dict(width=32), target=dict(width=32))  # no delta: no roles
    with pytest.raises(ValueError, match="no hidden matrix.*delta="):
        mupkit.optim.Muon(mupkit.param_groups(no_roles))
    model = gpt(64)
    with pytest.raises(ValueError, match=r"'blocks.0.attn.proj.weight' \(shape \(64, 64\)\).*does not split into 5 equal blocks"):
        mupkit.optim.Muon(mupkit.param_groups(model), blocks={"*.attn.proj.weight": 5})
    with pytest.raises(ValueError, match="'wte.weight'.*never orthogonalized"):
        mupkit.optim.Muon(mupkit.param_groups(model), blocks={"wte.weight": 2})
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        mupkit.optim.Muon([nn.Parameter(torch.zeros(8))])
    with pytest.raises(ValueError, match="muon_param_groups"):
        mupkit.param_groups(model, optimizer=torch.optim.Muon, lr=0.02)
    torch.manual_seed(0)
    cnn = mupkit.build(models.cnn, base=dict(width=16), target=dict(width=32))
    with pytest.raises(ValueError, match=r"'3.weight' \(shape \(64, 32, 3, 3\).*mupkit.optim.Muon"):
        mupkit.muon_param_groups(cnn, lr=0.02, adam_lr=1e-3)
    mupkit.optim.Muon(mupkit.param_groups(cnn), lr=0.02)  # mupkit's Muon reshapes the kernels


def test_newton_schulz_in_fp32_orthogonalizes():
    x = torch.randn(3, 40, 24, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(orthogonalize(x, dtype=torch.float32))
    assert s.min() > 0.6 and s.max() < 1.25


class AdamRuleOnMuon(mupkit.optim.Muon):
    """The double scaling of Megatron-LM #3715: Adam's ``1/fan_in`` LR on the orthogonalized matrices."""

    def __init__(self, params, **kwargs):
        def adam_rule(group):
            s = group["mupkit_scales"]
            return {**group, "mupkit_scales": {**s, "muon": {**s["muon"], **s["adam"]}}} \
                if s["muon"]["orthogonalize"] else group
        super().__init__([adam_rule(g) for g in params], **kwargs)


def test_relative_update_law_is_rank_limited_minus_half_and_flat_at_full_rank():
    """``||dW||_F / ||W_0||_F ~ sqrt(min(A, B, rows) / min(A, B))``: width^-1/2 while the matrix is
    wider than the rows it multiplies, width-free once it is narrower."""
    widths = [64, 256, 1024]
    def slope(rows):
        return np.polyfit(np.log(widths), np.log([relative_update_factor((4 * w, w), rows) for w in widths]), 1)[0]
    assert slope(32) == pytest.approx(-0.5) and slope(None) == pytest.approx(-0.5)
    assert slope(4096) == pytest.approx(0.0)
    assert -0.5 < slope(256) < 0.0  # straddles: full rank at 64, rank-limited at 1024


def test_coord_check_judges_muon_matrices_by_their_law_and_catches_adam_rule_on_top():
    """muP + Muon: the hidden matrix's relative update has slope ~-1/2 and passes against its law
    (recorded per row); judged against slope 0, the old law, it fails; Adam's 1/fan_in on top
    (slope -3/2) fails against the law. The AdamW part (input layer, biases) stays at slope 0."""
    def run(optimizer):
        return mupkit.coord_check(models.mlp, [64, 256, 1024], optimizer=optimizer, lr=0.02, steps=2, seeds=1,
                                  updates=True, optimizer_kwargs={"weight_decay": 0.0}, show_progress=False)
    good = run("muon")
    laws = {(r["module"], r["width"]): r["law"] for r in good.records if r["kind"] == "update" and r["step"] == 2}
    assert laws["2.weight", 64] == pytest.approx(math.sqrt(32 / 64))  # 32 rows (the synthetic batch) of 64
    assert laws["0.weight", 1024] == laws["2.bias", 1024] == 1.0
    verdict = good.verdict(kind="update")
    rows = {(r.module, r.step): r for r in verdict.rows}
    assert verdict.passed, verdict
    assert rows["2.weight", 2].expected == pytest.approx(-0.5) and rows["2.weight", 2].slope < -0.4
    assert rows["0.weight", 2].expected == 0.0 and rows["2.weight", 1].status == "zero"  # step 1: zero readout
    old_law = mupkit.CoordCheck([{k: v for k, v in r.items() if k != "law"} for r in good.records],
                                good.widths, "mup", "muon", 0.02)
    assert [(r.module, r.step) for r in old_law.verdict(kind="update").rows if r.status == "fail"] == [("2.weight", 2)]
    double = run(AdamRuleOnMuon).verdict(kind="update")
    failed = {r.module: r for r in double.rows if r.status == "fail"}
    assert not double.passed and set(failed) == {"2.weight"} and failed["2.weight"].slope < -1.2, double


def test_coord_check_warns_when_a_muon_matrix_is_full_rank():
    """A batch with more rows than a hidden matrix's narrower side leaves muP's rank-limited limit:
    the law flattens there (recorded as 1 at every width) and the check says so."""
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(128, 64, generator=g), torch.randint(0, 10, (128,), generator=g)
    with pytest.warns(UpdateRegimeWarning) as caught:
        c = mupkit.coord_check(models.mlp, [32, 64], optimizer="muon", lr=0.02, steps=1, seeds=1, batch=batch,
                               updates=True, show_progress=False)
    assert [str(w.message).split(" orthogonalized")[0] for w in caught] == ["at width 32 1", "at width 64 1"]
    assert "(2.weight (32, 32) x 128 rows)" in str(caught[0].message)
    assert {r["law"] for r in c.records if r["module"] == "2.weight" and r["kind"] == "update"} == {1.0}


def test_width_checks_of_muon_judge_the_updates_by_default_and_the_cli_prints_that_verdict(capsys):
    """Without ``updates=``: Adam's 1/fan_in on top of Muon passes by its activations on the MLP but
    fails the update verdict that :meth:`CoordCheck.verdicts` now includes; an entrywise optimizer
    records no updates. ``mupkit coord-check --optim muon`` prints both verdicts."""
    def run(optimizer):
        return mupkit.coord_check(models.mlp, [64, 256, 1024], optimizer=optimizer, lr=0.02, steps=2, seeds=1,
                                  optimizer_kwargs={"weight_decay": 0.0}, show_progress=False)
    double = run(AdamRuleOnMuon).verdicts()
    assert [v.passed for v in double] == [True, False]
    assert len(run("adam").verdicts()) == 1
    code = cli(["coord-check", "--model", "mlp", "--optim", "muon", "--widths", "64", "256", "1024", "--steps", "2",
                "--seeds", "1", "--out", "", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0 and printed.count("PASS") == 2 and "update" in printed, printed
