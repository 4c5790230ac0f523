"""Trials in parallel through Optuna: --workers 2 gives the trials of --workers 1, two at a time,
a SIGKILLed sweep and a rerun complete every trial exactly once, and a second process
joining the same storage takes trials the first has not started. The train function is a pure
function of the hyperparameters and the seed (optionally busy for a while), so results compare
exactly."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("optuna")
import optuna  # noqa: E402

from mupkit import models  # noqa: E402
from mupkit.cli import main as cli  # noqa: E402
from mupkit.study import KEY, RECORD, WORKER  # noqa: E402
from mupkit.sweep_plan import hparam_points  # noqa: E402
from mupkit.transfer import load_records, sweep  # noqa: E402

LRS = [2.0 ** k for k in range(-10, -4)]

SCRIPT = textwrap.dedent('''
    import math, sys, time
    import mupkit.study
    from mupkit import models
    from mupkit.transfer import sweep

    mupkit.study.HEARTBEAT_INTERVAL, mupkit.study.GRACE_PERIOD = 1, 2
    results, storage, delay, workers = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    hold = sys.argv[5:] == ["hold"]  # trials at the largest LR never end: they wait for the kill

    def train(model, hparams, seed):
        time.sleep(1e6 if hold and hparams["lr"] == 2.0 ** -5 else delay)
        x = math.log2(hparams["lr"]) + 7 + 0.1 * seed
        return [1.0 + 0.3 * x * x]

    sweep(models.mlp, [16], base=dict(width=16), kwargs=dict(d_in=4, d_out=2),
          grid={"lr": [2.0 ** k for k in range(-10, -4)]}, train=train, seeds=2, results=results,
          storage=storage, workers=workers, study_name="s", show_progress=False)
''')


def busy_train(model, hparams, seed, seconds=0.3):
    """CPU-bound for ``seconds``, then a loss that depends only on the hyperparameters and seed."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    x = math.log2(hparams["lr"]) + 7 + 0.1 * seed
    return [1.0 + 0.3 * x * x, 1.0 + 0.2 * x * x]


def small_sweep(tmp_path, name, workers, train=busy_train, **kw):
    return sweep(models.mlp, [16], base=dict(width=16), kwargs=dict(d_in=4, d_out=2), grid={"lr": LRS}, train=train,
                 seeds=2, results=tmp_path / f"{name}.jsonl", workers=workers, show_progress=False, **kw)


def complete_trials(url: str, name: str = "s"):
    study = optuna.load_study(study_name=name, storage=url)
    return study, [t for t in study.get_trials() if t.state.name == "COMPLETE"]


def by_trial(records):
    return {json.dumps([r["hparams"], r["seed"]]): r["losses"] for r in records}


def test_two_workers_give_the_same_trials_as_one_and_run_them_side_by_side(tmp_path):
    one = small_sweep(tmp_path, "one", workers=1)
    two = small_sweep(tmp_path, "two", workers=2, study_name="s")
    assert by_trial(two.records) == by_trial(one.records) and len(two.records) == 2 * len(LRS)
    assert by_trial(load_records(tmp_path / "two.jsonl")) == by_trial(one.records)  # the JSONL export
    study, done = complete_trials(f"sqlite:///{tmp_path / 'two.optuna.db'}")
    assert len({t.user_attrs[WORKER] for t in done}) == 2  # both workers took trials
    spans = sorted((t.datetime_start, t.datetime_complete) for t in done)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), "no two trials overlapped in time"
    again = small_sweep(tmp_path, "two", workers=2, study_name="s")  # resumed from the JSONL: nothing to run
    assert by_trial(again.records) == by_trial(one.records) and len(study.get_trials()) == len(done)


def test_an_error_in_a_trial_stops_the_sweep_with_its_traceback(tmp_path):
    def broken(model, hparams, seed):
        raise ArithmeticError("the train function is broken")

    with pytest.raises(RuntimeError, match="ArithmeticError: the train function is broken"):
        small_sweep(tmp_path, "broken", workers=2, train=broken)


def run_script(tmp_path, *args):
    script = tmp_path / "sweep_script.py"
    script.write_text(SCRIPT)
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, text=True)


def wait_for(predicate, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def study_exists(url):
    try:
        optuna.load_study(study_name="s", storage=url)
        return True
    except KeyError:
        return False


def count_complete(url):
    try:
        return len(complete_trials(url)[1])
    except KeyError:  # the study does not exist yet
        return 0


def count_running(url):
    try:
        return sum(t.state.name == "RUNNING" for t in optuna.load_study(study_name="s", storage=url).get_trials())
    except KeyError:  # the study does not exist yet
        return 0


def test_a_sigkilled_sweep_and_a_rerun_complete_every_trial_exactly_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    first = run_script(tmp_path, tmp_path / "a.jsonl", url, 0.1, 2, "hold")
    try:  # both workers end up inside a held trial, whatever the order and the machine's load
        wait_for(lambda: count_complete(url) == 2 * len(LRS) - 2 and count_running(url) == 2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the coordinator and both workers, mid-trial (or after a timeout)
        first.wait(timeout=10)
    study = optuna.load_study(study_name="s", storage=url)
    running = [t for t in study.get_trials() if t.state.name == "RUNNING"]
    assert len(running) == 2
    second = run_script(tmp_path, tmp_path / "b.jsonl", url, 0.05, 1)
    out, _ = second.communicate(timeout=90)
    assert second.returncode == 0, out
    study, done = complete_trials(url)
    keys = [t.user_attrs[KEY] for t in done]
    assert len(keys) == len(set(keys)) == 2 * len(LRS)  # every trial exactly once
    states = [t.state.name for t in study.get_trials()]
    assert states.count("FAIL") == len(running)  # the killed trials, failed by their stale heartbeat ...
    retried = [t for t in done if "failed_trial" in t.system_attrs]
    assert len(retried) == len(running)  # ... and retried
    records = [json.loads(t.user_attrs[RECORD]) for t in done]
    assert by_trial(load_records(tmp_path / "b.jsonl")) == by_trial(records)


def test_a_second_process_on_the_same_storage_takes_trials_the_first_has_not_started(tmp_path):
    url = f"sqlite:///{tmp_path / 'join.db'}"
    first = run_script(tmp_path, tmp_path / "a.jsonl", url, 0.7, 1)
    wait_for(lambda: study_exists(url))  # the first has planned the sweep and started on it
    second = run_script(tmp_path, tmp_path / "b.jsonl", url, 0.7, 1)
    outs = [p.communicate(timeout=90)[0] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outs
    study, done = complete_trials(url)
    keys = [t.user_attrs[KEY] for t in done]
    assert len(keys) == len(set(keys)) == 2 * len(LRS)
    workers = {t.user_attrs[WORKER] for t in done}
    assert len(workers) == 2  # the second process ran trials too, none twice
    assert not [t for t in study.get_trials() if t.state.name == "FAIL"]
    assert by_trial(load_records(tmp_path / "a.jsonl")) == by_trial(load_records(tmp_path / "b.jsonl"))


def test_random_search_draws_the_same_points_everywhere_from_the_grid_values():
    grid = {"lr": LRS, "init_mult": [0.5, 1.0, 2.0], "output_mult": [0.25, 1.0, 4.0]}
    points = hparam_points(grid, "random", trials=12, seed=3)
    assert points == hparam_points(grid, "random", trials=12, seed=3)
    assert points != hparam_points(grid, "random", trials=12, seed=4)
    assert all(p[k] in grid[k] for p in points for k in grid) and 1 < len(points) <= 12
    assert len({p["lr"] for p in points}) > 2
    with pytest.raises(ValueError, match="needs trials="):
        hparam_points(grid, "random")
    with pytest.raises(ValueError, match="search='sobol'"):
        hparam_points(grid, "sobol", trials=3)


def test_cli_progress_shows_done_running_left_and_eta(tmp_path, capsys):
    user = tmp_path / "user.py"
    user.write_text("import math\nimport mupkit\n"
                    "def make(width=16):\n    return mupkit.models.mlp(width, d_in=4, d_out=2)\n"
                    "def train(model, hparams, seed):\n"
                    "    x = math.log2(hparams['lr']) + 6 + math.log2(hparams.get('init_mult', 1))\n"
                    "    return [1 + 0.2 * x * x]\n")
    args = ["transfer", "--model", f"{user}:make", "--widths", "16", "--param", "mup", "--log2-lrs", "-8", "-6",
            "-4", "--hparam", "init_mult=-1,0,1", "--search", "random", "--trials", "6", "--seeds", "1",
            "--results", str(tmp_path / "t.jsonl"), "--out", "", "--workers", "2"]
    assert cli(args) == 0
    captured = capsys.readouterr()
    assert "done," in captured.err and "running," in captured.err and "left of" in captured.err
    assert "ETA" in captured.err
    assert "sensitivity at width=16" in captured.out and "init_mult" in captured.out
    assert cli(args[:-2] + ["--workers", "0"]) == 2
    assert "workers=0" in capsys.readouterr().err
