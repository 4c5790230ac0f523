"""What a transfer sweep consists of: the trials (their identities), the hyperparameter points
(a grid, or a random draw with Optuna's ``RandomSampler``), and the run of one trial.

A trial is ``parametrization x size x run x hyperparameters x seed``: ``size`` holds the
constructor kwargs that change between proxy and target (width, depth), ``run`` the training
knobs that do (``steps``, ``batch``; None when the sweep has one fixed run). Its identity is the
values of :data:`TRIAL_FIELDS`, so a results file can hold many sweeps and a changed setting
never reuses a stale trial. Records written before ``run`` existed have no ``run`` field and
read back as ``run=None``, which is what a sweep without runs makes, so they keep resuming.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .build import build
from .shapes import Constructor

#: ``train(model, hparams, seed)`` returns the training losses (one per step or per eval) or one loss
TrainFn = Callable[[nn.Module, Mapping[str, float], int], "float | Sequence[float]"]

#: what identifies a trial; a stored record differing in any of these is another trial
TRIAL_FIELDS = ("model", "kwargs", "base", "delta", "tag", "parametrization", "size", "run", "hparams", "seed")

#: how :func:`hparam_points` draws the points
SEARCHES = ("grid", "random")


def trial_key(record: Mapping[str, Any]) -> str:
    """A trial's identity as a string: the values of :data:`TRIAL_FIELDS` (absent ones as None)."""
    return json.dumps([record.get(k) for k in TRIAL_FIELDS], sort_keys=True, default=repr)


def model_name(constructor: Constructor) -> str:
    """``module.qualname`` of a constructor (its identity in a results file)."""
    return f"{getattr(constructor, '__module__', '?')}.{getattr(constructor, '__qualname__', repr(constructor))}"


def as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists, other objects by repr)."""
    return json.loads(json.dumps(value, default=repr))


def hparam_points(grid: Mapping[str, Sequence[float]], search: str = "grid", trials: int | None = None,
                  seed: int = 0) -> list[dict[str, float]]:
    """The hyperparameter points of a sweep. ``"grid"``: the product of ``grid``'s values (all of
    them; ``trials`` must be None). ``"random"``: ``trials`` points, each hyperparameter drawn
    uniformly from its values by Optuna's ``RandomSampler(seed)`` (Bergstra & Bengio 2012), so
    the same arguments give the same points on every machine; repeated points are kept once."""
    if not grid or any(len(v) == 0 for v in grid.values()):
        raise ValueError(f"grid={dict(grid)}: every hyperparameter needs at least one value")
    if search == "grid":
        if trials is not None:
            raise ValueError(f"trials={trials} is for search='random'; a grid runs all its points")
        return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    if search != "random":
        raise ValueError(f"search={search!r}; use one of {SEARCHES}")
    if not trials or trials < 1:
        raise ValueError(f"search='random' needs trials= (how many points to draw), got {trials}")
    optuna = require_optuna("search='random'")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    space = {k: optuna.distributions.CategoricalDistribution(list(v)) for k, v in grid.items()}
    points = []
    for _ in range(trials):
        trial = study.ask(space)
        study.tell(trial, 0.0)
        point = {k: float(trial.params[k]) for k in grid}
        if point not in points:
            points.append(point)
    return points


def require_optuna(what: str):
    """The ``optuna`` module, or an ImportError saying how to install it for ``what``."""
    try:
        import optuna
    except ImportError as err:
        raise ImportError(f"{what} runs on Optuna: pip install 'mupkit[sweep]' (or pip install optuna)") from err
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def final_losses(losses: Sequence[float], tail: float = 0.1) -> tuple[float, float]:
    """(last loss, mean of the last ``tail`` fraction); inf when any loss is not finite (diverged)."""
    if not losses or not all(math.isfinite(v) for v in losses):
        return math.inf, math.inf
    n = max(1, int(len(losses) * tail))
    return float(losses[-1]), float(np.mean(losses[-n:]))


@dataclass
class TrialRunner:
    """Builds and trains the model of one trial and returns its record (the trial's identity
    plus ``final_loss``, ``tail_loss`` and ``losses``). ``train(model, hparams, seed)`` trains
    every trial, or ``trainer(**run)`` makes the train function of each run (cached per run)."""

    constructor: Constructor
    base: Mapping[str, Any]
    delta: Mapping[str, Any] | None
    kwargs: Mapping[str, Any] | Callable[[str], Mapping[str, Any]] | None
    train: TrainFn | None = None
    trainer: Callable[..., TrainFn] | None = None
    _trainers: dict[str, TrainFn] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if (self.train is None) == (self.trainer is None):
            raise ValueError("pass exactly one of train= (one training run for every trial) and trainer= "
                             "(trainer(**run) -> train function, with runs=[...])")

    def fixed(self, parametrization: str) -> dict[str, Any]:
        """The fixed constructor kwargs of ``parametrization``."""
        return dict(self.kwargs(parametrization)) if callable(self.kwargs) else dict(self.kwargs or {})

    def train_fn(self, run: Mapping[str, Any] | None) -> TrainFn:
        if self.trainer is None:
            return self.train
        if run is None:
            raise ValueError("trainer= needs runs=[{'steps': ..., 'batch': ...}, ...] (the training knobs per run)")
        key = json.dumps(run, sort_keys=True)
        if key not in self._trainers:
            self._trainers[key] = self.trainer(**run)
        return self._trainers[key]

    def __call__(self, trial: Mapping[str, Any]) -> dict[str, Any]:
        parametrization, size, hparams, seed = (trial[k] for k in ("parametrization", "size", "hparams", "seed"))
        fixed = self.fixed(parametrization)
        torch.manual_seed(seed)
        model = build(self.constructor, base={**fixed, **self.base}, target={**fixed, **size},
                      delta=None if self.delta is None else {**fixed, **self.delta}, parametrization=parametrization)
        losses = self.train_fn(trial.get("run"))(model, hparams, seed)
        losses = [float(losses)] if isinstance(losses, (int, float)) else [float(v) for v in losses]
        final, tail_mean = final_losses(losses)
        return {**trial, "final_loss": final, "tail_loss": tail_mean, "losses": losses}
