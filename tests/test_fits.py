"""Power-law fits of the optimum along token horizon, batch and width, with bootstrap intervals,
and per-hyperparameter sensitivity, on synthetic losses whose optimum is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mupkit.fits import PowerLaw, bootstrap, fit_power_law, refine_optimum
from mupkit.sensitivity import sensitivities
from mupkit.transfer import Sweep

LRS = [2.0 ** k for k in range(-13, -2)]


def horizon_records(beta: float, steps=(100, 200, 400, 800), batches=(16,), widths=(32,), batch_exp=0.0,
                    width_exp=0.0, noise=0.0, seeds=4, coefficient=2.0 ** -2, rng_seed=0, curvature=0.3):
    """Records whose seed-mean loss is a parabola in log2(lr) with its vertex at
    ``c * tokens^-beta * batch^batch_exp * width^width_exp`` (tokens = steps * batch * 8), and
    per-seed Gaussian noise on the loss."""
    rng = np.random.default_rng(rng_seed)
    records = []
    for width in widths:
        for batch in batches:
            for s in steps:
                run = {"steps": s, "batch": batch, "context": 8}
                tokens = s * batch * 8
                vertex = math.log2(coefficient * tokens ** -beta * batch ** batch_exp * width ** width_exp)
                for lr in LRS:
                    for seed in range(seeds):
                        loss = 1.0 + curvature * (math.log2(lr) - vertex) ** 2 + noise * rng.standard_normal()
                        records.append({"parametrization": "mup", "size": {"width": width}, "run": run,
                                        "hparams": {"lr": lr}, "seed": seed, "tail_loss": loss})
    return records


@settings(max_examples=15, deadline=None)
@given(beta=st.floats(-0.3, 0.8), batch_exp=st.floats(-0.5, 0.5))
def test_noise_free_exponents_are_recovered_exactly(beta, batch_exp):
    middle = 200 * 16 * 8  # the optimum sits at 2^-8 there, inside the grid for every horizon
    s = Sweep(horizon_records(beta, steps=(100, 200, 400), batches=(16, 32), batch_exp=batch_exp, seeds=1,
                              coefficient=2.0 ** -8 * middle ** beta / 16 ** batch_exp), replicates=5)
    law = s.scaling("mup")
    assert law.exponents["tokens"] == pytest.approx(-beta, abs=1e-6)
    assert law.exponents["batch"] == pytest.approx(batch_exp, abs=1e-6)
    assert s.varied_axes("mup") == ["tokens", "batch"]


def test_noisy_exponent_lies_in_its_bootstrap_interval_and_the_interval_shrinks_with_seeds():
    beta = 0.35
    few = Sweep(horizon_records(beta, noise=0.05, seeds=3, rng_seed=1), replicates=200)
    many = Sweep(horizon_records(beta, noise=0.05, seeds=12, rng_seed=1), replicates=200)
    (fit_few,), (fit_many,) = few.fits("mup", "tokens"), many.fits("mup", "tokens")
    for fit in (fit_few, fit_many):
        low, high = fit.law.intervals["tokens"]
        assert low <= -beta <= high and low < fit.law.exponents["tokens"] < high
    width = lambda f: np.subtract(*f.law.intervals["tokens"][::-1])  # noqa: E731
    assert width(fit_many) < width(fit_few)


def test_width_axis_under_transfer_fits_an_exponent_near_zero_and_is_held_when_recommending():
    records = horizon_records(0.3, steps=(100, 200, 400), widths=(32, 64, 128), noise=0.02, seeds=4)
    s = Sweep(records, replicates=50)
    assert s.varied_axes("mup") == ["width", "tokens"]
    (by_width, *_) = s.fits("mup", "width")
    low, high = by_width.law.intervals["width"]
    assert low <= 0.0 <= high and abs(by_width.law.exponents["width"]) < 0.1
    rec = s.recommend("mup", width=4096, tokens=3200 * 16 * 8, batch=16)
    truth = 2.0 ** -2 * (3200 * 16 * 8) ** -0.3
    assert rec.low <= rec.value <= rec.high and abs(math.log2(rec.value / truth)) < 0.3
    assert "transferred along width from width=128" in rec.how and "extrapolated" in rec.how


def test_recommend_refuses_axes_the_sweep_did_not_vary_or_a_missing_target():
    s = Sweep(horizon_records(0.3, steps=(100, 200)), replicates=5)
    with pytest.raises(ValueError, match=r"batch=64: the sweep did not vary batch"):
        s.recommend("mup", tokens=1e6, batch=64)
    with pytest.raises(ValueError, match=r"give the target's tokens="):
        s.recommend("mup", width=32)
    with pytest.raises(ValueError, match="a scaling law needs a sweep over several values"):
        Sweep(horizon_records(0.3, steps=(100,)), replicates=5).scaling("mup")


def test_fit_power_law_needs_points_that_span_the_axes():
    law = fit_power_law([({"t": 2.0}, 8.0), ({"t": 8.0}, 2.0)], ["t"])
    assert law.exponents["t"] == pytest.approx(-1.0) and law(t=4.0) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="do not vary independently"):
        fit_power_law([({"t": 2.0, "b": 4.0}, 1.0), ({"t": 4.0, "b": 8.0}, 2.0), ({"t": 8.0, "b": 16.0}, 3.0)],
                      ["t", "b"])
    assert "t^-1.00" in PowerLaw(1.0, {"t": -1.0}, {"t": (-1.2, -0.8)}).describe()
    with pytest.raises(ValueError, match="replicates=1"):
        bootstrap(lambda rng: {"x": 0.0}, replicates=1)


def test_refine_optimum_finds_the_parabola_vertex_and_keeps_edges():
    line = [(2.0 ** k, (k + 6.6) ** 2) for k in range(-9, -3)]
    assert refine_optimum(line, 3) == pytest.approx(2 ** -6.6)
    assert refine_optimum(line, 0) == line[0][0]
    line[2] = (line[2][0], math.inf)
    assert refine_optimum(line, 3) == line[3][0]  # a diverged neighbour: the grid point


def test_sensitivity_profiles_each_hyperparameter_and_ranks_the_sharp_one_first():
    averaged = {}
    for lr in range(-4, 5):
        for init in range(-2, 3):
            averaged[(("init_mult", 2.0 ** init), ("lr", 2.0 ** lr))] = 1.0 + 0.4 * lr ** 2 + 0.05 * (init - 1) ** 2
    by_name = {s.hparam: s for s in sensitivities(averaged)}
    assert by_name["lr"].best == 1.0 and by_name["init_mult"].best == 2.0
    assert by_name["lr"].cost == pytest.approx(0.4) and by_name["init_mult"].cost == pytest.approx(0.05)
    assert by_name["lr"].profile[0] == pytest.approx(1.0 + 0.4 * 16)  # min over init_mult at lr = 2^-4
