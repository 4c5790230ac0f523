"""The eager steps' tensor plumbing: cache-sized runs, flat pieces and reused scratch buffers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mupkit.optim.tensors import cache_sized, flat_pieces, flat_scratch, scratch

sizes = st.lists(st.integers(0, 70), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(sizes=sizes, chunk=st.integers(1, 40), transposed=st.lists(st.booleans(), min_size=12, max_size=12))
def test_cut_runs_hold_at_most_a_chunk_and_cover_every_element_once_in_order(sizes, chunk, transposed):
    """``cut=True``: every run holds at most ``chunk`` elements (a non-contiguous tensor, never
    cut, only when it is alone over the chunk), the pieces are views that tile each tensor in
    order, and per-tensor values repeat alongside their tensor's pieces."""
    tensors = []
    for n, t in zip(sizes, transposed):
        base = torch.zeros(2, n)
        tensors.append(base.t() if t and n > 1 else base[0])  # .t(): a non-contiguous (n, 2)
    names = [f"tensor {i}" for i in range(len(tensors))]
    runs = cache_sized((tensors, names), chunk=chunk, cut=True)
    for pieces, values in runs:
        total = sum(p.numel() for p in pieces)
        if total > chunk:  # only by a non-contiguous tensor, last in its run
            assert not pieces[-1].is_contiguous() and total - pieces[-1].numel() < chunk, total
        for piece, value in zip(pieces, values):
            piece.add_(1.0)  # write through the view
            owner = tensors[names.index(value)]
            assert piece.untyped_storage().data_ptr() == owner.untyped_storage().data_ptr()
    assert [v for _, values in runs for v in values] == sorted([v for _, values in runs for v in values],
                                                              key=names.index)
    for t in tensors:
        assert torch.equal(t, torch.ones_like(t)), "every element visited exactly once"


def test_uncut_runs_keep_tensors_whole_and_close_at_the_chunk():
    tensors = [torch.zeros(n) for n in (5, 30, 7, 1, 50)]
    runs = cache_sized((tensors,), chunk=16)
    assert [[t.numel() for t in run[0]] for run in runs] == [[5, 30], [7, 1, 50]]
    assert all(a is b for a, b in zip([t for run in runs for t in run[0]], tensors))


def test_flat_pieces_tile_contiguous_tensors_and_keep_others_whole():
    a, b = torch.arange(10.0).view(2, 5), torch.zeros(2, 5)
    pieces = flat_pieces(a, b, chunk=4)
    assert [tuple(p.numel() for p in piece) for piece in pieces] == [(4, 4), (4, 4), (2, 2)]
    for pa, pb in pieces:
        pb.copy_(pa)
    assert torch.equal(a, b)
    at = a.t()
    for args, chunk in (((at, b.t()), 4), ((a, b), 16)):
        (whole,) = flat_pieces(*args, chunk=chunk)
        assert all(x is y for x, y in zip(whole, args))


def test_scratch_reuses_a_slot_and_never_aliases_two_slots():
    like = [torch.zeros(3, 4), torch.zeros(5)]
    first, again, other = scratch(like, 0), scratch(like, 0), scratch(like, 1)
    assert [t.shape for t in first] == [torch.Size([3, 4]), torch.Size([5])]
    assert first[0].data_ptr() == again[0].data_ptr()
    assert first[0].data_ptr() != other[0].data_ptr()
    flat, views = flat_scratch(like, 2, torch.float64)
    assert flat.dtype == torch.float64 and flat.numel() == 17
    views[1].fill_(3.0)
    assert torch.equal(flat[12:], torch.full((5,), 3.0, dtype=torch.float64))


def test_scratch_views_are_kept_per_shapes_and_remade_for_a_grown_buffer():
    """flat_scratch keeps a reused buffer's views per set of shapes (the same view objects come
    back), makes new ones for other shapes and after the buffer grows (the old ones would alias
    a dropped buffer), and keeps none of a fresh buffer (over CPU_PIECE elements)."""
    from mupkit.optim import tensors
    like = [torch.zeros(2, 3), torch.zeros(4)]
    _, first = flat_scratch(like, 5)
    _, again = flat_scratch(like, 5)
    assert all(a is b for a, b in zip(first, again))
    _, other = flat_scratch([torch.zeros(3, 2), torch.zeros(4)], 5)
    assert other[0].shape == (3, 2) and other[0] is not first[0]
    flat, _ = flat_scratch([torch.zeros(1000)], 5)  # more than the buffer held: a new buffer
    _, after = flat_scratch(like, 5)
    assert after[0] is not first[0] and after[0].data_ptr() == flat.data_ptr()
    big = [torch.zeros(tensors.CPU_PIECE + 1)]
    assert flat_scratch(big, 5)[1][0] is not flat_scratch(big, 5)[1][0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_foreach_scalars_as_tensors_give_the_same_bits(dtype):
    """A multi-tensor op with foreach_scalar / foreach_scalars operands (0-dim tensors for fp32
    and fp64 CPU lists, the numbers themselves otherwise) gives bitwise the result of the same op
    with Python numbers, for one value, equal values, and distinct ones."""
    from mupkit.optim.tensors import foreach_scalar, foreach_scalars
    gen = torch.Generator().manual_seed(0)
    ts = [torch.randn(n, generator=gen).to(dtype) for n in (7, 1, 300)]
    for ours, numbers in ((foreach_scalar(0.123456789123, ts), 0.123456789123),
                          (foreach_scalars([0.3, 0.3, 0.3], ts), 0.3),
                          (foreach_scalars([0.3, -1.7, 1e-7], ts), [0.3, -1.7, 1e-7])):
        as_tensors = isinstance(ours[0] if isinstance(ours, list) else ours, torch.Tensor)
        assert as_tensors == (dtype != torch.bfloat16)
        a, b = [t.clone() for t in ts], [t.clone() for t in ts]
        torch._foreach_mul_(a, ours)
        torch._foreach_mul_(b, numbers)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
