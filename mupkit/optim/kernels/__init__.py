"""Triton multi-tensor kernels: one launch per (device, dtype) for all of an optimizer's tensors.

Each kernel reads a :class:`~.tables.TensorTable`: device arrays of the tensors' addresses and
sizes and a block map (block ``b`` covers elements ``[start_b, start_b + BLOCK)`` of tensor
``tensor_b``), plus a per-tensor table of this step's values (effective lr, weight decay, eps,
bias corrections), so muP's per-group multipliers cost no extra launches and no host sync.

Kernels use core ``tl`` ops only (``atan2`` is written from them), so the same code runs on the
CPU under ``TRITON_INTERPRET=1``; that is how CI tests them against the single-tensor paths.
"""

from __future__ import annotations
