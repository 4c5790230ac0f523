"""Trials in parallel through Optuna (the ``sweep`` extra): one study in an RDB storage, any number
of worker processes on any number of machines taking trials from it.

* Storage: ``sqlite:///file.db`` (embedded, the default next to the results file) or a
  PostgreSQL/MySQL URL that every machine of a cluster reaches; each machine runs the same
  sweep (``mupkit transfer --storage URL``) and takes trials nobody has started.
* Plan: every trial the sweep still needs is enqueued once as a WAITING Optuna trial carrying
  its identity (``user_attrs["mupkit.key"]``); ``study.ask()`` pops a waiting trial atomically in
  the storage, so two workers never take the same one.
* Failures: a worker beats a heartbeat while it trains; a trial whose heartbeat stops for
  ``grace_period`` seconds (its worker was killed) is failed by ``fail_stale_trials`` and re-enqueued
  by Optuna's ``RetryHeartbeatStaleTrialCallback``. A trial is counted once: its record is read from the
  COMPLETE trial of its key, and a popped trial whose key is already complete or running under a
  lower trial number is pruned, not run. An exception in a training run fails the trial with
  its traceback and stops the sweep (a bug is not retried).
* Workers: ``workers`` processes forked from this one, one per GPU when CUDA devices are
  present (``torch.cuda.set_device``), else CPU processes with the cores split between them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import pathlib
import socket
import sys
import threading
import time
import traceback
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch

from .sweep_plan import require_optuna, trial_key
from .sweep_progress import SweepProgress

KEY, TRIAL, RECORD, WORKER, ERROR, NOTE = (f"mupkit.{k}" for k in ("key", "trial", "record", "worker", "error",
                                                                   "note"))

#: seconds between heartbeats, and silence after which a running trial counts as dead
HEARTBEAT_INTERVAL, GRACE_PERIOD = 5, 20
#: a killed trial is retried at most this many times (Optuna's RetryHeartbeatStaleTrialCallback)
MAX_RETRY = 3


def default_storage(results: str | pathlib.Path) -> str:
    """The embedded SQLite study next to a results file: ``sweep.jsonl -> sqlite:///sweep.optuna.db``."""
    return f"sqlite:///{pathlib.Path(results).with_suffix('.optuna.db')}"


def study_name_for(keys: Sequence[str]) -> str:
    """A name every process running the same sweep derives alike: a digest of its trial keys."""
    return "mupkit-" + hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:12]


def open_storage(url: str):
    """An Optuna ``RDBStorage`` with heartbeats and retry of dead workers' trials (SQLite gets a
    30 s lock timeout, so several local processes can write to one file). Heartbeat and grace
    period: the module's :data:`HEARTBEAT_INTERVAL` and :data:`GRACE_PERIOD`, read at call time."""
    optuna = require_optuna("a sweep with workers or storage")
    if "://" not in url:
        raise ValueError(f"storage={url!r} is not a database URL; use sqlite:///path.db or "
                         f"postgresql://user:pass@host/db (or mysql://...)")
    engine_kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else None
    with warnings.catch_warnings():  # heartbeats and their retry callback are marked experimental
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))


@contextlib.contextmanager
def claim_lock(url: str):
    """Exclusive between the processes of one machine while a trial is popped or the plan is
    enqueued, for SQLite: Optuna pops a waiting trial by reading then updating it, which a row lock
    makes atomic on PostgreSQL/MySQL but not on SQLite, where two processes could both take one
    trial. A PostgreSQL/MySQL URL needs no lock."""
    if not url.startswith("sqlite:///"):
        yield
        return
    with open(url[len("sqlite:///"):] + ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load(url: str, name: str):
    optuna = require_optuna("a sweep with workers or storage")
    storage = open_storage(url)
    return storage, optuna.create_study(storage=storage, study_name=name, direction="minimize", load_if_exists=True)


def _by_state(study) -> dict[str, dict[str, list]]:
    """key -> state name -> trials (FrozenTrial) of that key."""
    out: dict[str, dict[str, list]] = {}
    for t in study.get_trials(deepcopy=False):
        key = t.user_attrs.get(KEY)
        if key is not None:
            out.setdefault(key, {}).setdefault(t.state.name, []).append(t)
    return out


def enqueue(study, trials: Sequence[Mapping[str, Any]]) -> int:
    """Enqueue the trials whose key has no waiting, running or complete trial yet; how many."""
    present = _by_state(study)
    added = 0
    for t in trials:
        key = trial_key(t)
        if not {"WAITING", "RUNNING", "COMPLETE"} & set(present.get(key, {})):
            study.enqueue_trial({}, user_attrs={KEY: key, TRIAL: json.dumps(t)})
            added += 1
    return added


def completed_records(study, keys: set[str]) -> dict[str, dict[str, Any]]:
    """key -> the record of its complete trial, for ``keys``."""
    return {k: json.loads(s["COMPLETE"][0].user_attrs[RECORD]) for k, s in _by_state(study).items()
            if k in keys and "COMPLETE" in s}


class _Heartbeat(threading.Thread):
    """Records the trial's heartbeat every interval until stopped."""

    def __init__(self, storage, trial_id: int, interval: float):
        super().__init__(daemon=True)
        self.storage, self.trial_id, self.interval, self.stopped = storage, trial_id, interval, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.storage.record_heartbeat(self.trial_id)


def work(url: str, name: str, keys: set[str], runner: Callable[[Mapping[str, Any]], dict[str, Any]], *,
         poll: float = 0.5) -> None:
    """One worker: take waiting trials of the study and run them until every key is complete."""
    optuna = require_optuna("a sweep with workers or storage")
    storage, study = _load(url, name)
    while True:
        optuna.storages.fail_stale_trials(study)
        states = _by_state(study)
        if all("COMPLETE" in states.get(k, {}) for k in keys):
            return
        if not any("WAITING" in s for s in states.values()):
            time.sleep(poll)  # trials still running elsewhere; a dead one comes back after the grace period
            continue
        with claim_lock(url):
            trial = study.ask()
        key = trial.user_attrs.get(KEY)
        if key is None:  # the queue emptied between the look and the pop: nothing to run
            trial.set_user_attr(NOTE, "empty queue")
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        others = [t for s in ("COMPLETE", "RUNNING") for t in _by_state(study).get(key, {}).get(s, [])
                  if t.number != trial.number and (s == "COMPLETE" or t.number < trial.number)]
        if others:  # enqueued twice (two processes planning at once): the other copy counts
            trial.set_user_attr(NOTE, f"duplicate of trial {others[0].number}")
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        trial.set_user_attr(WORKER, f"{socket.gethostname()}:{os.getpid()}")
        storage.record_heartbeat(trial._trial_id)
        beat = _Heartbeat(storage, trial._trial_id, storage.get_heartbeat_interval())
        beat.start()
        try:
            record = runner(json.loads(trial.user_attrs[TRIAL]))
        except BaseException:
            beat.stopped.set()
            trial.set_user_attr(ERROR, traceback.format_exc())
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        beat.stopped.set()
        trial.set_user_attr(RECORD, json.dumps(record))
        value = record["tail_loss"]
        study.tell(trial, value if math.isfinite(value) else math.inf)


def _worker_main(url: str, name: str, keys: set[str], runner, threads: int, gpu: int | None) -> None:
    optuna = require_optuna("a sweep with workers or storage")
    # this engine drives heartbeats and fail_stale_trials through ask/tell on purpose: Optuna's
    # warnings that heartbeats are meant for optimize() and that fail_stale_trials is experimental
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
    torch.set_num_threads(threads)
    if gpu is not None:
        torch.cuda.set_device(gpu)
    try:
        work(url, name, keys, runner)
    except KeyboardInterrupt:
        sys.exit(130)
    except BaseException:
        traceback.print_exc()  # the coordinator reports the failed trial's traceback; this covers the rest
        sys.exit(1)


def placement(workers: int) -> list[tuple[int, int | None]]:
    """``(threads, gpu)`` per worker: one GPU each when CUDA devices are present (round robin),
    else the CPU cores split evenly (at least one thread each)."""
    if workers < 1:
        raise ValueError(f"workers={workers}; use 1 or more (--workers N)")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    threads = max(1, (os.cpu_count() or 1) // workers)
    return [(threads, i % gpus if gpus else None) for i in range(workers)]


def run_study(trials: Sequence[Mapping[str, Any]], runner: Callable[[Mapping[str, Any]], dict[str, Any]], *,
              storage: str, study_name: str | None = None, workers: int = 1,
              on_record: Callable[[dict[str, Any]], None] | None = None, show_progress: bool = True,
              poll: float = 0.5) -> list[dict[str, Any]]:
    """Run ``trials`` (identities) on ``workers`` forked processes through the study ``study_name``
    (default: :func:`study_name_for` the keys) in ``storage``; other processes may join the same
    study. ``on_record`` sees each completed record once (this process writes the JSONL export).
    Returns the records of ``trials``, in their order."""
    if not trials:
        return []
    keys = [trial_key(t) for t in trials]
    name = study_name or study_name_for(keys)
    places = placement(workers)
    rdb, study = _load(storage, name)
    with claim_lock(storage):
        enqueue(study, trials)
    rdb.engine.dispose()  # the forked workers open their own connections
    wanted, seen, records = set(keys), set(), {}
    context = multiprocessing.get_context("fork")

    def start(i: int):
        threads, gpu = places[i]
        p = context.Process(target=_worker_main, args=(storage, name, wanted, runner, threads, gpu), daemon=True)
        p.start()
        return p

    procs = [start(i) for i in range(workers)]
    bar = SweepProgress("transfer", len(keys), enabled=show_progress)
    try:
        while True:
            states = _by_state(study)
            done = {k: s["COMPLETE"][0] for k, s in states.items() if k in wanted and "COMPLETE" in s}
            for key in done.keys() - seen:
                seen.add(key)
                records[key] = json.loads(done[key].user_attrs[RECORD])
                if on_record is not None:
                    on_record(records[key])
            running = sum(1 for k, s in states.items() if k in wanted and "RUNNING" in s and k not in done)
            bar.update(len(done), running)
            if len(done) == len(wanted):
                break
            for i, p in enumerate(procs):
                if p.exitcode is None:
                    continue
                if p.exitcode < 0:  # killed by a signal: its trial comes back after the grace period
                    print(f"mupkit: worker {p.pid} died (signal {-p.exitcode}); its trial will be retried, "
                          f"starting a new worker", file=sys.stderr)
                    procs[i] = start(i)
                elif p.exitcode > 0:  # an error in a training run (a clean exit means all is done)
                    failed = [t for s in states.values() for t in s.get("FAIL", []) if ERROR in t.user_attrs]
                    detail = failed[-1].user_attrs[ERROR] if failed else f"exit code {p.exitcode}"
                    raise RuntimeError(f"a sweep worker stopped before the study was complete:\n{detail}")
            time.sleep(poll)
        bar.close()
    finally:
        for p in procs:
            if p.exitcode is None:
                p.join(timeout=10 * poll)
            if p.exitcode is None:
                p.terminate()
                p.join()
    return [records[k] for k in keys]
