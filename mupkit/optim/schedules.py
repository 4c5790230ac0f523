"""Learning-rate schedules as ``torch.optim.lr_scheduler.LRScheduler``: Eden/Eden2, WSD and Power.

Eden, the learning-rate schedule trained with ScaledAdam (Yao et al. 2024, "Zipformer",
Sec. 4.2; icefall ``zipformer/optim.py``), as a ``torch.optim.lr_scheduler.LRScheduler``.

With ``b`` the batch (the scheduler's step count) and ``e`` the epoch::

    Eden:   lr = lr_0 * ((b^2 + B^2) / B^2)^-1/4 * ((e^2 + E^2) / E^2)^-1/4 * warm(b)
    Eden2:  lr = lr_0 * ((b^2 + B^2) / B^2)^-1/2 * warm(b)
    warm(b) = warmup_start + (1 - warmup_start) b / warmup_batches  while b < warmup_batches, else 1

``B = lr_batches``, ``E = lr_epochs``. Call ``step()`` once per batch like any torch scheduler
(or icefall's ``step_batch(b)``), and ``step_epoch(e)`` at the start of each epoch. The muP
multipliers of mupkit's optimizers apply on top (they scale each group's ``lr`` inside ``step``).
"""

from __future__ import annotations

import abc

import math

from torch.optim.lr_scheduler import LRScheduler


class Eden(LRScheduler):
    """Eden schedule; ``lr_0`` is each group's lr when the scheduler is made."""

    def __init__(self, optimizer, lr_batches: float, lr_epochs: float, warmup_batches: float = 500.0,
                 warmup_start: float = 0.5, last_epoch: int = -1):
        if not (lr_batches > 0 and lr_epochs > 0):
            raise ValueError(f"lr_batches={lr_batches} and lr_epochs={lr_epochs} must be > 0")
        if not (warmup_batches >= 0 and 0.0 <= warmup_start <= 1.0):
            raise ValueError(f"need warmup_batches >= 0 and warmup_start in [0, 1], got {warmup_batches}, "
                             f"{warmup_start}")
        self.lr_batches, self.lr_epochs = lr_batches, lr_epochs
        self.warmup_batches, self.warmup_start = warmup_batches, warmup_start
        self.epoch = 0
        super().__init__(optimizer, last_epoch)

    def factor(self, batch: float, epoch: float) -> float:
        """The multiplier of the initial lr at ``batch`` and ``epoch``."""
        return self._decay(batch, epoch) * self._warmup(batch)

    def _decay(self, batch: float, epoch: float) -> float:
        batch_factor = ((batch ** 2 + self.lr_batches ** 2) / self.lr_batches ** 2) ** -0.25
        epoch_factor = ((epoch ** 2 + self.lr_epochs ** 2) / self.lr_epochs ** 2) ** -0.25
        return batch_factor * epoch_factor

    def _warmup(self, batch: float) -> float:
        if batch >= self.warmup_batches:
            return 1.0
        return self.warmup_start + (1.0 - self.warmup_start) * batch / self.warmup_batches

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch, self.epoch) for base in self.base_lrs]

    def _set_lrs(self) -> None:
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs

    def step_batch(self, batch: int | None = None) -> None:
        """icefall's call: move to ``batch`` (default: the next one) and set the lrs."""
        self.last_epoch = self.last_epoch + 1 if batch is None else batch
        self._set_lrs()

    def step_epoch(self, epoch: float | None = None) -> None:
        """Move to ``epoch`` (default: the next one) and set the lrs; the batch count is kept."""
        self.epoch = self.epoch + 1 if epoch is None else epoch
        self._set_lrs()


class Eden2(Eden):
    """Eden without the epoch factor and with a batch exponent of -1/2."""

    def __init__(self, optimizer, lr_batches: float, warmup_batches: float = 500.0, warmup_start: float = 0.5,
                 last_epoch: int = -1):
        super().__init__(optimizer, lr_batches, 1.0, warmup_batches, warmup_start, last_epoch)

    def _decay(self, batch: float, epoch: float) -> float:
        return ((batch ** 2 + self.lr_batches ** 2) / self.lr_batches ** 2) ** -0.5




#: the cooldown shapes of :class:`WSD` and :class:`PowerLR`: ``x`` is the fraction of the
#: decay phase done (0 -> 1), the value multiplies the LR at the start of the decay
DECAY_SHAPES = {
    "linear": lambda x: 1.0 - x,
    "cosine": lambda x: 0.5 * (1.0 + math.cos(math.pi * x)),
    "1-sqrt": lambda x: 1.0 - math.sqrt(x),  # Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training..."
}


def _decay_shape(name: str):
    if name not in DECAY_SHAPES:
        raise ValueError(f"decay={name!r}; use one of {sorted(DECAY_SHAPES)}")
    return DECAY_SHAPES[name]


def _phases(warmup_steps: int, decay_steps: int, total_steps: int | None) -> None:
    if warmup_steps < 0 or decay_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} and decay_steps={decay_steps} must be >= 0")
    if decay_steps and total_steps is None:
        raise ValueError(f"decay_steps={decay_steps} needs total_steps= (the decay ends there); pass total_steps "
                         f"or decay_steps=0 for no cooldown")
    if total_steps is not None and warmup_steps + decay_steps > total_steps:
        raise ValueError(f"warmup_steps + decay_steps = {warmup_steps + decay_steps} exceeds total_steps="
                         f"{total_steps}; shorten the warmup or the decay")


class _PiecewiseSchedule(LRScheduler, abc.ABC):
    """Warmup, a middle phase, a cooldown: ``get_lr`` asks :meth:`lr_at` per group."""

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch, base) for base in self.base_lrs]

    @abc.abstractmethod
    def lr_at(self, step: int, base_lr: float) -> float:
        """The lr at ``step`` of a group whose initial lr is ``base_lr``."""


class WSD(_PiecewiseSchedule):
    """Warmup-Stable-Decay (Hu et al. 2024, "MiniCPM", Sec. 4): with ``W = warmup_steps``,
    ``D = decay_steps``, ``S = total_steps`` and ``lr_0`` each group's initial lr::

        lr(t) = lr_0 * (t + 1) / W                         t < W        (warmup)
        lr(t) = lr_0                                       W <= t < S - D   (stable)
        lr(t) = lr_0 * (r + (1 - r) f((t - S + D) / D))    t >= S - D   (decay)

    ``f`` is the cooldown shape (``decay``: :data:`DECAY_SHAPES`; MiniCPM decays exponentially,
    Hägele et al. 2024 find ``1-sqrt`` best, linear is the common default) and ``r =
    final_ratio``. The stable phase needs no total length, so a run can branch a cooldown off
    any checkpoint."""

    def __init__(self, optimizer, *, warmup_steps: int, total_steps: int, decay_steps: int,
                 decay: str = "linear", final_ratio: float = 0.0, last_epoch: int = -1):
        _phases(warmup_steps, decay_steps, total_steps)
        if not 0.0 <= final_ratio <= 1.0:
            raise ValueError(f"final_ratio={final_ratio} must lie in [0, 1] (the LR at the end, relative to lr_0)")
        self.warmup_steps, self.total_steps, self.decay_steps = warmup_steps, total_steps, decay_steps
        self.shape, self.final_ratio = _decay_shape(decay), final_ratio
        super().__init__(optimizer, last_epoch)

    def lr_at(self, step: int, base_lr: float) -> float:
        if step < self.warmup_steps:
            return base_lr * (step + 1) / self.warmup_steps
        start = self.total_steps - self.decay_steps
        if step < start or not self.decay_steps:
            return base_lr
        done = min(1.0, (step - start) / self.decay_steps)
        return base_lr * (self.final_ratio + (1.0 - self.final_ratio) * self.shape(done))


class PowerLR(_PiecewiseSchedule):
    """The Power scheduler (Shen et al. 2024, "Power Scheduler: A Batch Size and Token Number
    Agnostic Learning Rate Scheduler", Sec. 4): with ``n`` the tokens trained so far
    (``step * tokens_per_step``), ``beta = batch_size`` and ``a`` each group's initial lr::

        power(n) = min(lr_max, beta * a * n^b)
        lr(n)    = n / N_w * power(N_w)                    n < N_w       (warmup)
        lr(n)    = power(n)                                N_w <= n < N - N_d
        lr(n)    = f((n - N + N_d) / N_d) * power(N - N_d) n >= N - N_d  (decay)

    ``N_w = warmup_steps * tokens_per_step``, ``N_d = decay_steps * tokens_per_step``, ``N =
    total_steps * tokens_per_step``, ``f`` the cooldown shape (:data:`DECAY_SHAPES`). The
    paper's fit is ``b = -0.51``, ``a = 4``, ``lr_max = 0.02`` (batch in sequences, muP); the
    optimizer's lr is ``a``, so a sweep over "lr" sweeps ``a``. Without a decay no total length
    is needed. The LR follows the tokens and the batch size, so one ``a`` serves every token
    budget and batch (the paper's claim under muP; a sweep measures it)."""

    def __init__(self, optimizer, *, batch_size: int, tokens_per_step: int, exponent: float = -0.51,
                 lr_max: float = 0.02, warmup_steps: int = 0, decay_steps: int = 0, total_steps: int | None = None,
                 decay: str = "linear", last_epoch: int = -1):
        _phases(warmup_steps, decay_steps, total_steps)
        if batch_size <= 0 or tokens_per_step <= 0:
            raise ValueError(f"batch_size={batch_size} and tokens_per_step={tokens_per_step} must be > 0")
        if not exponent < 0:
            raise ValueError(f"exponent={exponent}: the Power scheduler decays with tokens, b < 0 (the paper: -0.51)")
        if not lr_max > 0:
            raise ValueError(f"lr_max={lr_max} must be > 0 (math.inf for no cap)")
        self.batch_size, self.tokens_per_step = batch_size, tokens_per_step
        self.exponent, self.lr_max = exponent, lr_max
        self.warmup_steps, self.decay_steps, self.total_steps = warmup_steps, decay_steps, total_steps
        self.shape = _decay_shape(decay)
        super().__init__(optimizer, last_epoch)

    def power(self, tokens: float, a: float) -> float:
        """``min(lr_max, batch_size * a * tokens^b)``."""
        return min(self.lr_max, self.batch_size * a * tokens ** self.exponent)

    def lr_at(self, step: int, base_lr: float) -> float:
        tokens = (step + 1) * self.tokens_per_step  # the tokens the coming step will have seen
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps * self.power(self.warmup_steps * self.tokens_per_step, base_lr)
        if self.decay_steps and step >= self.total_steps - self.decay_steps:
            start = self.total_steps - self.decay_steps
            done = min(1.0, (step - start) / self.decay_steps)
            return self.shape(done) * self.power(start * self.tokens_per_step, base_lr)
        return self.power(tokens, base_lr)


__all__ = ["DECAY_SHAPES", "Eden", "Eden2", "PowerLR", "WSD"]
