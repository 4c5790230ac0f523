"""Triton multi-tensor kernels against the single-tensor implementations.

On a machine with a CUDA device the tensors live there and the kernels run compiled for it.
Elsewhere (CI) ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports
triton, so the same tests run the kernels' own code in Triton's interpreter on the CPU. Tolerance: 1e-6
relative to each tensor's largest entry after 10 fp32 steps (the kernels fuse the ops, so
roundings differ from the eager chain).
"""

from __future__ import annotations

import copy

import pytest
import torch

import mupkit
from mupkit import models
from mupkit.optim import dispatch

pytest.importorskip("triton")  # the test extra installs it; without it fused=True refuses with an error
from mupkit.optim.kernels import elementwise  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def apply_device_function(fn, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``fn(a, b)`` elementwise through a Triton kernel, for a ``@triton.jit`` device function of
    the kernels (passed as a constexpr, so it runs as the kernels run it)."""
    import triton
    out = torch.empty_like(a)
    _apply_kernel_of_device_function[(triton.cdiv(a.numel(), 1024),)](a, b, out, a.numel(), FN=fn, BLOCK=1024)
    return out


def _make_apply_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(a_ptr, b_ptr, out_ptr, n, FN: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(out_ptr + offs, FN(tl.load(a_ptr + offs, mask=mask), tl.load(b_ptr + offs, mask=mask)), mask=mask)
    return kernel


_apply_kernel_of_device_function = _make_apply_kernel()


@pytest.fixture
def kernels_by_default(monkeypatch):
    """The dispatcher's "CUDA tensors" rule made to hold for any tensors (on the CPU, the
    interpreter then runs the kernels)."""
    monkeypatch.setattr(dispatch, "kernel_device", lambda t: True)


@pytest.fixture
def fused_checks(monkeypatch) -> list[str]:
    """The names the kernels' entry check (``dispatch.check_fused``) is called with, in order."""
    checked: list[str] = []
    check = dispatch.check_fused
    monkeypatch.setattr(dispatch, "check_fused", lambda name, tensors, kernels: checked.append(name) or check(
        name, tensors, kernels))
    return checked

SHAPES = [(33, 17), (5,), (), (3, 4, 5), (2100,)]  # 2100: more than one block
LRS = [1e-2, 3e-3, 1e-2, 5e-4, 1e-3]  # a muP-like lr per tensor: all in one launch


def rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x.float() - y.float()).abs().max() / y.float().abs().max().clamp(min=1e-30)).item()
               for x, y in zip(a, b))


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_adam_kernel_matches_torch_adam_with_a_different_lr_and_step_per_tensor(decoupled, maximize):
    """Tensor ``i`` gets its first gradient at step ``i``, so the step counters (on the device,
    read by the kernel for the bias corrections) differ per tensor."""
    torch.manual_seed(0)
    params = [torch.randn(s).to(DEVICE) for s in SHAPES]
    ref = [p.clone().requires_grad_() for p in params]
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls([{"params": [r], "lr": lr} for r, lr in zip(ref, LRS)], weight_decay=0.1, foreach=False,
              maximize=maximize)
    exp_avgs, exp_avg_sqs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), device=DEVICE) for _ in params]
    for step in range(10):
        grads = [torch.randn(s).to(DEVICE) for s in SHAPES]
        live = [i for i in range(len(params)) if i <= step]
        for i, (r, g) in enumerate(zip(ref, grads)):
            r.grad = g.clone() if i in live else None
        opt.step()
        rows = [elementwise.adam_row(lr=LRS[i], beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                                     decoupled=decoupled, maximize=maximize) for i in live]
        elementwise.adam(*([column[i] for i in live] for column in (params, grads, exp_avgs, exp_avg_sqs, steps)),
                         rows)
    assert rel_err(params, [r.detach() for r in ref]) <= 1e-6
    assert rel_err(exp_avg_sqs, [opt.state[r]["exp_avg_sq"] for r in ref]) <= 1e-6


def test_bias_correction_is_accurate_for_betas_near_one_and_long_runs():
    """``1 - beta^t`` from the kernel's fp32 ``expm1`` against float64, beta from 0 to 0.9999 and
    t from 1 to 1e6: within 3e-7 relative (``1 - exp2`` in fp32 was off by 6e-5 at beta 0.999, t 1)."""
    betas = torch.tensor([0.0, 0.5, 0.9, 0.95, 0.99, 0.999, 0.9999], dtype=torch.float64)
    steps = torch.tensor([1, 2, 3, 10, 100, 1000, 10_000, 1_000_000], dtype=torch.float64)
    beta, step = (t.reshape(-1) for t in torch.meshgrid(betas, steps, indexing="ij"))
    log_beta = torch.tensor([elementwise.log_or_minus_inf(b) for b in beta.tolist()])
    out = apply_device_function(elementwise.bias_correction, step.float().to(DEVICE), log_beta.float().to(DEVICE))
    torch.testing.assert_close(out.cpu().double(), 1.0 - beta ** step, rtol=3e-7, atol=0.0)


@pytest.mark.parametrize("momentum,dampening,nesterov", [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.1, False),
                                                         (0.9, 0.0, True)])
def test_sgd_kernel_matches_torch_sgd(momentum, dampening, nesterov):
    torch.manual_seed(0)
    params = [torch.randn(s).to(DEVICE) for s in SHAPES]
    ref = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.SGD([{"params": [r], "lr": lr} for r, lr in zip(ref, LRS)], momentum=momentum,
                          dampening=dampening, nesterov=nesterov, weight_decay=0.05, foreach=False)
    buffers = [torch.zeros_like(p) for p in params] if momentum else None
    for step in range(10):
        grads = [torch.randn(s).to(DEVICE) for s in SHAPES]
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        opt.step()
        rows = [elementwise.sgd_row(lr=lr, weight_decay=0.05, momentum=momentum, dampening=dampening,
                                    nesterov=nesterov, first=step == 0) for lr in LRS]
        elementwise.sgd(params, grads, buffers, rows)
    assert rel_err(params, [r.detach() for r in ref]) <= 1e-6


def test_atan2_from_core_ops_is_accurate_over_many_decades_and_at_zero():
    torch.manual_seed(0)
    y = torch.randn(3000) * torch.logspace(-6, 6, 3000)
    x = torch.rand(3000) * torch.logspace(6, -6, 3000)
    x[:10], y[5] = 0.0, 0.0  # atan2(+-y, 0) = +-pi/2, atan2(0, 0) = 0
    y, x = y.to(DEVICE), x.to(DEVICE)
    torch.testing.assert_close(apply_device_function(elementwise.atan2_nonneg_x, y, x), torch.atan2(y, x),
                               rtol=4e-7, atol=2e-7)


def _train(make_opt, dtype=torch.float32, steps=10):
    torch.manual_seed(0)
    model = mupkit.build(models.mlp, base=dict(width=16), target=dict(width=48)).to(DEVICE, dtype)
    opt = make_opt(mupkit.param_groups(model))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 64, generator=gen).to(DEVICE, dtype), torch.randint(0, 10, (32,), generator=gen).to(DEVICE)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()
    return list(model.parameters())


@pytest.mark.parametrize("kwargs", [dict(weight_decay=0.1), dict(formulation="fused", maximize=True)])
def test_adam_atan2_fused_matches_its_single_tensor_path_with_mup_groups(kwargs):
    single = _train(lambda g: mupkit.optim.AdamAtan2(g, lr=1e-2, foreach=False, **kwargs))
    fused = _train(lambda g: mupkit.optim.AdamAtan2(g, lr=1e-2, fused=True, **kwargs))
    assert rel_err(fused, single) <= 1e-6


def test_adam_atan2_fused_bf16_parameters_keep_fp32_state():
    """One step on bf16 parameters: both paths do the math in fp32 and round once into bf16, so
    they differ by at most one bf16 ulp (a chaotic 10-step run would amplify those roundings);
    the fp32 state agrees to 1e-6."""
    def one_step(**impl):
        torch.manual_seed(0)
        model = mupkit.build(models.mlp, base=dict(width=16), target=dict(width=48)).to(DEVICE, torch.bfloat16)
        opt = mupkit.optim.AdamAtan2(mupkit.param_groups(model), lr=1e-2, **impl)
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to(DEVICE, torch.bfloat16)
        opt.step()
        return list(model.parameters()), [opt.state[p]["exp_avg_sq"] for p in model.parameters()]
    single, single_v = one_step(foreach=False)
    fused, fused_v = one_step(fused=True)
    assert all(v.dtype == torch.float32 for v in fused_v)
    assert rel_err(fused_v, single_v) <= 1e-6
    for a, b in zip(fused, single):
        ulp = b.float().abs().clamp(min=1e-3) * 2 ** -7
        assert ((a.float() - b.float()).abs() <= ulp).all()


def test_fused_refuses_what_it_cannot_run(monkeypatch):
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.float64, device=DEVICE))
    p.grad = torch.randn(4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(RuntimeError, match="float32/bfloat16/float16"):
        mupkit.optim.AdamAtan2([p], fused=True).step()
    monkeypatch.setattr(dispatch, "interpreted", lambda: False)
    q = torch.nn.Parameter(torch.randn(4))
    q.grad = torch.randn(4)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        mupkit.optim.AdamAtan2([q], fused=True).step()
    with pytest.raises(ValueError, match="choose one"):
        mupkit.optim.AdamAtan2([q], fused=True, compiled=True)


@pytest.mark.parametrize("cls,kwargs", [
    (mupkit.optim.DAdaptAdam, dict(decouple=True, weight_decay=0.1)),
    (mupkit.optim.DAdaptAdam, dict(weight_decay=0.05)), (mupkit.optim.Prodigy, dict(weight_decay=0.1)),
    (mupkit.optim.Prodigy, dict(betas=(0.0, 0.99), decouple=False, weight_decay=0.05))])
def test_dadaptation_fused_matches_the_eager_path_with_mup_groups(cls, kwargs):
    """The same gradient sequence fed to both (so roundings do not feed back through a model):
    parameters within 2e-6 after 10 fp32 steps (the kernels keep ``d`` on the device, so a group's
    scale ``r`` reaches them as an fp32 coefficient of the float64 ``d`` terms: one more rounding
    per step than the eager path's float64 products). ``d`` is a ratio of sums of terms that cancel
    (Prodigy's ``g . (p0 - p)`` with ``p`` near ``p0``), so fp32 itself misses it by ~2e-4 (the
    eager path on the CPU); both paths are held to 1e-3 of a float64 eager run, not to each other,
    whose summation orders differ by device."""
    def run(dtype=torch.float32, **impl):
        torch.manual_seed(0)
        model = mupkit.build(models.mlp, base=dict(width=16), target=dict(width=48)).to(DEVICE, dtype)
        opt = cls(mupkit.param_groups(model), **impl, **kwargs)
        gen = torch.Generator().manual_seed(1)
        for _ in range(10):
            for p in model.parameters():
                p.grad = (torch.randn(p.shape, generator=gen) + 0.5).to(DEVICE, dtype)
            opt.step()
        return list(model.parameters()), float(opt.param_groups[0]["d"])  # a device tensor after fused steps
    eager, d_eager = run()
    fused, d_fused = run(fused=True)
    _, d_exact = run(torch.float64)
    assert d_exact > 1e-5  # d adapted
    assert d_eager == pytest.approx(d_exact, rel=1e-3)
    assert d_fused == pytest.approx(d_exact, rel=1e-3)
    assert rel_err(fused, eager) <= 2e-6


@pytest.mark.parametrize("kwargs", [
    dict(), dict(weight_decay=0.1, maximize=True), dict(beta1=0.9, lr=0.05),
    dict(mode="hf"), dict(mode="hf", relative_step=False, lr=1e-2, beta1=0.9, weight_decay=0.05),
    dict(mode="hf", scale_parameter=False, warmup_init=True)])
def test_adafactor_fused_matches_the_single_tensor_path(kwargs):
    """Factored 2-D and batched 3-D tensors (one of 300 rows spans three programs, which add to its
    column sums), unfactored 1-D and 0-D ones, muP-like groups, in one launch per pass; the same
    gradients fed to both paths; 10 fp32 steps."""
    shapes = [(8, 16), (16,), (3, 4, 5), (), (40, 30), (300, 5)]
    def run(**impl):
        torch.manual_seed(0)
        params = [torch.nn.Parameter((torch.randn(s) * 0.3).to(DEVICE)) for s in shapes]
        opt = mupkit.optim.Adafactor([{"params": params[:2], "lr_scale": 0.5, "eps_scale": 0.5},
                                      {"params": params[2:]}], **impl, **kwargs)
        gen = torch.Generator().manual_seed(1)
        for _ in range(10):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
            opt.step()
        return params
    assert rel_err(run(fused=True), run(foreach=False)) <= 1e-6


@pytest.mark.parametrize("clipping_scale", [None, 0.5])
def test_scaled_adam_fused_matches_the_single_tensor_path(clipping_scale):
    """24 steps: RMS refreshes and size steps every 4, clipping thresholds at 10 and 20 (0.5 x
    the median clips often); one-element tensors clamp; the same gradients fed to both."""
    shapes = [(8, 16), (16,), (3, 4, 5), (), (1,), (40, 30)]
    def run(**impl):
        torch.manual_seed(0)
        params = [torch.nn.Parameter((torch.randn(s) * 0.3).to(DEVICE)) for s in shapes]
        opt = mupkit.optim.ScaledAdam([{"params": params[:3], "lr_scale": 0.5, "eps_scale": 0.5},
                                       {"params": params[3:]}], lr=0.05, clipping_scale=clipping_scale, **impl)
        gen = torch.Generator().manual_seed(1)
        for _ in range(24):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=gen) + 0.2).to(DEVICE)
            opt.step()
        return params, opt
    fused, opt = run(fused=True)
    single, _ = run(foreach=False)
    assert rel_err(fused, single) <= 1e-6
    if clipping_scale:
        assert opt.state[opt.param_groups[0]["params"][0]]["clip_count"] > 0


@pytest.mark.parametrize("cls,kwargs", [(mupkit.optim.Adam, dict(weight_decay=0.05)),
                                        (mupkit.optim.AdamW, dict(weight_decay=0.1, maximize=True)),
                                        (mupkit.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
                                        (mupkit.optim.SGD, dict(lr=0.05))])
def test_torch_based_optimizers_take_the_triton_kernel_for_fused_cuda_steps(cls, kwargs, monkeypatch):
    """fused=True on CUDA runs the Triton kernel (one launch for all muP groups). Here the route
    is forced on CPU tensors (the interpreter runs the kernel) and compared with torch's
    single-tensor step, with the state left in torch's layout."""
    def run(route, **impl):
        monkeypatch.setattr(dispatch, "kernel_device", lambda t: route)
        torch.manual_seed(0)
        model = mupkit.build(models.mlp, base=dict(width=16), target=dict(width=48)).to(DEVICE)
        opt = cls(mupkit.param_groups(model), **{"lr": 1e-2, **kwargs}, **impl)
        gen = torch.Generator().manual_seed(1)
        for _ in range(10):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
            opt.step()
        return list(model.parameters()), opt
    triton_params, opt = run(True, fused=True)
    torch_params, reference = run(False, foreach=False)
    assert rel_err(triton_params, torch_params) <= 1e-6
    layout = {tuple(sorted(k for k, v in s.items() if v is not None)) for s in opt.state.values()}
    assert layout <= {tuple(sorted(k for k, v in s.items() if v is not None)) for s in reference.state.values()} | {()}


@pytest.mark.parametrize("cls,kwargs", [
    (mupkit.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)), (mupkit.optim.SGD, dict(lr=0.05, momentum=0.9)),
    (mupkit.optim.AdamAtan2, dict(lr=1e-2)), (mupkit.optim.Adafactor, dict()), (mupkit.optim.DAdaptAdam, dict()),
    (mupkit.optim.Prodigy, dict()), (mupkit.optim.ScaledAdam, dict(lr=0.05))])
def test_the_default_step_on_cuda_tensors_is_the_fused_kernel(cls, kwargs, monkeypatch, fused_checks):
    """With no path chosen, CUDA parameters take the Triton kernels (:mod:`mupkit.optim.dispatch`).
    On a CUDA machine that is the real rule; on the CPU the rule is forced to hold (and the
    interpreter runs the kernels). The default step is then the ``fused=True`` step (bitwise; for
    Adafactor and ScaledAdam, whose kernels sum with atomic adds in a varying order on a GPU, to
    1e-6 relative), and the kernels' entry check runs; ``fused=False`` keeps the eager path."""
    monkeypatch.setattr(dispatch, "kernel_device", lambda t: True)
    checked = fused_checks

    def run(**impl):
        checked.clear()
        torch.manual_seed(0)
        model = mupkit.build(models.mlp, base=dict(width=16), target=dict(width=48)).to(DEVICE)
        opt = cls(mupkit.param_groups(model), **kwargs, **impl)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in model.parameters():
                p.grad = (torch.randn(p.shape, generator=gen) + 0.2).to(DEVICE)
            opt.step()
        return [p.detach().clone() for p in model.parameters()], bool(checked)

    default, default_fused = run()
    fused, _ = run(fused=True)
    _, eager_fused = run(fused=False)
    assert default_fused and not eager_fused
    if cls in (mupkit.optim.Adafactor, mupkit.optim.ScaledAdam):
        assert rel_err(default, fused) <= 1e-6
    else:
        assert all(torch.equal(a, b) for a, b in zip(default, fused))


@pytest.mark.parametrize("cls", [mupkit.optim.Adafactor, mupkit.optim.ScaledAdam])
def test_atomic_add_kernels_are_not_taken_under_torch_deterministic_mode(cls, kernels_by_default):
    """Adafactor's and ScaledAdam's kernels sum with atomic adds (run-to-run roundings differ on
    a GPU): under ``torch.use_deterministic_algorithms(True)`` the default stays eager and
    ``fused=True`` is refused with the fix named; with ``warn_only`` it runs and warns."""
    p = torch.nn.Parameter(torch.randn(8, 16, device=DEVICE))
    p.grad = torch.randn(8, 16, device=DEVICE)
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        default = cls([p])
        default.step()
        assert default.param_groups[0]["fused"] is None
        assert dispatch.group_paths(default, default.kernels)[0] in ("single", "foreach")  # eager
        with pytest.raises(RuntimeError, match="use_deterministic_algorithms.*fused=False"):
            cls([p], fused=True).step()
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="atomic adds"):
            cls([p], fused=True).step()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_prodigy_with_slice_p_stays_eager_by_default(kernels_by_default, fused_checks):
    """The kernels take ``slice_p=1`` only (``Kernels.takes_group``), so a sliced Prodigy is not
    fused by default, and its ``d`` stays a number."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, generator=gen).to(DEVICE))
    opt = mupkit.optim.Prodigy([p], slice_p=11)
    for _ in range(3):  # a gradient that keeps its sign: d grows
        p.grad = (1.0 + 0.1 * torch.randn(64, generator=gen)).to(DEVICE)
        opt.step()
    assert fused_checks == [] and dispatch.group_paths(opt, opt.kernels) == ["foreach"]
    assert isinstance(opt.param_groups[0]["d"], float) and opt.param_groups[0]["d"] > opt.param_groups[0]["d0"]


@pytest.mark.parametrize("cls", [mupkit.optim.DAdaptAdam, mupkit.optim.Prodigy])
def test_dadaptation_kernels_keep_d_on_the_device_and_the_state_dict_holds_numbers(cls, monkeypatch):
    """After the fused steps the state of ``d`` is a float64 device tensor in every group (never
    read back); ``state_dict()`` holds it as numbers, and a fresh optimizer loaded from it (a
    number again) takes the same next step to 1e-6."""
    def make():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in SHAPES]
        return params, cls([{"params": params[:2], "lr_scale": 0.5}, {"params": params[2:]}], fused=True)
    gen = torch.Generator().manual_seed(1)
    grads = [[(torch.randn(s, generator=gen) + 0.5).to(DEVICE) for s in SHAPES] for _ in range(4)]
    params, opt = make()
    for step in grads[:3]:
        for p, g in zip(params, step):
            p.grad = g
        opt.step()
    top = opt.param_groups[0]
    assert all(isinstance(g[key], torch.Tensor) and g[key] is top[key] for g in opt.param_groups
               for key in opt.shared_keys)
    saved = copy.deepcopy(opt.state_dict())  # its state tensors are the optimizer's own
    assert all(isinstance(g[key], (int, float)) for g in saved["param_groups"] for key in opt.shared_keys)
    assert saved["param_groups"][0]["k"] == 3 and saved["param_groups"][0]["d"] == float(top["d"]) > 1e-6
    resumed_params, resumed = make()
    with torch.no_grad():
        for a, b in zip(resumed_params, params):
            a.copy_(b)
    resumed.load_state_dict(saved)
    for ps, o in ((params, opt), (resumed_params, resumed)):
        for p, g in zip(ps, grads[3]):
            p.grad = g
        o.step()
    assert rel_err(resumed_params, params) <= 1e-6


@pytest.mark.parametrize("cls", [mupkit.optim.AdamW, mupkit.optim.AdamAtan2, mupkit.optim.Adafactor])
def test_fused_steps_update_the_fp32_master_copies_of_bf16_parameters(cls):
    """``master_weights=True`` with the kernels: the master copies of a bf16 model follow an fp32
    model fed the same (bf16-valued) gradients to 1e-6 after 10 steps."""
    def run(dtype, **options):
        torch.manual_seed(0)
        model = mupkit.build(models.mlp, base=dict(width=16), target=dict(width=48))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_((p + 0.01).bfloat16().float())
        model = model.to(DEVICE, dtype)
        opt = cls(mupkit.param_groups(model), fused=True, **options)
        gen = torch.Generator().manual_seed(1)
        for _ in range(10):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen).bfloat16().to(DEVICE, dtype)
            opt.step()
        return model, opt
    reference, _ = run(torch.float32)
    model, opt = run(torch.bfloat16, master_weights=True)
    masters = [opt.state[p]["master"] for p in model.parameters()]
    assert rel_err(masters, list(reference.parameters())) <= 1e-6
    assert all(torch.equal(p, m.bfloat16()) for p, m in zip(model.parameters(), masters))


@pytest.mark.parametrize("mode", ["torch", "hf"])
def test_fused_adafactor_keeps_a_tiny_gradient_tensor_beside_a_large_one(mode):
    """The row statistic's mean is summed per tensor: a factored tensor whose g^2 is 1e-16 of its
    neighbour's keeps its own scale (a sum shared across tensors would cancel it to 0)."""
    def run(**impl):
        torch.manual_seed(0)
        params = [torch.nn.Parameter((torch.randn(64, 32) * 0.3).to(DEVICE)) for _ in range(2)]
        opt = mupkit.optim.Adafactor(params, mode=mode, **impl)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p, scale in zip(params, (1.0, 1e-8)):
                p.grad = (torch.randn(p.shape, generator=gen) * scale).to(DEVICE)
            opt.step()
        return params
    assert rel_err(run(fused=True), run(foreach=False)) <= 1e-6


def test_fused_adafactor_takes_torch_mode_s_floor_where_it_bites():
    """eps1 = 0.5 floors V at 0.25. A 16 x 16 gradient of scale 10 in its top-left quarter, 1 in the
    bottom-right and 0.01 elsewhere puts the bottom-right under the floor: its RMS(U) (clipping)
    comes from the kernels' third pass over g, and differs from both the factored sum (no floor)
    and no clipping. A matrix of scale 10 stays above the floor, a vector of scale 0.1 falls under
    it (elementwise, in the statistics pass). The fused steps match the eager ones."""
    blocks = torch.full((16, 16), 0.01)
    blocks[:8, :8], blocks[8:, 8:] = 10.0, 1.0
    scales = [blocks, torch.full((8, 16), 10.0), torch.full((16,), 0.1)]
    def run(**impl):
        torch.manual_seed(0)
        params = [torch.nn.Parameter((torch.randn(s.shape) * 0.3).to(DEVICE)) for s in scales]
        opt = mupkit.optim.Adafactor(params, eps=(0.5, 1e-3), **impl)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p, scale in zip(params, scales):
                p.grad = (torch.randn(p.shape, generator=gen) * scale).to(DEVICE)
            opt.step()
        return params, opt
    fused, _ = run(fused=True)
    eager, opt = run(foreach=False)
    assert rel_err(fused, eager) <= 1e-6
    def floored(p):  # V = R C / max(mean(R), eps1) under eps1^2 somewhere
        state = opt.state[p]
        v = state["row_var"] * state["col_var"] / state["row_var"].mean().clamp(min=0.5)
        return bool((v < 0.25).any())
    assert floored(eager[0]) and not floored(eager[1])


def test_a_path_chosen_after_the_first_step_is_respected(kernels_by_default, fused_checks):
    """The default's decision is cached, but a group that later names its path keeps it."""
    checked = fused_checks
    p = torch.nn.Parameter(torch.randn(8, 16, device=DEVICE))
    opt = mupkit.optim.AdamAtan2([p])
    p.grad = torch.randn(8, 16, device=DEVICE)
    opt.step()
    assert checked == ["AdamAtan2"]
    opt.param_groups[0]["fused"] = False
    opt.step()
    assert checked == ["AdamAtan2"] and opt.param_groups[0]["fused"] is False
