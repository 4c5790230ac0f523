"""The few copies of the user's model a plan is inferred from, and the constructor calls they cost.

Inferring a plan needs the model at three sizes (microsoft/mup's base, delta and target):

* the **base** model, built for real on the CPU once (seed 0, the global RNG left untouched):
  its parameters give the user's init stds, and one forward of it is the usage trace
  (:mod:`mupkit.trace`) and the residual-branch trace (:mod:`mupkit.depth`);
* the **delta** model (every width kwarg doubled, or the user's ``delta``), on the CPU too: its
  shapes say which dims scale with width, and its trace, compared with the base's, shows
  width-dependent constants in the forward;
* the **target** model on the ``meta`` device (no memory): its parameter names and shapes.

A kwarg that differs between base and target is a *depth* kwarg when changing it alone
changes the set of parameter names; each differing kwarg is tested that way on ``meta``, except
a lone one, whose doubled CPU copy is the delta itself. So a width-only build calls the
constructor 3 times (4 with the final target build), a width-and-depth build 5 (6); every
call but the first is silenced (its prints, Python warnings and log records), so a
constructor's side effects show once.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from .shapes import Constructor, doubles, resolve_delta


@contextlib.contextmanager
def silenced():
    """Swallow prints, Python warnings and log records (a repeated constructor call's side effects)."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


@dataclass
class Copies:
    """The models an inference works from."""

    base: nn.Module  # real, CPU
    delta: nn.Module | None  # real, CPU; None when no kwarg scales width
    target: nn.Module  # meta
    base_kwargs: dict[str, Any]
    delta_kwargs: dict[str, Any]
    target_kwargs: dict[str, Any]
    depth_keys: list[str]


class _Builder:
    """Calls the constructor, counts the calls and silences all but the first (unless ``quiet``)."""

    def __init__(self, constructor: Constructor, quiet: bool):
        self.constructor, self.quiet, self.calls = constructor, quiet, 0

    def __call__(self, kwargs: Mapping[str, Any], device: str) -> nn.Module:
        loud = self.calls == 0 and not self.quiet
        self.calls += 1
        try:
            with contextlib.nullcontext() if loud else silenced(), torch.device(device):
                if device == "cpu":
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(0)
                        model = self.constructor(**kwargs)
                else:
                    model = self.constructor(**kwargs)
        except Exception as err:
            where = "on the meta device (allocates nothing)" if device == "meta" else "on the CPU"
            raise RuntimeError(f"building the model {where} with {dict(kwargs)} failed: {err!r} (raised by the "
                               f"constructor itself). mupkit calls it at the base size, at the delta size (width "
                               f"kwargs doubled) and at the target size; it must build at each of them"
                               + (" without data-dependent ops (.item()) at construction" if device == "meta"
                                  else "") + ".") from err
        if not isinstance(model, nn.Module):
            raise TypeError(f"the constructor returned {type(model).__name__}, expected an nn.Module")
        return model


def _names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters()}


def _variant(key: str, base: Mapping[str, Any], target: Mapping[str, Any], delta: Mapping[str, Any] | None) -> Any:
    """The value a kwarg takes when it alone is changed to test it: the delta's, else doubled
    (an int), else the target's."""
    if delta is not None and delta.get(key, base[key]) != base[key]:
        return delta[key]
    if doubles(base[key]):
        return 2 * base[key]
    return target[key]


def make_copies(constructor: Constructor, base: Mapping[str, Any], target: Mapping[str, Any],
                delta: Mapping[str, Any] | None = None, *, quiet: bool = False) -> Copies:
    """Build the base (CPU), delta (CPU) and target (meta) copies; see the module docstring."""
    missing = set(target) ^ set(base)
    if missing:
        raise ValueError(f"base and target must name the same constructor kwargs; only in one of them: "
                         f"{sorted(missing)}. Give both the same keys.")
    build = _Builder(constructor, quiet)
    base_model = build(base, "cpu")
    base_names = _names(base_model)
    differing = [k for k in target if target[k] != base[k]]
    depth_keys: list[str] = []
    delta_model = None
    if len(differing) == 1 and delta is None:  # the one changed kwarg: its doubled copy is the delta or a depth
        key = differing[0]
        trial_kwargs = {**base, key: _variant(key, base, target, None)}
        trial = build(trial_kwargs, "cpu")
        if _names(trial) == base_names:
            delta_model, delta_kwargs = trial, trial_kwargs
        else:
            depth_keys, delta_kwargs = [key], dict(base)
    else:
        depth_keys = [k for k in differing
                      if _names(build({**base, k: _variant(k, base, target, delta)}, "meta")) != base_names]
        width_target = {**target, **{k: base[k] for k in depth_keys}}
        given = None if delta is None else {**base, **delta, **{k: base[k] for k in depth_keys}}
        delta_kwargs = resolve_delta(base, width_target, given)
        if delta_kwargs != dict(base):
            delta_model = build(delta_kwargs, "cpu")
    target_model = build(target, "meta")
    return Copies(base_model, delta_model, target_model, dict(base), dict(delta_kwargs), dict(target), depth_keys)
