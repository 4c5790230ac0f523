"""``master_weights=True``: bf16 parameters updated through an fp32 master copy.

The same gradients (bf16 values, so both runs see them exactly) are fed to an fp32 model and to
a bf16 model with master weights: the master copies follow the fp32 run (1e-6 relative after 10
steps: the same fp32 math; only the paths' own roundings differ), and each bf16 parameter is its
master rounded to bf16. Without master weights, updates below half a bf16 ulp are lost.
"""

from __future__ import annotations

import copy

import pytest
import torch

import mupkit
from mupkit import models

OPTIMIZERS = [
    (mupkit.optim.AdamW, dict(lr=1e-3, weight_decay=0.1)),
    (mupkit.optim.Adam, dict(lr=1e-3)),
    (mupkit.optim.SGD, dict(lr=1e-2, momentum=0.9)),
    (mupkit.optim.AdamAtan2, dict(lr=1e-3)),
    (mupkit.optim.AdamAtan2, dict(lr=1e-3, compiled=True)),
    (mupkit.optim.Adafactor, dict()),
    (mupkit.optim.ScaledAdam, dict(lr=1e-2)),
]


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = mupkit.build(models.mlp, base=dict(width=16), target=dict(width=48))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((p + 0.01).bfloat16().float())  # bf16-representable starting values, no all-zero tensor
    return model.to(dtype)


def _gradients(model: torch.nn.Module, steps: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(p.shape, generator=gen).bfloat16() for p in model.parameters()] for _ in range(steps)]


def _train(model, opt, grads) -> None:
    for step_grads in grads:
        for p, g in zip(model.parameters(), step_grads):
            p.grad = g.to(p.dtype)
        opt.step()


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=[c.__name__ + ("-compiled" if k.get("compiled") else "")
                                                     for c, k in OPTIMIZERS])
def test_master_copies_follow_the_fp32_run_and_round_into_the_bf16_parameters(cls, kwargs):
    reference = _model(torch.float32)
    model = _model(torch.bfloat16)
    grads = _gradients(reference, 10)
    _train(reference, cls(mupkit.param_groups(reference), **kwargs), grads)
    opt = cls(mupkit.param_groups(model), master_weights=True, **kwargs)
    _train(model, opt, grads)
    for p, ref in zip(model.parameters(), reference.parameters()):
        master = opt.state[p]["master"]
        assert p.dtype == torch.bfloat16 and master.dtype == torch.float32 and p.grad.dtype == torch.bfloat16
        assert ((master - ref).abs().max() / ref.abs().max()).item() <= 1e-6
        assert torch.equal(p, master.bfloat16())


def test_small_updates_accumulate_only_with_master_weights():
    """SGD steps of 1e-4 on a parameter of 1.0 (bf16's spacing there: 2^-8): 30 of them move
    the master copy to 0.997, which rounds to 0.99609375; without it every step rounds back."""
    def run(**options):
        p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
        opt = mupkit.optim.SGD([p], lr=1e-4, **options)
        for _ in range(30):
            p.grad = torch.ones(4, dtype=torch.bfloat16)
            opt.step()
        return p, opt
    plain, _ = run()
    assert torch.equal(plain, torch.ones(4, dtype=torch.bfloat16))
    mastered, opt = run(master_weights=True)
    torch.testing.assert_close(opt.state[mastered]["master"], torch.full((4,), 1 - 30e-4), rtol=0, atol=1e-6)
    assert torch.equal(mastered, torch.full((4,), 0.99609375, dtype=torch.bfloat16))


@pytest.mark.parametrize("cls,kwargs", [OPTIMIZERS[0], OPTIMIZERS[3], OPTIMIZERS[5]],
                         ids=["AdamW", "AdamAtan2", "Adafactor"])
def test_a_checkpoint_keeps_the_fp32_master_copies(cls, kwargs):
    """Save after 5 steps, load into a fresh optimizer over a copy of the model, run 5 more:
    identical to 10 uninterrupted steps, master copies still fp32."""
    grads = _gradients(_model(torch.float32), 10)
    model = _model(torch.bfloat16)
    opt = cls(mupkit.param_groups(model), master_weights=True, **kwargs)
    _train(model, opt, grads[:5])
    resumed = copy.deepcopy(model)
    opt2 = cls(mupkit.param_groups(resumed), master_weights=True, **kwargs)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(model, opt, grads[5:])
    _train(resumed, opt2, grads[5:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert opt2.state[q]["master"].dtype == torch.float32
        assert torch.equal(opt.state[p]["master"], opt2.state[q]["master"]) and torch.equal(p, q)


def test_fp32_parameters_take_no_master_copy_and_subclasses_are_refused():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = mupkit.optim.AdamW([p], master_weights=True)
    opt.step()
    assert "master" not in opt.state[p]

    class Tagged(torch.nn.Parameter):
        pass

    q = Tagged(torch.ones(3, dtype=torch.bfloat16))
    q.grad = torch.ones(3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"master_weights=True.*shape \(3,\).*Tagged.*MixedPrecisionPolicy"):
        mupkit.optim.AdamAtan2([q], master_weights=True).step()
    assert q.dtype == torch.bfloat16


def test_a_parameter_changed_in_place_gets_a_fresh_master_copy():
    """Zeroing the bf16 parameter between steps (as a model load_state_dict or a re-init would)
    must not be undone by the old master copy at the next step."""
    p = torch.nn.Parameter(torch.full((4,), 0.5, dtype=torch.bfloat16))
    opt = mupkit.optim.SGD([p], lr=0.125, master_weights=True)
    p.grad = torch.ones(4, dtype=torch.bfloat16)
    opt.step()
    assert torch.equal(p, torch.full((4,), 0.375, dtype=torch.bfloat16))
    with torch.no_grad():
        p.zero_()
    opt.step()
    assert torch.equal(p, torch.full((4,), -0.125, dtype=torch.bfloat16))
    assert torch.equal(opt.state[p]["master"], torch.full((4,), -0.125))


def test_an_fp32_checkpoint_resumes_in_a_bf16_model_as_in_torch():
    """Without master weights, mupkit's AdamW loads state the way torch does (cast to the
    parameter's dtype), so an fp32 run's checkpoint steps a bf16 copy of the model on every path."""
    model = _model(torch.float32)
    opt = mupkit.optim.AdamW(mupkit.param_groups(model), lr=1e-3)
    _train(model, opt, _gradients(model, 2))
    for impl in (dict(), dict(foreach=True), dict(fused=False)):
        half = copy.deepcopy(model).bfloat16()
        resumed = mupkit.optim.AdamW(mupkit.param_groups(half), lr=1e-3, **impl)
        resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
        _train(half, resumed, _gradients(model, 1))
        assert all(s["exp_avg"].dtype == torch.bfloat16 for s in resumed.state.values())
