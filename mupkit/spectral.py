"""Spectral muP: learning-rate multipliers for optimizers whose update has a known spectral norm.

The spectral condition for feature learning (Yang, Simon & Bernstein 2023, "A Spectral Condition
for Feature Learning", Cond. 1) asks, for a matrix with fan-out ``A`` and fan-in ``B``, for
``||dW||_* = Theta(sqrt(A / B))`` (spectral norm). Muon (Jordan 2024) orthogonalizes its momentum
with Newton-Schulz iterations, so its direction ``O`` has singular values near 1 whatever the
gradient's scale, and it steps ``dW = lr * adjust(A, B) * O``, hence ``||dW||_* ~ lr * adjust(A, B)``.
The conventions of ``torch.optim.Muon``'s ``adjust_lr_fn`` (:data:`ADJUSTMENTS`):

* ``"original"`` (Jordan): ``adjust = sqrt(max(1, A / B))``;
* ``"match_rms_adamw"`` (Moonlight, Liu et al. 2025, Sec. 2.2): ``adjust = 0.2 sqrt(max(A, B))``
  (update RMS ``0.2 lr``, AdamW's).

Meeting the condition at every width, with the LR tuned at the base shape ``(A0, B0)``, takes the
multiplier (:func:`spectral_multiplier`)::

    mult = [sqrt(A / B) / adjust(A, B)] / [sqrt(A0 / B0) / adjust(A0, B0)]

which is 1 at the base (so muP + Muon equals ``torch.optim.Muon`` there). Per convention:

* ``"original"``: ``sqrt(A/B) / sqrt(max(1, A/B)) = min(1, sqrt(A/B))``, so
  ``mult = min(1, sqrt(A/B)) / min(1, sqrt(A0/B0))``: 1 for every matrix with ``A >= B`` at both
  sizes (no width factor: nanochat #644), ``sqrt(m_out / m_in)`` for ``A < B`` at both;
* ``"match_rms_adamw"``: ``sqrt(A/B) / (0.2 sqrt(max(A, B)))`` is ``5 / sqrt(B)`` for ``A >= B``
  and ``5 sqrt(A) / B`` for ``A < B``, so a square hidden matrix gets ``mult = m^-1/2``.

Applying Adam's hidden ``1/m_in`` on top of either is the double scaling of Megatron-LM #3715.

Which matrix: the parameter seen as ``(A, B)`` along the plan's fan axes; a conv kernel
``(out, in, *k)`` is the matrix ``(out, in * prod(k))`` (Moonlight #31), so its kernel size, which
does not scale, cancels in the ratio. ``B / B0 = m_in`` and ``A / A0 = m_out``, so the multiplier
is a function of the base fans and the width multipliers (:class:`SpectralLR`).

**Relative updates** (what a coordinate check records as ``kind="update"``): the Frobenius
ratio ``r = ||dW||_F / ||W_0||_F`` of a matrix Muon orthogonalizes is *not* width-free under
muP; its law (:func:`relative_update_factor`) follows from the spectral condition and ranks
(Yang, Simon & Bernstein 2023, Sec. 3: updates are low rank, the init is not):

* ``W_0`` has i.i.d. entries of std ``sigma ~ B^-1/2`` (muP's hidden init), so ``||W_0||_F =
  sigma sqrt(A B)`` while ``||W_0||_* ~ sigma (sqrt(A) + sqrt(B))``: full stable rank,
  ``||W_0||_F^2 / ||W_0||_*^2 ~ min(A, B)``;
* ``dW = lr mult adjust(A, B) O`` with ``mult adjust ~ sqrt(A / B)`` (the condition above) and
  ``O`` orthogonalized: its singular values are ~1 on the rank of the momentum, so
  ``||dW||_F^2 = ||dW||_*^2 rank(O)``, and ``rank(O) <= min(A, B, rows)`` where ``rows`` is how
  many rows the matrix multiplies in one step (the tokens of a linear layer, batch x output
  positions of a conv), as the gradient ``sum_rows delta x^T`` has at most that rank.

Both spectral norms are Theta(1) relative to each other, hence ``r ~ sqrt(min(A, B, rows) /
min(A, B))`` up to a width-free constant. In muP's limit (width -> infinity at a fixed batch, the
*rank-limited* regime, ``rows <= min(A, B)``) a hidden matrix, whose fans both scale, has
``r ~ width^-1/2``: slope -1/2. When the matrix is narrower than the batch's rows
(``min(A, B) <= rows``, *full rank*), ``O`` fills it and ``r`` is width-free: slope 0; between the
two the factor interpolates. Momentum sums the steps' gradients, so after ``t`` steps the bound
is ``t x rows``; the law takes one step's rows, muP's limit ``width >> t x rows``. In the
coordinate checks (32 tokens, widths from 64, 4 steps) the measured slopes stay within 0.1 of -1/2
(the worst, -0.41..-0.44, at step 4); the accumulated bound would predict -0.44 at step 4, the
flattening that shows there. The law is the orthogonalized matrices' only: the parameters Muon's AdamW part steps
(embeddings, readout, vectors) have entrywise-normalized updates, ``RMS(dW) ~`` their LR
multiplier, which muP keeps width-free like their init scale, so their ``r`` is width-free
(slope 0).
"""

from __future__ import annotations

import math
from fractions import Fraction
from dataclasses import dataclass
from typing import Sequence

#: torch.optim.Muon's ``adjust_lr_fn`` values (``None`` means ``"original"``)
ADJUSTMENTS = ("original", "match_rms_adamw")


def adjust(convention: str | None, fan_out: int | float, fan_in: int | float) -> float:
    """Muon's LR factor for a matrix ``(fan_out, fan_in)`` (``torch.optim.Muon``'s ``adjust_lr_fn``)."""
    if convention is None or convention == "original":
        return math.sqrt(max(1.0, fan_out / fan_in))
    if convention == "match_rms_adamw":
        return 0.2 * math.sqrt(max(fan_out, fan_in))
    raise ValueError(f"adjust_lr_fn={convention!r}; use None, 'original' or 'match_rms_adamw'")


def spectral_multiplier(convention: str | None, base: Sequence[float], target: Sequence[float]) -> float:
    """The muP LR multiplier of a Muon-stepped matrix of base fans ``base = (A0, B0)`` at
    ``target = (A, B)``: ``[sqrt(A/B) / adjust(A, B)] / [sqrt(A0/B0) / adjust(A0, B0)]`` (1 at
    the base), from the squares in exact rational arithmetic, so matrices whose multipliers are
    equal get the same float (and share a param group)."""
    return math.sqrt(_squared_step(convention, *target) / _squared_step(convention, *base))


def _squared_step(convention: str | None, fan_out: float, fan_in: float) -> Fraction:
    """``(sqrt(A/B) / adjust(A, B))^2`` up to a constant factor (``0.04`` for ``match_rms_adamw``)."""
    a, b = Fraction(fan_out), Fraction(fan_in)
    if convention is None or convention == "original":
        return (a / b) / max(Fraction(1), a / b)
    if convention == "match_rms_adamw":
        return (a / b) / max(a, b)
    raise ValueError(f"adjust_lr_fn={convention!r}; use None, 'original' or 'match_rms_adamw'")


def matrix_fans(shape: Sequence[int], fan_out_axis: int | None, fan_in_axis: int | None) -> tuple[int, int] | None:
    """``(fan_out, fan_in)`` of the matrix an orthogonalizing optimizer sees: a 2-D parameter
    along its fan axes, a conv kernel ``(out, in, *k)`` as ``(out, in * prod(k))``; None for
    anything else (vectors, expert stacks), which is not one matrix."""
    if fan_out_axis is None or fan_in_axis is None:
        return None
    if len(shape) == 2:
        return shape[fan_out_axis], shape[fan_in_axis]
    if len(shape) > 2 and (fan_out_axis, fan_in_axis) == (0, 1):
        return shape[0], math.prod(shape[1:])
    return None


def relative_update_factor(fans: tuple[int, int], rows: int | None) -> float:
    """The width dependence of ``||dW||_F / ||W_0||_F`` for an orthogonalized step of the matrix
    ``fans = (A, B)`` that multiplies ``rows`` rows per step: ``sqrt(min(A, B, rows) / min(A, B))``
    (the "Relative updates" law above; ``rows=None``: unknown, taken as muP's rank-limited limit,
    ``rank(O)`` fixed, i.e. ``min(A, B)^-1/2``). Its log-log slope against width is the law's."""
    narrow = min(fans)
    rank = 1 if rows is None else min(narrow, rows)
    return math.sqrt(rank / narrow)


@dataclass(frozen=True)
class SpectralLR:
    """The LR rule of a hidden matrix under an orthogonalizing optimizer with ``convention``:
    :func:`spectral_multiplier` at target fans ``(A0 m_out, B0 m_in)``, from the base fans."""

    convention: str

    def at(self, base_fans: tuple[int, int], m_in: float, m_out: float) -> float:
        a0, b0 = base_fans
        return spectral_multiplier(self.convention, (a0, b0), (a0 * m_out, b0 * m_in))


__all__ = ["ADJUSTMENTS", "SpectralLR", "adjust", "matrix_fans", "relative_update_factor",
           "spectral_multiplier"]
