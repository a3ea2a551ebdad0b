"""Hypothesis: the chunk planner honours its memory targets and tiles arrays exactly."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from storage.chunking import plan_bold_chunks

shapes = st.tuples(st.integers(1, 300), st.integers(1, 300), st.integers(1, 200),
                   st.integers(1, 3000))
itemsizes = st.sampled_from([1, 2, 4, 8])
sizes = st.integers(1 << 10, 1 << 30)


@settings(max_examples=300, deadline=None)
@given(shape=shapes, itemsize=itemsizes, chunk=sizes, batch=sizes,
       shard=st.one_of(st.none(), sizes))
def test_plan_invariants(shape, itemsize, chunk, batch, shard):
    plan = plan_bold_chunks(shape, itemsize, chunk_bytes=chunk, batch_bytes=batch,
                            shard_bytes=shard)
    cx, cy, cz, ct = plan.chunks
    nx, ny, nz, nt = shape
    # within bounds, non-empty
    assert 1 <= cx <= nx and 1 <= cy <= ny and 1 <= cz <= nz and 1 <= ct <= nt
    assert plan.time_block == ct
    volume = nx * ny * nz * itemsize
    # the ingest batch (ct volumes) respects the budget whenever one volume fits in it
    if volume <= batch:
        assert ct * volume <= batch
    # time blocks are balanced: no tiny remainder block
    n_blocks = math.ceil(nt / ct)
    assert n_blocks * ct - nt < n_blocks
    # chunks meet the size target unless a single voxel time block already exceeds it
    if itemsize * ct <= chunk:
        assert cx * cy * cz * ct * itemsize <= chunk
    # shards are whole multiples of chunks, one time block deep, within their target
    if plan.shards is not None:
        sx, sy, sz, st_ = plan.shards
        assert (sx % cx, sy % cy, sz % cz) == (0, 0, 0) and st_ == ct
        assert sx * sy * sz * ct * itemsize <= shard
        assert plan.shards != plan.chunks
        # never more than one extra chunk past the array edge
        assert sx < nx + cx and sy < ny + cy and sz < nz + cz


@settings(max_examples=50, deadline=None)
@given(shape=shapes, itemsize=itemsizes)
def test_small_runs_get_whole_time_series(shape, itemsize):
    """A run that fits the batch budget is stored with every volume in each chunk."""
    nbytes = math.prod(shape) * itemsize
    plan = plan_bold_chunks(shape, itemsize, batch_bytes=max(nbytes, 1))
    assert plan.chunks[3] == shape[3]


@settings(max_examples=100, deadline=None)
@given(shape=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9),
                       st.integers(1, 12)),
       block=st.integers(1, 50), dtype=st.sampled_from(["int16", "float32", "uint8"]))
def test_time_last_is_a_pure_relayout(shape, block, dtype):
    import numpy as np

    from storage.ingest import time_last

    rng = np.random.default_rng(0)
    raw = np.asfortranarray(rng.integers(0, 100, size=shape).astype(dtype))
    out = time_last(raw, block=block)
    assert out.shape == raw.shape
    np.testing.assert_array_equal(out, raw)
    # each voxel's time series is contiguous in memory (what chunk copies need)
    assert out.strides[3] == raw.itemsize
