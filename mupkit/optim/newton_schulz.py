"""Newton-Schulz orthogonalization of one matrix or a batch of same-shape matrices (Muon's core).

``orthogonalize(X)`` approximates ``U V^T`` of ``X = U S V^T`` by the quintic iteration of Jordan
(2024) with coefficients ``(a, b, c) = (3.4445, -4.7750, 2.0315)``::

    X <- X / max(||X||_F, eps)                    (so every singular value is <= 1)
    repeat ns_steps times:  G = X X^T;  X <- a X + (b G + c G^2) X

on the wide orientation (a tall matrix is transposed first and back after, so ``G`` is the
smaller Gram matrix). The coefficients maximize the slope at 0: the singular values land in
roughly ``[0.7, 1.2]`` rather than converging to 1, which Muon tolerates. Written with ``addmm``
(one matrix) and ``baddbmm`` (a ``(n, A, B)`` batch, one batched matmul per product for all
``n`` matrices): the op sequence of ``torch.optim.Muon``, so one matrix in bfloat16 gives its
numbers. ``dtype``: the iteration's precision (``torch.optim.Muon`` always uses bfloat16).
"""

from __future__ import annotations

import torch

#: Jordan's quintic coefficients (a, b, c) and step count (``torch.optim.Muon``'s defaults)
COEFFICIENTS = (3.4445, -4.7750, 2.0315)
STEPS = 5
EPS = 1e-7


def orthogonalize(x: torch.Tensor, coefficients: tuple[float, float, float] = COEFFICIENTS, steps: int = STEPS,
                  eps: float = EPS, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The Newton-Schulz orthogonalization of ``x`` (``(A, B)``, or ``(n, A, B)``: each of the
    ``n`` matrices on its own, batched), a new tensor of ``dtype`` and ``x``'s shape."""
    if x.ndim not in (2, 3):
        raise ValueError(f"orthogonalize takes a matrix or a batch of matrices, got shape {tuple(x.shape)}")
    if len(coefficients) != 3:
        raise ValueError(f"ns_coefficients={coefficients!r}: give three numbers (a, b, c)")
    a, b, c = coefficients
    tall = x.size(-2) > x.size(-1)
    work = x.to(dtype, copy=True)
    if tall:
        work = work.mT
    if x.ndim == 2:
        work = work.div_(work.norm().clamp(min=eps))
    else:
        work = work.div_(torch.linalg.vector_norm(work, dim=(-2, -1), keepdim=True).clamp(min=eps))
    product = torch.addmm if x.ndim == 2 else torch.baddbmm
    for _ in range(steps):
        gram = work @ work.mT
        poly = product(gram, gram, gram, beta=b, alpha=c)
        work = product(work, poly, work, beta=a)
    return work.mT if tall else work


__all__ = ["COEFFICIENTS", "EPS", "STEPS", "orthogonalize"]
