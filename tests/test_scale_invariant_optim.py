"""AdamAtan2 and Adafactor: parity with their references, paths, state, precision and muP rules.

Parity runs in float64 for 50 steps on shapes (8, 16), (16,), (3, 4, 5) and (), with fresh
gradients per step from a seeded generator, against the real reference packages
(``adam-atan2-pytorch`` 0.4.1, ``torch.optim.Adafactor``, ``transformers`` Adafactor); the
tolerance is max |diff| <= 1e-12 on every parameter.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import mupkit
from mupkit import models
from mupkit.optim import Adafactor, AdamAtan2
from mupkit.roles import Role
from mupkit.rules import FAMILIES, PARAMETRIZATIONS

SHAPES = [(8, 16), (16,), (3, 4, 5), ()]


def run(make_optimizer, steps=50, dtype=torch.float64, shapes=SHAPES, grad_scale=1.0):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in shapes]
    opt = make_optimizer(params)
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g, dtype=torch.float64) * grad_scale).to(dtype)
        opt.step()
    return params, opt


def max_diff(a, b) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


# --- Adam-atan2 -------------------------------------------------------------------------------

PATHS = [dict(foreach=False), dict(foreach=True)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("wd,decoupled", [(0.0, False), (0.1, False), (0.1, True)])
def test_adam_atan2_matches_adam_atan2_pytorch(path, wd, decoupled):
    ref_module = pytest.importorskip("adam_atan2_pytorch")
    from adam_atan2_pytorch.foreach import AdamAtan2 as RefForeach
    policy = "independent" if decoupled else "coupled"
    ours, _ = run(lambda ps: AdamAtan2(ps, lr=1e-3, weight_decay=wd, weight_decay_policy=policy, **path))
    for ref_cls in (ref_module.AdamAtan2, RefForeach):
        ref, _ = run(lambda ps: ref_cls(ps, lr=1e-3, weight_decay=wd, decoupled_wd=decoupled))
        assert max_diff(ours, ref) <= 1e-12
    if path == dict(foreach=False):  # same ops in the same order as the reference's per-parameter loop
        ref, _ = run(lambda ps: ref_module.AdamAtan2(ps, lr=1e-3, weight_decay=wd, decoupled_wd=decoupled))
        assert max_diff(ours, ref) == 0.0


def test_adam_atan2_compiled_path_matches_single_tensor():
    single, _ = run(lambda ps: AdamAtan2(ps, lr=1e-3, weight_decay=0.1, foreach=False), steps=10)
    compiled, _ = run(lambda ps: AdamAtan2(ps, lr=1e-3, weight_decay=0.1, compiled=True), steps=10)
    assert max_diff(single, compiled) <= 1e-12
    # one group per tensor and 12 shapes (muP can make many groups): one graph serves them all
    shapes = [(n, 3) for n in range(1, 13)]
    def one_group_each(ps):
        return AdamAtan2([{"params": [p], "lr_scale": 1.0 / (1 + i)} for i, p in enumerate(ps)], lr=1e-3,
                         compiled=True)
    compiled, _ = run(one_group_each, steps=10, dtype=torch.float32, shapes=shapes)
    single, _ = run(lambda ps: AdamAtan2([{"params": [p], "lr_scale": 1.0 / (1 + i)} for i, p in enumerate(ps)],
                                         lr=1e-3), steps=10, dtype=torch.float32, shapes=shapes)
    assert max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(compiled, single)) <= 1e-6


def test_adam_atan2_fused_formulation_is_the_cuda_packages_formula():
    """adam-atan2 0.0.3 (CUDA only): bias correction 1 outside atan2, a = b = 1."""
    lr, b1, b2, wd = 1e-3, 0.9, 0.999, 0.01
    ours, _ = run(lambda ps: AdamAtan2(ps, lr=lr, betas=(b1, b2), weight_decay=wd, formulation="fused"), steps=20)
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t in range(1, 21):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.mul_(1 - lr * wd)
            m[i].lerp_(grad, 1 - b1)
            v[i].lerp_(grad * grad, 1 - b2)
            p.sub_(lr / (1 - b1 ** t) * torch.atan2(m[i], v[i].sqrt() / math.sqrt(1 - b2 ** t)))
    assert max_diff(ours, params) <= 1e-12


def test_adam_atan2_single_and_foreach_agree_in_float32_and_zero_gradients_stay_finite():
    shapes = SHAPES + [(5, 7)]
    single, _ = run(lambda ps: AdamAtan2(ps, lr=1e-2, foreach=False), dtype=torch.float32, shapes=shapes)
    multi, _ = run(lambda ps: AdamAtan2(ps, lr=1e-2, foreach=True), dtype=torch.float32, shapes=shapes)
    for a, b in zip(single, multi):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    p = torch.nn.Parameter(torch.ones(4))
    opt = AdamAtan2([p], lr=1e-2, foreach=True)
    p.grad = torch.zeros(4)
    opt.step()  # atan2(0, 0) = 0: a never-used embedding row must not become NaN
    assert torch.equal(p.detach(), torch.ones(4))


def test_adam_atan2_foreach_matches_the_reference_and_low_precision_paths_agree():
    """The multi-tensor path (the same update function over lists) equals adam-atan2-pytorch to
    1e-12 in float64; in fp32, and with bf16 parameters (fp32 state and working copies), the two
    eager paths agree to 1e-6 relative (bf16: one unit in the last place)."""
    ref_module = pytest.importorskip("adam_atan2_pytorch")
    ref, _ = run(lambda ps: ref_module.AdamAtan2(ps, lr=1e-3, weight_decay=0.1))
    multi, _ = run(lambda ps: AdamAtan2(ps, lr=1e-3, weight_decay=0.1, foreach=True))
    assert max_diff(multi, ref) <= 1e-12
    for dtype in (torch.float32, torch.bfloat16):
        single, _ = run(lambda ps: AdamAtan2(ps, lr=1e-2, foreach=False), dtype=dtype, steps=10)
        multi, opt = run(lambda ps: AdamAtan2(ps, lr=1e-2, foreach=True), dtype=dtype, steps=10)
        tolerance = 1e-6 if dtype == torch.float32 else 2.0 ** -8  # bf16: one unit in the last place
        for a, b in zip(single, multi):
            assert a.dtype == dtype and opt.state[b]["exp_avg"].dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


# --- Adafactor ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("maximize", [False, True])
def test_adafactor_torch_mode_matches_torch_optim_adafactor(path, wd, maximize):
    ours, _ = run(lambda ps: Adafactor(ps, weight_decay=wd, maximize=maximize, **path))
    for ref_foreach in (False, True):
        ref, _ = run(lambda ps: torch.optim.Adafactor(ps, weight_decay=wd, maximize=maximize, foreach=ref_foreach))
        assert max_diff(ours, ref) <= 1e-12


HF_SETTINGS = [
    dict(),  # relative step with parameter scaling (the default)
    dict(relative_step=False, scale_parameter=False, lr=1e-3),  # the recommended external-LR mode
    dict(relative_step=False, lr=1e-3),
    dict(beta1=0.9),
    dict(weight_decay=0.1),
    dict(warmup_init=True),
    dict(beta1=0.9, weight_decay=0.1, relative_step=False, lr=1e-2, clip_threshold=0.5),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("settings", HF_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_adafactor_hf_mode_matches_transformers(path, settings):
    optimization = pytest.importorskip("transformers.optimization")
    ours, _ = run(lambda ps: Adafactor(ps, mode="hf", **settings, **path))
    ref, _ = run(lambda ps: optimization.Adafactor(ps, **settings))
    assert max_diff(ours, ref) <= 1e-12


@pytest.mark.parametrize("mode", ["torch", "hf"])
def test_adafactor_single_and_foreach_agree_in_float32(mode):
    kwargs = dict(mode=mode, beta1=0.9, weight_decay=0.1)
    single, _ = run(lambda ps: Adafactor(ps, foreach=False, **kwargs), dtype=torch.float32)
    multi, _ = run(lambda ps: Adafactor(ps, foreach=True, **kwargs), dtype=torch.float32)
    for a, b in zip(single, multi):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["torch", "hf"])
def test_adafactor_unfactored_tensors_with_zero_gradients_match_the_references(mode):
    """The multi-tensor step updates its unfactored tensors with multi-tensor ops. Entries whose
    gradient is always zero keep V at 0, where only the floor (torch mode: V >= eps1^2)
    or eps1 (hf mode: g^2 + eps1) keeps the update finite: 30 float64 steps match
    torch.optim.Adafactor / transformers' Adafactor to 1e-12, and those entries do not move."""
    reference = torch.optim.Adafactor if mode == "torch" else \
        pytest.importorskip("transformers.optimization").Adafactor

    def train(make):
        gen = torch.Generator().manual_seed(2)
        shapes = [(12,), (5,), (), (8,)]
        params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
        start = [p.detach().clone() for p in params]
        opt = make(params)
        for _ in range(30):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                if p.dim():
                    p.grad[::2] = 0.0
            opt.step()
        return params, start
    ours, start = train(lambda ps: Adafactor(ps, mode=mode, foreach=True))
    ref, _ = train(lambda ps: reference(ps))
    assert max_diff(ours, ref) <= 1e-12
    assert all(torch.isfinite(p).all() for p in ours)
    assert all(torch.equal(p[::2], p0[::2]) for p, p0 in zip(ours, start) if p.dim())


@pytest.mark.parametrize("mode", ["torch", "hf"])
@pytest.mark.parametrize("zero_column", [False, True], ids=["factor roots", "clamped product"])
def test_adafactor_foreach_matrices_and_vectors_match_the_references(mode, zero_column):
    """The multi-tensor step on three 6 x 5 and two 5 x 6 matrices beside a 3-D tensor and
    vectors: 30 float64 steps match torch.optim.Adafactor / transformers' Adafactor to 1e-12; a
    gradient column that is always zero puts products under torch mode's floor. bf16 parameters
    (fp32 state) end where the one-tensor-at-a-time path ends, to 1e-2."""
    reference = torch.optim.Adafactor if mode == "torch" else \
        pytest.importorskip("transformers.optimization").Adafactor
    shapes = [(6, 5), (6, 5), (6, 5), (5, 6), (5, 6), (4, 3, 2), (7,), (7,)]

    def train(make, dtype=torch.float64):
        gen = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]
        opt = make(params)
        for _ in range(30):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
            if zero_column:
                params[1].grad[:, 2] = 0.0
            opt.step()
        return params
    assert max_diff(train(lambda ps: Adafactor(ps, mode=mode, foreach=True)), train(lambda ps: reference(ps))) <= 1e-12
    together = train(lambda ps: Adafactor(ps, mode=mode, foreach=True), torch.bfloat16)
    alone = train(lambda ps: Adafactor(ps, mode=mode, foreach=False), torch.bfloat16)
    for a, b in zip(together, alone):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)


def test_adafactor_foreach_over_groups_of_different_scales_matches_single_tensor():
    """Two groups (lr_scale 0.5 and 1) of 128 x 128 matrices and vectors with momentum: the
    multi-tensor path (per-tensor step sizes and clipping) ends where the per-tensor loop ends."""
    shapes = [(128, 128)] * 6 + [(300,)] * 3

    def train(**impl):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
        opt = Adafactor([{"params": params[::2], "lr_scale": 0.5}, {"params": params[1::2]}], beta1=0.9, **impl)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return params
    for a, b in zip(train(foreach=False), train(foreach=True)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_adafactor_factored_update_clamps_products_under_the_floor_like_torch():
    """torch mode clamps the factored product R_i C_j / mean(R) at the floor eps1^2. A row and a
    column whose gradient is always zero put products under the floor in the first tensor (the
    second has none): on both eager paths, in fp32 and float64 the result matches torch.optim.Adafactor (float64 to 1e-12; fp32, where torch's floor is
    fp32's eps^2 too, to 1e-6 relative) and stays finite."""
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        results = []
        for make in (lambda ps: Adafactor(ps, foreach=False), lambda ps: Adafactor(ps, foreach=True),
                     lambda ps: torch.optim.Adafactor(ps, foreach=False)):
            gen = torch.Generator().manual_seed(3)
            params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in [(6, 9), (2, 5, 4)]]
            opt = make(params)
            for _ in range(8):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
                params[0].grad[1, :] = 0  # a never-used row and column: R_1 = C_2 = 0, under the floor
                params[0].grad[:, 2] = 0
                opt.step()
            results.append(params)
        for ours in results[:2]:
            for a, b in zip(ours, results[2]):
                assert torch.isfinite(a).all()
                torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)

@pytest.mark.parametrize("mode", ["torch", "hf"])
def test_adafactor_compiled_path_matches_single_tensor(mode):
    """compiled=True runs the same update function under torch.compile (0-dim tensors viewed as
    1-element ones): 4 fp32 steps with momentum and decay on 2-D, 1-D, 3-D and 0-D tensors end
    where the per-tensor loop ends, to 1e-6."""
    kwargs = dict(mode=mode, beta1=0.9, weight_decay=0.1)
    compiled, _ = run(lambda ps: Adafactor(ps, compiled=True, **kwargs), steps=4, dtype=torch.float32)
    single, _ = run(lambda ps: Adafactor(ps, foreach=False, **kwargs), steps=4, dtype=torch.float32)
    for a, b in zip(compiled, single):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_adafactor_muP_multiplier_is_not_just_a_cap():
    """torch applies group lr as the cap in min(lr, t^-1/2), so a 0.5 multiplier on lr=0.5 is
    gone after 4 steps; mupkit scales every step."""
    def step_size(lr_scale, t_end=30):
        p = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.float64))
        opt = Adafactor([{"params": [p], "lr_scale": lr_scale}], lr=0.5)
        before = None
        for _ in range(t_end):
            before = p.detach().clone()
            p.grad = torch.ones_like(p)
            opt.step()
        return (before - p.detach()).abs().mean().item() / before.abs().mean().item()
    assert step_size(0.5) == pytest.approx(0.5 * step_size(1.0), rel=1e-9)


def test_adafactor_tiny_eps1_and_zero_gradients_never_make_nan():
    p = torch.nn.Parameter(torch.ones(3, 5))
    for mode, eps in (("torch", (1e-30, 1e-3)), ("hf", (1e-30, 1e-3))):
        opt = Adafactor([p], mode=mode, eps=eps)
        p.grad = torch.zeros(3, 5)
        opt.step()
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("cls,kwargs", [(AdamAtan2, dict(lr=1e-2, weight_decay=0.1)),
                                        (Adafactor, dict(beta1=0.9, weight_decay=0.1)),
                                        (Adafactor, dict(mode="hf", beta1=0.9))])
@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip_continues_identically(cls, kwargs, foreach):
    def fresh():
        g = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in SHAPES]

    def grads(k):
        g = torch.Generator().manual_seed(100 + k)
        return [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]

    def steps(params, opt, ks):
        for k in ks:
            for p, grad in zip(params, grads(k)):
                p.grad = grad
            opt.step()

    straight = fresh()
    opt = cls(straight, foreach=foreach, **kwargs)
    steps(straight, opt, range(10))
    resumed = fresh()
    first = cls(resumed, foreach=foreach, **kwargs)
    steps(resumed, first, range(5))
    saved = copy.deepcopy(first.state_dict())
    second = cls(resumed, foreach=foreach, **kwargs)
    second.load_state_dict(saved)
    steps(resumed, second, range(5, 10))
    assert max_diff(straight, resumed) == 0.0


@pytest.mark.parametrize("cls", [AdamAtan2, Adafactor])
def test_bf16_parameters_train_with_fp32_state(cls):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)).to(torch.bfloat16)
    x, y = torch.randn(64, 16, dtype=torch.bfloat16), torch.randn(64, 1, dtype=torch.bfloat16)
    opt = cls(model.parameters(), lr=3e-2, foreach=True)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (model(x) - y).float().square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    states = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    assert states and all(t.dtype == torch.float32 for t in states)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert losses[-1] < 0.8 * losses[0]
    # a checkpoint round trip keeps the fp32 state (torch's load_state_dict would cast it to bf16)
    resumed = cls(model.parameters(), lr=3e-2, foreach=True)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p in model.parameters():
        for key, value in opt.state[p].items():
            if torch.is_tensor(value):
                assert resumed.state[p][key].dtype == value.dtype and torch.equal(resumed.state[p][key], value), key


# --- muP ---------------------------------------------------------------------------------------

def test_adafactor_lr_rule_is_adams_over_the_init_scale_for_every_role():
    """Adafactor's step is rho * RMS(W) * (scale-free direction): its LR exponent is Adam's minus
    the init exponent, on every row of every parametrization (Everett et al. 2024)."""
    for param in PARAMETRIZATIONS.values():
        for role, rule in param.rules.items():
            for m_in, m_out in ((4.0, 1.0), (1.0, 8.0), (2.0, 16.0)):
                adam = rule.lr["adam"](m_in, m_out)
                assert rule.lr["adafactor"](m_in, m_out) == pytest.approx(adam / rule.init(m_in, m_out)), (param, role)


def test_param_groups_give_each_optimizer_its_family_scales():
    torch.manual_seed(0)
    model = mupkit.build(models.mlp, base=dict(width=32), target=dict(width=128))
    hidden = "2.weight"
    plan = mupkit.plan_of(model)
    assert plan[hidden].role is Role.HIDDEN
    groups = mupkit.param_groups(model)
    for cls, family, lr_scale in ((AdamAtan2, "adamw", 1 / 4), (Adafactor, "adafactor", 1 / 2)):
        opt = cls(groups)
        assert cls.family is FAMILIES[family]
        group = next(g for g in opt.param_groups if hidden in g["param_names"])
        assert group["lr_scale"] == pytest.approx(lr_scale)
    readout = next(g for g in Adafactor(groups).param_groups if "4.weight" in g["param_names"])
    assert readout["lr_scale"] == 1.0 and readout["eps_scale"] == pytest.approx(1 / 4)  # RMS floor follows init
    no_scaling = Adafactor(groups, mode="hf", relative_step=False, scale_parameter=False, lr=1e-3)
    assert no_scaling.family is FAMILIES["adamw"]
    with pytest.raises(ValueError, match="mupkit.optim.Adafactor"):
        mupkit.param_groups(model, optimizer=torch.optim.Adafactor, lr=1e-2)


def test_adafactor_argument_errors_name_the_fix():
    p = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="mode='hf' options"):
        Adafactor(p, relative_step=False)
    with pytest.raises(ValueError, match="relative_step=False"):
        Adafactor(p, mode="hf", lr=1e-3)
    with pytest.raises(ValueError, match="needs lr"):
        Adafactor(p, mode="hf", relative_step=False)
    with pytest.raises(ValueError, match="formulation"):
        AdamAtan2(p, formulation="other")
