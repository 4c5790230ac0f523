"""HP-transfer sweeps: resume, interruption, the optimum fit, drift, the CLI and the real-data tasks."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F

import mupkit
from mupkit import models, tasks
from mupkit.cli import main as cli
from mupkit.transfer import Sweep, load_records, sweep
from mupkit.zoo import BUILTIN, load_definition, load_task, transfer_models

LRS = [2.0 ** k for k in range(-9, -4)]


def regression_train(calls: list | None = None, interrupt_at: int | None = None):
    """A real (tiny) training run: an MLP regressing a fixed random batch with Adam, 20 steps."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 64, generator=g), torch.randn(64, 10, generator=g)

    def train(model, hparams, seed):
        if calls is not None:
            calls.append((hparams["lr"], seed))
            if interrupt_at is not None and len(calls) == interrupt_at:
                raise KeyboardInterrupt
        opt = mupkit.optim.Adam(mupkit.param_groups(model), lr=hparams["lr"])
        losses = []
        for _ in range(20):
            loss = F.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses
    return train


def run_sweep(path, train):
    return sweep(models.mlp, [32, 64], base=dict(width=32), grid={"lr": LRS}, train=train,
                 parametrizations=["sp", "mup"], seeds=2, results=path, show_progress=False)


def test_rerun_trains_nothing_and_an_interrupted_sweep_resumes(tmp_path):
    calls = []
    full = run_sweep(tmp_path / "full.jsonl", regression_train(calls))
    assert len(calls) == 2 * 2 * len(LRS) * 2
    again = []
    assert run_sweep(tmp_path / "full.jsonl", regression_train(again)).records == full.records and again == []

    path = tmp_path / "cut.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(path, regression_train([], interrupt_at=7))  # Ctrl-C during the 7th trial
    assert len(load_records(path)) == 6
    rest = []
    resumed = run_sweep(path, regression_train(rest))
    assert len(rest) == len(calls) - 6
    def by_trial(records):
        return {json.dumps([r["parametrization"], r["size"], r["hparams"], r["seed"]]): r["losses"] for r in records}

    assert by_trial(resumed.records) == by_trial(full.records)  # same trials, same (deterministic) curves


def test_a_torn_last_line_is_skipped_and_the_next_record_stays_whole(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n" + '{"parametrization": "mu')  # killed mid-write
    assert load_records(path) == [{"a": 1}]
    calls = []
    sweep(models.mlp, [32], base=dict(width=32), grid={"lr": LRS[:2]}, train=regression_train(calls),
          parametrizations=["mup"], seeds=1, results=path, show_progress=False)
    records = load_records(path)
    assert len(calls) == 2 and [r.get("a") for r in records] == [1, None, None]
    assert [r["hparams"]["lr"] for r in records[1:]] == LRS[:2]


def synthetic(vertices: dict[int, float], lrs=LRS, curvature=0.3, seeds=(0, 1)) -> Sweep:
    """Records whose loss is an exact parabola in log2(lr) with its vertex at ``vertices[width]``."""
    records = []
    for width, vertex in vertices.items():
        for lr in lrs:
            for seed in seeds:
                loss = 1.0 + curvature * (math.log2(lr) - math.log2(vertex)) ** 2
                records.append({"parametrization": "mup", "size": {"width": width}, "hparams": {"lr": lr}, "seed": seed,
                                "final_loss": loss, "tail_loss": loss, "losses": [loss]})
    return Sweep(records)


def test_optimum_fit_drift_and_recommendation():
    s = synthetic({64: 2 ** -7.3, 256: 2 ** -6.8})
    o64, o256 = s.optima("mup")
    assert o64.grid_best == 2 ** -7 and o64.fitted == pytest.approx(2 ** -7.3, rel=1e-9) and not o64.at_edge
    assert o256.fitted == pytest.approx(2 ** -6.8, rel=1e-9)
    assert s.drift("mup") == 0.0  # both grid minima at 2^-7
    rec = s.recommend("mup", 4096)
    assert rec.value == pytest.approx(2 ** -6.8) and "transferred" in rec.how and rec.low <= rec.value <= rec.high

    drifting = synthetic({64: 2 ** -5.2, 256: 2 ** -7.0, 1024: 2 ** -8.8}, lrs=[2.0 ** k for k in range(-12, -2)])
    assert drifting.drift("mup") == 4.0
    rec = drifting.recommend("mup", 4096)
    assert math.log2(rec.value) == pytest.approx(-10.6, abs=0.05) and "extrapolated" in rec.how  # -0.9 per doubling

    edge = synthetic({64: 2 ** -12})
    assert edge.optima("mup")[0].at_edge and edge.optima("mup")[0].fitted == LRS[0]
    assert "grid's edge" in edge.summary()


def test_drift_counts_the_whole_excursion_of_the_optimum():
    s = synthetic({64: 2 ** -7, 128: 2 ** -5, 256: 2 ** -7})  # out two grid steps and back
    assert [o.grid_best for o in s.optima("mup")] == [2 ** -7, 2 ** -5, 2 ** -7]
    assert s.drift("mup") == 2.0
    assert "extrapolated" in s.recommend("mup", 1024).how


def test_diverged_trials_count_as_infinite_loss():
    """A trial whose losses turn NaN or inf is stored as diverged (inf), and never wins, even at
    the LR that would otherwise be the optimum."""
    best = 2.0 ** -7

    def train(model, hparams, seed):
        losses = regression_train()(model, hparams, seed)
        return losses[:-1] + [math.nan] if hparams["lr"] == best and seed == 1 else losses

    s = sweep(models.mlp, [32], base=dict(width=32), grid={"lr": LRS}, train=train, parametrizations=["mup"],
              seeds=2, show_progress=False)
    diverged = [r for r in s.records if r["hparams"]["lr"] == best and r["seed"] == 1]
    assert diverged[0]["final_loss"] == math.inf and diverged[0]["tail_loss"] == math.inf
    clean = synthetic({64: best})
    assert clean.optima("mup")[0].grid_best == best
    for r in clean.records:
        if r["hparams"]["lr"] == best and r["seed"] == 1:
            r["tail_loss"] = math.inf
    assert clean.optima("mup")[0].grid_best in (best / 2, best * 2)


def test_cli_transfer_on_a_user_model_and_resume(tmp_path, capsys):
    user = tmp_path / "user.py"
    user.write_text("import torch\nimport torch.nn.functional as F\nimport mupkit\n"
                    "def make(width=32):\n    return mupkit.models.mlp(width, d_in=8, d_out=2)\n"
                    "def train(model, hparams, seed):\n"
                    "    g = torch.Generator().manual_seed(seed)\n"
                    "    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 2, generator=g)\n"
                    "    opt = mupkit.optim.Adam(mupkit.param_groups(model), lr=hparams['lr'])\n"
                    "    out = []\n"
                    "    for _ in range(5):\n"
                    "        loss = F.mse_loss(model(x), y); opt.zero_grad(); loss.backward(); opt.step()\n"
                    "        out.append(loss.item())\n"
                    "    return out\n")
    args = ["transfer", "--model", f"{user}:make", "--widths", "32", "64", "--log2-lrs", "-8", "-6", "-4",
            "--seeds", "1", "--results", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "t.png"),
            "--target-width", "1024", "--quiet"]
    assert cli(args) == 0
    text = capsys.readouterr().out
    assert "sp: optimum lr" in text and "mup: optimum lr" in text and "recommended lr at 1024" in text
    assert (tmp_path / "t.png").exists() and len(load_records(tmp_path / "t.jsonl")) == 2 * 2 * 3
    assert cli(args) == 0 and len(load_records(tmp_path / "t.jsonl")) == 12  # resumed: nothing new
    bad = tmp_path / "nofn.py"
    bad.write_text("def make(width=8):\n    return None\n")
    assert cli(["transfer", "--model", f"{bad}:make", "--quiet"]) == 2
    assert "must define train(model, hparams, seed)" in capsys.readouterr().err


def test_cli_transfer_optim_trains_every_trial_with_it_and_tags_the_records(tmp_path, capsys, monkeypatch):
    """--optim muon reaches the task's trainer (every trial builds Muon), the records carry
    ``optim=muon`` in their tag (the tag of examples/transfer_muon.jsonl), a rerun trains nothing,
    and AdamW's trials of the same file stay apart."""
    built = []
    monkeypatch.setattr(tasks, "get_optimizer", lambda name: built.append(name) or mupkit.optim.get_optimizer(name))
    args = ["transfer", "--model", "transformer", "--param", "mup", "--widths", "64", "128", "--steps", "2",
            "--seeds", "1", "--log2-lrs", "-5", "--results", str(tmp_path / "m.jsonl"), "--out", "", "--quiet"]
    assert cli(args + ["--optim", "muon"]) == 0, capsys.readouterr().err
    records = load_records(tmp_path / "m.jsonl")
    assert built == ["muon"] * 2 and {r["tag"] for r in records} == {"steps=2 optim=muon"} and len(records) == 2
    assert cli(args + ["--optim", "muon"]) == 0 and built == ["muon"] * 2  # resumed: nothing new
    assert cli(args) == 0 and built == ["muon"] * 2 + ["adamw"] * 2  # the default keeps its own trials
    assert {r["tag"] for r in load_records(tmp_path / "m.jsonl")} == {"steps=2 optim=muon", "steps=2"}
    digits = ["transfer", "--model", "cnn", "--optim", "muon", "--param", "mup", "--widths", "16", "32", "--steps",
              "2", "--seeds", "1", "--log2-lrs", "-6", "--results", str(tmp_path / "d.jsonl"), "--out", "", "--quiet"]
    assert cli(digits) == 0 and built[4:] == ["muon"] * 2  # the digits task takes it too (conv kernels: Muon)


def test_cli_transfer_optim_errors_name_the_fix(tmp_path, capsys):
    """An unknown optimizer, a parametrization without a rule for its family (u-muP has no Muon
    column) and a user task (its train picks its own optimizer) exit 2 before any trial."""
    assert cli(["transfer", "--model", "mlp", "--optim", "nadam", "--quiet"]) == 2
    assert "unknown optimizer 'nadam'" in capsys.readouterr().err
    assert cli(["transfer", "--model", "umup-transformer", "--param", "umup", "--optim", "muon", "--quiet"]) == 2
    assert "the 'umup' parametrization has no 'muon' LR rule for its hidden parameters" in capsys.readouterr().err
    user = tmp_path / "user.py"
    user.write_text("import mupkit\ndef make(width=32):\n    return mupkit.models.mlp(width, d_in=8, d_out=2)\n"
                    "def train(model, hparams, seed):\n    return [1.0]\n")
    assert cli(["transfer", "--model", f"{user}:make", "--optim", "muon", "--results", "", "--quiet"]) == 2
    assert "['optimizer'] (--batches, --schedule, --optim) apply to built-in models only" in capsys.readouterr().err
    assert not (tmp_path / "transfer.jsonl").exists()


def test_both_clis_take_built_in_models_from_one_registry(capsys):
    """coord-check and transfer read the same mupkit.zoo entry; a model without a transfer task
    (resmlp, the HF models) is offered only for coordinate checks."""
    assert transfer_models() == ["cnn", "gpt", "mlp", "transformer", "umup-transformer"]
    for name in transfer_models():
        assert load_task(name) is load_definition(name) is BUILTIN[name]
    gpt = BUILTIN["transformer"]  # the measured kwargs: coord_checks/ figures and examples/transfer_gpt.jsonl
    assert gpt.kwargs("mup", 64) == {"base_width": 64, "max_len": 16, "emb_mult": 10.0, "tie": False}
    assert gpt.transfer.kwargs("sp", 64) == {"base_width": None, "max_len": 64, "depth": 2}
    assert cli(["transfer", "--model", "resmlp", "--quiet"]) == 2
    assert "use one of ['cnn', 'gpt', 'mlp', 'transformer', 'umup-transformer']" in capsys.readouterr().err


@pytest.mark.parametrize("constructor,kwargs", [(models.gpt, dict(max_len=64, depth=1, base_width=32)),
                                                (mupkit.unit.TransformerDecoder, dict(depth=1))])
def test_text_task_trains_token_models(constructor, kwargs):
    param = "umup" if constructor is mupkit.unit.TransformerDecoder else "mup"
    model = mupkit.build(constructor, base=dict(width=32, **kwargs), target=dict(width=64, **kwargs),
                         parametrization=param)
    losses = tasks.text_lm(steps=30, batch=8, limit=200_000)(model, {"lr": 3e-3 if param == "mup" else 0.3}, 0)
    assert len(losses) == 30 and losses[-1] < losses[0] - 0.5, losses


def test_one_results_file_keeps_models_and_settings_apart(tmp_path):
    """Trials of another constructor, other fixed kwargs or another tag are never reused."""
    path, calls = tmp_path / "shared.jsonl", []
    kw = dict(base=dict(width=32), grid={"lr": LRS[:2]}, parametrizations=["mup"], seeds=1, results=path,
              show_progress=False)
    sweep(models.mlp, [32, 64], train=regression_train(calls), **kw)
    sweep(models.mlp, [32, 64], train=regression_train(calls), tag="steps=20", **kw)
    sweep(models.mlp, [32, 64], train=regression_train(calls), kwargs={"bias": False}, **kw)
    assert len(calls) == 3 * 4
    sweep(models.mlp, [32, 64], train=regression_train(calls), kwargs={"bias": False}, **kw)  # resumed
    assert len(calls) == 12 and len(load_records(path)) == 12
    sweep(models.mlp, [32, 64], train=regression_train(calls), **{**kw, "base": dict(width=64)})  # another base
    assert len(calls) == 16


def test_digits_task_trains_the_mlp_on_real_images():
    x, y = tasks.digits_data()
    assert x.shape == (1797, 64) and int(y.max()) == 9  # scikit-learn's 8x8 digits
    model = mupkit.build(models.mlp, base=dict(width=32), target=dict(width=64), parametrization="mup")
    losses = tasks.digits(steps=60)(model, {"lr": 2.0 ** -7}, 0)
    assert len(losses) == 60 and sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10, losses


@pytest.mark.parametrize("results,models_", [("transfer_gpt.jsonl", ["mupkit.models.gpt"]),
                                             ("transfer_digits.jsonl", ["mupkit.models.mlp"])])
def test_committed_sweeps_show_transfer_under_mup_and_drift_under_sp(results, models_):
    """The committed example results (issue 9's acceptance): across widths 64..512 the muP optimum
    moves by at most one grid point and SP's by at least two."""
    path = pathlib.Path(__file__).parents[1] / "examples" / results
    records = [r for r in load_records(path) if r["model"] in models_ and r["size"]["width"] <= 512]
    s = Sweep(records)
    assert sorted({r["size"]["width"] for r in records}) == [64, 128, 256, 512]
    assert len({r["hparams"]["lr"] for r in records if r["parametrization"] == "mup"}) >= 5
    assert len({r["seed"] for r in records}) >= 2
    assert s.drift("mup") <= 1.0 and s.drift("sp") >= 2.0, s.summary()


def test_committed_muon_sweep_transfers_and_the_cli_resumes_it(tmp_path, monkeypatch):
    """examples/transfer_muon.jsonl (issue 22): under muP + Muon the optimum LR moves by at most one
    grid step across widths 64..1024, and ``mupkit transfer --optim muon`` names the same trials as
    the example, so on a copy of the file it trains nothing."""
    path = pathlib.Path(__file__).parents[1] / "examples" / "transfer_muon.jsonl"
    grid = [2.0 ** k for k in range(-7, -2)]
    records = [r for r in load_records(path) if r["hparams"]["lr"] in grid]
    assert sorted({r["size"]["width"] for r in records}) == [64, 128, 256, 512, 1024]
    assert len(records) == 5 * len(grid) and Sweep(records).drift("mup") <= 1.0, Sweep(records).summary()
    copy = tmp_path / "muon.jsonl"
    copy.write_text(path.read_text())
    monkeypatch.setattr(tasks, "get_optimizer", lambda name: pytest.fail(f"trained a trial with {name}"))
    assert cli(["transfer", "--model", "transformer", "--optim", "muon", "--param", "mup", "--widths", "64", "128",
                "256", "512", "1024", "--steps", "100", "--seeds", "1", "--log2-lrs", "-7", "-6", "-5", "-4", "-3",
                "--results", str(copy), "--out", "", "--quiet"]) == 0
    assert copy.read_text() == path.read_text()


def test_every_committed_results_file_still_loads_and_analyses():
    """Each JSONL under examples/ and coord_checks/ reads back, and its sweep records give optima
    (files written before runs, search and workers existed included)."""
    root = pathlib.Path(__file__).parents[1]
    files = sorted(root.glob("examples/*.jsonl")) + sorted(root.glob("coord_checks/**/*.jsonl"))
    assert any(f.name == "transfer_gpt.jsonl" for f in files)
    for path in files:
        records = [r for r in load_records(path) if "hparams" in r]
        assert records, path
        for model in {r["model"] for r in records}:
            s = Sweep([r for r in records if r["model"] == model], replicates=2)
            for p in s.parametrizations:
                assert s.optima(p) and all(o.fitted > 0 for o in s.optima(p)), (path, model, p)


@pytest.mark.parametrize("schedule", ["wsd", "power"])
def test_text_task_schedules_and_multipliers_change_training(schedule):
    kwargs = dict(max_len=16, depth=1, base_width=32)

    def model():
        torch.manual_seed(0)
        return mupkit.build(models.gpt, base=dict(width=32, **kwargs), target=dict(width=32, **kwargs),
                            parametrization="mup")

    train = tasks.text_lm(steps=6, batch=4, context=16, warmup=2, limit=50_000, schedule=schedule)
    lr = 2.0 ** -7 if schedule == "wsd" else 2.0 ** -2  # power: the lr is the scheduler's a
    plain = train(model(), {"lr": lr}, 0)
    assert len(plain) == 6 and plain == train(model(), {"lr": lr}, 0)  # deterministic per seed
    extras = ({"init_mult": 0.25}, {"output_mult": 4.0}, {"attn_temp": 2.0}, {"weight_decay": 0.5})
    for extra in extras if schedule == "wsd" else extras[:1]:
        assert train(model(), {"lr": lr, **extra}, 0) != plain, extra
    with pytest.raises(ValueError, match=r"does not know hyperparameters \['momentum'\]"):
        train(model(), {"lr": lr, "momentum": 0.9}, 0)
    mlp = mupkit.build(models.mlp, base=dict(width=32), target=dict(width=32), parametrization="mup")
    with pytest.raises(ValueError, match="attn_temp needs mupkit.models.Attention"):
        tasks.digits(steps=2)(mlp, {"lr": 1e-3, "attn_temp": 2.0}, 0)


def test_cli_sweeps_horizon_and_batch_and_recommends_a_target(tmp_path, capsys):
    args = ["transfer", "--model", "mlp", "--widths", "32", "--param", "mup", "--log2-lrs", "-10", "-8", "-6", "-4",
            "--steps", "10", "20", "--batches", "8", "16", "--schedule", "wsd", "--seeds", "1",
            "--results", str(tmp_path / "h.jsonl"), "--out", "", "--quiet"]
    assert cli(args + ["--target-steps", "80", "--target-batch", "16"]) == 0
    out = capsys.readouterr().out
    assert "along tokens at batch=8" in out and "along batch at tokens=160" in out
    assert "recommended lr at batch=16 tokens=1280" in out
    runs = {json.dumps(r["run"], sort_keys=True) for r in load_records(tmp_path / "h.jsonl")}
    assert len(runs) == 4 and all('"schedule": "wsd"' in r for r in runs)
    assert cli(args + ["--target-steps", "80"]) == 2
    assert "--target-steps needs the target's batch" in capsys.readouterr().err
    assert cli(args) == 0 and len(load_records(tmp_path / "h.jsonl")) == 4 * 4  # resumed: nothing new
    assert cli(["transfer", "--model", "mlp", "--steps", "10", "20", "--quiet"]) == 2
    assert "give --batches too" in capsys.readouterr().err


def test_committed_multi_hp_random_search_finds_the_lr_only_optimum_and_ranks_sensitivity():
    """examples/transfer_multi_hp.jsonl (random search over LR, init and output multipliers,
    weight decay) puts the LR optimum within one grid step of the LR-only sweep's
    (examples/transfer_digits.jsonl) at each width, and reports a sensitivity for all four HPs."""
    root = pathlib.Path(__file__).parents[1] / "examples"
    random_search = Sweep(load_records(root / "transfer_multi_hp.jsonl"), replicates=20)
    lr_only = Sweep([r for r in load_records(root / "transfer_digits.jsonl")
                     if r["model"] == "mupkit.models.mlp" and r["parametrization"] == "mup"])
    reference = {o.size["width"]: o.grid_best for o in lr_only.optima("mup")}
    for o in random_search.optima("mup"):
        assert abs(math.log2(o.grid_best / reference[o.size["width"]])) <= 1.0, (o, reference)
    assert len({r["hparams"]["init_mult"] for r in random_search.records}) > 2  # the other HPs did vary
    for sens in random_search.sensitivity("mup").values():
        assert {s.hparam for s in sens} == {"lr", "init_mult", "output_mult", "weight_decay"}
        assert all(s.cost >= 0 for s in sens)
    assert "sensitivity at width=64" in random_search.summary()


def test_committed_horizon_sweep_predicts_the_held_out_optimum_within_one_grid_step():
    """examples/transfer_horizon.jsonl: fitted on horizons T..4T (batch 16 and 32, width 32, and
    width 64 at T), the optimum predicted at 8T lands within one grid step (factor 2) of the one
    measured at 8T, for width 32 and for width 128 (README, "Transfer across token horizon")."""
    records = load_records(pathlib.Path(__file__).parents[1] / "examples" / "transfer_horizon.jsonl")
    proxy = Sweep([r for r in records if r["run"]["steps"] < 1600], replicates=50)
    held_out = Sweep([r for r in records if r["run"]["steps"] == 1600], replicates=5)
    assert proxy.varied_axes("mup") == ["width", "tokens", "batch"]
    for fit in proxy.fits("mup", "tokens"):
        low, high = fit.law.intervals["tokens"]
        assert low <= fit.law.exponents["tokens"] <= high
    target_tokens = 1600 * 16 * 64
    for o in held_out.optima("mup"):
        rec = proxy.recommend("mup", width=o.size["width"], tokens=target_tokens, batch=16)
        assert abs(math.log2(o.fitted / rec.value)) <= 1.0, (o, rec)
