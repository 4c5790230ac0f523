"""Patterns from public architectures, written small: roles come from how the forward uses each
parameter (:mod:`mupkit.trace`), not from module types (Tensor Programs V, Sec. 4: fan-in and
fan-out decide the role). Each model here would get a wrong role from a module-type table."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mupkit
from mupkit import Role

SIZES = dict(base=dict(width=32), target=dict(width=128))  # m = 4


class CastedLinear(nn.Linear):
    """modded-nanogpt's readout: an nn.Linear subclass casting its weight in forward."""

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


class SubclassReadout(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.emb = nn.Embedding(50, width)
        self.fc = nn.Linear(width, width)
        self.head = CastedLinear(width, 50, bias=False)

    def forward(self, ids):
        return self.head(torch.relu(self.fc(self.emb(ids))))


def test_linear_subclass_readout_is_the_output_layer():
    plan = mupkit.infer_plan(SubclassReadout, **SIZES)
    head = plan["head.weight"]
    assert head.role is Role.OUTPUT and head.role_source == "trace" and plan.readouts == ("head.weight",)
    assert head.absorbed == pytest.approx(1 / 4) and head.scales["adam"].lr == pytest.approx(1 / 4)
    assert plan["fc.weight"].role is Role.HIDDEN and plan["emb.weight"].role is Role.INPUT


class RawRouter(nn.Module):
    """A Mixtral-style router as a raw (experts, width) parameter applied with F.linear, beside a
    raw (in, out) matrix applied with ``@`` and 3-D experts applied with ``bmm``."""

    def __init__(self, width=32, experts=4):
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.router = nn.Parameter(torch.randn(experts, width) / math.sqrt(width))
        self.w_in_out = nn.Parameter(torch.randn(width, 2 * width) / math.sqrt(width))  # stored (in, out)
        self.experts = nn.Parameter(torch.randn(experts, 2 * width, width) / math.sqrt(2 * width))  # (E, in, out)
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        h = self.inp(x)
        gates = F.linear(h, self.router).softmax(-1)  # (batch, E)
        u = torch.relu(h @ self.w_in_out)  # (batch, 2 width)
        per_expert = torch.bmm(u.expand(self.experts.shape[0], *u.shape), self.experts)  # (E, batch, width)
        h = h + torch.einsum("be,ebd->bd", gates, per_expert)
        return self.out(h)


def test_raw_router_raw_in_out_matrix_and_3d_experts_get_their_roles():
    plan = mupkit.infer_plan(RawRouter, **SIZES)
    router, matrix, experts = plan["router"], plan["w_in_out"], plan["experts"]
    assert router.role is Role.OUTPUT and (router.fan_out_axis, router.fan_in_axis) == (0, 1)
    assert router.m_in == 4 and router.absorbed == pytest.approx(1 / 4)
    assert matrix.role is Role.HIDDEN and (matrix.fan_out_axis, matrix.fan_in_axis) == (1, 0)
    assert matrix.init_scale == pytest.approx(4 ** -0.5) and matrix.scales["adam"].lr == pytest.approx(1 / 4)
    assert experts.role is Role.HIDDEN and (experts.fan_out_axis, experts.fan_in_axis) == (2, 1)
    assert experts.scales["adam"].lr == pytest.approx(1 / 4)
    assert plan.readouts == ("out.weight",)  # the router maps width to a fixed size too, but is not the output


def test_layouts_override_the_trace_for_any_axes():
    plan = mupkit.infer_plan(RawRouter, **SIZES, layouts={"experts": (1, 2)})
    assert (plan["experts"].fan_out_axis, plan["experts"].fan_in_axis) == (1, 2)
    assert plan["experts"].role_source == "layouts="
    with pytest.raises(ValueError, match=r"layouts\[\.\.\.\] = \(0, 0\) for parameter 'experts' \(3-d\)"):
        mupkit.infer_plan(RawRouter, **SIZES, layouts={"experts": (0, 0)})


class EinsumTied(nn.Module):
    """x-transformers' readout: logits = einsum(h, token_emb.weight) in the wrapper's forward."""

    def __init__(self, width=32):
        super().__init__()
        self.emb = nn.Embedding(50, width)
        self.fc = nn.Linear(width, width)

    def forward(self, ids):
        h = torch.relu(self.fc(self.emb(ids)))
        return torch.einsum("bnd,vd->bnv", h, self.emb.weight)


def test_einsum_tied_readout_keeps_the_embedding_and_scales_the_logits():
    plan = mupkit.infer_plan(EinsumTied, **SIZES)
    emb = plan["emb.weight"]
    assert emb.role is Role.INPUT and emb.tied_readouts == ("",) and plan.readouts == ("emb.weight",)
    assert plan.output_multipliers == {"": pytest.approx(1 / 4)} and not plan.input_multipliers
    torch.manual_seed(0)
    model = mupkit.build(EinsumTied, **SIZES)
    ids = torch.randint(0, 50, (2, 5))
    h = torch.relu(model.fc(model.emb(ids)))
    torch.testing.assert_close(model(ids), torch.einsum("bnd,vd->bnv", h, model.emb.weight) / 4)


class Scaled(nn.Module):
    """T5 / x-transformers: a width-dependent constant in the forward (``width**-0.5``)."""

    def __init__(self, width=32):
        super().__init__()
        self.width = width
        self.inp = nn.Linear(8, width)
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        return self.out(self.inp(x) * self.width ** -0.5)


def test_width_dependent_constant_is_warned_and_explained():
    with pytest.warns(mupkit.ForwardScalingWarning, match=r"aten\.mul\.Tensor in the model's own forward multiplies "
                                                          r"by a constant that scales like width\^-0\.5"):
        model = mupkit.build(Scaled, **SIZES)
    assert "width^-0.5" in mupkit.explain(model)


class Attention(nn.Module):
    def __init__(self, width=32, heads=2, base_width=None):
        super().__init__()
        self.heads = heads
        head_dim = width // heads
        self.scale = None if base_width is None else mupkit.nn.attention_scale(head_dim, base_width // heads)
        self.inp = nn.Linear(8, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, 3)

    def forward(self, x):  # x: (batch, seq, 8)
        h = self.inp(x)
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out(a.transpose(1, 2).flatten(-2) + h)


def test_sdpa_at_inverse_sqrt_head_dim_is_warned_and_muP_scale_is_not():
    x = torch.randn(2, 5, 8)
    with pytest.warns(mupkit.ForwardScalingWarning, match=r"attention in the model's own forward scales its logits "
                                                          r"by 1/sqrt\(d\) while the head dim d scales \(16 -> 32\)"):
        plan = mupkit.infer_plan(Attention, **SIZES, example_inputs=x)
    assert any("1/sqrt(d)" in note for note in plan.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mupkit.ForwardScalingWarning)
        plan = mupkit.infer_plan(Attention, base=dict(width=32, base_width=32), target=dict(width=128, base_width=32),
                                 example_inputs=x)
    assert plan.notes == ()


class Wrapper(nn.Module):
    """A wrapper whose output is the logits of the model inside it (HF's CausalLM-style)."""

    def __init__(self, width=32):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                   nn.Linear(width, 10))

    def forward(self, x):
        return self.inner(x).float()


def test_wrapper_returning_the_logits_is_judged_as_the_readout_and_passes():
    plan = mupkit.infer_plan(Wrapper, **SIZES)
    assert {"inner", "inner.4"} <= set(plan.output_modules)
    check = mupkit.coord_check(Wrapper, [64, 128, 256, 512], optimizer="adam", lr=1e-2, steps=3, seeds=2,
                               show_progress=False)
    verdict = check.verdict()
    assert "inner" in check.expected_at_init and {r.module for r in verdict.rows} >= {"inner", "inner.4"}
    assert verdict.passed, str(verdict)
    sp = mupkit.coord_check(Wrapper, [64, 128, 256, 512], parametrization="sp", optimizer="adam", lr=1e-2, steps=3,
                            seeds=2, show_progress=False)
    assert not sp.verdict().passed


class Rotary(nn.Module):
    """A parameter-free module (a rotary-like table) is not judged by the coordinate check."""

    def __init__(self, width):
        super().__init__()
        self.register_buffer("freq", torch.arange(width // 2, dtype=torch.float32))

    def forward(self, positions):
        angles = positions[:, None] * self.freq
        return torch.cat([angles.sin(), angles.cos()], -1)


class WithRotary(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.inp = nn.Linear(16, width)
        self.rotary = Rotary(width)
        self.out = nn.Linear(width, 10)

    def forward(self, x):
        table = self.rotary(torch.arange(x.shape[0], dtype=torch.float32))
        return self.out(torch.relu(self.inp(x)) + table)


def test_parameter_free_modules_are_not_judged():
    plan = mupkit.infer_plan(WithRotary, **SIZES)
    assert plan.constant_modules == ("rotary",)
    check = mupkit.coord_check(WithRotary, [64, 128], steps=1, seeds=1, show_progress=False)
    assert "rotary" not in {r["module"] for r in check.records}


def test_build_calls_the_constructor_a_handful_of_times_and_prints_once(capsys):
    calls = []

    def make(width, depth=2):
        calls.append((width, depth))
        print("building", width, depth)
        return mupkit.models.resmlp(width, depth=depth)

    mupkit.build(make, **SIZES)
    assert len(calls) == 4 and capsys.readouterr().out.count("building") == 1
    calls.clear()
    mupkit.build(make, base=dict(width=32, depth=2), target=dict(width=128, depth=8), parametrization="mup+depth")
    assert len(calls) == 6 <= 8 and capsys.readouterr().out.count("building") == 1
    calls.clear()
    mupkit.infer_plan(make, **SIZES)
    assert len(calls) == 3 and capsys.readouterr().out.count("building") == 1  # the base build shows


class KwargsModel(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.a = nn.Parameter(torch.randn(width, 8) / math.sqrt(8))
        self.b = nn.Parameter(torch.randn(3, width) / math.sqrt(width))

    def forward(self, features, scale):
        return F.linear(F.linear(features, self.a) * scale, self.b)


def test_example_inputs_as_kwargs_and_a_clear_warning_without_them():
    plan = mupkit.infer_plan(KwargsModel, **SIZES, example_inputs={"features": torch.randn(2, 8), "scale": 2.0})
    assert plan["a"].role is Role.INPUT and plan["b"].role is Role.OUTPUT and plan["b"].role_source == "trace"
    with pytest.warns(mupkit.TraceWarning, match=r"could not run KwargsModel.*example_inputs="):
        plan = mupkit.infer_plan(KwargsModel, **SIZES)
    assert plan["b"].role_source == "shape"
