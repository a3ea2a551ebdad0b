"""Chunk planning: pure functions from array shapes and memory targets to chunk shapes.

BOLD is stored with dimensions ``(x, y, z, time)``. Every chunk holds a spatial block over
a contiguous range of volumes. The time range is as long as the ingest memory budget
allows (the whole run when it fits, so most runs get "time-contiguous" chunks holding
every volume of their voxels); readers merge the time blocks of each spatial block, so
pipeline stages always see whole voxel time series. For long runs the spatial block is
also kept small enough that its whole time series fits the stages' block budget
(``series_bytes``): readers then never split a stored chunk, which would decode it once
per part.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["ChunkPlan", "parse_bytes", "plan_bold_chunks"]

MiB = 1 << 20


def parse_bytes(value: int | float | str) -> int:
    """``"256MiB"``/``"1GB"``/``1e8`` -> bytes (dask's parser: the same units as dask)."""
    from dask.utils import parse_bytes as _parse

    return int(value) if isinstance(value, int | float) else int(_parse(value))


@dataclass(frozen=True)
class ChunkPlan:
    """Chunk (and shard) shapes for one BOLD array.

    Attributes
    ----------
    chunks : tuple of int
        Zarr chunk shape ``(cx, cy, cz, ct)``.
    shards : tuple of int or None
        Zarr shard shape, a multiple of ``chunks`` covering whole spatial blocks of one
        time block, so that each ingest batch writes whole shards (no read-modify-write).
    time_block : int
        Volumes read and written per ingest batch (= ``chunks[3]``).
    """

    chunks: tuple[int, int, int, int]
    shards: tuple[int, int, int, int] | None
    time_block: int

    @property
    def write_unit(self) -> tuple[int, int, int, int]:
        """The shape one writer must cover at a time (shard if sharded, else chunk)."""
        return self.shards or self.chunks


def _halve_while(dims: list[int], too_big: Callable[[list[int]], bool]) -> list[int]:
    """Halve the largest dimension while ``too_big(block)`` (and a side can still shrink)."""
    block = list(dims)
    while too_big(block) and max(block) > 1:
        i = max(range(len(block)), key=lambda k: block[k])
        block[i] = math.ceil(block[i] / 2)
    return block


def _split_to_target(dims: list[int], fixed_bytes: int, target: int) -> list[int]:
    """Halve the largest dimension until the block is at most ``target`` bytes."""
    return _halve_while(dims, lambda b: fixed_bytes * math.prod(b) > target)


def _densest(mask: np.ndarray, block: list[int]) -> int:
    """Most in-mask voxels of any block of the grid of ``block``-shaped blocks."""
    counts = mask.astype(np.int64)
    for axis, size in enumerate(block):
        counts = np.add.reduceat(counts, np.arange(0, mask.shape[axis], size), axis=axis)
    return int(counts.max()) if counts.size else 0


def _split_masked(block: list[int], mask: np.ndarray, fixed_bytes: int,
                  target: int) -> list[int]:
    """Go on halving (as :func:`_split_to_target`) until the densest block fits ``target``."""
    return _halve_while(block, lambda b: fixed_bytes * _densest(mask, b) > target)


def plan_bold_chunks(shape: tuple[int, int, int, int], itemsize: int, *,
                     chunk_bytes: int = 32 * MiB, batch_bytes: int = 128 * MiB,
                     shard_bytes: int | None = None,
                     series_bytes: int | None = 128 * MiB, mask: np.ndarray | None = None,
                     masked_series_bytes: int | None = 32 * MiB) -> ChunkPlan:
    """Plan chunks for a ``(x, y, z, time)`` array.

    Parameters
    ----------
    shape : tuple of int
        ``(nx, ny, nz, nt)``.
    itemsize : int
        Bytes per voxel value on disk.
    chunk_bytes : int, default=32 MiB
        Target uncompressed chunk size.
    batch_bytes : int, default=128 MiB
        Memory budget of one ingest batch: the number of volumes held at once. When the
        whole run fits, chunks span all volumes.
    shard_bytes : int, optional
        Target shard size for object stores (several chunks per object); None: no sharding.
    series_bytes : int, optional, default=128 MiB
        Largest size of a chunk's spatial block over *all* ``nt`` volumes as float64 (what
        a stage reading whole voxel time series holds: open_run's ``block_bytes``). A run
        longer than one batch gets spatial blocks this small, so that readers never split
        a stored chunk. None: ``chunk_bytes`` alone sets the spatial block.
    mask : numpy.ndarray of bool, optional
        The run's brain mask ``(nx, ny, nz)``. With ``series_bytes`` set, spatial blocks are
        also halved until the *densest* block's in-mask voxels over all volumes, as
        float64 (the ``(time, voxel)`` block the stages clean), fit ``masked_series_bytes``.
        Without it the widest masked block grows with the run length even under the same
        ``series_bytes``: short runs get big blocks that the brain fills sparsely, long
        runs small ones at the centre of the brain that it fills completely.
    masked_series_bytes : int, optional, default=32 MiB
        See ``mask``. None: no mask-based split.

    Returns
    -------
    ChunkPlan
    """
    nx, ny, nz, nt = (int(s) for s in shape)
    if min(nx, ny, nz, nt) < 1:
        raise ValueError(f"cannot plan chunks for shape {shape}")
    vol = nx * ny * nz * itemsize
    time_block = max(1, min(nt, batch_bytes // max(vol, 1)))
    # fewer, equal time blocks: 300 volumes with room for 250 -> 2 x 150, not 250 + 50
    n_blocks = math.ceil(nt / time_block)
    time_block = math.ceil(nt / n_blocks)
    block = _split_to_target([nx, ny, nz], itemsize * time_block, chunk_bytes)
    if series_bytes:
        # halving again (not a fresh split) keeps the parts that readers' time_blocks
        # would cut out of the larger block: the same shapes, now stored whole
        block = _split_to_target(block, 8 * nt, series_bytes)
        if mask is not None and masked_series_bytes:
            block = _split_masked(block, np.asarray(mask, dtype=bool), 8 * nt,
                                  masked_series_bytes)
    cx, cy, cz = block
    chunks = (cx, cy, cz, time_block)
    shards = None
    if shard_bytes:
        # grow the spatial block by whole chunks (doubling) up to the shard target
        sx, sy, sz = cx, cy, cz
        while True:
            grown = False
            for i, (n, c) in enumerate(((nx, cx), (ny, cy), (nz, cz))):
                cur = [sx, sy, sz]
                if cur[i] < n:
                    cur[i] = min(cur[i] * 2, math.ceil(n / c) * c)
                    if math.prod(cur) * itemsize * time_block <= shard_bytes:
                        sx, sy, sz = cur
                        grown = True
            if not grown:
                break
        shards = (sx, sy, sz, time_block)
        if shards == chunks:
            shards = None
    return ChunkPlan(chunks=chunks, shards=shards, time_block=time_block)
