"""Launches and memory traffic of every fused optimizer step, counted under ``TRITON_INTERPRET=1``.

Each case runs an optimizer's Triton route (``fused=True``) on a few small CPU tensors, then
records one step with :class:`kernel_traffic.Traffic`: the kernels launched, and for every
parameter, gradient and per-element state tensor how many times each element was read and
written (by the kernels and by any torch op outside them), and the host reads of tensor values
(host syncs on CUDA). A tensor of ``n`` elements of ``s`` bytes read ``r`` times and written ``w``
times moves ``(r + w) n s`` bytes, so the tables below, in passes per element, are the bytes per
parameter of ``docs/kernels.md``: e.g. Adam fp32, ``p (1, 1), g (1, 0), m (1, 1), v (1, 1)`` =
``7 x 4 = 28 B``.

Two tables per case: ``today`` (what the kernels do now: an extra pass fails the test) and
``minimum`` (the algorithm's minimum, derived in ``docs/kernels.md``). Where today's kernels
do more than the minimum, the minimum test is ``xfail(strict=True)``: a kernel that reaches it
makes that test pass unexpectedly, and the case's ``today`` becomes its ``minimum``.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

import mupkit
from kernel_traffic import Traffic, interpreted

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not interpreted(), reason="counts accesses in Triton's interpreter: run with "
                                                          "TRITON_INTERPRET=1 (set by conftest without CUDA)")

MATRIX, VECTOR = (48, 40), (40,)  # 1920 + 40 elements: two blocks and one


@dataclass(frozen=True, eq=False)
class Case:
    """One optimizer configuration: how to build it, which state tensors are per element, which
    step to record (``before`` steps run first, unrecorded) and the expected counts. Tables map a
    tensor kind (``p``, ``g``, a state key) to ``(reads, writes)`` per element; ``kind@1d`` overrides
    it for 1-D tensors."""

    id: str
    make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
    state: tuple[str, ...]
    today: dict[str, tuple[int, int]]
    kernels: tuple[str, ...]
    minimum: dict[str, tuple[int, int]] | None = None  # None: today is the minimum
    min_kernels: int | None = None  # None: as many as today
    host_reads: int = 0  # today, on the CPU
    counter_reads: int = 0  # of those, reads of step counters that live on the CPU also on CUDA (no sync)
    before: int = 1
    dtype: torch.dtype = torch.float32
    shapes: tuple[tuple[int, ...], ...] = (MATRIX, VECTOR)
    triton_route: bool = False  # torch-based classes: take their CUDA-only Triton route on the CPU
    programs: int | None = None  # per launch; None: one per 1024-element block of each parameter
    why: str = field(default="", compare=False)  # why today exceeds the minimum

    def exceeds_minimum(self) -> bool:
        return (self.minimum is not None and self.minimum != self.today) or \
            (self.min_kernels is not None and self.min_kernels != len(self.kernels))


def expected(table: dict[str, tuple[int, int]], kind: str, dim: int) -> tuple[int, int]:
    return table.get(f"{kind}@{dim}d", table[kind])


ADAM = {"p": (1, 1), "g": (1, 0), "exp_avg": (1, 1), "exp_avg_sq": (1, 1)}
CASES = [
    Case("Adam", lambda ps: mupkit.optim.Adam(ps, lr=1e-2, fused=True), ("exp_avg", "exp_avg_sq"), ADAM,
         ("_adam_kernel",), triton_route=True),
    Case("AdamW", lambda ps: mupkit.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
         ("exp_avg", "exp_avg_sq"), ADAM, ("_adam_kernel",), triton_route=True),
    Case("AdamW-bf16", lambda ps: mupkit.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
         ("exp_avg", "exp_avg_sq"), ADAM, ("_adam_kernel",), triton_route=True, dtype=torch.bfloat16),
    Case("SGD", lambda ps: mupkit.optim.SGD(ps, lr=0.05, fused=True), (), {"p": (1, 1), "g": (1, 0)},
         ("_sgd_kernel",), triton_route=True),
    Case("SGD-momentum", lambda ps: mupkit.optim.SGD(ps, lr=0.05, momentum=0.9, fused=True), ("momentum_buffer",),
         {"p": (1, 1), "g": (1, 0), "momentum_buffer": (1, 1)}, ("_sgd_kernel",), triton_route=True),
    Case("AdamAtan2", lambda ps: mupkit.optim.AdamAtan2(ps, lr=1e-2, fused=True), ("exp_avg", "exp_avg_sq"), ADAM,
         ("_adam_atan2_kernel",)),
    Case("AdamAtan2-bf16", lambda ps: mupkit.optim.AdamAtan2(ps, lr=1e-2, fused=True), ("exp_avg", "exp_avg_sq"),
         ADAM, ("_adam_atan2_kernel",), dtype=torch.bfloat16),
    # pass 1: R, C's column sums, sum U^2 = mean(R) sum_j w_j / C_j (vector: V, sum U^2) and sum p^2, by
    # programs of whole rows (one per matrix and one per vector here); pass 2: the update. Torch mode
    # launches a third pass between them for tensors whose clamp at eps1^2 can bite: none here, so it
    # reads nothing
    Case("Adafactor", lambda ps: mupkit.optim.Adafactor(ps, fused=True), ("variance",),
         {"p": (2, 1), "g": (2, 0), "variance": (2, 1)},
         ("_statistics_kernel", "_clamped_sums_kernel", "_update_kernel"), host_reads=1, counter_reads=1, programs=2),
    Case("Adafactor-hf-bf16", lambda ps: mupkit.optim.Adafactor(ps, mode="hf", beta1=0.9, fused=True),
         ("variance", "exp_avg"), {"p": (2, 1), "g": (2, 0), "variance": (2, 1), "exp_avg": (1, 1)},
         ("_statistics_kernel", "_update_kernel"), host_reads=1, counter_reads=1, programs=2, dtype=torch.bfloat16),
    # eps1 = 1 (floor 1) with g^2 ~ 1: the clamp bites on the matrix, whose g the third pass reads
    Case("Adafactor-clamped", lambda ps: mupkit.optim.Adafactor(ps, eps=(1.0, 1e-3), fused=True), ("variance",),
         {"p": (2, 1), "g": (3, 0), "g@1d": (2, 0), "variance": (2, 1)},
         ("_statistics_kernel", "_clamped_sums_kernel", "_update_kernel"), host_reads=1, counter_reads=1, programs=2),
    # d for the update is the previous step's: one pass (the first step, d not adapting yet, is eager); d
    # stays on the device
    Case("DAdaptAdam", lambda ps: mupkit.optim.DAdaptAdam(ps, fused=True), ("exp_avg", "exp_avg_sq", "s"),
         {"p": (1, 1), "g": (1, 0), "exp_avg": (1, 1), "exp_avg_sq": (1, 1), "s": (1, 1)}, ("_dadapt_adam_kernel",)),
    # the update's denominator sqrt(v) + d eps needs this step's d: two passes; the EMAs of m and v (previous d)
    # run in pass 2, so v is read and written once
    Case("Prodigy", lambda ps: mupkit.optim.Prodigy(ps, fused=True), ("p0", "exp_avg", "exp_avg_sq", "s"),
         {"p": (2, 1), "g": (2, 0), "p0": (1, 0), "exp_avg": (1, 1), "exp_avg_sq": (1, 1), "s": (1, 1)},
         ("_prodigy_sums_kernel", "_prodigy_update_kernel")),
    # step 1 of a size_update_period of 4: RMS(P) and ss come from earlier steps; this step's <P, g>
    # for the next size step is summed in the update pass
    Case("ScaledAdam", lambda ps: mupkit.optim.ScaledAdam(ps, lr=0.05, fused=True), ("exp_avg_sq", "delta"),
         {"p": (1, 1), "g": (1, 0), "exp_avg_sq": (1, 1), "delta": (1, 1)}, ("_update_kernel",)),
    # step 3: a size-update step needs this step's <P, g> and sum P^2 before the update
    Case("ScaledAdam-size-step", lambda ps: mupkit.optim.ScaledAdam(ps, lr=0.05, fused=True), ("exp_avg_sq", "delta"),
         {"p": (2, 1), "g": (2, 0), "exp_avg_sq": (1, 1), "delta": (1, 1)}, ("_sums_kernel", "_update_kernel"),
         before=3),
    # step 12, past the first clipping threshold (step 10), not a size-update step: the global
    # gradient norm needs a pass over g before the update; the clipping factor stays on the device
    Case("ScaledAdam-clipping", lambda ps: mupkit.optim.ScaledAdam(ps, lr=0.05, clipping_scale=2.0, fused=True),
         ("exp_avg_sq", "delta"), {"p": (1, 1), "g": (2, 0), "exp_avg_sq": (1, 1), "delta": (1, 1)},
         ("_sums_kernel", "_update_kernel"), before=12),
]


def record(case: Case):
    """Run ``case.before`` steps, then record one: ``(traffic, tensors by name, warnings)``, once
    per case (the tests below read the same recording)."""
    return _record(case.id)


@functools.lru_cache(maxsize=None)
def _record(case_id: str):
    case = next(c for c in CASES if c.id == case_id)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.3).to(case.dtype)) for s in case.shapes]
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if case.triton_route:
            from mupkit.optim import dispatch
            patch.setattr(dispatch, "kernel_device", lambda t: True)  # the CUDA route, on CPU tensors
        opt = case.make(params)
        for _ in range(case.before + 1):
            for p in params:  # nonzero mean: D-Adaptation's d adapts
                p.grad = (torch.randn(p.shape, generator=gen) + 0.2).to(case.dtype)
            if _ == case.before:
                tensors = {f"{kind}[{i}]": t for i, p in enumerate(params)
                           for kind, t in [("p", p), ("g", p.grad)] + [(k, opt.state[p].get(k)) for k in case.state]
                           if t is not None}  # Adafactor's "variance": unfactored tensors only
                with Traffic(tensors) as traffic:
                    opt.step()
            else:
                opt.step()
    return traffic, tensors, [str(w.message) for w in caught]


def check(case: Case, table: dict[str, tuple[int, int]]) -> None:
    traffic, tensors, caught = record(case)
    assert not caught
    assert not traffic.torch_ops, f"torch ops outside the kernels touch per-element tensors: {traffic.torch_ops}"
    for name, t in tensors.items():
        kind = name.split("[")[0]
        reads, writes = expected(table, kind, t.dim())
        assert traffic.passes(name) == (reads, writes), name
        assert traffic.bytes(name) == (reads * t.numel() * t.element_size(), writes * t.numel() * t.element_size())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_today_s_kernels_make_no_more_passes_than_counted(case):
    """Today's launches, passes per tensor and host reads (an extra pass or launch fails)."""
    traffic, tensors, _ = record(case)
    assert traffic.kernels() == list(case.kernels)
    blocks = sum(-(-t.numel() // 1024) for name, t in tensors.items() if name.startswith("p["))
    assert all(launch.grid == (case.programs or blocks, 1, 1) for launch in traffic.launches)
    assert traffic.host_reads == case.host_reads
    check(case, case.today)


def minimum_cases() -> list:
    return [pytest.param(case, id=case.id, marks=[pytest.mark.xfail(strict=True, raises=AssertionError, reason=case.why)]
                         if case.exceeds_minimum() else []) for case in CASES]


@pytest.mark.parametrize("case", minimum_cases())
def test_kernels_move_the_algorithm_s_minimum_bytes(case):
    """The minimum of ``docs/kernels.md``: passes per tensor and launches."""
    traffic, _, _ = record(case)
    assert len(traffic.launches) == (case.min_kernels or len(case.kernels))
    check(case, case.minimum or case.today)


def host_read_cases() -> list:
    return [pytest.param(case, id=case.id, marks=[pytest.mark.xfail(strict=True, raises=AssertionError, reason=case.why)]
                         if case.host_reads > case.counter_reads else []) for case in CASES]


@pytest.mark.parametrize("case", host_read_cases())
def test_a_fused_step_reads_nothing_back_to_the_host(case):
    """No ``item()``/``tolist()``/... of device values in a fused step: on CUDA each is a host
    sync. (Adafactor reads its step counters, which it keeps on the CPU as torch's does: no sync.)"""
    assert record(case)[0].host_reads - case.counter_reads == 0


# ---------------------------------------------------------------------- the recorder itself

def _make_probe_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def probe(x_ptr, y_ptr, total_ptr, n, BLOCK: tl.constexpr):
        """``y = 2 x`` and ``total += sum x``; x is read twice, y written once."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(y_ptr + offs, 2.0 * tl.load(x_ptr + offs, mask=mask), mask=mask)
        tl.atomic_add(total_ptr, tl.sum(tl.load(x_ptr + offs, mask=mask, other=0.0), axis=0))
    return probe


def test_the_recorder_counts_masked_accesses_atomics_and_torch_ops_and_restores_the_interpreter():
    from triton.runtime import interpreter
    probe = _make_probe_kernel()
    x, y, total, z = torch.randn(100), torch.zeros(100), torch.zeros(1), torch.ones(8, 4)
    original = interpreter.InterpreterBuilder.create_masked_load
    with Traffic({"x": x, "y": y, "z": z}) as traffic:
        probe[(4,)](x, y, total, 100, BLOCK=32)  # 128 lanes, 28 masked off
        z[:2].mul_(3.0)  # a torch op on a view: 8 of 32 elements read and written
        assert z.sum().item() == 48.0
    assert interpreter.InterpreterBuilder.create_masked_load is original
    assert torch.equal(y, 2 * x) and total.item() == pytest.approx(x.sum().item(), rel=1e-5)
    assert traffic.kernels() == ["probe"] and traffic.launches[0].grid == (4, 1, 1)
    assert traffic.passes("x") == (2, 0) and traffic.passes("y") == (0, 1)
    assert traffic.bytes("x") == (800, 0) and traffic.bytes("y") == (0, 400)
    assert traffic.launches[0].read["other"] == traffic.launches[0].written["other"] == 4 * 4  # the atomics
    assert [op.name for op in traffic.torch_ops] == ["aten.mul_", "aten.sum"]
    assert traffic.bytes("z") == (8 * 4 + 32 * 4, 8 * 4)
    with pytest.raises(AssertionError, match="z: elements read between 1 and 2 times"):
        traffic.passes("z")
    assert traffic.host_reads == 1
