"""ScaledAdam and Eden against an independent re-implementation of icefall's algorithm.

icefall is not on PyPI. ``IcefallScaledAdam`` below re-implements, in this test file and apart
from the package, the post-refactor (k2-fsa/icefall#1837, Dec 2024) ScaledAdam the way icefall
runs it: parameters of one (dtype, shape) stacked into a bucket whose state lives on the
bucket's first parameter, a None gradient stacked as zeros, clipping per param group. It was
written from the pseudo-code in ``shared/reference/optimizers.md`` §1.7 and checked line by
line against icefall's code (``egs/zipvoice/zipvoice/optim.py`` at 8c529eb, the refactored
file; the LibriSpeech recipe's copy is the same algorithm).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import defaultdict

import pytest
import torch

from mupkit.optim import Eden, Eden2, ScaledAdam


class IcefallScaledAdam(torch.optim.Optimizer):
    def __init__(self, params, lr=3e-2, clipping_scale=None, betas=(0.9, 0.98), scalar_lr_scale=0.1, eps=1e-8,
                 param_min_rms=1e-5, param_max_rms=3.0, scalar_max=10.0, size_update_period=4,
                 clipping_update_period=100):
        super().__init__(params, dict(lr=lr, clipping_scale=clipping_scale, betas=betas,
                                      scalar_lr_scale=scalar_lr_scale, eps=eps, param_min_rms=param_min_rms,
                                      param_max_rms=param_max_rms, scalar_max=scalar_max,
                                      size_update_period=size_update_period,
                                      clipping_update_period=clipping_update_period))
        self.thresholds = []  # (group index, step, threshold) each time one is set

    @torch.no_grad()
    def step(self):
        for index, group in enumerate(self.param_groups):
            by_key = defaultdict(list)
            for p in group["params"]:
                by_key[(str(p.dtype), *p.shape)].append(p)
            buckets = []
            for key in sorted(by_key):
                ps = by_key[key]
                stacked = torch.stack(ps)
                grad = torch.stack([torch.zeros_like(p) if p.grad is None else p.grad for p in ps])
                buckets.append((ps, stacked, grad, self.state[ps[0]]))
            clip = 1.0 if len(buckets[0][3]) == 0 else self._clipping_scale(index, group, buckets)
            for ps, stacked, grad, state in buckets:
                step = state.setdefault("step", 0)
                if clip != 1.0:
                    grad.mul_(clip)
                stacked += self._momentum_step(group, stacked, state, grad)
                if stacked.numel() == stacked.shape[0]:
                    stacked.clamp_(-group["scalar_max"], group["scalar_max"])
                state["step"] = step + 1
                for i, p in enumerate(ps):
                    p.copy_(stacked[i])

    @staticmethod
    def _basic_step(group, p, state, grad):
        lr = group["lr"] * (group["scalar_lr_scale"] if p.numel() == p.shape[0] else 1.0)
        beta2 = group["betas"][1]
        if "exp_avg_sq" not in state:
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float, device=p.device)
        v = state["exp_avg_sq"]
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        correction = 1 - beta2 ** (state["step"] + 1)
        if correction < 0.99:
            v = v * (1.0 / correction)
        return -lr * grad / v.sqrt().add_(group["eps"])

    def _scaling_step(self, group, p, state, grad):
        delta = self._basic_step(group, p, state, grad)
        if p.numel() == p.shape[0]:
            return delta
        step, period = state["step"], group["size_update_period"]
        dims = list(range(1, p.ndim))
        if step == 0:
            state["param_rms"] = (p ** 2).mean(dim=dims, keepdim=True).sqrt().float()
            state["scale_exp_avg_sq"] = torch.zeros_like(state["param_rms"])
            state["scale_grads"] = torch.zeros(period, *state["param_rms"].shape, device=p.device)
        param_rms = state["param_rms"]
        state["scale_grads"][step % period] = (p * grad).sum(dim=dims, keepdim=True)
        if step % period == period - 1:
            param_rms.copy_((p ** 2).mean(dim=dims, keepdim=True).sqrt())
        delta = delta * param_rms.clamp(min=group["param_min_rms"])
        if step % period == period - 1 and step > 0:
            beta2 = group["betas"][1] ** period
            scale_grads = state["scale_grads"]
            state["scale_exp_avg_sq"].mul_(beta2).add_((scale_grads ** 2).mean(dim=0), alpha=1 - beta2)
            correction = 1 - beta2 ** ((step + 1) // period)
            size_lr = group["lr"] * group["scalar_lr_scale"]
            scale_step = -size_lr * correction ** 0.5 * scale_grads.sum(dim=0) / (
                state["scale_exp_avg_sq"].sqrt() + group["eps"])
            scale_step.masked_fill_(param_rms < group["param_min_rms"], 0.0)
            scale_step.clamp_(min=-0.1, max=0.1)
            scale_step = torch.minimum(scale_step, (group["param_max_rms"] - param_rms) / param_rms)
            delta = delta + p * scale_step
        return delta

    def _momentum_step(self, group, p, state, grad):
        delta = self._scaling_step(group, p, state, grad)
        if "delta" not in state:
            state["delta"] = torch.zeros(p.shape, dtype=torch.float, device=p.device)
        state["delta"].mul_(group["betas"][0]).add_(delta, alpha=1 - group["betas"][0])
        return state["delta"]

    def _clipping_scale(self, index, group, buckets):
        first = buckets[0][3]
        step = first["step"]
        if group["clipping_scale"] is None or step == 0:
            return 1.0
        period = group["clipping_update_period"]
        tot = 0.0
        for _, p, grad, state in buckets:
            if p.numel() == p.shape[0]:
                tot += (grad ** 2).sum() * group["scalar_lr_scale"] ** 2
            else:
                tot += ((grad * state["param_rms"]) ** 2).sum()
        tot_norm = tot.sqrt()
        norms = first.setdefault("model_norms", torch.zeros(period, device=buckets[0][1].device))
        norms[step % period] = tot_norm
        irregular = [s for s in (10, 20, 40) if s < period]
        if step % period == 0 or step in irregular:
            ordered = norms.sort()[0]
            if step in irregular:
                ordered = ordered[-step:]
            n = ordered.numel()
            median = ordered[min(n - 1, (n // 4) * 2)]
            threshold = group["clipping_scale"] * median * (2.0 if step in irregular else 1.0)
            first["model_norm_threshold"] = threshold
            first["num_clipped"] = 0
            self.thresholds.append((index, step, float(threshold)))
        if "model_norm_threshold" not in first:
            return 1.0
        ans = min(1.0, (first["model_norm_threshold"] / (tot_norm + 1.0e-20)).item())
        if ans < 1.0:
            first["num_clipped"] += 1
        if ans == 0.0:
            for _, _, grad, _ in buckets:
                grad.zero_()
        return ans


SHAPES = [(8, 16), (8, 16), (16,), (3, 4, 5), (), (1,), (5, 3)]


def _params(seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype) * 0.5) for s in SHAPES]
    frozen = torch.nn.Parameter(torch.randn(8, 16, generator=gen, dtype=dtype) * 0.5, requires_grad=False)
    return params, frozen


def _drive(make_optimizer, steps: int, seed: int = 0, spike_at: int | None = None, eden: bool = True):
    """Train two groups (different lr) on a noisy quadratic; return params and the lr history."""
    params, frozen = _params(seed)
    groups = [{"params": params[:4] + [frozen], "lr": 0.05}, {"params": params[4:], "lr": 0.02}]
    opt = make_optimizer(groups)
    sched = Eden(opt, lr_batches=50, lr_epochs=3.5, warmup_batches=20, warmup_start=0.1) if eden else None
    gen = torch.Generator().manual_seed(seed + 1)
    targets = [torch.randn(p.shape, generator=gen) for p in params]
    for t in range(steps):
        if sched is not None:
            sched.step_batch(t)
        for p, target in zip(params, targets):
            p.grad = (p.detach() - target) + 0.3 * torch.randn(p.shape, generator=gen)
            if t == spike_at:
                p.grad *= 1000.0
        opt.step()
    return params, frozen, opt


@pytest.mark.parametrize("clipping_scale", [None, 2.0])
@pytest.mark.parametrize("foreach", [False, True])
def test_matches_icefall_over_250_steps_across_clipping_refreshes(clipping_scale, foreach):
    """fp32 state both sides; 260 steps cross the refreshes at 10, 20, 40, 100, 200 and the end
    of the second-moment bias correction (step ~228); a gradient spike at 150 forces a clip."""
    kwargs = dict(clipping_scale=clipping_scale, size_update_period=4)
    ref_params, ref_frozen, ref = _drive(lambda g: IcefallScaledAdam(g, **kwargs), 260, spike_at=150)
    ours_params, ours_frozen, ours = _drive(lambda g: ScaledAdam(g, foreach=foreach, **kwargs), 260, spike_at=150)
    for a, b in zip(ours_params, ref_params):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_frozen, ref_frozen, rtol=0, atol=0)
    if clipping_scale is not None:
        # the same thresholds at the same steps, per group, and the forced clip happened
        holders = [ours.state[g["params"][0]] for g in ours.param_groups]
        assert [ours.state[ours.param_groups[0]["params"][0]]["clip_step"]] == [260]
        ref_first = [ref.state[min(g["params"], key=lambda p: (str(p.dtype), *p.shape))] for g in ref.param_groups]
        for holder, first in zip(holders, ref_first):
            assert holder["clip_threshold"] == pytest.approx(float(first["model_norm_threshold"]), rel=1e-6)
            assert holder["clip_count"] == first["num_clipped"]
        steps_set = sorted({step for _, step, _ in ref.thresholds})
        assert steps_set == [10, 20, 40, 100, 200]


def test_forced_clip_scales_the_step_down():
    """The spike at step 150 is clipped: the update stays near the unclipped neighbours' size."""
    clipped, _, opt = _drive(lambda g: ScaledAdam(g, clipping_scale=2.0), 151, spike_at=150, eden=False)
    before, _, _ = _drive(lambda g: ScaledAdam(g, clipping_scale=2.0), 150, eden=False)
    unclipped, _, _ = _drive(lambda g: ScaledAdam(g, clipping_scale=None), 151, spike_at=150, eden=False)
    holder = opt.state[opt.param_groups[0]["params"][0]]
    assert holder["clip_count"] >= 1
    moved = (clipped[0] - before[0]).norm()
    jumped = (unclipped[0] - before[0]).norm()
    assert moved < 0.5 * jumped


def test_single_tensor_and_foreach_paths_agree_bitwise():
    a, _, _ = _drive(lambda g: ScaledAdam(g, clipping_scale=2.0, foreach=False), 60, spike_at=30)
    b, _, _ = _drive(lambda g: ScaledAdam(g, clipping_scale=2.0, foreach=True), 60, spike_at=30)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_state_is_per_parameter_and_survives_a_change_of_bucketing():
    """Save after 30 steps; reload into an optimizer whose groups hold the same parameters in
    another order and split (so icefall's buckets would differ); continue: identical."""
    torch.manual_seed(0)
    params, _ = _params(3)
    targets = [torch.randn(p.shape) for p in params]

    def run(opt, steps, start):
        gen = torch.Generator().manual_seed(start)
        for _ in range(steps):
            for p, t in zip(params, targets):
                p.grad = (p.detach() - t) + 0.3 * torch.randn(p.shape, generator=gen)
            opt.step()

    opt = ScaledAdam([{"params": params}], lr=0.03, clipping_scale=None)
    run(opt, 30, 0)
    for p in params:  # every entry belongs to its own parameter
        assert opt.state[p]["exp_avg_sq"].shape == p.shape
    saved = copy.deepcopy(opt.state_dict())
    start = [p.detach().clone() for p in params]
    run(opt, 20, 1)
    expected = [p.detach().clone() for p in params]

    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    order = [6, 1, 0, 3, 2, 5, 4]
    fresh = ScaledAdam([{"params": [params[i] for i in order]}], lr=0.03)
    state = {order.index(i): v for i, v in saved["state"].items()}  # re-key by the new order
    groups = [dict(saved["param_groups"][0], params=list(range(len(params))))]
    fresh.load_state_dict({"state": state, "param_groups": groups})
    run(fresh, 20, 1)
    for p, e in zip(params, expected):
        assert torch.equal(p.detach(), e)


def test_bf16_parameters_keep_fp32_state_through_a_checkpoint():
    p = torch.nn.Parameter(torch.randn(16, 8).bfloat16())
    opt = ScaledAdam([p], lr=0.03)
    p.grad = torch.randn(16, 8).bfloat16()
    opt.step()
    fresh = ScaledAdam([p], lr=0.03)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert {k: v.dtype for k, v in fresh.state[p].items() if isinstance(v, torch.Tensor)} == \
        {k: torch.float32 for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}


def test_zero_initialized_parameter_warns_once_by_name():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    torch.nn.init.zeros_(model[1].weight)
    opt = ScaledAdam(list(model.named_parameters()), lr=0.03)
    model(torch.randn(5, 4)).square().sum().backward()
    with pytest.warns(UserWarning, match=r"1\.weight \(3, 8\).*all zeros"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert model[1].weight.abs().max() < 1e-5  # frozen in practice, as the warning says


def test_non_finite_gradient_norm_zeroes_the_step_instead_of_spreading_nan():
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = ScaledAdam([p], lr=0.03, clipping_scale=2.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):  # past the first threshold at step 10
        p.grad = torch.randn(8, 8, generator=gen)
        opt.step()
    p.grad = torch.full((8, 8), float("nan"))
    opt.step()
    assert torch.isfinite(p).all()


def test_mup_scales_apply_to_the_direction_step_and_the_rms_bounds():
    """lr_scale multiplies the direction step only; eps_scale the parameter-unit RMS bounds."""
    def one_step(**scales):
        p = torch.nn.Parameter(torch.full((4, 4), 0.5))
        opt = ScaledAdam([{"params": [p], **scales}], lr=0.1, betas=(0.0, 0.98))
        p.grad = torch.ones(4, 4)
        opt.step()
        return p.detach() - 0.5

    base = one_step()
    torch.testing.assert_close(one_step(lr_scale=0.25), 0.25 * base)
    # RMS 0.5 < param_min_rms * eps_scale = 1e-5 * 1e5: the floor takes over
    torch.testing.assert_close(one_step(eps_scale=1e5), base * (1.0 / 0.5))


def test_bad_arguments_are_refused_with_the_fix():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="clipping_scope"):
        ScaledAdam([p], clipping_scope="model")
    with pytest.raises(ValueError, match="param_min_rms"):
        ScaledAdam([p], param_min_rms=1.0, param_max_rms=0.5)
    p.grad = torch.randn(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        ScaledAdam([p]).step()


def test_eden_and_eden2_follow_their_formulas_and_save_their_position():
    p = torch.nn.Parameter(torch.randn(2))
    opt = ScaledAdam([p], lr=0.045)
    sched = Eden(opt, lr_batches=7500, lr_epochs=3.5, warmup_batches=500, warmup_start=0.1)
    for epoch in (0, 2):
        sched.step_epoch(epoch)
        for batch in (0, 250, 499, 500, 20000):
            sched.step_batch(batch)
            warm = 1.0 if batch >= 500 else 0.1 + 0.9 * batch / 500
            expected = 0.045 * ((batch ** 2 + 7500 ** 2) / 7500 ** 2) ** -0.25 \
                * ((epoch ** 2 + 3.5 ** 2) / 3.5 ** 2) ** -0.25 * warm
            assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
    state = sched.state_dict()
    again = Eden(opt, lr_batches=7500, lr_epochs=3.5, warmup_batches=500, warmup_start=0.1)
    again.load_state_dict(state)
    assert (again.last_epoch, again.epoch) == (20000, 2)

    opt2 = ScaledAdam([torch.nn.Parameter(torch.randn(2))], lr=1.0)
    sched2 = Eden2(opt2, lr_batches=100, warmup_batches=10, warmup_start=0.5)
    for _ in range(30):  # torch's convention: step() once per batch
        opt2.step()
        sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(((30 ** 2 + 100 ** 2) / 100 ** 2) ** -0.5, rel=1e-12)
    assert math.isclose(sched2.get_last_lr()[0], opt2.param_groups[0]["lr"])


def test_a_deepcopied_or_pickled_optimizer_keeps_its_clipping_scope():
    import pickle
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = ScaledAdam([p], clipping_scope="all")
    p.grad = torch.randn(4, 4)
    opt.step()
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.clipping_scope == "all"
        clone.param_groups[0]["params"][0].grad = torch.randn(4, 4)
        clone.step()
