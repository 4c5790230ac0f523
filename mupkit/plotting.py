"""Coordinate-check figure: one panel per step, log2-log2, one line per module (or group).

Rows are parametrizations (e.g. SP above muP), columns are steps; every row's title carries
its verdict. With many modules, lines are grouped by name pattern (``blocks.*.mlp.0``: same
layer across blocks) and, if still too many, by module type; the line is the group mean and
the shaded band spans the seeds.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .verdict import verdict

if TYPE_CHECKING:
    from .coord_check import CoordCheck

LABELS = {"l1": "mean |x|", "rms": "RMS(x)", "delta_rms": "RMS(x_t - x_0)"}


def _groups(check: "CoordCheck", max_lines: int) -> dict[str, str]:
    """module -> line label."""
    modules = {r["module"]: r.get("type", "") for r in check.records if r["kind"] == check.judged_kind}
    if len(modules) <= max_lines:
        return {m: f"{m} ({t})" if t else m for m, t in modules.items()}
    pattern = {m: re.sub(r"(?<=\.)\d+(?=[.#\[]|$)|^\d+(?=[.#\[]|$)", "*", m) for m in modules}
    if len(set(pattern.values())) <= max_lines:
        return pattern
    return {m: t or "module" for m, t in modules.items()}


def _series(check: "CoordCheck", metric: str, labels: dict[str, str]):
    """label -> step -> (widths, mean over seeds, min, max) of the group-mean metric."""
    acc: dict[tuple[str, int, int, int], list[float]] = {}
    for r in check.records:
        if r["kind"] == check.judged_kind and r.get(metric, 0) > 0:
            acc.setdefault((labels[r["module"]], r["step"], r[check.axis], r["seed"]), []).append(r[metric])
    out: dict[str, dict[int, tuple]] = {}
    keys = {(lab, step) for lab, step, _, _ in acc}
    for lab, step in keys:
        widths = sorted({w for (l2, s2, w, _) in acc if (l2, s2) == (lab, step)})
        per_seed = [[np.mean(v) for (l2, s2, w2, _), v in acc.items() if (l2, s2, w2) == (lab, step, w)]
                    for w in widths]
        out.setdefault(lab, {})[step] = (widths, [np.mean(s) for s in per_seed], [min(s) for s in per_seed],
                                         [max(s) for s in per_seed])
    return out


def plot(checks: Sequence["CoordCheck"], path: str, *, metric: str = "l1", max_lines: int = 12,
         tolerance: float = 0.1) -> None:
    """Write the figure for one or more checks (one row each) to ``path`` (PNG, PDF, SVG...)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # plot extra
        raise ImportError("plotting needs matplotlib: pip install 'mupkit[plot]'") from err
    steps = sorted({r["step"] for c in checks for r in c.records})
    label_maps = [_groups(c, max_lines) for c in checks]
    labels = sorted({lab for m in label_maps for lab in m.values()})
    colors = {lab: _color(i, len(labels)) for i, lab in enumerate(labels)}
    fig = Figure(figsize=(2.9 * len(steps) + 3.2, 3.0 * len(checks) + 0.4), layout="constrained")
    rows = fig.subfigures(len(checks), 1, squeeze=False)[:, 0]
    for subfig, check, label_map in zip(rows, checks, label_maps):
        series = _series(check, metric, label_map)
        judged = verdict(check, metric=metric, tolerance=tolerance)
        axes = subfig.subplots(1, len(steps), squeeze=False)[0]
        for col, step in enumerate(steps):
            ax = axes[col]
            for lab in sorted(series):
                if step not in series[lab]:
                    continue
                widths, mean, lo, hi = series[lab][step]
                ax.plot(widths, mean, marker="o", ms=3, lw=1.4, color=colors[lab], label=lab)
                ax.fill_between(widths, lo, hi, color=colors[lab], alpha=0.18, lw=0)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            _min_octaves(ax, 2.0)
            ax.set_title("step 0 (init)" if step == 0 else f"step {step}", fontsize=9)
            ax.set_xlabel(check.axis, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, which="major", alpha=0.3)
            if col == 0:
                inputs = " of inputs" if check.judged_kind == "in" else ""
                ax.set_ylabel(f"{check.parametrization}: {LABELS.get(metric, metric)}{inputs}", fontsize=8)
        legend = {}  # every line, also those absent at step 0 (a zero-initialized readout)
        for ax in axes:
            for handle, name in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(name, handle)
        names = sorted(legend)
        subfig.legend([legend[n] for n in names], names, loc="outside right upper", fontsize=7, frameon=False)
        subfig.suptitle(judged.summary(), fontsize=9, color="tab:green" if judged.passed else "tab:red")
    fig.savefig(path, dpi=120)


def _min_octaves(ax, octaves: float) -> None:
    """Widen a log2 y-axis to span at least ``octaves`` so flat lines look flat (and get ticks)."""
    lo, hi = ax.get_ylim()
    if hi / lo < 2 ** octaves:
        mid = (lo * hi) ** 0.5
        ax.set_ylim(mid / 2 ** (octaves / 2), mid * 2 ** (octaves / 2))


def _color(i: int, n: int):
    from matplotlib import colormaps
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return cmap(i % cmap.N)


def plot_loss_curves(curves: dict[str, Sequence[float]], path: str, *, title: str, smooth: int = 1) -> None:
    """Training-loss curves, one line per run (``smooth``: running mean over that many steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, losses), style in zip(curves.items(), ("-", "--", ":", "-.") * len(curves)):
        values = np.convolve(losses, np.ones(smooth) / smooth, mode="valid")
        ax.plot(range(smooth - 1, len(losses)), values, style, label=name, lw=2)
    ax.set(xlabel="step", ylabel="training loss" + (f" ({smooth}-step mean)" if smooth > 1 else ""), title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
