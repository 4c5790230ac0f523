"""Coordinate checks: the library, the verdict, the CLI, and "wider is better".

Pass: under muP every module's mean |output| after 1-4 steps has |slope| <= 0.1 in log-log
against width over a 16x range. Fail: SP shows a slope >= 0.5 on the same model.
"""

from __future__ import annotations

import contextlib

import csv
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F

import mupkit
from mupkit import models
from mupkit.cli import main as cli
from mupkit.zoo import BUILTIN

HERE = pathlib.Path(__file__).parent


def check(name: str, param: str, optim: str, seeds=2):
    d = BUILTIN[name]
    base = min(d.widths)
    return mupkit.coord_check(d.constructor, list(d.widths), parametrization=param, optimizer=optim,
                              lr=d.lr_for(optim), steps=4, seeds=seeds, batch=d.batch_for(optim),
                              kwargs=d.kwargs(param, base), show_progress=False)


def _zero_bias_warning(optim: str):
    if optim == "scaled-adam":
        return pytest.warns(UserWarning, match="all zeros at their first step")
    return contextlib.nullcontext()


@pytest.mark.parametrize("name,optim", [("mlp", "adam"), ("mlp", "sgd"), ("cnn", "adam"), ("cnn", "sgd"),
                                        ("transformer", "adam"), ("transformer", "sgd"),
                                        ("mlp", "adam-atan2"), ("mlp", "adafactor"),
                                        ("transformer", "adam-atan2"), ("transformer", "adafactor"),
                                        ("mlp", "dadapt-adam"), ("mlp", "prodigy"), ("mlp", "scaled-adam"),
                                        ("transformer", "dadapt-adam"), ("transformer", "prodigy"),
                                        ("transformer", "scaled-adam")])
def test_builtin_models_pass_under_mup_and_fail_under_sp(name, optim):
    with _zero_bias_warning(optim):  # the models' zero-initialized biases: ScaledAdam warns they stay frozen
        mup = check(name, "mup", optim).verdict(steps=range(1, 5))
        sp = check(name, "sp", optim).verdict(steps=range(1, 5))
    assert mup.passed, str(mup)
    # an RMS-relative step (ScaledAdam) shrinks with SP's 1/sqrt(fan_in) init on its own, so SP
    # blows up more slowly under it than under Adam or SGD; it must still fail clearly
    blow_up = 0.3 if optim == "scaled-adam" else 0.5
    assert not sp.passed and max(abs(r.slope) for r in sp.rows if r.status in ("pass", "fail")) >= blow_up, str(sp)


def test_wider_is_better_under_mup():
    """Same data, same LR, 200 Adam steps: training loss falls with width (mup's MLPTrainCase)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 64, generator=g), torch.randint(0, 10, (256,), generator=g)
    losses = {}
    for width in (64, 256, 1024):
        torch.manual_seed(0)
        model = mupkit.build(models.mlp, base=dict(width=64), delta=dict(width=128), target=dict(width=width))
        opt = mupkit.optim.Adam(mupkit.param_groups(model), lr=3e-3)
        for _ in range(200):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        losses[width] = loss.item()
    assert losses[64] > losses[256] > losses[1024], losses


def test_records_every_call_and_every_tensor_leaf_and_optional_kinds():
    import user_model
    c = mupkit.coord_check(user_model.make, [16, 32], steps=2, seeds=1, batch=user_model.batch(),
                           loss=user_model.loss, inputs=True, params=True, updates=True, show_progress=False)
    modules = {(r["module"], r["kind"]) for r in c.records}
    assert {("shared", "out"), ("shared#1", "out"), ("shared[0]", "in")} <= modules  # second call, inputs
    assert {("head", "out"), ("head.weight", "update"), ("embed.bias", "param")} <= modules
    steps = {r["step"] for r in c.records if r["module"] == "shared#1"}
    assert steps == {0, 1, 2}
    # the readout is zero-initialized for the check, so step 1 moves only it; step 2 moves all.
    # Updates are relative to the init norm, so the zero-initialized readout weight has none (NaN).
    updates = {r["module"]: r["l1"] for r in c.records if r["kind"] == "update" and r["step"] == 2}
    assert math.isnan(updates.pop("head.weight")) and math.isnan(updates.pop("head.bias"))
    assert all(v > 0 for v in updates.values()), updates
    first = {r["module"]: r["l1"] for r in c.records if r["kind"] == "update" and r["step"] == 1}
    assert all(math.isnan(first.pop(n)) for n in ("head.weight", "head.bias")) and set(first.values()) == {0.0}
    delta = [r["delta_rms"] for r in c.records if r["module"] == "shared" and r["kind"] == "out"]
    assert delta[0] == delta[1] == 0.0 and delta[2] > 0  # step 1 changed only the readout


def test_verdict_marks_zero_and_expected_readouts_and_fails_otherwise():
    c = mupkit.coord_check(models.mlp, [64, 256], steps=1, seeds=1, show_progress=False, zero_init=("readout",),
                           kwargs=dict(bias=False))
    rows = {(r.module, r.step): r for r in c.verdict().rows}
    assert rows[("4", 0)].status == "zero"  # zero readout, no bias: output exactly 0 at init
    sp = mupkit.coord_check(models.mlp, [64, 256, 1024], parametrization="sp", steps=1, seeds=1,
                            show_progress=False, zero_init=(), kwargs=dict(bias=False))
    mup = mupkit.coord_check(models.mlp, [64, 256, 1024], steps=1, seeds=1, show_progress=False, zero_init=(),
                             kwargs=dict(bias=False))
    assert {r.status for r in mup.verdict().rows if r.module == "4" and r.step == 0} == {"expected"}
    assert not sp.verdict(tolerance=0.1).passed


def test_accepts_a_dataloader_and_a_torch_optimizer_class():
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    c = mupkit.coord_check(models.mlp, [32, 64], optimizer=torch.optim.SGD, lr=0.1, steps=1, seeds=1,
                           batch=loader, show_progress=False)
    assert c.optimizer == "SGD" and {r["width"] for r in c.records} == {32, 64}


def test_table_exports(tmp_path):
    c = mupkit.coord_check(models.mlp, [32, 64], steps=1, seeds=1, show_progress=False)
    c.to_csv(str(tmp_path / "t.csv"))
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(c.records) and {"width", "seed", "step", "module", "l1", "rms"} <= set(rows[0])


def test_cli_user_model_passes_writes_figure_and_csv(tmp_path, capsys):
    out, table = tmp_path / "cc.png", tmp_path / "cc.csv"
    code = cli(["coord-check", "--model", f"{HERE / 'user_model.py'}:make", "--widths", "64", "128", "256", "512",
                "1024", "--steps", "3", "--seeds", "3", "--lr", "0.01", "--out", str(out), "--csv", str(table), "--quiet",
                "--compare", "sp"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "PASS: mup" in text and "FAIL: sp" in text
    assert out.stat().st_size > 20_000 and out.read_bytes()[:4] == b"\x89PNG"
    assert table.exists() and (tmp_path / "cc.sp.csv").exists()


def test_cli_exit_codes_for_failing_check_and_bad_input(tmp_path, capsys):
    assert cli(["coord-check", "--model", "mlp", "--param", "sp", "--widths", "64", "256", "1024", "--steps", "2",
                "--seeds", "1", "--out", "", "--quiet"]) == 1
    assert cli(["coord-check", "--model", "nope.py:make", "--out", "", "--quiet"]) == 2
    assert "no file nope.py" in capsys.readouterr().err
    assert cli(["coord-check", "--model", "mlp", "--widths", "64", "--out", "", "--quiet"]) == 2


def _synthetic_check(change_slope: float) -> mupkit.CoordCheck:
    """A readout whose init output falls like width^-1/2 and whose change since init goes like width^s."""
    records = []
    for width in (64, 256, 1024):
        for step in (0, 1):
            init = width ** -0.5
            change = 0.0 if step == 0 else 0.3 * (width / 64) ** change_slope
            records.append(dict(module="head", kind="out", width=width, seed=0, step=step, l1=init + change,
                                rms=init + change, delta_rms=change))
    return mupkit.CoordCheck(records, [64, 256, 1024], "mup", "adam", 0.01, ["head"])


def test_verdict_judges_an_init_transient_readout_by_its_change_since_init():
    flat = {r.step: r for r in _synthetic_check(0.0).verdict().rows}
    assert flat[0].status == "expected" and flat[0].metric == "l1"
    assert flat[1].metric == "delta_rms" and flat[1].status == "pass" and abs(flat[1].slope) < 1e-9
    shrinking = {r.step: r for r in _synthetic_check(-0.3).verdict().rows}
    assert shrinking[1].status == "fail" and shrinking[1].slope == pytest.approx(-0.3)


def test_plot_legend_names_lines_absent_at_init(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    c = mupkit.coord_check(models.mlp, [32, 64], steps=1, seeds=1, show_progress=False, kwargs=dict(bias=False))
    from matplotlib.figure import Figure
    seen = {}
    original = Figure.savefig

    def capture(fig, *args, **kwargs):
        seen["labels"] = {t.get_text() for sub in fig.subfigs for leg in sub.legends for t in leg.get_texts()}
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    c.plot(str(tmp_path / "cc.png"))
    assert any(label.startswith("4") for label in seen["labels"]), seen  # the zero-init readout


def test_a_model_that_returns_no_tensor_is_told_to_wrap_it():
    """An HF-style output object instead of logits: the synthetic batch says how to fix it."""
    from mupkit.data import synthetic_batch

    class Output(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)

        def forward(self, x):
            return {"logits": self.linear(x)}

    with pytest.raises(TypeError, match="returns a dict, not a tensor of logits.*CausalLM.*batch="):
        synthetic_batch(Output())


def test_a_language_model_without_a_batch_gets_32_tokens_and_passes_under_mup():
    """The synthetic batch of a token model multiplies as many rows per step as an MLP's (2 x 16
    tokens, not 32 sequences): at CPU widths the cross-token terms of 512 tokens failed a muP LM's
    readout."""
    from mupkit.data import ROWS, synthetic_batch
    from mupkit.zoo import BUILTIN
    kwargs = BUILTIN["transformer"].kwargs("mup", 64)
    x, y = synthetic_batch(models.gpt(64, **kwargs))
    assert x.shape == y.shape == (ROWS // 16, 16)
    check = mupkit.coord_check(models.gpt, [64, 128, 256, 512], lr=3e-3, steps=3, seeds=2, kwargs=kwargs,
                               show_progress=False)
    assert check.verdict().passed, check.verdict()
