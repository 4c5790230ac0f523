"""The ``"stacked"`` path (mupkit.optim.stacked): many small same-shape CPU tensors stepped as one
stack per shape.

* The dispatcher picks it for small tensors in few shapes, for the algorithms that offer it.
* Each optimizer's stacked step equals its unstacked default (single-tensor or multi-tensor)
  over steps where a parameter misses its gradient once, and so does the per-parameter state.
  Tolerance: relative 1e-5 of each tensor's largest entry (elementwise functions run vectorized
  over a stack, summations add in another order); 1e-4 for the D-Adaptation family and Prodigy,
  whose global ``d`` carries such differences into every parameter.
* The state is per parameter for ``state_dict`` (views of one stack, saved once), a saved state
  resumes bitwise, a loaded state is stacked anew, and the optimizer pickles and deep-copies.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch

import mupkit.optim as mo
from mupkit.optim import dispatch

#: small tensors in a few repeating shapes, a 3-D one, one-element ones (ScaledAdam's scalars)
SHAPES = [(6, 4), (4,), (4, 6), (1,)] * 5 + [(2, 3, 4)] * 4 + [(5,)]

CASES = [
    (mo.AdamAtan2, dict(lr=1e-2, weight_decay=0.1), 1e-5),
    (mo.AdamAtan2, dict(lr=1e-2, maximize=True), 1e-5),
    (mo.Adafactor, dict(weight_decay=0.1), 1e-5),
    (mo.Adafactor, dict(mode="hf", relative_step=False, lr=1e-2, beta1=0.9), 1e-5),
    (mo.ScaledAdam, dict(lr=3e-2, clipping_scale=2.0, clipping_update_period=4), 1e-5),
    (mo.DAdaptAdam, dict(d0=1e-2, weight_decay=0.1, decouple=True), 1e-4),
    (mo.Prodigy, dict(d0=1e-2), 1e-4),
    (mo.Prodigy, dict(d0=1e-2, betas=(0.0, 0.99), slice_p=3), 1e-4),
    (mo.DAdaptSGD, dict(d0=1e-2, momentum=0.9, weight_decay=0.1), 1e-4),
    (mo.DAdaptLion, dict(d0=1e-2, weight_decay=0.1), 1e-4),
    (mo.DAdaptAdaGrad, dict(d0=1e-2, weight_decay=0.1), 1e-4),
]


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    params[1].data.zero_()  # a zero-initialized tensor (Prodigy keeps a 0-dim p0 for it)
    return params


def train(opt, params, steps: int, start: int = 0) -> None:
    """Gradients pulling each parameter to 1, with noise; parameter 2 has none at step 2."""
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(100 + t)
        for i, p in enumerate(params):
            noise = torch.randn(p.shape, generator=g)
            p.grad = None if (t == 2 and i == 2) else (p.detach() - 1.0 + 0.1 * noise).to(p.dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "ScaledAdam: parameter", UserWarning)  # the zero tensor (asserted below)
            opt.step()


def unstacked(monkeypatch):
    """Turn the stacked default off (the next most specific default runs instead)."""
    monkeypatch.setattr(dispatch, "STACK_PER_SHAPE", 10 ** 9)


def close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    return bool((a - b).abs().max() <= rtol * a.abs().max().clamp(min=1e-30))


def test_the_table_stacks_small_tensors_of_few_shapes():
    stacked = dispatch.Kernels(stacked=True)
    few_shapes = [torch.zeros(4096) for _ in range(6)] + [torch.zeros(64, 64) for _ in range(2)]
    assert dispatch.default_path(few_shapes, stacked) == "stacked"
    assert dispatch.default_path(few_shapes, dispatch.Kernels()) == "foreach"  # an algorithm without it
    many_shapes = [torch.zeros(100 + i) for i in range(8)]
    assert dispatch.default_path(many_shapes, stacked) == "foreach"
    assert dispatch.default_path(many_shapes, dispatch.Kernels(stacked=True, foreach=False)) == "single"
    assert dispatch.default_path([torch.zeros(1 << 17)] * 8, stacked) == "single"
    group = {"params": few_shapes, "foreach": True}  # a group's own flag still wins
    assert dispatch.chosen_path(group, stacked) == "foreach"


@pytest.mark.parametrize("cls,kwargs,rtol", CASES, ids=lambda v: getattr(v, "__name__", None))
def test_stacked_step_equals_the_unstacked_default(cls, kwargs, rtol, monkeypatch):
    params = make_params()
    opt = cls(params, **kwargs)
    train(opt, params, 10)
    assert dispatch.group_paths(opt, opt.kernels) == ["stacked"]
    unstacked(monkeypatch)
    reference = make_params()
    ref_opt = cls(reference, **kwargs)
    train(ref_opt, reference, 10)
    assert dispatch.group_paths(ref_opt, ref_opt.kernels) != ["stacked"]
    assert any(not torch.equal(p, q) for p, q in zip(params, make_params()))  # they moved
    for p, q in zip(params, reference):
        assert close(q, p, rtol), (cls.__name__, tuple(p.shape))
    for p, q in zip(params, reference):
        ours, theirs = opt.state[p], ref_opt.state[q]
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            if isinstance(value, torch.Tensor):
                assert ours[key].shape == value.shape and ours[key].dtype == value.dtype, key
                assert close(value.double(), ours[key].double(), rtol), (cls.__name__, key, tuple(p.shape))
            else:
                assert ours[key] == value, key


def test_the_zero_tensor_warning_still_names_the_parameter():
    params = make_params()
    with pytest.warns(UserWarning, match=r"ScaledAdam: parameter\(s\) #1 of its group \(4,\) are all zeros"):
        opt = mo.ScaledAdam(params)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()


@pytest.mark.parametrize("cls,kwargs", [(mo.AdamAtan2, {}), (mo.ScaledAdam, dict(clipping_scale=2.0)),
                                        (mo.Prodigy, dict(d0=1e-2)), (mo.Adafactor, dict(beta1=0.9))],
                         ids=lambda v: getattr(v, "__name__", None))
def test_a_saved_state_is_per_parameter_saved_once_and_resumes_bitwise(cls, kwargs):
    params = make_params()
    opt = cls(params, **kwargs)
    train(opt, params, 5)
    state = opt.state_dict()
    for index, p in enumerate(params):
        for key, value in state["state"][index].items():
            if isinstance(value, torch.Tensor) and key in ("exp_avg", "exp_avg_sq", "delta", "s"):
                assert value.shape == p.shape or value.dim() == 1, key
    buffer = io.BytesIO()
    torch.save(state, buffer)
    state_bytes = sum(v.numel() * v.element_size() for s in state["state"].values() for v in s.values()
                      if isinstance(v, torch.Tensor))
    assert buffer.tell() < 1.5 * state_bytes + 100_000  # the stacks' storages once, not once per view
    buffer.seek(0)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = cls(resumed_params, **kwargs)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    train(opt, params, 4, start=5)
    train(resumed, resumed_params, 4, start=5)
    assert all(torch.equal(p, q) for p, q in zip(params, resumed_params))


def test_a_state_loaded_into_a_running_optimizer_is_stacked_anew():
    """Roll back by loading a deep copy: the loaded tensors replace the stacked ones, and the
    steps after it equal those after the same state in a fresh optimizer."""
    params = make_params()
    opt = mo.AdamAtan2(params, lr=1e-2)
    train(opt, params, 3)
    saved = copy.deepcopy(opt.state_dict())
    saved_params = [p.detach().clone() for p in params]
    train(opt, params, 3, start=3)
    opt.load_state_dict(copy.deepcopy(saved))
    with torch.no_grad():
        for p, q in zip(params, saved_params):
            p.copy_(q)
    train(opt, params, 3, start=3)
    fresh_params = [torch.nn.Parameter(q.clone()) for q in saved_params]
    fresh = mo.AdamAtan2(fresh_params, lr=1e-2)
    fresh.load_state_dict(copy.deepcopy(saved))
    train(fresh, fresh_params, 3, start=3)
    assert all(torch.equal(p, q) for p, q in zip(params, fresh_params))
    assert all(torch.equal(opt.state[p]["exp_avg"], fresh.state[q]["exp_avg"])
               for p, q in zip(params, fresh_params))


def test_state_tensors_alias_the_stack_between_steps():
    """What a user reads from ``optimizer.state`` is the live state, and a write to it reaches the step."""
    params = make_params()
    opt = mo.AdamAtan2(params, lr=1e-2)
    train(opt, params, 2)
    held = opt.state[params[0]]["exp_avg"]
    before = held.clone()
    train(opt, params, 1, start=2)
    assert held is opt.state[params[0]]["exp_avg"] and not torch.equal(held, before)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin_opt = mo.AdamAtan2(twin, lr=1e-2)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    with torch.no_grad():
        opt.state[params[0]]["exp_avg"].zero_()
        twin_opt.state[twin[0]]["exp_avg"].zero_()
    train(opt, params, 1, start=3)
    train(twin_opt, twin, 1, start=3)
    assert all(torch.equal(p, q) for p, q in zip(params, twin))


def test_the_optimizer_pickles_and_deep_copies():
    params = make_params()
    opt = mo.ScaledAdam(params, lr=3e-2)
    train(opt, params, 2)
    assert "_stack_cache" in opt.__dict__
    restored = pickle.loads(pickle.dumps(opt))
    assert "_stack_cache" not in restored.__dict__
    copied = copy.deepcopy((params, opt))
    train(opt, params, 2, start=2)
    train(copied[1], copied[0], 2, start=2)
    assert all(torch.equal(p, q) for p, q in zip(params, copied[0]))


def test_low_precision_parameters_with_master_weights(monkeypatch):
    def run():
        params = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in make_params()]
        opt = mo.AdamAtan2(params, lr=1e-2, master_weights=True)
        train(opt, params, 4)
        return params, opt
    params, opt = run()
    assert dispatch.group_paths(opt, opt.kernels) == ["stacked"]
    unstacked(monkeypatch)
    reference, _ = run()
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert all(close(q.float(), p.float(), 1e-2) for p, q in zip(params, reference))  # bf16 rounding of equal fp32
    assert all(opt.state[p]["master"].dtype == torch.float32 for p in params)
