"""The default dispatcher on the CPU: which path each optimizer takes when none is chosen.

* mupkit's own optimizers (AdamAtan2, Adafactor, DAdaptAdam, Prodigy) compile a large model
  (``compiled=None``) and keep a small one eager; results agree with the eager path to <= 1e-6
  relative in fp32 after 10 steps.
* mupkit's AdamW/Adam/SGD run torch's fused CPU kernel: bitwise torch's ``fused=True``.
* The compiled AdamAtan2 path's polynomial ``atan2`` is within 3e-7 relative of ``torch.atan2``.

The size thresholds are lowered for these tests (the real ones, ~4M elements, would make CI
compile large models); the rule they feed is the same.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import mupkit
import mupkit.optim.compiled as compiled_module
from mupkit.optim import Adafactor, AdamAtan2, DAdaptAdam, Prodigy
from mupkit.optim.adam_atan2 import atan2_nonnegative_x
from mupkit.optim.compiled import compiled_by_default

SHAPES = [(32, 48), (48, 32), (48,), (5,)]  # two "large" matrices, two small vectors


@pytest.fixture
def small_thresholds(monkeypatch):
    """Tensors of >= 256 elements count as large; 2000 elements in all make a large model."""
    monkeypatch.setattr(compiled_module, "CPU_SMALL_TENSOR", 256)
    monkeypatch.setattr(compiled_module, "AUTO_COMPILE_MIN_NUMEL", 2000)


def test_compiled_by_default_takes_a_large_model_whole(small_thresholds, monkeypatch):
    monkeypatch.setattr(compiled_module, "inductor_works", lambda: True)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    assert compiled_by_default(params) == [True] * 4  # small tensors ride in the same graph
    assert compiled_by_default(params[:1] + params[2:]) == [False] * 3  # 1536 large elements: a small model
    strided = torch.zeros(48, 64).t()  # non-contiguous: no flat view, so only the large plain tensors go
    assert compiled_by_default([strided, *params]) == [False, True, True, False, False]
    monkeypatch.setattr(compiled_module, "AUTO_COMPILE_MAX_TENSORS", 2)  # too many for one graph: the large ones
    assert compiled_by_default(params) == [True, True, False, False]
    monkeypatch.setattr(compiled_module, "AUTO_COMPILE_MAX_TENSORS", 1)  # even those are too many: none
    assert compiled_by_default(params) == [False] * 4
    monkeypatch.setattr(compiled_module, "inductor_works", lambda: False)
    monkeypatch.setattr(compiled_module, "AUTO_COMPILE_MAX_TENSORS", 512)
    assert compiled_by_default(params) == [False] * 4


def test_inductor_failure_warns_once_and_keeps_the_eager_default(monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler")
    compiled_module.inductor_works.cache_clear()
    monkeypatch.setattr(torch, "compile", broken_compile)
    try:
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler.*compiled=False"):
            assert compiled_module.inductor_works() is False
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert compiled_module.inductor_works() is False  # cached: no second warning
    finally:
        compiled_module.inductor_works.cache_clear()


def run(make, steps=10, shapes=SHAPES):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    opt = make(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return params


def spy_compiled(monkeypatch):
    """Record the size of every tensor a compiled call of any path gets."""
    import mupkit.optim.adafactor as adafactor_module
    import mupkit.optim.adam_atan2 as atan2_module
    seen = []
    run_compiled = atan2_module._run_compiled
    monkeypatch.setattr(atan2_module, "_run_compiled",
                        lambda ps, *a: seen.extend(p.numel() for p in ps) or run_compiled(ps, *a))
    adafactor_run = adafactor_module._run
    monkeypatch.setattr(adafactor_module, "_run", lambda ts, group, cfg, path: (
        seen.extend(t["param"].numel() for t in ts) if path == "compiled" else None) or adafactor_run(ts, group, cfg,
                                                                                                      path))
    apply = compiled_module.ListKernel._apply
    monkeypatch.setattr(compiled_module.ListKernel, "_apply", lambda self, columns, rows, compiled: (
        seen.extend(t.numel() for t in columns[0]) if compiled else None) or apply(self, columns, rows, compiled))
    return seen


@pytest.mark.parametrize("cls", [AdamAtan2, Adafactor, DAdaptAdam, Prodigy], ids=lambda c: c.__name__)
def test_default_compiles_a_large_model_and_matches_the_eager_path(cls, small_thresholds, monkeypatch):
    seen = spy_compiled(monkeypatch)
    eager = run(lambda ps: cls(ps, compiled=False))
    assert not seen
    default = run(lambda ps: cls(ps))
    assert set(seen) == {32 * 48, 48, 5}  # every tensor went through compiled code
    for a, b in zip(default, eager):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-6


def test_adafactor_default_keeps_large_matrices_eager_and_compiles_the_rest(small_thresholds, monkeypatch):
    """Adafactor's eager step of a large CPU matrix (from the two factor vectors, in blocks) is
    faster than the compiled one, so the default leaves matrices of CPU_EAGER_MATRIX elements or
    more (here lowered to 1000) eager and decides for the other tensors by the usual rule."""
    import mupkit.optim.adafactor as adafactor_module
    monkeypatch.setattr(adafactor_module, "CPU_EAGER_MATRIX", 1000)
    monkeypatch.setattr(compiled_module, "inductor_works", lambda: True)
    seen = spy_compiled(monkeypatch)
    shapes = [(32, 48), (3000,), (48,), (5,)]
    default = run(lambda ps: Adafactor(ps), shapes=shapes)
    assert set(seen) == {3000, 48, 5}  # the vectors compiled, the 1536-element matrix not
    eager = run(lambda ps: Adafactor(ps, compiled=False), shapes=shapes)
    for a, b in zip(default, eager):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-6


@pytest.mark.parametrize("cls", [AdamAtan2, Adafactor, DAdaptAdam, Prodigy], ids=lambda c: c.__name__)
def test_small_models_stay_eager(cls, monkeypatch):
    seen = spy_compiled(monkeypatch)
    run(lambda ps: cls(ps), steps=3)  # the real thresholds: this model is far too small to compile
    assert not seen


@pytest.mark.parametrize("name,kwargs", [("AdamW", dict(weight_decay=0.1)), ("Adam", dict(weight_decay=0.1)),
                                         ("SGD", dict(lr=0.1, momentum=0.9))])
def test_torch_based_default_is_torchs_fused_cpu_kernel(name, kwargs):
    """Bitwise torch's ``fused=True`` by default, bitwise torch's own default with
    ``fused=False``, and the groups keep ``fused=None`` (state_dict and the user see no change)."""
    ours = run(lambda ps: getattr(mupkit.optim, name)(ps, **kwargs))
    fused = run(lambda ps: getattr(torch.optim, name)(ps, fused=True, **kwargs))
    assert all(torch.equal(a, b) for a, b in zip(ours, fused))
    ours_loop = run(lambda ps: getattr(mupkit.optim, name)(ps, fused=False, **kwargs))
    torch_default = run(lambda ps: getattr(torch.optim, name)(ps, **kwargs))
    assert all(torch.equal(a, b) for a, b in zip(ours_loop, torch_default))
    opt = getattr(mupkit.optim, name)([torch.nn.Parameter(torch.ones(3))], **kwargs)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    assert opt.param_groups[0]["fused"] is None and opt.state_dict()["param_groups"][0]["fused"] is None


def test_polynomial_atan2_matches_torch_atan2():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(200_000, generator=g) * torch.randn(200_000, generator=g).mul(4).exp()
    x = torch.randn(200_000, generator=g).abs() * torch.randn(200_000, generator=g).mul(4).exp()
    ours, exact = atan2_nonnegative_x(y, x).double(), torch.atan2(y.double(), x.double())
    assert ((ours - exact).abs() / exact.abs().clamp_min(1e-30)).max().item() <= 3e-7
    y_edge, zero = torch.tensor([0.0, -0.0, 2.0, -3.0]), torch.zeros(4)  # (0, 0), (-0, 0) and x = 0
    edge, exact = atan2_nonnegative_x(y_edge, zero), torch.atan2(y_edge, zero)
    torch.testing.assert_close(edge, exact, rtol=1e-7, atol=0)
    assert torch.equal(edge.signbit(), exact.signbit()) and exact[2].item() == pytest.approx(math.pi / 2)
    y64, x64 = y.double(), x.double()
    assert torch.equal(atan2_nonnegative_x(y64, x64), torch.atan2(y64, x64))  # fp64 keeps the exact atan2


@pytest.mark.parametrize("cls", [AdamAtan2, Adafactor], ids=lambda c: c.__name__)
def test_groups_of_equal_values_step_as_one_multi_tensor_call(cls, monkeypatch):
    """12 groups, 3 distinct multipliers: 3 multi-tensor calls per step, and the result is bitwise
    that of 12 optimizers stepping one group each (so merging changes only the call count)."""
    import mupkit.optim.adafactor as adafactor_module
    import mupkit.optim.adam_atan2 as atan2_module
    module, name = (atan2_module, "_multi_tensor") if cls is AdamAtan2 else (adafactor_module, "_run")
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda first, *a, **k: calls.append(len(first)) or original(first, *a, **k))
    scales = [1.0, 0.5, 0.25]

    def groups(ps):
        return [{"params": [p], "lr_scale": scales[i % 3], "param_names": [f"p{i}"]} for i, p in enumerate(ps)]
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4096, generator=g)) for _ in range(12)]
    alone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    merged = cls(groups(params), foreach=True)
    separate = [cls([group], foreach=True) for group in groups(alone)]
    for _ in range(3):
        for p, q in zip(params, alone):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        calls.clear()
        merged.step()
        assert sorted(calls) == [4, 4, 4]
        for opt in separate:
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, alone))
    assert len(merged.param_groups) == 12 and merged.param_groups[0]["param_names"] == ["p0"]


def test_packed_by_default_takes_many_small_tensors(monkeypatch):
    """The CPU default packs small tensors when there are at least PACKED_MIN_TENSORS of them
    (here 4); a tensor that is not a plain dense contiguous CPU tensor of its parameter's size
    stays out. The runs are compiled for a model of AUTO_COMPILE_MIN_NUMEL elements (here 2000)
    when torch.compile works, else eager."""
    from mupkit.optim.compiled import packed_by_default, packed_runs_compiled
    monkeypatch.setattr(compiled_module, "AUTO_COMPILE_MIN_NUMEL", 2000)
    monkeypatch.setattr(compiled_module, "PACKED_MIN_TENSORS", 4)
    monkeypatch.setattr(compiled_module, "inductor_works", lambda: True)
    small = [(torch.zeros(16), torch.zeros(16)) for _ in range(5)]
    odd = [(torch.zeros(16), torch.zeros(8)),  # a state of another size
           (torch.zeros(16), torch.zeros(16).to_sparse()),  # a sparse gradient
           (torch.zeros(16), torch.zeros(4, 4).t()),  # a non-contiguous gradient
           (torch.zeros(1 << 16), torch.zeros(1 << 16))]  # too large to pack: CPU_SMALL_TENSOR
    assert packed_by_default(small + odd) == [True] * 5 + [False] * 4
    assert packed_by_default(small[:3] + odd) == [False] * 7  # too few to pack
    assert packed_runs_compiled(2000) and not packed_runs_compiled(1999)
    monkeypatch.setattr(compiled_module, "inductor_works", lambda: False)
    assert not packed_runs_compiled(10 ** 9)
