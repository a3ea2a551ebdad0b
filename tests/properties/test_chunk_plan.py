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
       shard=st.one_of(st.none(), sizes), series=st.one_of(st.none(), sizes))
def test_plan_invariants(shape, itemsize, chunk, batch, shard, series):
    plan = plan_bold_chunks(shape, itemsize, chunk_bytes=chunk, batch_bytes=batch,
                            shard_bytes=shard, series_bytes=series)
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
    # a chunk's spatial block over every volume (float64) fits the stages' block budget
    if series is not None and 8 * nt <= series:
        assert cx * cy * cz * nt * 8 <= series
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
       unit=st.tuples(st.integers(1, 10), st.integers(1, 10), st.integers(1, 10)),
       dtype=st.sampled_from(["int16", "float32", "uint8"]),
       fortran=st.booleans())
def test_time_last_blocks_tile_the_batch_exactly(shape, unit, dtype, fortran):
    import numpy as np

    from storage.ingest import time_last_blocks

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 100, size=shape).astype(dtype)
    if fortran:
        raw = np.asfortranarray(raw)
    seen = np.zeros(shape[:3], dtype=int)
    for (sx, sy, sz), block in time_last_blocks(raw, unit):
        np.testing.assert_array_equal(block, raw[sx, sy, sz])
        # each block is C-contiguous: voxel time series adjacent (what chunks store)
        assert block.flags.c_contiguous and block.dtype == raw.dtype
        assert block.shape[:3] == tuple(min(u, n - s.start) for u, n, s in
                                         zip(unit, shape[:3], (sx, sy, sz), strict=True))
        seen[sx, sy, sz] += 1
    assert (seen == 1).all()  # every voxel exactly once


@settings(max_examples=100, deadline=None)
@given(shape=st.tuples(st.integers(1, 80), st.integers(1, 80), st.integers(1, 80),
                       st.integers(2, 2000)),
       itemsize=st.sampled_from([2, 4]),
       budget=st.sampled_from(["4MiB", "16MiB", "128MiB"]))
def test_readers_never_split_stored_chunks(shape, itemsize, budget):
    """open_run's whole-time-series blocks (time_blocks) with the same budget are the
    stored spatial chunks themselves: no stored chunk is decoded twice."""
    import dask.array as da
    import xarray as xr

    from storage.chunking import parse_bytes
    from storage.dataset import time_blocks

    plan = plan_bold_chunks(shape, itemsize, series_bytes=parse_bytes(budget))
    if 8 * shape[3] > parse_bytes(budget):
        return  # one voxel's series alone exceeds the budget: nothing can fit
    bold = xr.DataArray(da.zeros(shape, chunks=plan.chunks, dtype=f"i{itemsize}"),
                        dims=("x", "y", "z", "time"))
    bold.encoding["chunks"] = plan.chunks
    out = time_blocks(bold, budget)
    for d, c, n in zip("xyz", plan.chunks[:3], shape[:3], strict=True):
        assert out[d] == da.core.normalize_chunks((c,), (n,))[0]


@settings(max_examples=100, deadline=None)
@given(shape=st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(1, 40),
                       st.integers(1, 2000)),
       series=st.sampled_from([1 << 20, 8 << 20, 128 << 20]),
       masked=st.sampled_from([1 << 18, 1 << 20, 4 << 20]),
       fill=st.floats(0.05, 1.0), seed=st.integers(0, 2**16))
def test_masked_blocks_fit_their_budget(shape, series, masked, fill, seed):
    """With a mask, the densest block's in-mask series (float64) fit masked_series_bytes
    (unless one voxel's series alone exceeds it), counted against a brute-force count; and
    a masked plan only ever refines the unmasked one (readers still never split it)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    mask = rng.random(shape[:3]) < fill
    plain = plan_bold_chunks(shape, 4, series_bytes=series)
    plan = plan_bold_chunks(shape, 4, series_bytes=series, mask=mask,
                            masked_series_bytes=masked)
    cx, cy, cz, nt = *plan.chunks[:3], shape[3]
    densest = max(int(mask[i:i + cx, j:j + cy, k:k + cz].sum())
                  for i in range(0, shape[0], cx) for j in range(0, shape[1], cy)
                  for k in range(0, shape[2], cz))
    if 8 * nt <= masked:
        assert densest * nt * 8 <= masked
    assert plan.chunks[3] == plain.chunks[3]
    # the same halving sequence, continued: no side grows
    for c, p in zip(plan.chunks[:3], plain.chunks[:3], strict=True):
        assert c <= p
