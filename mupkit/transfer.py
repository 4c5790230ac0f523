"""Zero-shot hyperparameter transfer: sweep hyperparameters at several sizes, token horizons and
batch sizes, find where the optimum sits and how it scales.

muTransfer (Tensor Programs V, Sec. 1 and Fig. 1): under muP the optimal learning rate of a
small proxy stays optimal as the model widens (CompleteP: deepens), while under SP it drifts.
Along the token horizon and the batch size it moves even under muP, as a power law fitted from
short runs (Bjorck et al. 2024, "Scaling Optimal LR Across Token Horizons", Sec. 3; Shen et al.
2024, "Power Scheduler", Sec. 3; Filatov et al., "Time Transfer").

:func:`sweep` runs ``parametrization x size x run x hyperparameters x seed`` trials
(:mod:`mupkit.sweep_plan`): ``size`` the constructor kwargs (width, depth), ``run`` the training
knobs (``steps``, ``batch``, optional ``context``: the horizon is ``tokens = steps * batch *
context``), the hyperparameters a grid or a random draw. Trials run in this process, or on
``workers`` processes and other machines through an Optuna study (:mod:`mupkit.study`). Every
finished trial is appended to a JSONL file, so a rerun skips what is done and an interrupted
sweep resumes. :class:`Sweep` gives the optimum per point (the minimum of the seed-averaged loss
along ``along``, the other hyperparameters at their best, refined by a parabola in ``log2``),
its drift, power-law fits per axis and jointly with bootstrap intervals, a recommendation for a
target with its interval, per-hyperparameter sensitivity, and a figure.
"""

from __future__ import annotations

import json
import math
import pathlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .fits import PowerLaw, bootstrap, fit_power_law, refine_optimum
from .sensitivity import Sensitivity, sensitivities
from .shapes import Constructor
from .sweep_plan import TrainFn, TrialRunner, as_json, hparam_points, model_name, trial_key
from .sweep_progress import SweepProgress

#: the axes an optimum is fitted along: constructor sizes (width, depth) and run knobs (tokens, batch)
AXES = ("width", "depth", "tokens", "batch")

Point = tuple[tuple[str, float], ...]  # a hyperparameter point as sorted (name, value) pairs


def sweep(constructor: Constructor, sizes: Sequence[int | Mapping[str, Any]], *, base: Mapping[str, Any],
          grid: Mapping[str, Sequence[float]], train: TrainFn | None = None,
          trainer: Callable[..., TrainFn] | None = None, runs: Sequence[Mapping[str, Any]] | None = None,
          parametrizations: Sequence[str] = ("mup",), seeds: Sequence[int] | int = 2,
          results: str | pathlib.Path | None = None, width_arg: str = "width", depth_arg: str = "depth",
          kwargs: Mapping[str, Any] | Callable[[str], Mapping[str, Any]] | None = None,
          along: str | None = None, delta: Mapping[str, Any] | None = None, tag: str = "",
          search: str = "grid", trials: int | None = None, search_seed: int = 0, workers: int = 1,
          storage: str | None = None, study_name: str | None = None, show_progress: bool = True) -> "Sweep":
    """Run (or resume) the sweep and return its :class:`Sweep`.

    ``sizes``: widths (the constructor kwarg ``width_arg``) or full kwarg dicts (e.g. depths);
    ``base``: the sizes the parametrization is relative to; ``grid``: hyperparameter -> values
    (``along``: the one the optimum is fitted along, default the first); ``search``: ``"grid"``
    (their product) or ``"random"`` (``trials`` points drawn by Optuna's RandomSampler with
    ``search_seed``); ``train(model, hparams, seed) -> losses`` trains every trial, or
    ``trainer(**run) -> train`` per entry of ``runs`` (e.g. ``{"steps": 200, "batch": 16}``);
    ``kwargs``: fixed constructor kwargs, or ``parametrization -> kwargs``; ``results``: the JSONL
    file trials are appended to and resumed from (None: in memory only); ``delta``: the width
    probe for shape inference (default: ``base`` with ``width_arg`` doubled); ``tag``: what else
    defines a trial. ``workers``/``storage``: with ``workers > 1`` or a ``storage`` URL the trials
    run through an Optuna study (default storage: SQLite next to ``results``); another process
    running the same sweep against the same ``storage`` shares the work.
    """
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if workers < 1:
        raise ValueError(f"workers={workers}; use 1 (trials in this process) or more (--workers N)")
    along = along or next(iter(grid))
    if along not in grid:
        raise ValueError(f"along={along!r} is not a swept hyperparameter; the grid has {list(grid)}")
    if runs is not None and (not runs or not all(isinstance(r, Mapping) for r in runs)):
        raise ValueError(f"runs={runs!r}: give a non-empty list of dicts of training knobs, e.g. "
                         f"[{{'steps': 100, 'batch': 16}}, {{'steps': 200, 'batch': 16}}]")
    if delta is None and width_arg in base:
        delta = {**base, width_arg: 2 * base[width_arg]}
    runner = TrialRunner(constructor, base, delta, kwargs, train=train, trainer=trainer)
    path = pathlib.Path(results) if results is not None else None
    records = load_records(path) if path is not None and path.exists() else []
    done = {trial_key(r) for r in records}
    name = model_name(constructor)

    def identity(parametrization: str, size: dict[str, Any], run: Mapping[str, Any] | None,
                 hparams: dict[str, float], seed: int) -> dict[str, Any]:
        return {"model": name, "kwargs": as_json(runner.fixed(parametrization)), "base": as_json(base),
                "delta": None if delta is None else as_json(delta), "tag": tag,
                "parametrization": parametrization, "size": size, "run": None if run is None else as_json(run),
                "hparams": hparams, "seed": seed}

    trials_ = [identity(p, _as_size(s, width_arg), run, h, seed) for p in parametrizations for s in sizes
               for run in (runs or [None]) for h in hparam_points(grid, search, trials, search_seed) for seed in seeds]
    todo = [t for t in trials_ if trial_key(t) not in done]

    def keep(record: dict[str, Any]) -> None:
        if trial_key(record) in done:
            return
        done.add(trial_key(record))
        records.append(record)
        if path is not None:
            _append(path, record)

    if workers == 1 and storage is None:
        bar = SweepProgress("transfer", len(todo), enabled=show_progress)
        for i, trial in enumerate(todo):
            bar.update(i, 1, note=_trial_label(trial))
            keep(runner(trial))
        bar.close()
    else:
        from .study import default_storage, run_study

        if storage is None and path is None:
            raise ValueError(f"workers={workers} runs trials through an Optuna study; give results= (the "
                             f"study goes to an SQLite file next to it) or storage= (a database URL)")
        run_study(todo, runner, storage=storage or default_storage(path), study_name=study_name,
                  workers=workers, on_record=keep, show_progress=show_progress)
    wanted = {trial_key(t) for t in trials_}
    return Sweep([r for r in records if trial_key(r) in wanted], along, width_arg, depth_arg)


def load_records(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """The trials stored in a sweep's JSONL file (a torn last line, from a kill mid-write, is skipped)."""
    out = []
    for line in pathlib.Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _append(path: pathlib.Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line; first end a torn last line (a kill mid-write) so this record stays whole."""
    torn = False
    if path.exists() and path.stat().st_size:
        with path.open("rb") as f:
            f.seek(-1, 2)
            torn = f.read(1) != b"\n"
    with path.open("a") as f:
        f.write(("\n" if torn else "") + json.dumps(record) + "\n")


def _as_size(size: int | Mapping[str, Any], width_arg: str) -> dict[str, Any]:
    return {width_arg: size} if isinstance(size, int) else dict(size)


def _label(values: Mapping[str, Any] | None) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in (values or {}).items())


def _trial_label(t: Mapping[str, Any]) -> str:
    return f"{t['parametrization']} {_label(t['size'])} {_label(t.get('run'))} {_label(t['hparams'])} seed {t['seed']}"


@dataclass(frozen=True)
class Optimum:
    """The best value of the swept hyperparameter at one point (size and run)."""

    parametrization: str
    size: Mapping[str, Any]
    grid_best: float  # the grid point with the lowest seed-averaged loss
    fitted: float  # refined by a quadratic in log2 through the minimum and its neighbours
    loss: float  # seed-averaged loss at grid_best
    others: Mapping[str, float]  # the other hyperparameters at that point
    at_edge: bool  # the minimum sits at the grid's edge: the true optimum may lie outside
    run: Mapping[str, Any] | None = None  # the training knobs (steps, batch, ...), None for one fixed run


@dataclass(frozen=True)
class Recommendation:
    """The swept hyperparameter for a target, its interval (:data:`mupkit.fits.LEVEL`) and how it was found."""

    value: float
    low: float
    high: float
    how: str


@dataclass(frozen=True)
class AxisFit:
    """The optimum's power law along one axis, the other varied axes held at ``fixed``."""

    axis: str
    fixed: Mapping[str, float]
    law: PowerLaw


@dataclass
class Sweep:
    """The trials of a sweep (one dict per trial) and what they say about transfer."""

    records: list[dict[str, Any]]
    along: str = "lr"
    width_arg: str = "width"
    depth_arg: str = "depth"
    metric: str = "tail_loss"
    replicates: int = 200  # bootstrap resamplings behind every interval

    def __post_init__(self) -> None:
        unique: dict[str, dict[str, Any]] = {}
        for r in self.records:  # a trial exported twice (two processes, one file) counts once
            unique.setdefault(trial_key(r), r)
        self.records = list(unique.values())

    @property
    def parametrizations(self) -> list[str]:
        return list(dict.fromkeys(r["parametrization"] for r in self.records))

    def sizes(self, parametrization: str) -> list[dict[str, Any]]:
        sizes = {json.dumps(r["size"], sort_keys=True) for r in self.records if r["parametrization"] == parametrization}
        return sorted((json.loads(s) for s in sizes), key=lambda s: tuple(sorted(s.items())))

    def table(self, parametrization: str) -> dict[str, dict[Point, list[float]]]:
        """point (``{"size", "run"}`` as JSON) -> hyperparameter point -> per-seed losses (``metric``)."""
        out: dict[str, dict[Point, list[float]]] = {}
        for r in self.records:
            if r["parametrization"] == parametrization:
                point = json.dumps({"size": r["size"], "run": r.get("run")}, sort_keys=True)
                out.setdefault(point, {}).setdefault(tuple(sorted(r["hparams"].items())), []).append(r[self.metric])
        return out

    def losses(self, parametrization: str) -> dict[str, dict[float, list[float]]]:
        """point (JSON, see :meth:`table`) -> swept value -> per-seed losses of the best
        hyperparameter point with that value (the profile the optimum is read from; with one
        swept hyperparameter simply its losses)."""
        out: dict[str, dict[float, list[float]]] = {}
        for point, cells in self.table(parametrization).items():
            best: dict[float, tuple[float, list[float]]] = {}
            for hp, values in cells.items():
                x, mean = dict(hp)[self.along], float(np.mean(values))
                if x not in best or mean < best[x][0]:
                    best[x] = (mean, values)
            out[point] = {x: values for x, (_, values) in best.items()}
        return out

    def optima(self, parametrization: str) -> list[Optimum]:
        """One :class:`Optimum` per point, smallest size (then run) first."""
        return self._optima(self.table(parametrization), parametrization)

    def _optima(self, table: Mapping[str, Mapping[Point, Sequence[float]]], parametrization: str) -> list[Optimum]:
        out = []
        for point in sorted(table, key=_point_order):
            averaged = {k: float(np.mean(v)) for k, v in table[point].items()}
            best = min(averaged, key=averaged.get)
            profile: dict[float, float] = {}  # along-value -> best loss over the other hyperparameters
            for k, loss in averaged.items():
                x = dict(k)[self.along]
                profile[x] = min(profile.get(x, math.inf), loss)
            line = sorted(profile.items())
            xs = [x for x, _ in line]
            i = xs.index(dict(best)[self.along])
            where = json.loads(point)
            out.append(Optimum(parametrization, where["size"], xs[i], refine_optimum(line, i), averaged[best],
                               {k: v for k, v in best if k != self.along}, at_edge=i in (0, len(xs) - 1),
                               run=where["run"]))
        return out

    def axis_value(self, optimum: Optimum, axis: str) -> float | None:
        """Where ``optimum`` sits along ``axis`` (:data:`AXES`): its width or depth kwarg, its run's
        ``tokens = steps * batch * context`` (context 1 when the run does not set it), or its
        batch; None when the point does not say."""
        if axis not in AXES:
            raise ValueError(f"axis={axis!r}; use one of {AXES}")
        if axis in ("width", "depth"):
            return optimum.size.get(self.width_arg if axis == "width" else self.depth_arg)
        run = optimum.run or {}
        if axis == "batch":
            return run.get("batch")
        if "steps" in run and "batch" in run:
            return run["steps"] * run["batch"] * run.get("context", 1)
        return None

    def varied_axes(self, parametrization: str) -> list[str]:
        """The axes along which this parametrization's points take more than one value."""
        optima = self.optima(parametrization)
        return [a for a in AXES if len({self.axis_value(o, a) for o in optima}) > 1]

    def drift(self, parametrization: str, axis: str | None = None) -> float:
        """How far the optimum moves, in grid steps: the range of the grid optima,
        ``log2(max best / min best) / log2(grid factor)`` (1.0 = one neighbour; a path that goes
        out and comes back counts its full excursion), over all points, or with ``axis`` the
        largest such range along that axis with the other varied axes held fixed. The grid
        factor is this parametrization's own (the median ratio of neighbouring swept values)."""
        optima = self.optima(parametrization)
        values = sorted({r["hparams"][self.along] for r in self.records if r["parametrization"] == parametrization})
        if len(optima) < 2 or len(values) < 2:
            return 0.0
        step = float(np.median(np.diff(np.log2(values))))
        groups = [optima] if axis is None else [g for _, g in self._groups(parametrization, optima, axis)]
        ranges = [math.log2(max(o.grid_best for o in g) / min(o.grid_best for o in g)) for g in groups]
        return max(ranges, default=0.0) / step

    def _groups(self, parametrization: str, optima: Sequence[Optimum], axis: str):
        """``(fixed values of the other varied axes, optima)`` per group varying along ``axis``."""
        others = [a for a in self.varied_axes(parametrization) if a != axis]
        groups: dict[str, list[Optimum]] = {}
        for o in optima:
            groups.setdefault(json.dumps({a: self.axis_value(o, a) for a in others}), []).append(o)
        return [(json.loads(k), g) for k, g in groups.items() if len({self.axis_value(o, axis) for o in g}) > 1]

    def _law(self, optima: Sequence[Optimum], axes: Sequence[str]) -> PowerLaw:
        return fit_power_law([({a: self.axis_value(o, a) for a in axes}, o.fitted) for o in optima], axes)

    def _replicate(self, parametrization: str, rng: np.random.Generator,
                   select: Callable[[Optimum], bool], axes: Sequence[str]) -> PowerLaw:
        """One bootstrap refit: every grid cell's seeds resampled, then the fitted points (cases)
        resampled when there are enough of them: a draw must hold ``len(axes) + 2`` distinct
        points and span the axes (fewer make a near-interpolation whose slope is noise)."""
        table = {p: {k: rng.choice(v, len(v)) for k, v in cells.items()}
                 for p, cells in self.table(parametrization).items()}
        optima = [o for o in self._optima(table, parametrization) if select(o)]
        if len(optima) >= len(axes) + 3:
            for _ in range(100):
                picks = rng.integers(0, len(optima), len(optima))
                if len(set(picks.tolist())) >= len(axes) + 2:
                    try:
                        return self._law([optima[i] for i in picks], axes)
                    except ValueError:
                        continue
        return self._law(optima, axes)

    def _fit(self, parametrization: str, select: Callable[[Optimum], bool], axes: Sequence[str],
             at: Mapping[str, float] | None = None) -> tuple[PowerLaw, tuple[float, float] | None]:
        """The law through the selected optima with exponent intervals, and (``at``) the interval
        of its prediction there."""
        law = self._law([o for o in self.optima(parametrization) if select(o)], axes)

        def estimate(rng: np.random.Generator) -> dict[str, float]:
            rep = self._replicate(parametrization, rng, select, axes)
            return {**rep.exponents, **({"@": rep(**at)} if at is not None else {})}

        bands = bootstrap(estimate, self.replicates)
        law = PowerLaw(law.coefficient, law.exponents, {a: bands[a] for a in axes})
        return law, bands.get("@")

    def fits(self, parametrization: str, axis: str) -> list[AxisFit]:
        """The optimum's power law along ``axis``, one per group of points that differ only there
        (e.g. along tokens: one per batch size), exponent intervals by bootstrap."""
        out = []
        for fixed, group in self._groups(parametrization, self.optima(parametrization), axis):
            keys = {_point_id(o) for o in group}
            law, _ = self._fit(parametrization, lambda o, keys=keys: _point_id(o) in keys, [axis])
            out.append(AxisFit(axis, fixed, law))
        return out

    def scaling(self, parametrization: str) -> PowerLaw:
        """One power law in every varied axis through all optima, exponent intervals by bootstrap."""
        axes = self.varied_axes(parametrization)
        if not axes:
            raise ValueError(f"{parametrization}: every point sits at the same width, depth, tokens and batch; "
                             f"a scaling law needs a sweep over several values of one of them")
        return self._fit(parametrization, lambda o: True, axes)[0]

    def recommend(self, parametrization: str, target: int | Mapping[str, Any] | None = None, *,
                  width: float | None = None, depth: float | None = None, tokens: float | None = None,
                  batch: float | None = None) -> Recommendation:
        """The swept hyperparameter for a target (``target``: a width or a size dict; or by axis),
        with its bootstrap interval. Every varied axis needs a target value. The joint power law
        (:meth:`scaling`) is evaluated there, except that a width or depth axis along which the
        optimum drifted at most one grid step is taken as transferred (the muP/CompleteP claim):
        beyond the swept range it is held at the nearest swept value instead of extrapolating a
        slope that is noise."""
        given = {"width": width, "depth": depth, "tokens": tokens, "batch": batch}
        if target is not None:
            size = {self.width_arg: target} if isinstance(target, int) else dict(target)
            given["width"] = size.get(self.width_arg, width)
            given["depth"] = size.get(self.depth_arg, depth)
        optima = self.optima(parametrization)
        axes = self.varied_axes(parametrization)
        for a, v in given.items():
            swept = {self.axis_value(o, a) for o in optima}
            if a not in axes and v is not None and swept != {v}:
                raise ValueError(f"{a}={v}: the sweep did not vary {a} (every trial at {sorted(swept, key=str)}), "
                                 f"so its effect on the optimum is unknown; sweep several {a} values")
        missing = [a for a in axes if given[a] is None]
        if missing:
            raise ValueError(f"give the target's {', '.join(f'{a}=' for a in missing)} (the sweep varied "
                             f"{', '.join(missing)})")
        if not axes:
            return Recommendation(optima[0].fitted, *self._single_interval(parametrization),
                                  "the swept optimum (no axis varied)")
        at, notes = {}, []
        for a in axes:
            at[a] = given[a]
            if a in ("width", "depth") and self.drift(parametrization, a) <= 1.0:
                swept = [self.axis_value(o, a) for o in optima]
                at[a] = min(max(given[a], min(swept)), max(swept))
                notes.append(f"transferred along {a} from {a}={at[a]:g} (drift <= 1 grid step)")
        law, band = self._fit(parametrization, lambda o: True, axes, at)
        how = "; ".join(notes + ([f"extrapolated: optimum ~ {law.describe(self.along + '*')}"]
                                 if len(notes) < len(axes) else []))
        return Recommendation(law(**at), band[0], band[1], how)

    def _single_interval(self, parametrization: str) -> tuple[float, float]:
        """The interval of a single point's optimum (seeds resampled)."""
        table = self.table(parametrization)

        def estimate(rng: np.random.Generator) -> dict[str, float]:
            resampled = {p: {k: rng.choice(v, len(v)) for k, v in c.items()} for p, c in table.items()}
            return {"@": self._optima(resampled, parametrization)[0].fitted}

        return bootstrap(estimate, self.replicates)["@"]

    def sensitivity(self, parametrization: str) -> dict[str, list[Sensitivity]]:
        """point (JSON, see :meth:`table`) -> one :class:`~mupkit.sensitivity.Sensitivity` per
        hyperparameter that takes several values."""
        return {p: sensitivities({k: float(np.mean(v)) for k, v in cells.items()})
                for p, cells in self.table(parametrization).items()}

    def summary(self, target: int | Mapping[str, Any] | None = None, **axes: float) -> str:
        """The optimum table per parametrization, the drift, the power laws along each varied axis
        with intervals, per-hyperparameter sensitivity when several were swept, and (with ``target``
        or axis values) a recommendation."""
        lines = []
        for p in self.parametrizations:
            optima = self.optima(p)
            lines.append(f"{p}: optimum {self.along} per size (metric {self.metric})")
            lines.append(f"  {'size':24s} {'run':22s} {'grid best':>10s} {'fitted':>10s} {'loss':>8s}")
            for o in optima:
                edge = "  (at the grid's edge)" if o.at_edge else ""
                lines.append(f"  {_label(o.size):24s} {_label(o.run):22s} {o.grid_best:10.3g} {o.fitted:10.3g} "
                             f"{o.loss:8.4f}{edge}")
            lines.append(f"  drift across sizes: {self.drift(p):.1f} grid steps")
            seeds = {len(v) for cells in self.table(p).values() for v in cells.values()}
            if min(seeds) < 2:
                lines.append("  (one seed per cell: intervals only resample the fitted points, and only where a fit "
                             "has len(axes) + 3 of them; otherwise they are a single value)")
            for axis in self.varied_axes(p):
                for fit in self.fits(p, axis):
                    where = f" at {_label(fit.fixed)}" if fit.fixed else ""
                    lines.append(f"  along {axis}{where}: {fit.law.describe(self.along + '*')}")
            for point, sens in self.sensitivity(p).items():
                if len(sens) > 1:
                    where = json.loads(point)
                    lines.append(f"  sensitivity at {_label(where['size'])} {_label(where['run'])} "
                                 f"(loss lost one grid step from the best):")
                    for s in sorted(sens, key=lambda s: -s.cost):
                        lines.append(f"    {s.hparam:16s} best {s.best:10.3g}   +{s.cost:.4f}")
            if target is not None or axes:
                rec = self.recommend(p, target, **axes)
                at = " ".join(([str(target)] if target is not None else []) + ([_label(axes)] if axes else []))
                lines.append(f"  recommended {self.along} at {at}: {rec.value:.3g} [{rec.low:.3g}, {rec.high:.3g}] "
                             f"({rec.how})")
        return "\n".join(lines)

    def plot(self, path: str, *, title: str | None = None) -> None:
        """Loss against the swept hyperparameter (log2 axis), one curve per point with a seed band,
        the optimum marked, one panel per parametrization (shared y axis); with several swept
        hyperparameters a second row of sensitivity panels (loss profile per hyperparameter)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        params = self.parametrizations
        swept = sorted({s.hparam for p in params for sens in self.sensitivity(p).values() for s in sens})
        rows, cols = (2 if len(swept) > 1 else 1), max(len(params), len(swept) if len(swept) > 1 else 1)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
        finite = [r[self.metric] for r in self.records if math.isfinite(r[self.metric])]
        top = np.percentile(finite, 90) if finite else 1.0
        for ax, p in zip(axes[0], params):
            curves = self.losses(p)
            colors = plt.cm.viridis(np.linspace(0, 0.9, len(curves)))
            for color, o in zip(colors, self.optima(p)):
                per = curves[_point_id(o)]
                xs = sorted(per)
                mean = np.array([np.mean(per[x]) for x in xs])
                lo, hi = np.array([min(per[x]) for x in xs]), np.array([max(per[x]) for x in xs])
                ax.plot(xs, np.minimum(mean, top * 1.5), "-o", ms=3, color=color, label=f"{_label(o.size)} "
                                                                                       f"{_label(o.run)}")
                ax.fill_between(xs, np.minimum(lo, top * 1.5), np.minimum(hi, top * 1.5), color=color, alpha=0.15)
                ax.plot([o.grid_best], [o.loss], "*", ms=14, color=color, mec="black")
            ax.set_xscale("log", base=2)
            ax.set(title=p, xlabel=self.along, ylabel=self.metric.replace("_", " "))
            ax.set_ylim(top=top * 1.5 if finite else None)
            ax.legend(fontsize=7)
        if rows == 2:
            for ax, h in zip(axes[1], swept):
                for p in params:
                    for point, sens in self.sensitivity(p).items():
                        for s in sens:
                            if s.hparam == h:
                                where = json.loads(point)
                                ax.plot(s.values, np.minimum(s.profile, top * 1.5), "-o", ms=3,
                                        label=f"{p} {_label(where['size'])} {_label(where['run'])}")
                ax.set_xscale("log", base=2)
                ax.set(title=f"sensitivity: {h}", xlabel=h, ylabel=f"best {self.metric.replace('_', ' ')}")
                ax.legend(fontsize=7)
        for ax in axes.flat[len(params):cols]:
            ax.set_visible(False)
        fig.suptitle(title or f"{self.along} transfer (star: optimum)")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _point_id(optimum: Optimum) -> str:
    """The JSON key of an optimum's point, as in :meth:`Sweep.table`."""
    return json.dumps({"size": optimum.size, "run": optimum.run}, sort_keys=True)


def _point_order(point: str) -> tuple:
    where = json.loads(point)
    return tuple(sorted(where["size"].items())), tuple(sorted((where["run"] or {}).items()))
