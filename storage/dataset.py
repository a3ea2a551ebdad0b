"""Reading a boldflow store as lazy, dask-backed xarray Datasets."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from .catalog import STATUS_ATTR, read_catalog
from .chunking import parse_bytes
from .errors import IncompleteRunError, StoreError
from .stores import StoreRef

__all__ = ["BoldStore", "open_run", "open_store", "world_coordinates"]

_ENTITY_ARGS = {"subject": "sub", "session": "ses", "task": "task", "run": "run",
                "space": "space", "acq": "acq"}

log = logging.getLogger(__name__)


class BoldStore:
    """A boldflow Zarr store: its catalog and lazy access to each run.

    Use :func:`open_store` to create one.

    Attributes
    ----------
    ref : StoreRef
        Where the store is (URL and fsspec options).
    zarr_store : zarr.abc.store.Store
        The opened zarr store.
    """

    def __init__(self, ref: StoreRef, *, read_only: bool = True) -> None:
        self.ref = ref
        self.zarr_store = ref.open(read_only=read_only)
        try:
            self._root = zarr.open_group(self.zarr_store, mode="r", use_consolidated=False)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise StoreError(f"{ref}: no boldflow store here") from e
        if "boldflow_format" not in self._root.attrs:
            raise StoreError(f"{ref}: a Zarr group, but not a boldflow store "
                             "(no boldflow_format attribute)")

    @property
    def catalog(self) -> pd.DataFrame:
        """One row per run ever ingested (status ``complete`` or ``failed``)."""
        return read_catalog(self.zarr_store)

    def runs(self) -> pd.DataFrame:
        """Catalog rows of the runs that can be opened."""
        cat = self.catalog
        return cat[cat["status"] == "complete"].reset_index(drop=True)

    def find(self, **entities: Any) -> pd.Series:
        """The one complete catalog row matching the entities (``subject=``, ``task=``...)."""
        rows = self.runs()
        for arg, value in entities.items():
            if value is None:
                continue
            key = _ENTITY_ARGS.get(arg, arg)
            value = str(value).removeprefix(f"{key}-")
            if key not in rows:
                raise StoreError(f"unknown entity {arg!r}")
            rows = rows[rows[key].astype(str) == value]
        if len(rows) == 0:
            failed = self.catalog
            for arg, value in entities.items():
                if value is not None:
                    key = _ENTITY_ARGS.get(arg, arg)
                    failed = failed[failed[key].astype(str) == str(value)]
            hint = ""
            if len(failed):
                hint = f"; it failed to ingest: {failed['error'].iloc[0]}"
            raise StoreError(f"{self.ref}: no complete run matches {entities}{hint}")
        if len(rows) > 1:
            raise StoreError(f"{self.ref}: {len(rows)} runs match {entities}; add entities "
                             f"to choose one of {list(rows['run_id'])}")
        return rows.iloc[0]

    def open_run(self, subject: str | None = None, task: str | None = None,
                 run: str | int | None = None, session: str | None = None, *,
                 space: str | None = None, acq: str | None = None,
                 chunks: dict | str | None = "time",
                 block_bytes: int | str = "128MiB") -> xr.Dataset:
        """Open one run lazily. See :func:`open_run`."""
        row = self.find(subject=subject, task=task, run=run, session=session, space=space,
                        acq=acq)
        return self.open_group(row["group"], chunks=chunks, block_bytes=block_bytes)

    def open_group(self, group: str, *, chunks: dict | str | None = "time",
                   block_bytes: int | str = "128MiB") -> xr.Dataset:
        """Open the run stored in ``group`` (a path such as ``sub-01/task-rest``).

        See :func:`open_run` for ``chunks`` and ``block_bytes``.
        """
        try:
            grp = zarr.open_group(self.zarr_store, path=group, mode="r", use_consolidated=False)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise StoreError(f"{self.ref}: no run group {group!r}") from e
        status = grp.attrs.get(STATUS_ATTR)
        if status != "complete":
            raise IncompleteRunError(f"{self.ref}: run {group!r} is not complete "
                                     f"(status {status!r}); re-run the ingestion")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)
            ds = xr.open_zarr(self.zarr_store, group=group, consolidated=False,
                              chunks={}, zarr_format=3)
        if chunks == "time":
            if "bold" not in ds:  # a run ingested without voxels
                return _finish(ds)
            # merge each spatial block's time chunks (stages see whole voxel time series),
            # splitting the block in space if all its volumes would exceed block_bytes
            ds["bold"] = ds["bold"].chunk(time_blocks(ds["bold"], block_bytes))
        elif chunks is not None:
            ds = ds.chunk(chunks)
        return _finish(ds)

    def __repr__(self) -> str:
        cat = self.catalog
        n_ok = int((cat["status"] == "complete").sum()) if len(cat) else 0
        return f"<BoldStore {self.ref}: {n_ok} complete run(s), {len(cat) - n_ok} failed>"


def time_blocks(bold: xr.DataArray, block_bytes: int | str = "128MiB") -> dict[str, Any]:
    """Chunks for ``bold`` with whole time series and at most ``block_bytes`` (float64).

    Each stored spatial chunk is split into equal parts (halving its largest side) until
    one part times all volumes fits; the split parts never straddle stored chunks.

    A split costs reads: every part decodes the whole stored chunk(s) it lies in, so N
    parts read the stored bytes N times. For a memory budget below the stored chunks,
    ingest with a smaller ``chunk_bytes`` (about ``block_bytes / 2`` for float32 data read
    as float64) rather than lowering ``block_bytes`` alone.
    """
    budget = parse_bytes(block_bytes)
    nt = bold.sizes["time"]
    stored = bold.encoding.get("chunks") or tuple(c[0] for c in bold.chunks)
    dims = list(bold.dims)
    spatial = {d: int(stored[dims.index(d)]) for d in ("x", "y", "z")}
    while np.prod(list(spatial.values())) * nt * 8 > budget and max(spatial.values()) > 1:
        d = max(spatial, key=spatial.get)
        spatial[d] = -(-spatial[d] // 2)
    parts = int(np.prod([-(-int(stored[dims.index(d)]) // spatial[d]) for d in spatial]))
    if parts > 1:
        log.info("block_bytes=%s splits each stored chunk into %d parts: each stored chunk "
                 "is decoded %d times (ingest with a smaller chunk_bytes to avoid it)",
                 block_bytes, parts, parts)
    out: dict[str, Any] = {"time": -1}
    for d, size in spatial.items():
        n_stored = int(stored[dims.index(d)])
        # parts of each stored chunk: chunk sizes that restart at every stored boundary
        sizes = []
        for start in range(0, bold.sizes[d], n_stored):
            length = min(n_stored, bold.sizes[d] - start)
            sizes += [min(size, length - k) for k in range(0, length, size)]
        out[d] = tuple(sizes)
    return out


def _finish(ds: xr.Dataset) -> xr.Dataset:
    ds.attrs["affine"] = np.asarray(ds.attrs["affine"], dtype=float)
    if "bold" in ds:
        ds["bold"].attrs["affine"] = ds.attrs["affine"]
    ds["mask"].attrs["affine"] = ds.attrs["affine"]
    if ds.sizes["confound"]:
        names = [str(v) for v in ds["confound"].values]
        ds = ds.assign_coords(confound=np.array(names, dtype=str))
    else:
        ds = ds.assign_coords(confound=np.array([], dtype=str))
    return ds


def open_store(store: str | os.PathLike | StoreRef, *, storage_options: dict | None = None,
               read_only: bool = True) -> BoldStore:
    """Open a boldflow store (local path or fsspec URL).

    Examples
    --------
    >>> bs = open_store("study.zarr")  # doctest: +SKIP
    >>> bs.catalog[["run_id", "status", "n_volumes"]]  # doctest: +SKIP
    >>> ds = bs.open_run(subject="01", task="rest")  # doctest: +SKIP
    """
    return BoldStore(StoreRef.coerce(store, storage_options), read_only=read_only)


def open_run(store: str | os.PathLike | StoreRef | BoldStore, subject: str | None = None,
             task: str | None = None, run: str | int | None = None,
             session: str | None = None, *, space: str | None = None, acq: str | None = None,
             storage_options: dict | None = None,
             chunks: dict | str | None = "time", block_bytes: int | str = "128MiB") -> xr.Dataset:
    """Open one run of a store as a lazy :class:`xarray.Dataset`.

    Parameters
    ----------
    store : str, path, StoreRef or BoldStore
        The store.
    subject, task, run, session, space, acq : str, optional
        BIDS entities (without their ``sub-`` etc. prefixes) selecting exactly one run.
    storage_options : dict, optional
        fsspec options of the store.
    chunks : "time", dict or None, default="time"
        ``"time"``: the stored spatial blocks, each with all volumes (what per-voxel
        temporal stages need). A dict: passed to :meth:`xarray.Dataset.chunk`. None:
        the on-disk chunks.
    block_bytes : int or str, default="128MiB"
        With ``chunks="time"``: the largest block of voxels x all volumes, counted in
        float64 (the pipeline's working precision). A stored spatial block whose time
        series exceed it is split in space, so a task's memory does not grow with the
        number of volumes. Splitting costs reads (each split piece decompresses the whole
        stored chunk): ingest with a smaller ``chunk_bytes`` for very long runs, and lower
        this only for workers with little memory.

    Returns
    -------
    xarray.Dataset
        ``bold`` (x, y, z, time; scaled values, float when the NIfTI was scaled),
        ``mask`` (x, y, z; bool), ``confounds`` (time, confound), coordinates ``time``
        (seconds), ``x``/``y``/``z`` (voxel indices) and ``confound`` (column names);
        attrs ``repetition_time`` (s), ``affine`` (4x4 ndarray), ``entities``,
        ``voxel_size`` and the NIfTI header needed for exact export. A run ingested
        without voxels (attribute ``voxels`` False) has no ``bold``.

    Raises
    ------
    StoreError
        No run, or several runs, match; :class:`IncompleteRunError` if the run was not
        completely written.
    """
    bs = store if isinstance(store, BoldStore) else open_store(store,
                                                               storage_options=storage_options)
    return bs.open_run(subject=subject, task=task, run=run, session=session, space=space,
                       acq=acq, chunks=chunks, block_bytes=block_bytes)


def world_coordinates(ds: xr.Dataset | xr.DataArray) -> xr.DataArray:
    """World (scanner/template, mm) coordinates of every voxel, lazily, from the affine.

    Returns a DataArray ``(x, y, z, axis)`` with ``axis`` = ``["x", "y", "z"]`` in mm.
    """
    affine = np.asarray(ds.attrs["affine"], dtype=float)
    ijk = xr.broadcast(ds["x"], ds["y"], ds["z"])
    world = [sum(affine[r, c] * ijk[c] for c in range(3)) + affine[r, 3] for r in range(3)]
    return xr.concat(world, dim=pd.Index(["x", "y", "z"], name="axis")).transpose(
        "x", "y", "z", "axis")
