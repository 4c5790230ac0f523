"""Shape inference, roles, init rescaling and bad-input errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mupkit
from mupkit import Role, models


def roles(plan):
    return {n: s.role for n, s in plan.items()}


def test_mlp_roles_and_multipliers():
    plan = mupkit.infer_plan(models.mlp, base=dict(width=32), target=dict(width=128))
    assert plan.sizes["delta"] == {"width": 64}  # inferred by doubling what differs
    assert roles(plan) == {"0.weight": Role.INPUT, "0.bias": Role.VECTOR, "2.weight": Role.HIDDEN,
                           "2.bias": Role.VECTOR, "4.weight": Role.OUTPUT, "4.bias": Role.SCALAR}
    assert (plan["2.weight"].m_in, plan["2.weight"].m_out) == (4.0, 4.0)
    assert plan["4.weight"].m_in == 4.0 and plan["0.weight"].m_out == 4.0


def test_cnn_kernel_dims_are_finite_and_conv_is_hidden():
    plan = mupkit.infer_plan(models.cnn, base=dict(width=4), target=dict(width=16))
    conv = plan["3.weight"]  # Conv2d(w, 2w, 3)
    assert conv.role is Role.HIDDEN and conv.infinite == (True, True, False, False)
    assert plan["0.weight"].role is Role.INPUT and plan["10.weight"].role is Role.OUTPUT


def test_gpt_tied_embedding_keeps_input_init_and_scales_readout_input():
    torch.manual_seed(0)
    model = mupkit.build(models.gpt, base=dict(width=32, base_width=32), target=dict(width=128, base_width=32))
    plan = mupkit.plan_of(model)
    wte = plan["wte.weight"]
    assert wte.role is Role.INPUT and wte.aliases == ("lm_head.weight",) and wte.tied_readouts == ("lm_head",)
    assert plan.input_multipliers == {"lm_head": 0.25}
    # the embedding init stays width-invariant (unlike mup's MuSharedReadout, mup#55)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.02)
    x = torch.randint(0, 256, (2, 8))
    hidden = {}
    model.ln_f.register_forward_hook(lambda m, a, o: hidden.setdefault("h", o))
    logits = model(x)
    torch.testing.assert_close(logits, hidden["h"] @ model.wte.weight.T * 0.25)


def test_hidden_init_follows_inverse_sqrt_fan_in_and_input_init_is_constant():
    stds = {}
    for width in (64, 256, 1024):
        torch.manual_seed(0)
        model = mupkit.build(models.mlp, base=dict(width=64), delta=dict(width=128), target=dict(width=width))
        stds[width] = {n: p.std().item() for n, p in model.named_parameters()}
    base_std = 1 / math.sqrt(3 * 64)  # torch's default Linear init at fan_in 64 (d_in = base width = 64)
    # the base std is measured on one base build: a sample std of n values is off by ~1/sqrt(2 n); allow 3 of those
    rel = {name: 3 / math.sqrt(2 * p.numel()) for name, p in models.mlp(64).named_parameters()}
    for width in (256, 1024):
        m = width / 64
        assert stds[width]["0.weight"] == pytest.approx(base_std, rel=rel["0.weight"])
        assert stds[width]["2.weight"] == pytest.approx(base_std / math.sqrt(m), rel=rel["2.weight"])
        assert stds[width]["4.weight"] == pytest.approx(base_std / m, rel=rel["4.weight"])  # absorbed 1/m_in
        assert stds[width]["2.bias"] == pytest.approx(base_std, rel=rel["2.bias"])  # constant, like mup's rescale
        for name in ("0.weight", "2.bias"):  # the same measured base std at every width
            assert stds[width][name] == pytest.approx(stds[256][name], rel=1e-5), name


def test_build_at_base_size_is_the_plain_constructor_bitwise():
    torch.manual_seed(7)
    plain = models.gpt(48, base_width=48)
    torch.manual_seed(7)
    model = mupkit.build(models.gpt, base=dict(width=48, base_width=48), delta=dict(width=96, base_width=48),
                         target=dict(width=48, base_width=48))
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)


def test_infer_plan_leaves_the_global_rng_alone():
    torch.manual_seed(1)
    mupkit.infer_plan(models.mlp, base=dict(width=8), target=dict(width=16))
    after = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(after, torch.rand(3))


def test_zero_init_readout_and_query_patterns():
    model = mupkit.build(models.mlp, base=dict(width=8), target=dict(width=32), zero_init=("readout",))
    assert model[4].weight.abs().sum() == 0 and model[2].weight.abs().sum() > 0
    with pytest.raises(ValueError, match="tied to an embedding"):
        mupkit.build(models.gpt, base=dict(width=32, base_width=32), target=dict(width=64, base_width=32),
                     zero_init=("readout",))
    with pytest.raises(ValueError, match="match no parameter"):
        mupkit.build(models.mlp, base=dict(width=8), target=dict(width=32), zero_init=("*.q_proj.weight",))


def test_sp_leaves_the_users_init_untouched():
    torch.manual_seed(2)
    plain = models.mlp(64)
    torch.manual_seed(2)
    model = mupkit.build(models.mlp, base=dict(width=16), target=dict(width=64), parametrization="sp")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))
    assert all(g["lr"] == 0.1 for g in mupkit.param_groups(model, optimizer="sgd", lr=0.1))


def test_attention_scale_equals_sp_at_base_head_dim_and_falls_like_one_over_d():
    assert mupkit.nn.attention_scale(64, 64) == pytest.approx(1 / 8)
    assert mupkit.nn.attention_scale(256, 64) == pytest.approx(1 / 8 / 4)
    with pytest.raises(ValueError, match="positive"):
        mupkit.nn.attention_scale(0, 64)


def test_explain_lists_every_parameter_with_its_multipliers():
    model = mupkit.build(models.gpt, base=dict(width=32, base_width=32), target=dict(width=64, base_width=32))
    text = mupkit.explain(model)
    assert text.splitlines()[1].split()[:4] == ["name", "role", "shape", "m_in"]
    for name in mupkit.plan_of(model):
        assert any(line.startswith(name + " ") for line in text.splitlines()), name
    assert "x0.5 at lm_head" in text and "input (tied readout)" in text


def test_plan_json_round_trip(tmp_path):
    plan = mupkit.infer_plan(models.gpt, base=dict(width=32, base_width=32), target=dict(width=64, base_width=32))
    path = tmp_path / "plan.json"
    plan.to_json(str(path))
    assert mupkit.Plan.from_json(str(path)) == plan


# ---------------------------------------------------------------- bad input
def test_error_different_parameter_names_lists_them():
    """A plain Sequential MLP grows by inserting layers, which shifts names: no repeated blocks."""
    with pytest.raises(ValueError, match=r"do not form repeated blocks: the model itself is a list of layers that grows "
                                         r"\(\['4\.bias', '4\.weight'\] are new\).*nn\.ModuleList"):
        mupkit.infer_plan(models.mlp, base=dict(width=8, depth=2), target=dict(width=16, depth=3),
                          delta=dict(width=16, depth=2))


def test_error_nothing_scales_unless_sp():
    def fixed(width):  # the width kwarg changes no shape
        return models.mlp(16)

    with pytest.raises(ValueError, match="nothing scales with width.*parametrization='sp'"):
        mupkit.infer_plan(fixed, base=dict(width=8), target=dict(width=32))
    with pytest.raises(ValueError, match="nothing scales with width"):
        mupkit.infer_plan(models.mlp, base=dict(width=8), target=dict(width=8), delta=dict(width=8))
    mupkit.infer_plan(fixed, base=dict(width=8), target=dict(width=32), parametrization="sp")


def test_build_at_the_base_size_needs_no_delta_and_changes_nothing():
    torch.manual_seed(3)
    plain = models.mlp(16)
    torch.manual_seed(3)
    model = mupkit.build(models.mlp, base=dict(width=16), target=dict(width=16))
    plan = mupkit.plan_of(model)
    assert plan.at_base and all(s.init_scale == 1.0 and s.absorbed == 1.0 for s in plan.values())
    assert all((sc.lr, sc.wd, sc.eps) == (1.0, 1.0, 1.0) for s in plan.values() for sc in s.scales.values())
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)


class ThreeInf(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(width, width, width))

    def forward(self, x):
        return self.w.sum() * x


def test_error_more_than_two_infinite_dims_names_the_parameter():
    with pytest.raises(ValueError, match=r"parameter 'w'.*3 infinite dims"):
        mupkit.infer_plan(ThreeInf, base=dict(width=2), target=dict(width=4), example_inputs=torch.ones(3))


def bottleneck(width):
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3), nn.ReLU(), nn.Linear(3, width),
                         nn.ReLU(), nn.Linear(width, 2))


def test_every_width_to_fixed_map_is_output_like_and_the_trace_finds_the_readout():
    """A bottleneck (width -> 3) needs the output rule like the readout does (its fan-out is finite),
    but only the layer producing the model's output is the readout (zeroed by zero_init='readout')."""
    plan = mupkit.infer_plan(bottleneck, base=dict(width=8), target=dict(width=16))
    assert plan["2.weight"].role is Role.OUTPUT and plan["6.weight"].role is Role.OUTPUT
    assert plan.readouts == ("6.weight",) and "6" in plan.output_modules and "2" not in plan.output_modules
    plan = mupkit.infer_plan(bottleneck, base=dict(width=8), target=dict(width=16), readout=["2", "6"])
    assert plan.readouts == ("2.weight", "6.weight")
    with pytest.raises(ValueError, match=r"readout=\['5'\]: '5' matches no module that maps a width-sized input.*"
                                         r"modules that do: \['2', '6'\]"):
        mupkit.infer_plan(bottleneck, base=dict(width=8), target=dict(width=16), readout=["5"])


def test_error_delta_that_does_not_scale_what_target_scales():
    with pytest.raises(ValueError, match="scales in target but not in delta"):
        mupkit.infer_plan(models.mlp, base=dict(width=8, d_in=4), target=dict(width=16, d_in=8),
                          delta=dict(width=16, d_in=4))


def test_error_parametrize_twice_and_model_plan_mismatch():
    model = mupkit.build(models.mlp, base=dict(width=8), target=dict(width=16))
    with pytest.raises(RuntimeError, match="already has a mupkit plan"):
        mupkit.parametrize(model, mupkit.plan_of(model))
    with pytest.raises(ValueError, match=r"parameter '0.weight' has shape \(32, 64\).*target shape is \(16, 64\)"):
        mupkit.parametrize(models.mlp(32), mupkit.plan_of(model))


def test_error_unknown_parametrization():
    with pytest.raises(ValueError, match="unknown parametrization 'mupp'"):
        mupkit.infer_plan(models.mlp, base=dict(width=8), target=dict(width=16), parametrization="mupp")


# ---------------------------------------------------------------- properties
@settings(max_examples=25, deadline=None)
@given(base=st.integers(2, 24), factor=st.integers(1, 6), d_in=st.integers(1, 9), d_out=st.integers(1, 9),
       depth=st.integers(2, 4), conv=st.booleans())
def test_multipliers_are_one_at_base_and_monotone_in_width(base, factor, d_in, d_out, depth, conv):
    def make(width):
        if conv:
            return models.cnn(width, in_channels=d_in, n_classes=d_out)
        return models.mlp(width, d_in=d_in, d_out=d_out, depth=depth)
    delta = dict(width=2 * base)
    at_base = mupkit.infer_plan(make, base=dict(width=base), delta=delta, target=dict(width=base))
    small = mupkit.infer_plan(make, base=dict(width=base), delta=delta, target=dict(width=base * factor))
    large = mupkit.infer_plan(make, base=dict(width=base), delta=delta, target=dict(width=base * factor * 2))
    for name, spec in at_base.items():
        assert spec.init_scale == 1.0 and all(
            (s.lr, s.wd, s.eps) == (1.0, 1.0, 1.0) for s in spec.scales.values()), name
        for fam in mupkit.FAMILIES:  # monotone up to rounding (sqrt(m_out / m_in) of a square matrix: 1 + 2e-16)
            a, b, c = (round(p[name].scales[fam].lr, 12) for p in (at_base, small, large))
            assert (a >= b >= c) or (a <= b <= c), (name, fam, a, b, c)
        a, b, c = (p[name].init_scale for p in (at_base, small, large))
        assert a >= b >= c, name
