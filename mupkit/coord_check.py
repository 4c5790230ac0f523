"""Coordinate checks: do activation sizes stay constant as width (or depth) grows?

For every width (and/or depth) and seed, the model is built by :func:`mupkit.build`, trained a few steps on
one fixed batch, and forward hooks record, for every module call (a module called twice is
recorded twice, as ``name#1``), at step 0 (init) and after each step:

* ``l1``: mean |x| (microsoft/mup's statistic), ``rms``: sqrt(mean x^2), and
* ``delta_rms``: RMS of (x_t - x_0) on the same batch, the change since init, which hides
  the init-time transients (readout and attention logits shrink like width^-1/2 at step 0).

Tensor leaves of tuple/list/dict outputs are recorded as ``name[i]`` / ``name[key]``; ``None``
is skipped. Optionally module inputs (``inputs=True``), parameters (``params=True``) and the
relative update ``||W_t - W_(t-1)|| / ||W_0||`` (``updates=True``; NaN for a parameter that is zero at
init, which has no scale to relate to). Each update row also carries ``law``, the width dependence
muP predicts for it (:func:`update_laws`): ``sqrt(min(A, B, rows) / min(A, B))`` for a matrix the
optimizer orthogonalizes (Muon; the "Relative updates" law of :mod:`mupkit.spectral`, slope -1/2
while the matrix is wider than the rows it multiplies per step), 1 for every other parameter
(entrywise-normalized steps whose muP LR and init scales keep ``r`` width-free). See
:mod:`mupkit.verdict` for the fit and :mod:`mupkit.plotting` for the figure.

Depth checks (``depths=[...]``): module names inside repeated blocks are made comparable across
depths: block 0 keeps its name, the last block is named ``<container>.last``, the others are not
compared. Module inputs are recorded too (kind ``"in"``; inside blocks only the blocks' own
inputs): the residual stream entering the first and last block and the modules after the blocks
(a final norm, the readout). Two per-block relative update sizes are averaged over the blocks:

* kind ``"stream_update"`` (module ``<container>.*``): ``RMS(h_t - h_0) / RMS(h_0)`` of the
  residual stream ``h`` each block hands to the next (the inputs of blocks ``1..L-1``), the
  relative change of the features the blocks build. Depth-muP and CompleteP keep it Theta(1) in
  L: each block adds ``1/L`` of the change, so after block ``k`` it is ``~ k/L``, whose mean over
  ``k = 1..L-1`` is ``1/2`` at every L. Without depth scaling it grows with L (TP VI Sec. 3;
  Dey et al. 2025, Sec. 3).
* kind ``"update"`` (template ``<container>.*.<rest>``): each parameter's ``||dW|| / ||W_0||``,
  which follows the depth rule's own law ``m_L^(alpha - 1)``: flat under CompleteP, ``L^-1/2``
  under Depth-muP (its "lazy" blocks), see :mod:`mupkit.verdict`.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from . import optim as mupkit_optim
from .build import build
from .forward_checks import ForwardScalingWarning
from .infer import NoDepthRuleWarning, infer_plan
from .data import ROWS, Batch, synthetic_batch
from .groups import param_groups, resolve_family
from .plan import Plan, plan_of
from .progress import progress
from .roles import Role
from .rules import MUP, DepthRule, Family
from .shapes import Constructor, matches, name_template
from .spectral import SpectralLR, matrix_fans, relative_update_factor

METRICS = ("l1", "rms", "delta_rms")


class UpdateRegimeWarning(UserWarning):
    """An orthogonalized matrix multiplies more rows per step than its narrower side at some
    checked width: its update is full rank there, outside muP's rank-limited limit that the
    relative-update law is stated for (:mod:`mupkit.spectral`, "Relative updates")."""


@dataclass
class CoordCheck:
    """The records of one coordinate check (a tidy table: one dict per measurement)."""

    records: list[dict[str, Any]]
    widths: list[int]
    parametrization: str
    optimizer: str
    lr: float
    expected_at_init: list[str] = field(default_factory=list)  # readout / attention-logit modules
    kept_init_outputs: list[str] = field(default_factory=list)  # output-like modules not zeroed (tied, routers)
    depths: list[int] = field(default_factory=list)
    axis: str = "width"  # the size the verdict fits against: "width" or "depth"
    update_slope: float = 0.0  # expected slope of per-block relative updates against depth: alpha - 1

    @property
    def sizes(self) -> list[int]:
        """The values along :attr:`axis`."""
        return self.depths if self.axis == "depth" else self.widths

    @property
    def judged_kind(self) -> str:
        """What the verdict and plot use by default: module outputs for width, module inputs for
        depth (recorded only where they are the residual stream; a branch's own output is
        scaled by ``m_L^-alpha`` by design)."""
        return "in" if self.axis == "depth" else "out"

    def to_pandas(self):
        import pandas as pd  # optional
        return pd.DataFrame(self.records)

    def to_csv(self, path: str) -> None:
        keys = list(dict.fromkeys(k for r in self.records for k in r))
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.records)

    def verdict(self, **kwargs):
        """Fit and judge the slopes; see :func:`mupkit.verdict.verdict`."""
        from .verdict import verdict
        return verdict(self, **kwargs)

    def verdicts(self, **kwargs) -> list:
        """Every verdict the check is judged by: the activations (:attr:`judged_kind`); along
        depth, the per-block relative updates of the stream (``"stream_update"``) and of the
        parameters (``"update"``), both measured as ``l1`` records; along width, the parameters'
        relative updates against their laws where the check recorded laws (orthogonalized
        matrices)."""
        if self.axis == "depth":
            extra: tuple[str, ...] = ("stream_update", "update")
        else:
            extra = ("update",) if any("law" in r for r in self.records if r["kind"] == "update") else ()
        return [self.verdict(**kwargs)] + [self.verdict(**{**kwargs, "metric": "l1", "kind": k}) for k in extra]

    def plot(self, path: str, *, compare: "CoordCheck | None" = None, **kwargs) -> None:
        """Write the figure; ``compare``: a second check (e.g. SP) drawn as another row."""
        from .plotting import plot
        plot([c for c in (compare, self) if c is not None], path, **kwargs)


def _tensor_leaves(out: Any, prefix: str = "") -> Iterable[tuple[str, torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        if out.is_floating_point() and out.numel():
            yield prefix, out
    elif isinstance(out, (tuple, list)):
        for i, item in enumerate(out):
            yield from _tensor_leaves(item, f"{prefix}[{i}]")
    elif isinstance(out, Mapping):
        for key, item in out.items():
            yield from _tensor_leaves(item, f"{prefix}[{key}]")


def _stats(x: torch.Tensor) -> dict[str, float]:
    x = x.detach().to(torch.float32)
    return {"l1": x.abs().mean().item(), "rms": x.square().mean().sqrt().item()}


class _Recorder:
    """Forward hooks on every named module recording output statistics; the root (as
    :data:`MODEL_OUTPUT`) only when ``judged("")``: its output is the logits its own forward computes."""

    def __init__(self, model: nn.Module, inputs: bool, judged: Callable[[str], bool]):
        self.rows: list[dict[str, Any]] = []
        self.step = 0
        self.inputs = inputs
        self.initial: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        modules = [(n or MODEL_OUTPUT, m) for n, m in model.named_modules() if judged(n)]
        self.types = {n: type(m).__name__ for n, m in modules}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules]

    def _hook(self, name: str) -> Callable:
        def hook(module, args, out):
            call = self.calls.get(name, 0)
            self.calls[name] = call + 1
            base = name if call == 0 else f"{name}#{call}"
            self._record(base, self.types[name], "out", out)
            if self.inputs:
                self._record(base, self.types[name], "in", args)
        return hook

    def _record(self, base: str, type_name: str, kind: str, value: Any) -> None:
        for suffix, x in _tensor_leaves(value):
            key = f"{kind}:{base}{suffix}"
            row = {"module": base + suffix, "type": type_name, "kind": kind, "step": self.step, **_stats(x)}
            if self.step == 0:
                self.initial[key] = x.detach().clone()
            first = self.initial.get(key)
            if first is not None and first.shape == x.shape:
                row["delta_rms"] = (x.detach() - first).to(torch.float32).square().mean().sqrt().item()
            self.rows.append(row)

    def new_step(self, step: int) -> None:
        self.step = step
        self.calls.clear()

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _zero_init_kwargs(optimizer: Any) -> dict[str, Any]:
    """An optimizer's ``zero_init_kwargs``: the arguments under which it trains a zero tensor
    (``{}`` for most; ScaledAdam needs an RMS floor)."""
    cls = mupkit_optim.get_optimizer(optimizer) if isinstance(optimizer, str) else optimizer
    return dict(getattr(cls, "zero_init_kwargs", {}))


def _family(optimizer: Any) -> Family:
    """The muP family of ``optimizer`` (a mupkit name, a mupkit class, a torch class)."""
    return resolve_family(mupkit_optim.get_optimizer(optimizer) if isinstance(optimizer, str) else optimizer)


def _orthogonalizes(family: Family) -> bool:
    """Whether ``family`` steps some role under a spectral LR rule (:func:`orthogonalized`)."""
    return any(family.steps(role) and isinstance(rule.lr.get(family.update), SpectralLR)
               for role, rule in MUP.rules.items())


def orthogonalized(plan: Plan, family: Family) -> dict[str, tuple[int, int]]:
    """``name -> (fan_out, fan_in)`` of the parameters ``family`` orthogonalizes at the plan's
    target size: those it steps itself (:meth:`Family.steps`) under a spectral LR rule in muP's
    table (:class:`~mupkit.spectral.SpectralLR`: Muon's hidden matrices, conv kernels as
    ``(out, in * k)``); empty for families that step entrywise."""
    out = {}
    for name, spec in plan.items():
        rule = MUP.rules[spec.role].lr.get(family.update)
        fans = matrix_fans(spec.target, spec.fan_out_axis, spec.fan_in_axis)
        if family.steps(spec.role) and isinstance(rule, SpectralLR) and fans is not None:
            out[name] = fans
    return out


@contextlib.contextmanager
def _rows_per_step(model: nn.Module, matrices: Mapping[str, tuple[int, int]]):
    """Count, over the forwards inside the block, the rows each matrix multiplies: its module's
    output elements over the fan-out (tokens of a linear layer, batch x positions of a conv), summed
    over calls. A matrix whose module output does not carry its fan-out on the last axis (linear) or
    axis 1 (conv) is left out: unknown, :func:`update_laws` then takes muP's rank-limited limit."""
    rows: dict[str, int] = {}

    def hook(name: str, fan_out: int) -> Callable:
        def count(module, args, out):
            leaf = next((t for _, t in _tensor_leaves(out)), None)
            if leaf is not None and fan_out in (leaf.shape[-1], leaf.shape[1] if leaf.ndim > 2 else None):
                rows[name] = rows.get(name, 0) + leaf.numel() // fan_out
        return count
    handles = [model.get_submodule(_owner(n)).register_forward_hook(hook(n, fans[0])) for n, fans in matrices.items()]
    try:
        yield rows
    finally:
        for h in handles:
            h.remove()


def update_laws(matrices: Mapping[str, tuple[int, int]], rows: Mapping[str, int]) -> dict[str, float]:
    """``name -> law`` of the relative update's width dependence for the orthogonalized
    ``matrices``: :func:`~mupkit.spectral.relative_update_factor` of its fans and rows per step
    (every other parameter's law is 1: width-free)."""
    return {n: relative_update_factor(fans, rows.get(n)) for n, fans in matrices.items()}


def _warn_full_rank(width: int, matrices: Mapping[str, tuple[int, int]], rows: Mapping[str, int]) -> None:
    """:class:`UpdateRegimeWarning` naming the matrices that multiply more rows than ``min(A, B)``."""
    full = [f"{n} {fans} x {rows[n]} rows" for n, fans in matrices.items() if rows.get(n, 0) > min(fans)]
    if full:
        warnings.warn(UpdateRegimeWarning(
            f"at width {width} {len(full)} orthogonalized matrices multiply more rows per step than their narrower "
            f"side ({', '.join(full[:3])}{', ...' if len(full) > 3 else ''}): their updates are full rank, where the "
            f"relative-update law flattens to slope 0, outside muP's rank-limited limit (width >> rows). Use a "
            f"batch with fewer tokens (or images, or positions) to check that limit."), stacklevel=3)


def _optimizer(model: nn.Module, optimizer: Any, lr: float, kwargs: Mapping[str, Any]) -> torch.optim.Optimizer:
    cls = mupkit_optim.get_optimizer(optimizer) if isinstance(optimizer, str) else optimizer
    if hasattr(cls, "family"):  # mupkit optimizer: reads the per-family scales itself
        if "compiled" in inspect.signature(cls).parameters:  # a few steps never earn back a compile
            kwargs = {"compiled": False, **kwargs}
        return cls(param_groups(model), lr=lr, **kwargs)
    scaled = {k: kwargs[k] for k in ("eps", "weight_decay") if k in kwargs}  # per group, scaled by the plan
    rest = {k: v for k, v in kwargs.items() if k not in scaled}
    return cls(param_groups(model, optimizer=cls, lr=lr, **scaled), **rest)


#: the name the model's own output is recorded under when it is computed in the root's forward
MODEL_OUTPUT = "(model)"


def _owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _recorded(module: str) -> str:
    return module or MODEL_OUTPUT


def _expected_at_init(plan: Plan, patterns: Sequence[str]) -> list[str]:
    """Modules whose outputs may shrink like width^-1/2 at init: every output-role layer (the
    readout, a router), tied readouts, every module the trace saw returning the model's output
    (wrappers), plus globs."""
    owners = {_owner(n) for n, s in plan.items() if s.role is Role.OUTPUT}
    owners |= {m for s in plan.values() for m in s.tied_readouts}
    owners |= set(plan.output_modules)
    return sorted(_recorded(m) for m in owners) + list(patterns)


def _kept_init_outputs(plan: Plan, zeroed: Sequence[str]) -> list[str]:
    """Output-like modules that keep a nonzero init (a tied readout, a router, a readout not
    zeroed): their change carries a fading ``W_0 dh / m`` term (see :mod:`mupkit.verdict`)."""
    kept = {_owner(n) for n, s in plan.items() if s.role is Role.OUTPUT and n not in zeroed}
    kept |= {m for n in plan.readouts for m in plan[n].tied_readouts}
    if any(n not in zeroed for n in plan.readouts):
        kept |= set(plan.output_modules)
    return sorted(_recorded(m) for m in kept)


def coord_check(constructor: Constructor, widths: Sequence[int] | int, *, base: int | None = None,
                depths: Sequence[int] | None = None, base_depth: int | None = None, depth_arg: str = "depth",
                parametrization: str = "mup", optimizer: Any = "adam", lr: float = 1e-2, steps: int = 4,
                seeds: Sequence[int] | int = 2, batch: Batch | Iterable[Batch] | None = None,
                loss: Callable[[Any, Any], torch.Tensor] | None = None, width_arg: str = "width",
                kwargs: Mapping[str, Any] | None = None, optimizer_kwargs: Mapping[str, Any] | None = None,
                device: str | torch.device = "cpu", inputs: bool = False, params: bool = False,
                updates: bool | None = None, include: Sequence[str] | None = None,
                expected_at_init: Sequence[str] = ("*attn_score*", "*attn_logits*"),
                zero_init: Sequence[str] | str = "auto", show_progress: bool = True,
                readout: Sequence[str] | None = None, layouts: Mapping[str, Any] | None = None,
                branch_outputs: Sequence[str] | None = None, example_inputs: Any = None) -> CoordCheck:
    """Run a width (or depth, or joint) coordinate check of ``constructor``.

    ``widths``: target widths (the constructor kwarg ``width_arg``), or one width for a depth
    check; ``base``: the base width (default: the smallest), with delta ``2 * base``;
    ``depths``/``base_depth``/``depth_arg``: the same along depth (base: the smallest); the
    verdict then fits against depth (``axis="depth"``) unless several widths are given too.
    ``kwargs``: fixed constructor kwargs.
    ``batch``: ``(inputs, targets)``, or a dataloader (its first batch is used, as in mup), or
    None for a synthetic batch inferred from the model's first layer (:mod:`mupkit.data`);
    ``loss(output, targets)``: default cross-entropy for class/token logits, else MSE to the
    targets. ``optimizer``: a mupkit optimizer name (``"adam" | "adamw" | "sgd" | "adam-atan2"
    | "adafactor"``) or class, or any ``torch.optim`` class (groups with concrete LRs are made
    for it). ``zero_init``: passed to :func:`mupkit.build`; ``"auto"`` zero-initializes an untied
    readout, as microsoft/mup's own coord checks do (TP5 App. D.2), so the readout's init
    transient (``width^-1/2``) does not mask the step-1 behaviour; a readout tied to an
    embedding keeps its init. An optimizer whose steps are relative to the parameter's RMS then
    gets its ``zero_init_kwargs`` (ScaledAdam: ``param_min_rms=1e-3``, a floor that mupkit
    scales with each tensor's muP init scale), unless ``optimizer_kwargs`` set them.
    ``readout``, ``layouts``, ``branch_outputs``, ``example_inputs``: passed to
    :func:`mupkit.build` (``example_inputs`` defaults to the batch's inputs). ``updates``: also
    record each parameter's relative update per step with its ``law`` (module docstring), which
    ``verdict(kind="update")`` fits as the expected slope; an orthogonalized matrix that multiplies
    more rows per step than its narrower side gives an :class:`UpdateRegimeWarning`. Default
    (None): along depth, and for an optimizer that orthogonalizes matrices (Muon), whose
    activations alone do not show a double-scaled step; :meth:`CoordCheck.verdicts` then judges them.
    The laws are those of the gradient step, so an orthogonalizing optimizer's check with updates
    steps without weight decay unless ``optimizer_kwargs`` sets it (Muon's default 0.1 would move
    a matrix whose gradient is still zero behind a zero readout).

    Modules whose outputs depend on no parameter (rotary tables, masks: the plan's
    ``constant_modules``) are not recorded; modules returning the model's output (a readout
    layer and its wrappers, ``plan.output_modules``) are judged as the readout.
    """
    widths = sorted([widths] if isinstance(widths, int) else widths)
    depths = sorted(depths or [])
    if len(widths) < 2 and len(depths) < 2:
        raise ValueError(f"a coordinate check needs at least two widths or two depths, got widths {widths} and "
                         f"depths {depths}")
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    orthogonalizing = _orthogonalizes(_family(optimizer))
    updates = bool(depths) or orthogonalizing if updates is None else updates
    if updates and orthogonalizing:  # the laws are those of the gradient step
        optimizer_kwargs = {"weight_decay": 0.0, **(optimizer_kwargs or {})}
    base = widths[0] if base is None else base
    fixed = dict(kwargs or {})
    if depths:
        fixed[depth_arg] = depths[0] if base_depth is None else base_depth
    sizes = {"base": {width_arg: base, **fixed}, "delta": {width_arg: 2 * base, **fixed}}
    if batch is not None:
        first_x = _first_batch(batch, "cpu")[0]
        example_inputs = first_x if example_inputs is None else example_inputs
    options = dict(readout=readout, layouts=layouts, branch_outputs=branch_outputs, example_inputs=example_inputs)

    def target(width: int, depth: int | None) -> dict[str, Any]:
        return {width_arg: width, **fixed, **({depth_arg: depth} if depth is not None else {})}

    with _depth_control():
        probe = infer_plan(constructor, target=target(widths[-1], depths[-1] if depths else None),
                           parametrization=parametrization, **sizes, **options)
    expected = _expected_at_init(probe, expected_at_init)
    skipped = sorted({name_template(m) for m in probe.constant_modules})
    root = probe.output_modules == ("",)  # the logits come from an op in the model's own forward

    def judged(name: str) -> bool:
        if not name:
            return root and (include is None or matches(MODEL_OUTPUT, include))
        return (include is None or matches(name, include)) and not matches(name_template(name), skipped)
    containers = list(probe.depth.blocks) if probe.depth is not None else []
    if zero_init == "auto":
        untied = [n for n in probe.readouts if probe[n].role is Role.OUTPUT]
        zero_init = ("readout",) if untied else ()
        optimizer_kwargs = {**_zero_init_kwargs(optimizer), **(optimizer_kwargs or {})} if zero_init \
            else optimizer_kwargs
    records: list[dict[str, Any]] = []
    runs = [(w, d, s) for s in seeds for w in widths for d in (depths or [None])]
    for width, depth, seed in progress(runs, "coord-check", enabled=show_progress,
                                       label=lambda r: f"width {r[0]}" + (f" depth {r[1]}" if r[1] else "")
                                       + f" seed {r[2]}"):
        torch.manual_seed(seed)
        with _depth_control(), warnings.catch_warnings():
            warnings.simplefilter("ignore", ForwardScalingWarning)  # the probe above already said it
            model = build(constructor, target=target(width, depth), parametrization=parametrization,
                          device=device, zero_init=zero_init, **sizes, **options)
        model.train()
        if batch is None:
            # along depth 32 sequences of a token model: with fewer tokens the deep models fit the
            # batch within the check's steps (as the zoo's depth batch, mupkit.zoo._token_batch_for_depth)
            x, y = synthetic_batch(model, seed=1234, device=device, batch_size=ROWS if depths else None)
        else:
            x, y = _first_batch(batch, device)
        loss_fn = loss or default_loss
        opt = _optimizer(model, optimizer, lr, optimizer_kwargs or {})
        matrices = orthogonalized(plan_of(model), _family(optimizer)) if updates else {}
        rows, counted = _run(model, opt, x, y, loss_fn, steps, inputs or bool(depths), params, updates, judged,
                             matrices)
        if matrices:
            _warn_full_rank(width, matrices, counted)
            laws = update_laws(matrices, counted)
            rows = [{**r, "law": laws.get(r["module"], 1.0)} if r["kind"] == "update" else r for r in rows]
        if depths:
            rows = _comparable_across_depth(rows, {c: len(model.get_submodule(c)) for c in containers})
        records.extend({"width": width, **({"depth": depth} if depth else {}), "seed": seed, **row} for row in rows)
    name = optimizer if isinstance(optimizer, str) else optimizer.__name__
    axis = "depth" if len(depths) > 1 and len(widths) == 1 else "width"
    alpha = probe.depth.alpha if probe.depth is not None else None
    zero_init = (zero_init,) if isinstance(zero_init, str) else tuple(zero_init)
    zeroed = [n for n in probe if matches(n, [z for z in zero_init if z != "readout"])
              or ("readout" in zero_init and n in probe.readouts)]
    return CoordCheck(records, widths, parametrization, name, lr, expected, _kept_init_outputs(probe, zeroed), depths,
                      axis, 0.0 if alpha is None else DepthRule(alpha).block_update_exponent)


@contextlib.contextmanager
def _depth_control():
    """Silence :class:`~mupkit.build.NoDepthRuleWarning`: a depth check under a parametrization
    without a depth rule is the control that shows what the rule fixes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoDepthRuleWarning)
        yield


def _comparable_across_depth(rows: list[dict[str, Any]], blocks: Mapping[str, int]) -> list[dict[str, Any]]:
    """Rename block modules (block 0 kept, last block -> ``<container>.last``, others dropped),
    average parameter updates over the blocks per template (``<container>.*.<rest>``) and the
    relative change of the stream entering blocks ``1..L-1`` over those blocks (``<container>.*``)."""
    out, updates, streams = [], {}, {}
    for row in rows:
        name = row["module"]
        hit = next(((c, name[len(c) + 1:]) for c in blocks if name.startswith(c + ".")), None)
        if hit is None:
            if row["kind"] != "update":  # per-block updates only
                out.append(row)
            continue
        container, rest = hit
        parsed = re.match(r"(\d+)(?:\.(.*)|([#\[].*))?$", rest)
        if parsed is None:
            out.append(row)
            continue
        index, tail = parsed.group(1), parsed.group(2) or ""
        suffix = parsed.group(3) or ""
        if row["kind"] == "update":
            key = (f"{container}.*.{tail}", row["step"])
            updates.setdefault(key, []).append(row["l1"])
        elif row["kind"] == "in" and tail:
            continue  # inside a branch; the stream is the input of the block itself
        else:
            if row["kind"] == "in" and int(index) > 0:  # the stream block ``index - 1`` hands on
                streams.setdefault((f"{container}.*{suffix}", index), {})[row["step"]] = row
            if int(index) == 0:
                out.append(row)
            if int(index) == blocks[container] - 1:  # also block 0 when the depth is 1
                out.append({**row, "module": f"{container}.last" + (f".{tail}" if tail else "") + suffix})
    out.extend({"module": name, "kind": "update", "step": step, "l1": sum(v) / len(v)}
               for (name, step), v in updates.items())
    relative: dict[tuple[str, int], list[float]] = {}
    for (name, _), by_step in streams.items():
        for step, row in by_step.items():
            if step > 0 and "delta_rms" in row and by_step[0]["rms"] > 0:
                relative.setdefault((name, step), []).append(row["delta_rms"] / by_step[0]["rms"])
    out.extend({"module": name, "kind": "stream_update", "step": step, "l1": sum(v) / len(v)}
               for (name, step), v in relative.items())
    return out


def _run(model, opt, x, y, loss_fn, steps, inputs, params, updates, judged,
         matrices) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The records of ``steps`` steps on ``(x, y)``, and the rows each of ``matrices`` multiplies per step."""
    recorder = _Recorder(model, inputs, judged)
    rows: list[dict[str, Any]] = []
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    init_norms = [p.detach().norm().item() for _, p in named] if updates else []  # 0: no scale to relate to
    rows_per_step: dict[str, int] = {}
    try:
        for step in range(steps + 1):
            recorder.new_step(step)
            if params:
                rows.extend({"module": n, "kind": "param", "step": step, **_stats(p)} for n, p in named)
            with _rows_per_step(model, matrices if step == 0 else {}) as counted:
                out = model(x)
            if step == 0:
                rows_per_step = counted
            if step == steps:
                break
            value = loss_fn(out, y)
            if not torch.isfinite(value):
                raise FloatingPointError(f"loss is {value.item()} at step {step}; lower lr={opt.defaults['lr']}")
            opt.zero_grad(set_to_none=True)
            value.backward()
            before = [p.detach().clone() for _, p in named] if updates else []
            opt.step()
            for (n, p), old, norm in zip(named, before, init_norms):
                rows.append({"module": n, "kind": "update", "step": step + 1,
                             "l1": (p.detach() - old).norm().item() / norm if norm > 0 else math.nan})
    finally:
        recorder.close()
    return recorder.rows + rows, rows_per_step


def default_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for integer targets (classes or tokens), MSE otherwise."""
    out = next(t for _, t in _tensor_leaves(out))
    if not target.is_floating_point():
        return nn.functional.cross_entropy(out.flatten(0, -2), target.flatten())
    return nn.functional.mse_loss(out, target)


def _first_batch(batch, device) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
    else:
        x, y = next(iter(batch))
    return (x.to(device), y.to(device)) if isinstance(x, torch.Tensor) else (x, y)
