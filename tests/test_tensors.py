"""The eager steps' tensor plumbing: cache-sized runs, flat pieces and reused scratch buffers."""

from __future__ import annotations

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
