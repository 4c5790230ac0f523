"""Eden, the learning-rate schedule trained with ScaledAdam (Yao et al. 2024, "Zipformer",
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


__all__ = ["Eden", "Eden2"]
