"""Depth: repeated blocks inferred from the constructor, Depth-muP / CompleteP rules, depth checks.

Rule oracle: CompleteP's Table 1 (Dey et al. 2025), alpha-family column, with m_N = width
multiplier and m_L = depth multiplier (see shared reference umup_depth.md, Sec. 3.c and 6.6).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import mupkit
from mupkit import models
from mupkit.coord_check import default_loss
from mupkit.data import synthetic_batch
from mupkit.plan import Plan

GPT = dict(base_width=64, max_len=16)


def gpt_plan(parametrization, depth=8, width=128):
    return mupkit.infer_plan(models.gpt, base=dict(width=64, depth=2, **GPT), target=dict(width=width, depth=depth, **GPT),
                             parametrization=parametrization)


@pytest.mark.parametrize("name,alpha", [("completep", 1.0), ("depth-mup", 0.5), ("mup+completep", 1.0)])
def test_rules_follow_the_completep_table(name, alpha):
    plan = gpt_plan(name)
    m_n, m_l = 2.0, 4.0
    assert plan.depth.blocks == {"blocks": (2, 8)} and plan.depth.alpha == alpha
    assert set(plan.depth.branch_outputs) == {f"blocks.*.{m}.{w}" for m in ("attn.proj", "mlp.2") for w in ("weight", "bias")}
    qkv, ln, bias = plan["blocks.5.attn.qkv.weight"], plan["blocks.5.ln1.weight"], plan["blocks.5.mlp.0.bias"]
    assert qkv.m_depth == m_l and not qkv.branch_output
    assert qkv.scales["adamw"].lr == pytest.approx(m_n ** -1 * m_l ** (alpha - 1))  # hidden LR
    assert ln.scales["adamw"].lr == pytest.approx(m_l ** (alpha - 1))  # pre-LN gain LR
    assert bias.scales["adamw"].lr == pytest.approx(m_l ** (alpha - 1))  # hidden bias LR
    assert qkv.scales["adam"].eps == pytest.approx(m_n ** -1 * m_l ** -alpha)  # Adam eps in blocks
    assert qkv.scales["adamw"].wd == pytest.approx(m_n)  # hidden WD lambda m_N, no depth factor
    assert ln.scales["adamw"].wd * ln.scales["adamw"].lr == pytest.approx(m_l ** (alpha - 1))  # decay per step
    assert qkv.init_scale == pytest.approx(m_n ** -0.5)  # no depth factor on init
    for outside in ("wte.weight", "wpe.weight", "ln_f.weight"):  # embedding, final LN: lr x 1
        assert plan[outside].scales["adamw"].lr == 1.0 and plan[outside].block is None
        assert plan[outside].scales["adam"].eps == pytest.approx(m_n ** -1)  # the table's muP eps column
    proj = plan["blocks.7.attn.proj.weight"]  # the branch multiplier m_L^-alpha, folded into the layer
    c = m_l ** -alpha
    assert proj.branch_output and proj.absorbed == pytest.approx(c)
    assert proj.init_scale == pytest.approx(m_n ** -0.5 * c)
    assert proj.scales["adamw"].lr == pytest.approx(m_n ** -1 * m_l ** (alpha - 1) * c)  # Adam: lr x c
    assert proj.scales["sgd"].lr == pytest.approx(m_l ** (2 * alpha - 1) * c ** 2)  # SGD: lr x c^2
    assert proj.scales["adafactor"].lr == pytest.approx(m_n ** -0.5 * m_l ** (alpha - 1))  # scale-relative


@pytest.mark.parametrize("name", ["completep", "depth-mup", "mup+depth"])
def test_eps_rule_does_not_jump_when_depth_equals_the_base(name):
    """At equal depths (m_L = 1) a depth parametrization is muP with the CompleteP table's eps
    m_N^-1: the same eps as a deeper target's block would get at m_L = 1, not muP's fixed eps."""
    same, mup = gpt_plan(name, depth=2), gpt_plan("mup", depth=2)
    assert same.depth is None
    for n, spec in same.items():
        m_n = max(spec.m_in, spec.m_out)
        assert spec.scales["adam"].eps == pytest.approx(m_n ** -1), n
        assert spec.scales["adam"].lr == mup[n].scales["adam"].lr, n
    assert mup["blocks.1.attn.qkv.weight"].scales["adam"].eps == 1.0  # microsoft/mup parity


def test_mup_plus_depth_picks_completep_for_multi_layer_branches_and_explain_says_so():
    plan = gpt_plan("mup+depth")
    assert plan.depth.alpha == 1.0
    text = mupkit.explain(plan)
    assert "CompleteP" in text and "Depth-muP's theory breaks down" in text and "branch x0.25" in text


def test_plain_mup_maps_blocks_but_does_not_scale_depth():
    with pytest.warns(mupkit.NoDepthRuleWarning):
        plan = gpt_plan("mup")
    assert plan.depth.alpha is None and not any(s.branch_output for s in plan.values())
    assert plan["blocks.7.attn.proj.weight"].scales["adamw"].lr == pytest.approx(0.5)


class ExplicitResidualMLP(models.ResidualMLP):
    """The residual MLP with CompleteP's branch multiplier written in the forward pass."""

    def __init__(self, width=32, *, depth=2, **kwargs):
        super().__init__(width, depth=depth, **kwargs)
        self.scale = mupkit.nn.residual_scale(depth, 2, alpha=1.0)

    def forward(self, x):
        x = self.input(x)
        for block in self.blocks:
            x = mupkit.nn.residual(x, block(x), self.scale)
        return self.readout(self.norm(x))


def test_absorbed_branch_multiplier_equals_the_explicit_one():
    """x + m_L^-1 W2 relu(W1 LN x) in the forward (built with branch_outputs=[]) and mupkit's
    absorbed model (m_L^-1 folded into W2's init, LR and eps) train identically: float64 Adam,
    5 steps, outputs equal to 1e-10."""
    sizes = dict(base=dict(width=32, depth=2), delta=dict(width=64, depth=2), target=dict(width=32, depth=8))
    torch.manual_seed(0)
    absorbed = mupkit.build(models.resmlp, parametrization="completep", **sizes).double()
    torch.manual_seed(0)
    explicit = mupkit.build(ExplicitResidualMLP, parametrization="completep", branch_outputs=[], **sizes).double()
    assert not any(s.branch_output for s in mupkit.plan_of(explicit).values())
    assert mupkit.plan_of(absorbed)["blocks.5.3.weight"].absorbed == pytest.approx(0.25)
    x, y = torch.randn(16, 64, dtype=torch.float64), torch.randn(16, 10, dtype=torch.float64)
    torch.testing.assert_close(absorbed(x), explicit(x), rtol=1e-12, atol=1e-12)
    optimizers = [mupkit.optim.Adam(mupkit.param_groups(m), lr=1e-2) for m in (absorbed, explicit)]
    for _ in range(5):
        for model, opt in zip((absorbed, explicit), optimizers):
            opt.zero_grad()
            (model(x) - y).square().mean().backward()
            opt.step()
    torch.testing.assert_close(absorbed(x), explicit(x), rtol=1e-10, atol=1e-12)


class PlanResidualMLP(models.ResidualMLP):
    """The residual MLP whose forward takes the branch multiplier from its own plan."""

    def forward(self, x):
        x = self.input(x)
        for block in self.blocks:
            x = mupkit.nn.residual(x, block(x), self)
        return self.readout(self.norm(x))


def test_residual_takes_the_multiplier_from_the_plan():
    sizes = dict(base=dict(width=32, depth=2), delta=dict(width=64, depth=2), target=dict(width=32, depth=8))
    torch.manual_seed(0)
    explicit = mupkit.build(ExplicitResidualMLP, parametrization="completep", branch_outputs=[], **sizes)
    torch.manual_seed(0)
    with pytest.warns(mupkit.TraceWarning, match="could not run PlanResidualMLP"):  # its forward reads its plan
        from_plan = mupkit.build(PlanResidualMLP, parametrization="completep", branch_outputs=[], **sizes)
    assert mupkit.nn.branch_multiplier(from_plan) == pytest.approx(0.25)
    x = torch.randn(4, 64)
    torch.testing.assert_close(from_plan(x), explicit(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="apply it twice"):
        mupkit.nn.branch_multiplier(mupkit.build(models.resmlp, parametrization="completep", **sizes))
    with pytest.raises(ValueError, match="no depth rule"):
        mupkit.nn.branch_multiplier(mupkit.build(models.resmlp, base=dict(width=32), target=dict(width=64)))


def test_plan_with_depth_round_trips_json():
    plan = gpt_plan("completep")
    again = Plan.from_json(plan.to_json())
    assert again.depth == plan.depth and again["blocks.7.mlp.2.weight"] == plan["blocks.7.mlp.2.weight"]


class NoResidual(nn.Module):
    def __init__(self, width=32, depth=2):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth))
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_errors_name_what_to_do():
    with pytest.raises(ValueError, match=r"feeds no residual add.*branch_outputs="):
        mupkit.infer_plan(NoResidual, base=dict(depth=2), target=dict(depth=4), parametrization="completep")
    plan = mupkit.infer_plan(NoResidual, base=dict(depth=2), target=dict(depth=4), parametrization="completep",
                             branch_outputs=["blocks.*.0"])
    assert plan["blocks.3.0.weight"].branch_output
    with pytest.raises(ValueError, match="match no layer with parameters"):
        mupkit.infer_plan(NoResidual, base=dict(depth=2), target=dict(depth=4), parametrization="completep",
                          branch_outputs=["blocks.*.nothing"])
    with pytest.raises(ValueError, match="unknown parametrization 'mup\\+deep'"):
        mupkit.infer_plan(NoResidual, base=dict(depth=2), target=dict(depth=4), parametrization="mup+deep")


DEPTHS = [2, 4, 8, 16, 32]


def depth_check(name, parametrization):
    if name == "gpt":
        make, kwargs, lr = models.gpt, dict(GPT, emb_mult=10.0, tie=False), 3e-3
    else:
        make, kwargs, lr = models.resmlp, {}, 1e-2
    return mupkit.coord_check(make, 64, depths=DEPTHS, parametrization=parametrization, optimizer="adam", lr=lr,
                              steps=4, seeds=2, kwargs=kwargs, updates=True, show_progress=False)


def stream_slope(check, step=4):
    """Slope of the residual stream entering the final norm, against depth."""
    module = "ln_f[0]" if "ln_f[0]" in {r["module"] for r in check.records} else "norm[0]"
    return next(r.slope for r in check.verdict().rows if r.module == module and r.step == step)


@pytest.mark.parametrize("name", ["resmlp", "gpt"])
def test_depth_coordinate_check(name):
    """Depths 2..32 after 1-4 Adam steps. CompleteP and Depth-muP keep the residual stream and the
    per-block relative update of the stream each block works on flat (|slope| <= 0.1); plain muP
    lets both grow (slope >= 0.3). Per-block relative weight updates follow the rule's law:
    flat under CompleteP, L^-1/2 under Depth-muP (its Adam LR is eta L^-1/2 on an init without
    depth factor, TP VI)."""
    mup = depth_check(name, "mup")
    assert stream_slope(mup) >= 0.3
    mup_streams = mup.verdict(steps=range(2, 5), kind="stream_update")
    assert mup_streams.rows and all(r.slope >= 0.3 for r in mup_streams.rows), str(mup_streams)
    for parametrization, update_slope in (("completep", 0.0), ("depth-mup", -0.5)):
        check = depth_check(name, parametrization)
        verdict = check.verdict(steps=range(1, 5))
        assert verdict.passed, str(verdict)
        streams = check.verdict(steps=range(1, 5), kind="stream_update")
        assert streams.passed and {r.step for r in streams.rows if r.status == "pass"} == {2, 3, 4}, str(streams)
        updates = check.verdict(steps=range(2, 5), kind="update")
        block_rows = [r for r in updates.rows if r.module.startswith("blocks.*") and r.module.endswith("weight")
                      and r.status != "zero"]
        assert block_rows and all(abs(r.slope - update_slope) <= 0.1 for r in block_rows), str(updates)
        assert check.update_slope == update_slope and all(r.status == "pass" for r in block_rows), str(updates)


def test_cli_depth_check(tmp_path, capsys):
    from mupkit.cli import main as cli
    code = cli(["coord-check", "--model", "resmlp", "--depths", "2", "4", "8", "--param", "completep", "--compare",
                "mup", "--steps", "2", "--seeds", "1", "--quiet", "--out", str(tmp_path / "d.png")])
    text = capsys.readouterr().out
    assert code == 0 and "PASS: completep" in text and "depths 2..8" in text
    assert "PASS: completep adam lr=0.01, stream_update l1" in text
    assert "PASS: completep adam lr=0.01, update l1" in text
    assert "FAIL: mup adam lr=0.01, stream_update l1" in text  # the comparison run: no depth scaling
    assert (tmp_path / "d.png").stat().st_size > 20_000


def test_depth_build_draws_from_the_global_rng_like_the_constructor():
    torch.manual_seed(0)
    mupkit.build(models.gpt, base=dict(width=64, depth=2, **GPT), target=dict(width=64, depth=4, **GPT),
                 parametrization="completep")
    after_build = torch.rand(3)
    torch.manual_seed(0)
    models.gpt(width=64, depth=4, **GPT)
    assert torch.equal(after_build, torch.rand(3))


class TorchEncoder(nn.Module):
    """torch's own pre-LN nn.TransformerEncoder: attention's output projection is applied inside
    F.multi_head_attention_forward, which the usage trace sees through."""

    def __init__(self, width=64, depth=2):
        super().__init__()
        self.emb = nn.Embedding(100, width)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(width, 100)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)))


def test_torch_transformer_encoder_branches_are_traced_or_named():
    sizes = dict(base=dict(width=64, depth=2), target=dict(width=128, depth=8), parametrization="completep")
    expected = {f"enc.layers.{i}.{m}.{w}" for i in range(8) for m in ("self_attn.out_proj", "linear2")
                for w in ("weight", "bias")}
    with pytest.warns(mupkit.ForwardScalingWarning, match=r"attention in module 'enc\.layers\.\*\.self_attn'.*1/sqrt"):
        traced = mupkit.infer_plan(TorchEncoder, **sizes)
    assert {n for n, s in traced.items() if s.branch_output} == expected
    with pytest.warns(mupkit.ForwardScalingWarning):
        model = mupkit.build(TorchEncoder, branch_outputs=["enc.layers.*.self_attn.out_proj", "enc.layers.*.linear2"],
                             **sizes)
    plan = mupkit.plan_of(model)
    ends = {n for n, s in plan.items() if s.branch_output}
    assert ends == expected
    assert plan["enc.layers.3.linear2.weight"].absorbed == pytest.approx(0.25)
    assert model(torch.randint(0, 100, (2, 8))).shape == (2, 8, 100)


def test_joint_width_and_depth_grid_fits_against_width():
    check = mupkit.coord_check(models.resmlp, [64, 256], depths=[2, 4], steps=1, seeds=1, show_progress=False)
    assert check.axis == "width" and check.sizes == [64, 256]
    assert {(r["width"], r["depth"]) for r in check.records} == {(64, 2), (64, 4), (256, 2), (256, 4)}
    verdict = check.verdict()
    assert verdict.rows and "widths 64..256" in verdict.summary()


class Block(nn.Module):
    def __init__(self, width, post_ln=False):
        super().__init__()
        self.post_ln = post_ln
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        if self.post_ln:  # x = LN(x + f(x)) twice: the second add does not see the stream
            x = self.ln1(x + self.fc1(x))
            return self.ln2(x + self.fc2(x))
        return x + self.fc2(torch.relu(self.fc1(self.ln1(x))))


class Stages(nn.Module):
    """Two stages of blocks, the first twice as deep (ResNet-like stage depths)."""

    def __init__(self, width=32, depth=1, post_ln=False):
        super().__init__()
        self.inp = nn.Linear(16, width)
        self.stages = nn.ModuleList(nn.ModuleList(Block(width, post_ln) for _ in range(n)) for n in (2 * depth, depth))
        self.out = nn.Linear(width, 4)

    def forward(self, x):
        x = self.inp(x)
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return self.out(x)


def test_nested_containers_get_their_own_depths():
    plan = mupkit.infer_plan(Stages, base=dict(depth=1), target=dict(depth=4), parametrization="completep")
    assert plan.depth.blocks == {"stages.0": (2, 8), "stages.1": (1, 4)}
    assert plan["stages.0.5.fc2.weight"].m_depth == 4 and plan["stages.1.3.fc2.weight"].branch_output


def test_post_ln_blocks_ask_for_their_branch_outputs():
    with pytest.raises(ValueError, match=r"post-LN.*branch_outputs=\['stages\.0\.\*\.fc2'\]"):
        mupkit.infer_plan(Stages, base=dict(depth=1, post_ln=True), target=dict(depth=2, post_ln=True),
                          parametrization="completep")
    plan = mupkit.infer_plan(Stages, base=dict(depth=1, post_ln=True), target=dict(depth=2, post_ln=True),
                             parametrization="completep", branch_outputs=["stages.*.*.fc1", "stages.*.*.fc2"])
    assert plan["stages.0.3.fc1.weight"].branch_output and plan["stages.0.3.fc2.weight"].branch_output


def test_sequential_growth_is_a_clear_error_at_any_depth():
    with pytest.raises(ValueError, match="do not form repeated blocks"):
        mupkit.infer_plan(models.mlp, base=dict(width=64, depth=3), target=dict(width=64, depth=5),
                          parametrization="mup+depth")


class DecayingInit(models.ResidualMLP):
    """A block-index-dependent init: branch output std 0.02 / (i + 1)."""

    def __init__(self, width=32, depth=2):
        super().__init__(width, depth=depth)
        with torch.no_grad():
            for i, block in enumerate(self.blocks):
                block[3].weight.normal_(0, 0.02 / (i + 1))


def test_blocks_take_the_base_block_at_the_same_relative_position():
    with pytest.warns(mupkit.NoDepthRuleWarning):
        plan = mupkit.infer_plan(DecayingInit, base=dict(depth=2), target=dict(depth=8))
    stds = [plan[f"blocks.{i}.3.weight"].base_init_std for i in range(8)]
    assert stds[:4] == pytest.approx([0.02] * 4, rel=0.05) and stds[4:] == pytest.approx([0.01] * 4, rel=0.05)


def test_a_verdict_with_nothing_to_judge_does_not_pass():
    check = mupkit.coord_check(models.resmlp, 32, depths=[2, 4], include=["blocks.*.3"], steps=1, seeds=1,
                               show_progress=False)
    verdict = check.verdict()
    assert not verdict.passed and "no module to judge" in verdict.summary()


@pytest.mark.parametrize("name", sorted(mupkit.optim.BY_NAME))
def test_every_optimizer_family_trains_a_completep_model(name):
    """Each mupkit optimizer takes ``param_groups(model)`` of a deeper CompleteP model, picks its
    family's depth-scaled multipliers (eps only where the family has one) and trains."""
    sizes = dict(base=dict(width=32, depth=2), target=dict(width=64, depth=8), parametrization="completep")
    torch.manual_seed(0)
    model = mupkit.build(models.resmlp, **sizes)
    cls = mupkit.optim.get_optimizer(name)
    opt = cls(mupkit.param_groups(model), lr=1.0 if name.startswith(("dadapt", "prodigy")) else 3e-3)
    plan, family = mupkit.plan_of(model), cls.family
    for group in opt.param_groups:
        for pname in group["param_names"]:
            scales = plan[pname].scales[family.name]
            assert group["lr_scale"] == scales.lr and group["eps_scale"] == scales.eps, pname
    hidden = plan["blocks.5.0.weight"].scales[family.name]
    if family.has_eps and family.update == "adam":
        assert hidden.eps == pytest.approx(2.0 ** -1 * 4.0 ** -1)  # m_N^-1 m_L^-alpha
    x, y = synthetic_batch(model, seed=0)
    losses = []
    for step in range(8):
        loss = default_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        if step == 0 and name == "scaled-adam":  # the zero-initialized final norm bias stays frozen, and it says so
            with pytest.warns(UserWarning, match="all zeros at their first step"):
                opt.step()
        else:
            opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses


def test_unmatched_blocks_are_errors_that_name_the_parameters():
    from mupkit.depth import find_blocks
    base = ["emb.weight", "blocks.0.w", "blocks.1.w"]
    with pytest.raises(ValueError, match=r"match no repeated block.*'extra\.0\.bias'"):
        find_blocks(base, base + ["blocks.2.w", "extra.0.bias"])
    with pytest.raises(ValueError, match=r"lacks parameters the base model has: \['blocks\.1\.w'\].*shallower"):
        find_blocks(base, ["emb.weight", "blocks.0.w"])
    sites = find_blocks(base, base + ["blocks.2.w"])
    assert sites["blocks.2.w"].container == "blocks" and sites["blocks.2.w"].index == 2


def test_depth_without_a_depth_rule_warns():
    with pytest.warns(mupkit.NoDepthRuleWarning, match=r"depth: 2 -> 8.*'mup\+depth'"):
        mupkit.infer_plan(models.resmlp, base=dict(depth=2), target=dict(depth=8), parametrization="mup")
    with warnings.catch_warnings():
        warnings.simplefilter("error", mupkit.NoDepthRuleWarning)
        mupkit.infer_plan(models.resmlp, base=dict(depth=2), target=dict(depth=8), parametrization="mup+depth")
        mupkit.infer_plan(models.resmlp, base=dict(width=64), target=dict(width=128), parametrization="mup")
