"""Zero-shot hyperparameter transfer: sweep a grid at several sizes, find where the optimum sits.

muTransfer (Tensor Programs V, Sec. 1 and Fig. 1): under muP the optimal learning rate of a
small proxy stays optimal as the model widens, while under SP it drifts. :func:`sweep` runs
``parametrization x size x hyperparameters x seed`` trials, each a fresh ``mupkit.build`` of the
constructor trained by ``train(model, hparams, seed) -> losses``. Every finished trial is
appended to a JSONL file at once, so a rerun skips what is done and an interrupted sweep
(Ctrl-C) resumes where it stopped. :class:`Sweep` gives the loss table, the optimum per size
(the grid minimum of the seed-averaged loss, refined by a quadratic fit in ``log2`` of the
swept hyperparameter through the minimum and its two neighbours), the drift of the optimum
across sizes in grid steps, a recommendation for a target size, and a figure.
"""

from __future__ import annotations

import itertools
import json
import math
import pathlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .build import build
from .progress import progress
from .shapes import Constructor

#: ``train(model, hparams, seed)`` returns the training losses (one per step or per eval) or one loss
TrainFn = Callable[[nn.Module, Mapping[str, float], int], "float | Sequence[float]"]


#: what identifies a trial; a stored record differing in any of these is another trial
TRIAL_FIELDS = ("model", "kwargs", "base", "delta", "tag", "parametrization", "size", "hparams", "seed")


def _key(record: Mapping[str, Any]) -> str:
    """A trial's identity: the values of :data:`TRIAL_FIELDS` (model, fixed kwargs, the base and
    delta sizes the parametrization is relative to, tag, parametrization, size, hyperparameters, seed)."""
    return json.dumps([record.get(k) for k in TRIAL_FIELDS], sort_keys=True, default=repr)


def model_name(constructor: Constructor) -> str:
    """``module.qualname`` of a constructor (its identity in a results file)."""
    return f"{getattr(constructor, '__module__', '?')}.{getattr(constructor, '__qualname__', repr(constructor))}"


def _final(losses: Sequence[float], tail: float = 0.1) -> tuple[float, float]:
    """(last loss, mean of the last ``tail`` fraction); inf when any loss is not finite (diverged)."""
    if not losses or not all(math.isfinite(v) for v in losses):
        return math.inf, math.inf
    n = max(1, int(len(losses) * tail))
    return float(losses[-1]), float(np.mean(losses[-n:]))


def sweep(constructor: Constructor, sizes: Sequence[int | Mapping[str, Any]], *, base: Mapping[str, Any],
          grid: Mapping[str, Sequence[float]], train: TrainFn, parametrizations: Sequence[str] = ("mup",),
          seeds: Sequence[int] | int = 2, results: str | pathlib.Path | None = None, width_arg: str = "width",
          kwargs: Mapping[str, Any] | Callable[[str], Mapping[str, Any]] | None = None,
          along: str | None = None, delta: Mapping[str, Any] | None = None, tag: str = "",
          show_progress: bool = True) -> "Sweep":
    """Run (or resume) the sweep and return its :class:`Sweep`.

    ``sizes``: widths (the constructor kwarg ``width_arg``) or full kwarg dicts (e.g. depths);
    ``base``: the sizes the parametrization is relative to; ``grid``: hyperparameter -> values,
    swept as a product (``along``: the one the optimum is fitted along, default the first);
    ``kwargs``: fixed constructor kwargs, or ``parametrization -> kwargs``; ``results``: the JSONL
    file trials are appended to and resumed from (None: keep them in memory only); ``delta``: the
    width probe for shape inference (default: ``base`` with ``width_arg`` doubled); ``tag``: what
    else defines a trial (e.g. ``"steps=200"``). A trial is identified by the constructor's name,
    its fixed kwargs, the base and delta sizes, the tag, parametrization, size, hyperparameters and
    seed, so one results file can hold several models and a changed setting never reuses stale trials.
    """
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    along = along or next(iter(grid))
    if along not in grid:
        raise ValueError(f"along={along!r} is not a swept hyperparameter; the grid has {list(grid)}")
    if delta is None and width_arg in base:
        delta = {**base, width_arg: 2 * base[width_arg]}
    path = pathlib.Path(results) if results is not None else None
    records = load_records(path) if path is not None and path.exists() else []
    done = {_key(r) for r in records}
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    name = model_name(constructor)

    def identity(parametrization: str, size: dict[str, Any], hparams: dict[str, float], seed: int) -> dict[str, Any]:
        fixed = kwargs(parametrization) if callable(kwargs) else dict(kwargs or {})
        return {"model": name, "kwargs": _as_json(fixed), "base": _as_json(base),
                "delta": None if delta is None else _as_json(delta), "tag": tag,
                "parametrization": parametrization, "size": size, "hparams": hparams, "seed": seed}

    trials = [identity(p, _as_size(s, width_arg), h, seed) for p in parametrizations for s in sizes for h in points
              for seed in seeds]
    todo = [t for t in trials if _key(t) not in done]
    for trial in progress(todo, "transfer", enabled=show_progress,
                          label=lambda t: f"{t['parametrization']} {_size_label(t['size'])} "
                                          f"{_hparams_label(t['hparams'])} seed {t['seed']}"):
        parametrization, size, hparams, seed = (trial[k] for k in ("parametrization", "size", "hparams", "seed"))
        fixed = kwargs(parametrization) if callable(kwargs) else dict(kwargs or {})
        torch.manual_seed(seed)
        model = build(constructor, base={**fixed, **base}, target={**fixed, **size},
                      delta=None if delta is None else {**fixed, **delta}, parametrization=parametrization)
        losses = train(model, hparams, seed)
        losses = [float(losses)] if isinstance(losses, (int, float)) else [float(v) for v in losses]
        final, tail_mean = _final(losses)
        record = {**trial, "final_loss": final, "tail_loss": tail_mean, "losses": losses}
        records.append(record)
        if path is not None:
            _append(path, record)
    wanted = {_key(t) for t in trials}
    return Sweep([r for r in records if _key(r) in wanted], along, width_arg)


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


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists, other objects by repr)."""
    return json.loads(json.dumps(value, default=repr))


def _as_size(size: int | Mapping[str, Any], width_arg: str) -> dict[str, Any]:
    return {width_arg: size} if isinstance(size, int) else dict(size)


def _size_label(size: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in size.items())


def _hparams_label(hparams: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.3g}" for k, v in hparams.items())


@dataclass(frozen=True)
class Optimum:
    """The best value of the swept hyperparameter at one size."""

    parametrization: str
    size: Mapping[str, Any]
    grid_best: float  # the grid point with the lowest seed-averaged loss
    fitted: float  # refined by a quadratic in log2 through the minimum and its neighbours
    loss: float  # seed-averaged loss at grid_best
    others: Mapping[str, float]  # the other hyperparameters at that point
    at_edge: bool  # the minimum sits at the grid's edge: the true optimum may lie outside


@dataclass
class Sweep:
    """The trials of a sweep (one dict per trial) and what they say about transfer."""

    records: list[dict[str, Any]]
    along: str = "lr"
    width_arg: str = "width"
    metric: str = "tail_loss"

    def losses(self, parametrization: str) -> dict[str, dict[float, list[float]]]:
        """size (JSON) -> swept value -> per-seed losses (``metric``), the other hyperparameters
        fixed at the size's optimum."""
        best = {json.dumps(o.size, sort_keys=True): o.others for o in self.optima(parametrization)}
        out: dict[str, dict[float, list[float]]] = {}
        for r in self.records:
            size = json.dumps(r["size"], sort_keys=True)
            others = {k: v for k, v in r["hparams"].items() if k != self.along}
            if r["parametrization"] == parametrization and others == best[size]:
                out.setdefault(size, {}).setdefault(r["hparams"][self.along], []).append(r[self.metric])
        return out

    @property
    def parametrizations(self) -> list[str]:
        return list(dict.fromkeys(r["parametrization"] for r in self.records))

    def sizes(self, parametrization: str) -> list[dict[str, Any]]:
        sizes = {json.dumps(r["size"], sort_keys=True) for r in self.records if r["parametrization"] == parametrization}
        return sorted((json.loads(s) for s in sizes), key=lambda s: tuple(sorted(s.items())))

    def optima(self, parametrization: str) -> list[Optimum]:
        """One :class:`Optimum` per size, smallest size first."""
        out = []
        for size in self.sizes(parametrization):
            means: dict[tuple, list[float]] = {}
            for r in self.records:
                if r["parametrization"] == parametrization and r["size"] == size:
                    key = tuple(sorted(r["hparams"].items()))
                    means.setdefault(key, []).append(r[self.metric])
            averaged = {k: float(np.mean(v)) for k, v in means.items()}
            best = min(averaged, key=averaged.get)
            others = {k: v for k, v in best if k != self.along}
            line = sorted((dict(k)[self.along], v) for k, v in averaged.items()
                          if {a: b for a, b in k if a != self.along} == others)
            xs = [x for x, _ in line]
            i = xs.index(dict(best)[self.along])
            out.append(Optimum(parametrization, size, xs[i], _refine(line, i), averaged[best], others,
                               at_edge=i in (0, len(xs) - 1)))
        return out

    def drift(self, parametrization: str) -> float:
        """How far the optimum moves across the sizes, in grid steps: the range of the grid optima,
        ``log2(max best / min best) / log2(grid factor)`` (so 1.0 = one neighbour; a path that
        goes out and comes back counts its full excursion). The grid factor is this
        parametrization's own (the median ratio of neighbouring swept values)."""
        optima = self.optima(parametrization)
        values = sorted({r["hparams"][self.along] for r in self.records if r["parametrization"] == parametrization})
        if len(optima) < 2 or len(values) < 2:
            return 0.0
        step = float(np.median(np.diff(np.log2(values))))
        best = [o.grid_best for o in optima]
        return math.log2(max(best) / min(best)) / step

    def recommend(self, parametrization: str, target: int | Mapping[str, Any]) -> tuple[float, str]:
        """The swept hyperparameter for a ``target`` size, and how it was chosen: the largest
        swept size's fitted optimum when it did not drift (muTransfer), else a log-log linear
        extrapolation of the fitted optima against width."""
        optima = self.optima(parametrization)
        width = target if isinstance(target, int) else target[self.width_arg]
        if self.drift(parametrization) <= 1.0 or len(optima) < 2:
            return optima[-1].fitted, f"transferred from {_size_label(optima[-1].size)} (drift <= 1 grid step)"
        ws = np.log2([o.size[self.width_arg] for o in optima])
        ys = np.log2([o.fitted for o in optima])
        slope, icpt = np.polyfit(ws, ys, 1)
        return float(2 ** (icpt + slope * math.log2(width))), f"extrapolated: optimum ~ width^{slope:+.2f}"

    def summary(self, target: int | Mapping[str, Any] | None = None) -> str:
        """The optimum table per parametrization, the drift, and (with ``target``) a recommendation."""
        lines = []
        for p in self.parametrizations:
            lines.append(f"{p}: optimum {self.along} per size (metric {self.metric})")
            lines.append(f"  {'size':24s} {'grid best':>10s} {'fitted':>10s} {'loss':>8s}")
            for o in self.optima(p):
                edge = "  (at the grid's edge)" if o.at_edge else ""
                lines.append(f"  {_size_label(o.size):24s} {o.grid_best:10.3g} {o.fitted:10.3g} {o.loss:8.4f}{edge}")
            lines.append(f"  drift across sizes: {self.drift(p):.1f} grid steps")
            if target is not None:
                value, how = self.recommend(p, target)
                lines.append(f"  recommended {self.along} at {target}: {value:.3g} ({how})")
        return "\n".join(lines)

    def plot(self, path: str, *, title: str | None = None) -> None:
        """Loss against the swept hyperparameter (log2 axis), one curve per size with a seed band,
        the optimum marked; one panel per parametrization, side by side with a shared y axis."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        params = self.parametrizations
        fig, axes = plt.subplots(1, len(params), figsize=(5 * len(params), 4), sharey=True, squeeze=False)
        finite = [r[self.metric] for r in self.records if math.isfinite(r[self.metric])]
        top = np.percentile(finite, 90) if finite else 1.0
        for ax, p in zip(axes[0], params):
            optima = {json.dumps(o.size, sort_keys=True): o for o in self.optima(p)}
            sizes = self.sizes(p)
            colors = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
            for color, size in zip(colors, sizes):
                label = json.dumps(size, sort_keys=True)
                per = self.losses(p)[label]
                xs = sorted(per)
                mean = np.array([np.mean(per[x]) for x in xs])
                lo, hi = np.array([min(per[x]) for x in xs]), np.array([max(per[x]) for x in xs])
                ax.plot(xs, np.minimum(mean, top * 1.5), "-o", ms=3, color=color, label=_size_label(size))
                ax.fill_between(xs, np.minimum(lo, top * 1.5), np.minimum(hi, top * 1.5), color=color, alpha=0.15)
                o = optima[label]
                ax.plot([o.grid_best], [o.loss], "*", ms=14, color=color, mec="black")
            ax.set_xscale("log", base=2)
            if finite and min(finite) > 0:
                ax.set_yscale("log")
            ax.set(title=p, xlabel=self.along, ylabel=self.metric.replace("_", " "))
            ax.set_ylim(top=top * 1.5 if finite else None)
            ax.legend(fontsize=8)
        fig.suptitle(title or f"{self.along} transfer across sizes (star: optimum)")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _refine(line: Sequence[tuple[float, float]], i: int) -> float:
    """Vertex of the parabola in ``log2(x)`` through points ``i-1, i, i+1`` (the grid point when
    the minimum is at an edge, or a neighbour diverged)."""
    if i in (0, len(line) - 1) or not all(math.isfinite(line[j][1]) for j in (i - 1, i, i + 1)):
        return line[i][0]
    xs = np.log2([line[j][0] for j in (i - 1, i, i + 1)])
    a, b, _ = np.polyfit(xs, [line[j][1] for j in (i - 1, i, i + 1)], 2)
    if a <= 0:
        return line[i][0]
    return float(2 ** np.clip(-b / (2 * a), xs[0], xs[2]))

