"""Small real-data training tasks for HP-transfer sweeps (nothing is downloaded).

* :func:`text_lm`: next-byte prediction on the Python standard library's sources
  (:func:`mupkit.data.stdlib_corpus`), for token models (``model(ids) -> logits``, or a
  ``model.loss(ids)`` such as :class:`mupkit.unit.TransformerDecoder`).
* :func:`digits`: the scikit-learn 8x8 digits (1797 images, shipped with scikit-learn; install
  the ``examples`` extra), flattened to 64 features for an MLP or as ``1x8x8`` images for a CNN.

Each returns ``train(model, hparams, seed) -> training losses`` for :func:`mupkit.transfer.sweep`:
a mupkit optimizer over ``mupkit.param_groups(model)`` with ``hparams["lr"]`` (and optional
``"weight_decay"``, ``"init_mult"``, ``"output_mult"``, ``"attn_temp"``: :data:`HPARAMS`), a
linear warmup then a schedule (:data:`SCHEDULES`), and a fixed batch order per seed. Which built-in model
trains on which (widths, LR grid, fixed kwargs) is in the registry, :data:`mupkit.zoo.BUILTIN`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .data import stdlib_corpus, token_windows
from .groups import param_groups
from .models import Attention
from .optim import get_optimizer
from .optim.schedules import WSD, PowerLR

TrainFn = Callable[[nn.Module, Mapping[str, float], int], list[float]]

#: the learning-rate schedules of the tasks (``warmup`` steps each): ``"constant"`` after a linear
#: warmup, ``"wsd"`` (:class:`~mupkit.optim.schedules.WSD`, a linear cooldown over the last
#: ``decay_fraction`` of the steps) and ``"power"`` (:class:`~mupkit.optim.schedules.PowerLR` with
#: that cooldown: ``hparams["lr"]`` is then the Power scheduler's ``a``, the LR ``batch * a * tokens^b``)
SCHEDULES = ("constant", "wsd", "power")

#: the hyperparameters a task reads (Tensor Programs V, Sec. 6 tunes these): the LR, decoupled
#: weight decay, a multiplier of every weight matrix's initial values, a multiplier of the logits,
#: and a multiplier of the attention logits' scale (mupkit's GPT only)
HPARAMS = ("lr", "weight_decay", "init_mult", "output_mult", "attn_temp")


@dataclass(frozen=True)
class Schedule:
    """A task's LR schedule: ``name`` (:data:`SCHEDULES`), the cooldown's share of the steps, and
    for ``"power"`` the exponent ``b`` and the cap ``lr_max`` (Shen et al. 2024 fit -0.51 and 0.02
    at their scale; ``math.inf``: no cap)."""

    name: str = "constant"
    decay_fraction: float = 0.2
    exponent: float = -0.51
    lr_max: float = math.inf

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"schedule={self.name!r}; use one of {SCHEDULES}")
        if not 0.0 <= self.decay_fraction < 1.0:
            raise ValueError(f"decay_fraction={self.decay_fraction} must lie in [0, 1)")

    def make(self, opt: torch.optim.Optimizer, steps: int, warmup: int, batch: int,
             tokens_per_step: int) -> torch.optim.lr_scheduler.LRScheduler:
        warmup = min(warmup, steps)
        decay = min(int(round(self.decay_fraction * steps)), steps - warmup)
        if self.name == "wsd":
            return WSD(opt, warmup_steps=warmup, total_steps=steps, decay_steps=decay)
        if self.name == "power":
            return PowerLR(opt, batch_size=batch, tokens_per_step=tokens_per_step, exponent=self.exponent,
                           lr_max=self.lr_max, warmup_steps=warmup, decay_steps=decay, total_steps=steps)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / max(warmup, 1)))


def _schedule(schedule: str | Schedule) -> Schedule:
    return schedule if isinstance(schedule, Schedule) else Schedule(schedule)


def _apply_multipliers(model: nn.Module, hparams: Mapping[str, float]) -> None:
    """``init_mult`` scales every weight matrix (2-D or more) in place; ``attn_temp`` scales the
    attention scale of each :class:`mupkit.models.Attention`."""
    unknown = set(hparams) - set(HPARAMS)
    if unknown:
        raise ValueError(f"the task does not know hyperparameters {sorted(unknown)}; it reads {HPARAMS}")
    if "lr" not in hparams:
        raise ValueError(f"the task needs hparams['lr'], got {dict(hparams)}; sweep with grid={{'lr': [...]}}")
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(hparams.get("init_mult", 1.0))
    if "attn_temp" in hparams:
        attention = [m for m in model.modules() if isinstance(m, Attention)]
        if not attention:
            raise ValueError(f"attn_temp needs mupkit.models.Attention layers (mupkit's GPT); "
                             f"{type(model).__name__} has none: drop attn_temp from the grid")
        for m in attention:
            m.scale = m.scale * hparams["attn_temp"]


def _train_loop(model: nn.Module, hparams: Mapping[str, float], seed: int, steps: int, warmup: int,
                optimizer: str, next_loss: Callable[[torch.Generator], torch.Tensor], schedule: Schedule,
                batch: int, tokens_per_step: int) -> list[float]:
    _apply_multipliers(model, hparams)
    opt = get_optimizer(optimizer)(param_groups(model), lr=hparams["lr"],
                                   weight_decay=hparams.get("weight_decay", 0.0))
    sched = schedule.make(opt, steps, warmup, batch, tokens_per_step)
    gen, losses = torch.Generator().manual_seed(10_000 + seed), []
    model.train()
    for _ in range(steps):
        loss = next_loss(gen)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break  # diverged: the sweep records it as inf
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return losses


def _logits_loss(logits: torch.Tensor, targets: torch.Tensor, hparams: Mapping[str, float]) -> torch.Tensor:
    return F.cross_entropy(hparams.get("output_mult", 1.0) * logits.flatten(0, -2), targets.flatten())


def text_lm(*, steps: int = 200, batch: int = 16, context: int = 64, warmup: int = 20,
            optimizer: str = "adamw", limit: int = 4_000_000, schedule: str | Schedule = "constant") -> TrainFn:
    """Train on random ``batch x context`` byte windows of the stdlib corpus; returns the losses."""
    corpus = stdlib_corpus("train", limit=limit)
    schedule = _schedule(schedule)

    def train(model: nn.Module, hparams: Mapping[str, float], seed: int) -> list[float]:
        if hasattr(model, "loss") and "output_mult" in hparams:
            raise ValueError(f"output_mult scales logits, but {type(model).__name__} computes its own loss "
                             f"(model.loss); drop output_mult from the grid")

        def next_loss(gen: torch.Generator) -> torch.Tensor:
            x, y = token_windows(corpus, batch, context, gen)
            if hasattr(model, "loss"):
                return model.loss(torch.cat([x, y[:, -1:]], dim=1))
            return _logits_loss(model(x), y, hparams)
        return _train_loop(model, hparams, seed, steps, warmup, optimizer, next_loss, schedule, batch,
                           batch * context)
    return train


@functools.cache
def digits_data(images: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 digits, pixels scaled to [0, 1] then standardized per pixel (constant pixels 0):
    ``(N, 64)`` or ``(N, 1, 8, 8)`` float32, labels ``(N,)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits task needs scikit-learn: pip install -e '.[examples]'") from e
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-3)
    y = torch.tensor(data.target, dtype=torch.long)
    return (x.view(-1, 1, 8, 8) if images else x), y


def digits(*, steps: int = 300, batch: int = 64, warmup: int = 20, optimizer: str = "adamw",
           images: bool = False, schedule: str | Schedule = "constant") -> TrainFn:
    """Train a classifier on random minibatches of the digits (``images``: 1x8x8 for a CNN)."""
    x, y = digits_data(images)
    schedule = _schedule(schedule)

    def train(model: nn.Module, hparams: Mapping[str, float], seed: int) -> list[float]:
        def next_loss(gen: torch.Generator) -> torch.Tensor:
            idx = torch.randint(0, len(y), (batch,), generator=gen)
            return _logits_loss(model(x[idx]), y[idx], hparams)
        return _train_loop(model, hparams, seed, steps, warmup, optimizer, next_loss, schedule, batch, batch)
    return train
