"""Numeric verdict for a coordinate check: log-log slopes of activation size against width.

For each (module, step) the slope of ``log(size)`` against ``log(width)`` is fitted per seed
by least squares and averaged over seeds. Under muP every slope should be ~0 (Tensor Programs
V, Sec. 5 and Fig. 5); SP's grow after one step. A (module, step) passes when ``|slope| <=
tolerance``; exceptions are judged explicitly, never silently dropped:

* ``expected``: readout (and attention-logit) outputs at step 0 may shrink like width^-1/2
  (a slope in ``[-0.5 - tolerance, tolerance]``), as the readout init has constant variance and
  a ``1/width`` multiplier (TP5 Table 8; mup README "Coord Check");
* ``zero``: the size is exactly 0 at some width (e.g. a zero-initialized readout at step 0),
  so there is no slope to fit.

A module whose step-0 size shrinks as expected is judged at later steps by its change since
init, ``RMS(x_t - x_0)``: under muP every activation's change is Theta(1) (TP5 Sec. 5), while
``x_0`` of a readout tends to 0 with width, so ``|x_t| = |x_0 + Delta x_t|`` mixes a vanishing
init term into the slope at finite width. Such rows carry ``metric="delta_rms"``.

An output-like layer that keeps its (nonzero) init (a readout tied to the embedding, an MoE
router, a readout not zero-initialized) has a change ``Delta x_t = (W_0 Delta h + Delta W h_t) / m`` with, besides muP's Theta(1) term ``Delta W h_t / m``, the term
``W_0 Delta h / m``, a sum of ``m`` terms uncorrelated with ``W_0``, which fades like
``width^-1/2``. At CPU-sized widths that term still shows, so such a module passes when its
change's slope lies in ``[-1/2 - tolerance, tolerance]`` (it must not grow, as SP's does, and
may fade at most like that term); rows carry ``metric="delta_rms (kept init)"``.

Along depth, the per-block relative update ``||dW|| / ||W||`` (``kind="update"``, block
templates ``blocks.*.<rest>``) is judged against the depth rule's own law, ``m_L^(alpha - 1)``
(``CoordCheck.update_slope``): every depth rule makes each block add ``m_L^-alpha`` times its
update, ``1/L`` of the stream's change, so CompleteP's blocks keep Theta(1) relative updates
while Depth-muP's shrink like ``L^-1/2``, the laziness CompleteP removes (Dey et al. 2025,
Sec. 3); without a depth rule the expected slope is 0.

Along width, each parameter's relative update ``||W_t - W_(t-1)||_F / ||W_0||_F`` (``kind="update"``)
is judged against the law of the optimizer that steps it, recorded per row as ``law``
(:func:`mupkit.coord_check.update_laws`) and fitted like the measurement: a matrix Muon
orthogonalizes has Theta(1) spectral-norm steps of rank ``<= rows`` per step, so ``r ~
sqrt(min(A, B, rows) / min(A, B))``: slope -1/2 in muP's rank-limited limit (width >> the batch's
rows), 0 once the matrix is narrower than the rows (:mod:`mupkit.spectral`, "Relative updates",
from Yang, Simon & Bernstein 2023, Sec. 3). The parameters its AdamW part steps (embeddings,
readout, vectors) keep slope 0. Adam's ``1/fan_in`` on top of Muon's own factor (Megatron-LM
#3715) gives slope -3/2 and fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .shapes import matches

if TYPE_CHECKING:
    from .coord_check import CoordCheck

#: slope of a readout's output against width at init under muP: constant-variance readout
#: weights times the 1/width multiplier give logits ~ width^-1/2 (TP5 Table 8)
INIT_READOUT_SLOPE = -0.5


@dataclass(frozen=True)
class Slope:
    module: str
    step: int
    slope: float
    status: str  # "pass" | "fail" | "expected" | "zero"
    metric: str = "l1"  # the size whose slope this row judges
    expected: float = 0.0  # the slope the parametrization predicts

    @property
    def deviation(self) -> float:
        return self.slope - self.expected


@dataclass(frozen=True)
class Verdict:
    rows: tuple[Slope, ...]
    tolerance: float
    metric: str
    title: str

    @property
    def passed(self) -> bool:
        judged = [r for r in self.rows if r.status in ("pass", "fail")]
        return bool(judged) and all(r.status != "fail" for r in judged)  # nothing judged is no pass

    def worst(self, n: int = 8) -> list[Slope]:
        """The failing rows first, then the passing ones, each by the size of their deviation."""
        judged = [r for r in self.rows if r.status in ("pass", "fail")]
        return sorted(judged, key=lambda r: (r.status != "fail", -abs(r.deviation)))[:n]

    def summary(self) -> str:
        worst = self.worst(1)
        tail = f"worst slope {worst[0].slope:+.3f}{_against(worst[0])} ({worst[0].module}, step {worst[0].step})" \
            if worst else \
            "no module to judge (check include= and kind=)"
        return f"{'PASS' if self.passed else 'FAIL'}: {self.title}; {tail}; tolerance {self.tolerance}"

    def __str__(self) -> str:
        lines = [self.summary(), f"{'module':40s} {'step':>4s} {'slope':>8s} {'expect':>7s}  {'status':8s}  of"]
        other = [r for r in self.rows if r.status in ("expected", "zero")]
        lines += [f"{r.module:40s} {r.step:4d} {r.slope:+8.3f} {r.expected:+7.2f}  {r.status:8s}  {r.metric}"
                  for r in self.worst() + other[:8]]
        return "\n".join(lines)


def _against(row: Slope) -> str:
    return f" against {row.expected:+.2f}" if row.expected else ""


def fit_slopes(check: "CoordCheck", metric: str = "l1", kind: str = "out") -> dict[tuple[str, int], float]:
    """(module, step) -> slope of log(metric) vs log(size along ``check.axis``), averaged over seeds
    (and over the other size, in a joint check); NaN if a value is 0 or NaN. Only modules recorded at
    every size are fitted."""
    axis = check.axis
    other = "depth" if axis == "width" else "width"
    series: dict[tuple, dict[int, float]] = {}
    for r in check.records:
        if r["kind"] == kind and metric in r:
            series.setdefault((r["module"], r["step"], r["seed"], r.get(other)), {})[r[axis]] = r[metric]
    per_key: dict[tuple[str, int], list[float]] = {}
    for (module, step, _seed, _other), by_width in series.items():
        if len(by_width) < max(2, len(check.sizes)):
            continue
        widths = sorted(by_width)
        values = [by_width[w] for w in widths]
        undefined = any(math.isnan(v) or v <= 0 for v in values)
        slope = math.nan if undefined else float(np.polyfit(np.log(widths), np.log(values), 1)[0])
        per_key.setdefault((module, step), []).append(slope)
    return {key: float(np.mean(v)) for key, v in per_key.items()}


def _base_name(module: str) -> str:
    return module.split("#", 1)[0].split("[", 1)[0]


def _init_transient(check: "CoordCheck", module: str, slope: float, tolerance: float) -> bool:
    """Readout-like module whose init size falls with width, within the expected law."""
    return (matches(_base_name(module), check.expected_at_init) and not math.isnan(slope)
            and INIT_READOUT_SLOPE - tolerance <= slope < -tolerance)


def _expected(check: "CoordCheck", kind: str, module: str, law: float) -> float:
    """The slope a row is judged against: along depth, a block parameter's update follows the
    depth rule (``check.update_slope``); along width, a parameter's update its optimizer's
    ``law`` (fitted); every other row 0."""
    if kind != "update":
        return 0.0
    if check.axis == "depth":
        return check.update_slope if ".*." in module else 0.0
    return law


def verdict(check: "CoordCheck", *, tolerance: float = 0.1, metric: str = "l1", steps=None,
            kind: str | None = None) -> Verdict:
    """Judge every (module, step); ``steps``: which steps to judge (default all recorded).

    Modules whose step-0 row is ``expected`` are judged on ``delta_rms`` at later steps.
    ``kind``: ``"out"``, ``"in"`` or ``"update"`` records (default: ``check.judged_kind``).
    """
    kind = kind or check.judged_kind
    slopes = fit_slopes(check, metric, kind)
    laws = fit_slopes(check, "law", kind) if kind == "update" and check.axis == "width" else {}
    changes = fit_slopes(check, "delta_rms", kind)
    transient = {module for (module, step), slope in slopes.items()
                 if step == 0 and _init_transient(check, module, slope, tolerance)}
    tracked = {(r["module"], r["step"]): r.get("delta_rms", 0) > 0 for r in check.records
               if r["kind"] == kind and "delta_rms" in r}
    at_init = {key for key in slopes if key[1] == 0 or tracked.get(key) is False}  # not changed by any step yet
    rows = []
    for (module, step), slope in sorted(slopes.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if steps is not None and step not in steps:
            continue
        if metric == "delta_rms" and step == 0:
            continue  # no change yet at init
        judged = metric
        if step > 0 and module in transient and (module, step) in changes:
            judged, slope = "delta_rms", changes[module, step]
        expected = _expected(check, kind, module, laws.get((module, step), 0.0))
        tied = step > 0 and judged == "delta_rms" and matches(_base_name(module), check.kept_init_outputs)
        if tied:
            judged = "delta_rms (kept init)"
        if math.isnan(slope):
            status = "zero"
        elif abs(slope - expected) <= tolerance or (tied and INIT_READOUT_SLOPE - tolerance <= slope <= tolerance):
            status = "pass"
        elif step == 0 and module in transient:
            status = "expected"
        elif check.axis == "depth" and (module, step) in at_init and INIT_READOUT_SLOPE - tolerance <= slope < 0:
            status = "expected"  # CompleteP: the branches' init variance L * L^-2 fades (Dey et al. 2025, Fig. 3)
        else:
            status = "fail"
        rows.append(Slope(module, step, slope, status, judged, expected))
    sizes = f"{check.axis}s {check.sizes[0]}..{check.sizes[-1]}"
    what = metric if kind == check.judged_kind else f"{kind} {metric}"
    title = f"{check.parametrization} {check.optimizer} lr={check.lr:g}, {what}, {sizes}"
    return Verdict(tuple(rows), tolerance, metric, title)
