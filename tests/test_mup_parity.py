"""Parity with microsoft/mup 1.0.0 (PyPI), run on the same models and inputs.

mup marks the readout with ``MuReadout`` (forward ``x / m_in``); mupkit keeps a plain
``nn.Linear`` and absorbs the multiplier into init, LR, WD and eps (see mupkit.rules.absorb).
Every other parameter's infinite dims, width multipliers and optimizer LR/WD must be equal;
for the readout the test shows the two are the same training dynamics (float64 logits over
10 steps agree to 1e-10 relative, far inside the 1e-5 asked for).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mupkit

mup = pytest.importorskip("mup")  # test extra; CI installs it via .[test]

BASE, DELTA, TARGET = 16, 32, 64


def mlp(width: int, readout=nn.Linear, norm: str | None = None) -> nn.Sequential:
    norms = {"layer": nn.LayerNorm, "batch": nn.BatchNorm1d}
    extra = [norms[norm](width)] if norm else []
    return nn.Sequential(nn.Linear(12, width), *extra, nn.ReLU(), nn.Linear(width, width), *extra, nn.ReLU(),
                         readout(width, 5))


def cnn(width: int, readout=nn.Linear, norm: str | None = None) -> nn.Sequential:
    extra = [nn.BatchNorm2d(width)] if norm == "batch" else []
    return nn.Sequential(nn.Conv2d(3, width, 3), *extra, nn.ReLU(), nn.Conv2d(width, 2 * width, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(2 * width * 4 * 4, 3 * width), nn.ReLU(), readout(3 * width, 5))


FAMILIES = [(mlp, None), (mlp, "layer"), (mlp, "batch"), (cnn, None), (cnn, "batch")]
INPUTS = {mlp: (8, 12), cnn: (8, 3, 8, 8)}


def mup_model(family, norm, dtype=torch.float32):
    model = family(TARGET, mup.MuReadout, norm).to(dtype)
    mup.set_base_shapes(model, family(BASE, mup.MuReadout, norm), delta=family(DELTA, mup.MuReadout, norm))
    return model


def example(family, dtype=torch.float32) -> torch.Tensor:
    """An input batch for the usage trace, from its own generator (the global RNG is the models')."""
    return torch.randn(INPUTS[family], generator=torch.Generator().manual_seed(0), dtype=dtype)


def mupkit_model(family, norm, dtype=torch.float32):
    def make(width):
        return family(width, nn.Linear, norm).to(dtype)
    return mupkit.build(make, base=dict(width=BASE), delta=dict(width=DELTA), target=dict(width=TARGET),
                        example_inputs=example(family, dtype))


def readout_name(model) -> str:
    return [n for n, _ in model.named_parameters()][-2]


@pytest.mark.parametrize("family,norm", FAMILIES)
def test_infinite_dims_and_width_multipliers_equal_mup(family, norm):
    ref = mup_model(family, norm)
    plan = mupkit.plan_of(mupkit_model(family, norm))
    for name, p in ref.named_parameters():
        spec = plan[name]
        assert spec.infinite == tuple(d.isinf() for d in p.infshape), name
        assert spec.multipliers == tuple(float(d.width_mult()) for d in p.infshape), name
        assert tuple(d.base_dim for d in p.infshape if d.isinf()) == tuple(
            b for b, inf in zip(spec.base, spec.infinite) if inf), name


def lr_wd_by_name(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g.get("weight_decay", 0.0)) for g in groups for p in g["params"]}


@pytest.mark.parametrize("family,norm", FAMILIES)
@pytest.mark.parametrize("opt", ["adam", "adamw", "sgd"])
def test_lr_and_wd_multipliers_equal_mup(family, norm, opt):
    lr, wd = 0.3, 0.01
    ref = mup_model(family, norm)
    make_ref = {"adam": mup.MuAdam, "adamw": mup.MuAdamW, "sgd": mup.MuSGD}[opt]
    ref_map = lr_wd_by_name(ref, make_ref(ref.parameters(), lr=lr, weight_decay=wd).param_groups)
    model = mupkit_model(family, norm)
    ours = lr_wd_by_name(model, mupkit.param_groups(model, optimizer=opt, lr=lr, weight_decay=wd))
    assert set(ours) == set(ref_map)
    readout = readout_name(model)
    for name in ref_map:
        if name == readout:
            continue  # absorbed: equivalence is shown by the trajectory test below
        assert ours[name] == pytest.approx(ref_map[name], rel=1e-12), name
    m = mupkit.plan_of(model)[readout].m_in
    # readout: absorbed c = 1/m maps lr by c**lr_power; decay lr*wd is unchanged for adamw and sgd
    power = 2 if opt == "sgd" else 1
    assert ours[readout][0] == pytest.approx(ref_map[readout][0] / m ** power, rel=1e-12)


@pytest.mark.parametrize("family,norm", [(mlp, None), (mlp, "layer"), (cnn, None)])
@pytest.mark.parametrize("opt,lr,wd", [("adam", 0.05, 0.01), ("adamw", 0.05, 0.1), ("sgd", 0.1, 0.01)])
def test_absorbed_readout_trains_identically_to_mureadout(family, norm, opt, lr, wd):
    torch.manual_seed(0)
    ref = mup_model(family, norm, torch.float64)
    model = mupkit_model(family, norm, torch.float64)
    m = mupkit.plan_of(model)[readout_name(model)].m_in
    with torch.no_grad():
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            p.copy_(q / m if name == readout_name(model) else q)  # W' = W / m_in: same function
    ref_opt = {"adam": mup.MuAdam, "adamw": mup.MuAdamW, "sgd": mup.MuSGD}[opt](
        ref.parameters(), lr=lr, weight_decay=wd, **({"momentum": 0.9} if opt == "sgd" else {}))
    our_cls = {"adam": mupkit.optim.Adam, "adamw": mupkit.optim.AdamW, "sgd": mupkit.optim.SGD}[opt]
    our_opt = our_cls(mupkit.param_groups(model), lr=lr, weight_decay=wd, **({"momentum": 0.9} if opt == "sgd" else {}))
    x = torch.randn(*INPUTS[family], dtype=torch.float64)
    y = torch.randint(0, 5, (x.shape[0],))
    worst = 0.0
    for _ in range(10):
        out_ref, out = ref(x), model(x)
        worst = max(worst, float(((out - out_ref).abs() / out_ref.abs().clamp_min(1e-3)).max().detach()))
        for net, o, optim in ((ref, out_ref, ref_opt), (model, out, our_opt)):
            optim.zero_grad()
            nn.functional.cross_entropy(o, y).backward()
            optim.step()
    assert worst <= 1e-10, worst


@pytest.mark.parametrize("family,norm", [(mlp, "layer"), (cnn, "batch")])
def test_at_base_width_mupkit_equals_sp_exactly(family, norm):
    """mup's BackwardCompatibleCase: at the base size muP is SP, bit for bit, init and LRs."""
    torch.manual_seed(3)
    sp = family(BASE, nn.Linear, norm)
    torch.manual_seed(3)
    model = mupkit.build(lambda width: family(width, nn.Linear, norm), base=dict(width=BASE),
                         delta=dict(width=DELTA), target=dict(width=BASE), example_inputs=example(family))
    for p, q in zip(model.parameters(), sp.parameters()):
        assert torch.equal(p, q)
    for g in mupkit.param_groups(model, optimizer="sgd", lr=0.1, weight_decay=0.01):
        assert (g["lr"], g["weight_decay"]) == (0.1, 0.01)


@pytest.mark.parametrize("family,norm", [(mlp, "layer"), (cnn, None)])
def test_bsh_files_round_trip_with_mup(family, norm, tmp_path):
    model = mupkit_model(family, norm)
    plan = mupkit.plan_of(model)
    ours, theirs = tmp_path / "ours.bsh", tmp_path / "theirs.bsh"
    mupkit.save_bsh(plan, str(ours))
    expected = mup.make_base_shapes(family(BASE, mup.MuReadout, norm), family(DELTA, mup.MuReadout, norm))
    loaded = mup.load_base_shapes(str(ours))
    assert {n: [d.base_dim for d in s] for n, s in loaded.items()} == \
        {n: [d.base_dim for d in s] for n, s in expected.items()}

    mup.save_base_shapes(expected, str(theirs))
    assert mupkit.load_bsh(str(theirs)) == mupkit.load_bsh(str(ours))
    from_file = mupkit.plan_from_base_shapes(family(TARGET, nn.Linear, norm), str(theirs))
    for name, spec in plan.items():
        assert (from_file[name].infinite, from_file[name].multipliers, from_file[name].role) == \
            (spec.infinite, spec.multipliers, spec.role)
        assert from_file[name].scales == spec.scales
