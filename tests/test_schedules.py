"""WSD and Power LR schedules: their values against the papers' formulas, written out here per phase."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mupkit.optim.schedules import DECAY_SHAPES, WSD, Eden2, PowerLR


def lrs(make, steps: int, lr: float = 1.0) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_wsd_warms_up_holds_and_cools_down_linearly():
    got = lrs(lambda o: WSD(o, warmup_steps=4, total_steps=20, decay_steps=5), 20, lr=0.1)
    assert got[:4] == pytest.approx([0.1 * (t + 1) / 4 for t in range(4)])  # (t + 1) / W
    assert got[4:15] == pytest.approx([0.1] * 11)  # stable until S - D = 15
    assert got[15:] == pytest.approx([0.1 * (1 - (t - 15) / 5) for t in range(15, 20)])  # f(x) = 1 - x
    assert max(got) == pytest.approx(0.1)


@pytest.mark.parametrize("decay", sorted(DECAY_SHAPES))
def test_wsd_cooldown_shapes_and_final_ratio(decay):
    shape = {"linear": lambda x: 1 - x, "cosine": lambda x: (1 + math.cos(math.pi * x)) / 2,
             "1-sqrt": lambda x: 1 - math.sqrt(x)}[decay]
    got = lrs(lambda o: WSD(o, warmup_steps=0, total_steps=10, decay_steps=4, decay=decay, final_ratio=0.1), 10)
    assert got[:6] == pytest.approx([1.0] * 6)
    assert got[6:] == pytest.approx([0.1 + 0.9 * shape((t - 6) / 4) for t in range(6, 10)])


def test_power_scheduler_follows_batch_times_a_times_tokens_to_the_b():
    a, batch, tps, b = 0.5, 8, 64, -0.51
    got = lrs(lambda o: PowerLR(o, batch_size=batch, tokens_per_step=tps, exponent=b, lr_max=math.inf,
                                warmup_steps=3, decay_steps=4, total_steps=20), 20, lr=a)
    power = lambda n: batch * a * n ** b  # noqa: E731 - the paper's eta_power(n), uncapped
    assert got[:3] == pytest.approx([(t + 1) / 3 * power(3 * tps) for t in range(3)])  # n / N_w * power(N_w)
    assert got[3:16] == pytest.approx([power((t + 1) * tps) for t in range(3, 16)])
    assert got[16:] == pytest.approx([(1 - (t - 16) / 4) * power(16 * tps) for t in range(16, 20)])
    assert all(x > y for x, y in zip(got[3:16], got[4:16]))  # decays with tokens


def test_power_scheduler_caps_at_lr_max_and_scales_with_batch():
    capped = lrs(lambda o: PowerLR(o, batch_size=1024, tokens_per_step=1, lr_max=0.02), 5, lr=4.0)
    assert capped == pytest.approx([0.02] * 5)
    one, two = (lrs(lambda o, b=b: PowerLR(o, batch_size=b, tokens_per_step=100, lr_max=math.inf), 6, lr=1e-3)
                for b in (16, 32))
    assert [y / x for x, y in zip(one, two)] == pytest.approx([2.0] * 6)  # linear in the batch size


@settings(max_examples=25, deadline=None)
@given(warmup=st.integers(0, 10), stable=st.integers(0, 10), decay=st.integers(1, 10))
def test_wsd_never_exceeds_the_peak_and_is_continuous_at_the_phase_edges(warmup, stable, decay):
    total = warmup + stable + decay
    got = lrs(lambda o: WSD(o, warmup_steps=warmup, total_steps=total, decay_steps=decay), total)
    assert max(got) <= 1.0 + 1e-12 and min(got) > 0
    assert got[total - decay] == pytest.approx(1.0)  # the decay starts from the peak


@pytest.mark.parametrize("make,message", [
    (lambda o: WSD(o, warmup_steps=5, total_steps=8, decay_steps=4), "exceeds total_steps"),
    (lambda o: WSD(o, warmup_steps=1, total_steps=8, decay_steps=2, decay="step"), "decay='step'"),
    (lambda o: PowerLR(o, batch_size=8, tokens_per_step=8, decay_steps=3), "needs total_steps"),
    (lambda o: PowerLR(o, batch_size=8, tokens_per_step=8, exponent=0.5), "b < 0"),
    (lambda o: PowerLR(o, batch_size=0, tokens_per_step=8), "batch_size=0"),
])
def test_bad_schedule_arguments_name_the_parameter(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        lrs(make, 1)


def test_eden2_still_decays_as_before():
    got = lrs(lambda o: Eden2(o, lr_batches=10, warmup_batches=0), 30)
    assert got[20] == pytest.approx(((20 ** 2 + 100) / 100) ** -0.5)
