"""Ingestion: NIfTI / fMRIPrep runs -> one Zarr v3 store, in parallel on Dask.

Protocol for each run (it runs on a Dask worker, which opens the store itself):

1. read and check the headers, mask, confounds and TR (no voxel data yet);
2. compare the inputs' fingerprint with the run's completion marker in the store:
   a complete run with the same fingerprint is skipped;
3. write the run's group template (metadata, coordinates, mask, confounds) with the
   group attribute ``boldflow_status = "writing"``;
4. stream the BOLD volumes batch by batch (one sequential pass over the file) into
   chunk-aligned regions of the ``bold`` array (a run stored without voxels only passes
   them through the reducers);
5. commit: rewrite the group attributes with ``boldflow_status = "complete"`` and the
   fingerprint. That is a single key write, so a reader sees a run as complete only
   after all of its chunks exist.

Any failure removes the run's group (best effort) and is returned as a catalog row; the
other runs go on. A run left as ``"writing"`` by a killed process is redone next time.
The client then merges the rows into the catalog kept in the root group's attributes (no
consolidated metadata: see :func:`storage.catalog.write_catalog`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import logging
import math
import os
import re
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import dask
import dask.array as da
import fsspec
import numpy as np
import pandas as pd
import xarray as xr
import zarr
from zarr.codecs import BloscCodec

from . import __version__ as _version
from .bids import discover, read_sidecar_tr
from .catalog import CATALOG_ATTR, FORMAT_VERSION, STATUS_ATTR, read_catalog, write_catalog
from .chunking import ChunkPlan, parse_bytes, plan_bold_chunks
from .confounds import check_confounds, read_confounds
from .errors import InputError
from .nifti import NiftiInfo, iter_volume_batches, read_header, read_volume
from .runs import RunSpec
from .stores import StoreRef, redact_url

__all__ = ["BlockAccumulator", "BlockReducer", "IngestOptions", "ingest", "ingest_run",
           "load_manifest", "time_last_blocks"]

log = logging.getLogger(__name__)

#: affines of a mask and its BOLD image may differ by float32 rounding, not more (mm)
AFFINE_ATOL = 1e-3


@dataclass(frozen=True)
class IngestOptions:
    """How runs are written. Part of each run's fingerprint: changing it rewrites runs.

    Parameters
    ----------
    chunk_bytes : int or str, default="32MiB"
        Target uncompressed size of a BOLD chunk.
    batch_bytes : int or str, default="128MiB"
        Volumes held in memory at once while ingesting a run (the peak-memory knob).
    shard_bytes : int or str, optional
        Enable Zarr sharding with shards of about this size (recommended on object
        stores: fewer, larger objects). None: no sharding.
    series_bytes : int or str, optional, default="128MiB"
        Largest whole voxel time series block (a chunk's spatial block over every volume,
        as float64) that stages reading whole time series hold: the default
        ``block_bytes`` of :func:`storage.open_run` and of jobs. Long runs get smaller
        spatial chunks so that such readers never decode a stored chunk twice. Ingest
        with a smaller value when the pipeline runs with a smaller ``block_bytes``.
        With a brain mask, blocks are also halved until the densest block's in-mask
        voxels over all volumes fit a quarter of it (the stored block, its masked float64
        copy and the cleaned output then fit the budget together), so that the block a
        stage cleans does not grow with the run length.
        None: only ``chunk_bytes`` sets the spatial block.
    clevel : int, default=1
        Blosc compression level.
    shuffle : {"bitshuffle", "shuffle", "noshuffle"}, default="bitshuffle"
        Blosc pre-filter. On real int16 BOLD (Haxby, time-contiguous chunks) bit shuffle
        compresses clearly better than byte shuffle (2.5x vs 2.1x with zstd level 1).
    cname : {"lz4", "zstd", "lz4hc", "blosclz", "zlib"}, default="lz4"
        Blosc compressor. With bit shuffle, LZ4 encodes 2-3x and decodes 1.3-2x faster than
        zstd level 1 for 7-10 % larger stores on real BOLD (the HDF5 bitshuffle filter's
        choice for the same reason); ``"zstd"`` for the smallest store. Measured in
        tests/benchmarks/RESULTS.md ("Codec").
    voxels : bool, default=True
        Store the voxel data (the ``bold`` array). False keeps only what the run's
        reducers compute (``derived/``), with the mask, confounds and metadata: for jobs
        that need nothing else from the voxels (region means of one labels atlas), a
        store a fraction of the size, written without laying the volumes out as time
        series or compressing them. Such a run cannot serve another atlas or a voxel-wise
        stage: those need it ingested again with voxels. Needs at least one reducer.
        Such a run is read in batches of at most 8 MiB whatever ``batch_bytes``.
    """

    chunk_bytes: int | str = "32MiB"
    batch_bytes: int | str = "128MiB"
    shard_bytes: int | str | None = None
    clevel: int = 1
    shuffle: str = "bitshuffle"
    cname: str = "lz4"
    series_bytes: int | str | None = "128MiB"
    voxels: bool = True

    def normalized(self) -> IngestOptions:
        """The same options with sizes in bytes (and validated)."""
        if self.shuffle not in ("bitshuffle", "shuffle", "noshuffle"):
            raise ValueError(f"shuffle must be bitshuffle, shuffle or noshuffle, "
                             f"got {self.shuffle!r}")
        if not 0 <= int(self.clevel) <= 9:
            raise ValueError(f"clevel must be in 0..9, got {self.clevel!r}")
        if self.cname not in CNAMES:
            raise ValueError(f"cname must be one of {', '.join(CNAMES)}, got {self.cname!r}")
        return IngestOptions(
            chunk_bytes=parse_bytes(self.chunk_bytes),
            batch_bytes=parse_bytes(self.batch_bytes),
            shard_bytes=parse_bytes(self.shard_bytes) if self.shard_bytes else None,
            clevel=int(self.clevel),
            shuffle=str(self.shuffle),
            cname=str(self.cname),
            series_bytes=parse_bytes(self.series_bytes) if self.series_bytes else None,
            voxels=bool(self.voxels),
        )


#: Blosc compressors accepted for the ``bold`` array
CNAMES = ("lz4", "zstd", "lz4hc", "blosclz", "zlib")


class BlockAccumulator(Protocol):
    """Running state of a :class:`BlockReducer` for one run."""

    def update(self, index: tuple[slice, slice, slice, slice], block: np.ndarray) -> None:
        """Take one block of the run: ``bold[index] == block`` (unscaled, time last).

        ``block`` is a read-only view of a buffer that ingestion refills with the next
        block: it is only valid during this call (copy what you keep). When the run's
        voxels are stored it is a C-contiguous chunk (or shard) as written; when they are
        not (``IngestOptions.voxels=False``) it is a whole batch of volumes as read from
        the NIfTI file, Fortran-ordered (``index`` then spans the whole grid). The values
        are the same either way: only the memory layout differs.
        """

    def finish(self) -> tuple[np.ndarray, dict[str, Any]]:
        """The result array and its attributes, stored as ``<run>/derived/<name>``."""


@runtime_checkable
class BlockReducer(Protocol):
    """Something computed from a run's voxels while ingestion streams them.

    Ingestion already holds every block of a run once, decompressed, while it writes it;
    a reducer (for example region sums for an atlas) gets each block there instead of
    reading the run back from the store. Its result is written into the run's group as
    ``derived/<name>`` before the run's commit, so it exists exactly when the run is
    complete. A reducer that fails only loses its own result (logged); the run is still
    ingested, and consumers recompute from the store. Reducers must be picklable (they
    travel to the workers).

    Attributes
    ----------
    name : str
        Array name under ``derived/`` (letters, digits, ``-``, ``_``, ``.``).
    """

    name: str

    def begin(self, info: NiftiInfo, mask: np.ndarray | None) -> BlockAccumulator:
        """Start on one run: its header and brain mask (None: no mask file)."""


# ----------------------------------------------------------------------------------------
# checks on one run (no voxel data read)


@dataclass
class _CheckedRun:
    spec: RunSpec
    bold: NiftiInfo
    t_r: float
    tr_source: str
    mask: np.ndarray | None
    confounds: pd.DataFrame | None
    confounds_metadata: dict | None = None


def _check_run(spec: RunSpec, source_options: dict) -> _CheckedRun:
    bold = read_header(spec.bold, source_options)
    if len(bold.shape) == 3:
        raise InputError(spec.bold, f"is a 3D image {bold.shape}; a 4D BOLD series is expected")
    if len(bold.shape) != 4:
        raise InputError(spec.bold, f"has shape {bold.shape}; a 4D (x, y, z, time) image is "
                                    "expected")
    if bold.shape[3] < 2:
        raise InputError(spec.bold, f"has {bold.shape[3]} volume(s); a time series needs >= 2")
    if not np.all(np.isfinite(bold.affine)):
        raise InputError(spec.bold, "has a non-finite affine")

    # TR: explicit > sidecar > header. Disagreement is worth a log line, not an error
    # (fMRIPrep sidecars are authoritative; headers are often wrong after conversions).
    header_tr = bold.header_tr()
    sidecar_tr = read_sidecar_tr(spec.sidecar, source_options) if spec.sidecar else None
    if spec.t_r is not None:
        if not (np.isfinite(spec.t_r) and spec.t_r > 0):
            raise InputError(spec.bold, f"given TR {spec.t_r!r} is not a positive number")
        t_r, tr_source = float(spec.t_r), "given"
    elif sidecar_tr is not None:
        t_r, tr_source = sidecar_tr, "sidecar"
    elif header_tr is not None:
        t_r, tr_source = header_tr, "header"
    else:
        where = f" and sidecar {spec.sidecar} has no RepetitionTime" if spec.sidecar else \
            " and no JSON sidecar was found"
        raise InputError(spec.bold, "missing or zero repetition time: header pixdim[4] = "
                                    f"{float(bold.header['pixdim'][4])!r}{where}")
    if header_tr is not None and sidecar_tr is not None and abs(header_tr - sidecar_tr) > 1e-3:
        log.info("%s: header TR %.4g s differs from sidecar TR %.4g s; using the sidecar",
                 spec.bold, header_tr, sidecar_tr)

    mask = None
    if spec.mask:
        minfo = read_header(spec.mask, source_options)
        if minfo.shape[:3] != bold.shape[:3] or len(minfo.shape) != 3:
            raise InputError(spec.mask, f"mask shape {minfo.shape} does not match the BOLD "
                                        f"grid {bold.shape[:3]} of {spec.bold}")
        if not np.allclose(minfo.affine, bold.affine, atol=AFFINE_ATOL):
            raise InputError(spec.mask, "mask affine differs from the BOLD affine of "
                                        f"{spec.bold}:\n{minfo.affine}\nvs\n{bold.affine}")
        raw = read_volume(minfo)
        if np.issubdtype(raw.dtype, np.floating) and not np.all(np.isfinite(raw)):
            raise InputError(spec.mask, "mask contains NaN or inf")
        mask = (raw * minfo.slope + minfo.inter) != 0 if minfo.is_scaled else raw != 0
        if not mask.any():
            raise InputError(spec.mask, "mask is empty (no non-zero voxel)")

    confounds = None
    if spec.confounds:
        confounds = read_confounds(spec.confounds, storage_options=source_options,
                                   motion_format=spec.motion_format)
        check_confounds(confounds, bold.shape[3], spec.confounds)
    conf_meta = _confounds_metadata(spec.confounds, source_options) if spec.confounds else None
    return _CheckedRun(spec, bold, t_r, tr_source, mask, confounds, conf_meta)


def confounds_sidecar(path: str) -> str | None:
    """The JSON sidecar fMRIPrep writes next to a confounds TSV (CompCor metadata)."""
    for ext in (".tsv.gz", ".tsv"):
        if path.endswith(ext):
            return path[: -len(ext)] + ".json"
    return None


def _confounds_metadata(path: str, options: dict) -> dict | None:
    sidecar = confounds_sidecar(path)
    if sidecar is None:
        return None
    fs, fpath = fsspec.core.url_to_fs(sidecar, **options)
    try:
        if not fs.exists(fpath):
            return None
        with fs.open(fpath, "rb") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(sidecar, f"cannot read confounds sidecar JSON ({e})") from e
    if not isinstance(meta, dict):
        raise InputError(sidecar, "confounds sidecar JSON is not an object")
    return meta


# ----------------------------------------------------------------------------------------
# fingerprints


def _file_fingerprint(path: str | None, options: dict, *, full: bool) -> dict | None:
    """Identity of an input file: size + modification stamp, and a content hash.

    Small files (masks, TSVs, sidecars) are hashed whole. For BOLD images hashing every
    byte would double the read cost of a re-run that only needs to skip, so the hash
    covers the first MiB (the header and the first volumes) together with size and
    mtime/ETag, which change whenever a file is rewritten.
    """
    if path is None:
        return None
    fs, fpath = fsspec.core.url_to_fs(path, **options)
    try:
        info = fs.info(fpath)
        h = hashlib.sha256()
        with fs.open(fpath, "rb") as f:
            if full:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            else:
                h.update(f.read(1 << 20))
    except FileNotFoundError as e:
        raise InputError(path, "file not found") from e
    except OSError as e:
        raise InputError(path, f"cannot read ({e})") from e
    stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or ""
    return {"size": int(info.get("size") or 0), "stamp": str(stamp), "sha256": h.hexdigest()}


def _optional_fingerprint(path: str | None, options: dict) -> dict | None:
    if path is None:
        return None
    fs, fpath = fsspec.core.url_to_fs(path, **options)
    if not fs.exists(fpath):
        return None
    return _file_fingerprint(path, options, full=True)


def run_fingerprint(spec: RunSpec, options: IngestOptions, source_options: dict,
                    reducers: Sequence[BlockReducer] = ()) -> str:
    """sha256 over the run's input identities, its TR override and the write options.

    A run stored without voxels is only its reducers' results: their names are part of
    its fingerprint (another atlas re-ingests it). With voxels they are not (a consumer
    recomputes a missing result from the voxels), and the fingerprint is the one of
    stores written before ``voxels`` existed.
    """
    return _fingerprints(spec, options, source_options, reducers)[0]


def _fingerprints(spec: RunSpec, options: IngestOptions, source_options: dict,
                  reducers: Sequence[BlockReducer] = ()) -> tuple[str, set[str]]:
    """The run's fingerprint for ``options``, and every stored fingerprint that serves
    it (a run stored with its voxels also serves a request without them)."""
    opts = asdict(options.normalized())
    voxels = opts.pop("voxels")
    payload = {
        "format": FORMAT_VERSION,
        "bold": _file_fingerprint(spec.bold, source_options, full=False),
        "mask": _file_fingerprint(spec.mask, source_options, full=True),
        "confounds": _file_fingerprint(spec.confounds, source_options, full=True),
        "confounds_sidecar": _optional_fingerprint(
            confounds_sidecar(spec.confounds) if spec.confounds else None, source_options),
        "sidecar": _file_fingerprint(spec.sidecar, source_options, full=True),
        "t_r": spec.t_r,
        "motion_format": spec.motion_format,
        "entities": spec.entities,
        "options": opts,
    }

    def sha(obj: dict) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()

    with_voxels = sha(payload)
    if voxels:
        return with_voxels, {with_voxels}
    lean = sha({**payload, "voxels": False,
                "derived": sorted(str(r.name) for r in reducers)})
    return lean, {lean, with_voxels}


# ----------------------------------------------------------------------------------------
# writing one run


def _run_attrs(c: _CheckedRun, fingerprint: str, plan: ChunkPlan) -> dict[str, Any]:
    hdr = c.bold.header
    spec = c.spec
    return {
        STATUS_ATTR: "writing",
        "boldflow_fingerprint": fingerprint,
        "boldflow_version": _version,
        "boldflow_format": FORMAT_VERSION,
        "run_id": spec.run_id,
        "entities": dict(spec.entities),
        "repetition_time": c.t_r,
        "repetition_time_source": c.tr_source,
        "affine": np.asarray(c.bold.affine, dtype=float).tolist(),
        "voxel_size": [float(z) for z in c.bold.zooms[:3]],
        "shape": list(c.bold.shape),
        "n_volumes": int(c.bold.shape[3]),
        "spatial_units": hdr.get_xyzt_units()[0],
        "qform_code": int(hdr["qform_code"]),
        "sform_code": int(hdr["sform_code"]),
        "source_dtype": str(c.bold.dtype.newbyteorder("=")),
        "scl_slope": c.bold.slope,
        "scl_inter": c.bold.inter,
        "nifti_header": c.bold.header_b64(),
        "mask_source": "file" if c.mask is not None else "none",
        "sources": {
            "bold": redact_url(spec.bold),
            "mask": redact_url(spec.mask) if spec.mask else None,
            "confounds": redact_url(spec.confounds) if spec.confounds else None,
            "sidecar": redact_url(spec.sidecar) if spec.sidecar else None,
        },
        "chunks": list(plan.chunks),
        "shards": list(plan.shards) if plan.shards else None,
    }


def _template(c: _CheckedRun, plan: ChunkPlan, attrs: dict, options: IngestOptions):
    nx, ny, nz, nt = c.bold.shape
    raw_dtype = c.bold.dtype.newbyteorder("=")
    bold = da.zeros(c.bold.shape, dtype=raw_dtype, chunks=plan.write_unit)
    geometry = {k: attrs[k] for k in ("affine", "voxel_size", "nifti_header", "repetition_time")}
    mask = c.mask if c.mask is not None else np.ones((nx, ny, nz), dtype=bool)
    conf = c.confounds if c.confounds is not None else pd.DataFrame(index=range(nt))
    variables = {
        "bold": (("x", "y", "z", "time"), bold, {**geometry, "long_name": "BOLD signal"}),
        "mask": (("x", "y", "z"), mask, {**geometry, "long_name": "brain mask"}),
        "confounds": (("time", "confound"), conf.to_numpy(dtype=np.float64),
                      {"long_name": "confound regressors",
                       # fMRIPrep's sidecar (CompCor masks, variance explained)
                       "metadata": c.confounds_metadata or {}}),
    }
    if not options.voxels:
        del variables["bold"]
    ds = xr.Dataset(
        variables,
        coords={
            "x": np.arange(nx), "y": np.arange(ny), "z": np.arange(nz),
            "time": ("time", np.arange(nt) * c.t_r, {"units": "s", "long_name": "volume onset"}),
            "confound": ("confound", np.asarray(conf.columns, dtype=object)),
        },
        attrs=attrs,
    )
    bold_enc: dict[str, Any] = {
        "chunks": plan.chunks,
        "compressors": [BloscCodec(cname=options.cname, clevel=options.clevel,
                                  shuffle=options.shuffle)],
        "dtype": raw_dtype,
    }
    if plan.shards:
        bold_enc["shards"] = plan.shards
    if c.bold.is_scaled:
        bold_enc["scale_factor"] = c.bold.slope
        bold_enc["add_offset"] = c.bold.inter
    encoding = {
        "mask": {"chunks": (nx, ny, nz)},
        "confounds": {"chunks": (nt, max(1, conf.shape[1]))},
    }
    if options.voxels:
        encoding["bold"] = bold_enc
    return ds, encoding


def _delete_group(zstore, path: str) -> None:
    with contextlib.suppress(Exception):
        root = zarr.open_group(zstore, mode="r+", use_consolidated=False)
        if path in root:
            del root[path]


def _catalog_row(spec: RunSpec, status: str, *, error: str | None = None,
                 c: _CheckedRun | None = None, action: str = "", seconds: float = 0.0,
                 fingerprint: str | None = None, nbytes: int = 0,
                 voxels: bool | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"run_id": spec.run_id}
    for key in ("sub", "ses", "task", "acq", "run", "space"):
        row[key] = spec.entities.get(key)
    row.update({
        "group": spec.group_path,
        "status": status,
        "action": action,
        "error": error,
        "bold": redact_url(spec.bold),
        "shape": list(c.bold.shape) if c else None,
        "n_volumes": int(c.bold.shape[3]) if c else None,
        "t_r": c.t_r if c else None,
        "dtype": str(c.bold.dtype.newbyteorder("=")) if c else None,
        "n_confounds": int(c.confounds.shape[1]) if c and c.confounds is not None else 0,
        "has_mask": bool(c is not None and c.mask is not None),
        "fingerprint": fingerprint,
        # whether the store holds the run's voxels (False: only its derived arrays)
        "voxels": voxels,
        "bytes": int(nbytes),
        # what ingestion read of the source: the whole BOLD file as stored (compressed for
        # .nii.gz) when the run was ingested; nothing when it was skipped
        "source_bytes": 0,
        "seconds": round(float(seconds), 3),
    })
    if c is not None and action == "ingested":
        try:
            fs, path = fsspec.core.url_to_fs(c.bold.path, **c.bold.storage_options)
            row["source_bytes"] = int(fs.size(path))
        except Exception:  # a size is a report detail: never fail a finished run for it
            row["source_bytes"] = None
    return row


def ingest_run(spec: RunSpec, store: StoreRef, options: IngestOptions | None = None,
               source_options: dict | None = None, *, overwrite: bool = False,
               reducers: Sequence[BlockReducer] = ()) -> dict:
    """Ingest one run into ``store``; never raises for bad input, returns a catalog row.

    Parameters
    ----------
    spec : RunSpec
        The run.
    store : StoreRef
        Destination store (opened by the calling process itself).
    options : IngestOptions, optional
        Chunking and compression.
    source_options : dict, optional
        fsspec options for reading the inputs.
    overwrite : bool, default=False
        Rewrite the run even when a complete copy with the same fingerprint exists.
    reducers : sequence of BlockReducer, optional
        Computed from the blocks as they are written (see :class:`BlockReducer`); not
        applied to a run that is skipped.

    Returns
    -------
    dict
        One catalog row: entities, ``status`` ("complete" or "failed"), ``action``
        ("ingested", "skipped", "failed"), ``error`` (names the file), shape, TR, bytes,
        seconds.
    """
    options = (options or IngestOptions()).normalized()
    source_options = dict(source_options or {})
    start = time.perf_counter()
    c = None
    zstore = None
    try:
        c = _check_run(spec, source_options)
        fingerprint, accepted = _fingerprints(spec, options, source_options, reducers)
        zstore = store.open()
        path = spec.group_path
        if not overwrite:
            with contextlib.suppress(Exception):
                grp = zarr.open_group(zstore, path=path, mode="r", use_consolidated=False)
                attrs = dict(grp.attrs)
                if (attrs.get(STATUS_ATTR) == "complete"
                        and attrs.get("boldflow_fingerprint") in accepted):
                    return _catalog_row(spec, "complete", c=c, action="skipped",
                                        fingerprint=attrs["boldflow_fingerprint"],
                                        voxels=bool(attrs.get("voxels", True)),
                                        seconds=time.perf_counter() - start)
        nbytes = _write_run(c, zstore, path, fingerprint, options, reducers)
        return _catalog_row(spec, "complete", c=c, action="ingested", fingerprint=fingerprint,
                            voxels=options.voxels,
                            nbytes=nbytes, seconds=time.perf_counter() - start)
    except Exception as e:
        if zstore is not None:
            _delete_group(zstore, spec.group_path)
        if isinstance(e, InputError):
            msg = str(e)
        else:
            msg = f"{redact_url(spec.bold)}: {type(e).__name__}: {e}"
            log.debug("ingest of %s failed:\n%s", spec.run_id, traceback.format_exc())
        return _catalog_row(spec, "failed", error=msg, c=c, action="failed",
                            seconds=time.perf_counter() - start)


def time_last_blocks(raw: np.ndarray, unit: Sequence[int], *, reuse: bool = False
                     ) -> Iterator[tuple[tuple[slice, slice, slice], np.ndarray]]:
    """Split a Fortran-ordered ``(x, y, z, t)`` batch into time-last spatial blocks.

    NIfTI stores volumes one after the other; chunks store voxel time series. NumPy's 4D
    axis reversal is a strided copy at ~150 MB/s and would be the slowest step of
    ingestion. Viewed as a C-ordered ``(t, z, y, x)`` array (a free view of the Fortran
    batch), each z plane of a block is a small ``(t, y, x)`` tile, transposed to
    ``(x, y, t)`` in cache (~1 GB/s). Each block comes out C-contiguous in chunk order, so
    it is copied once here and zarr encodes it without another gather.

    Parameters
    ----------
    raw : numpy.ndarray
        ``(x, y, z, t)`` batch (Fortran order is the fast case; any layout is correct).
    unit : sequence of int
        Spatial block shape ``(ux, uy, uz)`` (a chunk or shard of the store).
    reuse : bool, default=False
        Lay every block out in the same buffer (allocated once per call): each block is
        then only valid until the generator is advanced (copy it to keep it).

    Yields
    ------
    (slice, slice, slice), numpy.ndarray
        The block's spatial position and its ``(ux, uy, uz, t)`` C-ordered values
        (edge blocks are smaller).
    """
    nx, ny, nz, nt = raw.shape
    ux, uy, uz = (int(u) for u in unit[:3])
    src = raw.T  # (t, z, y, x): C-ordered when raw is Fortran-ordered
    # one flat buffer for the largest block: edge blocks are C-ordered prefixes of it
    flat = np.empty(min(ux, nx) * min(uy, ny) * min(uz, nz) * nt, dtype=raw.dtype) \
        if reuse else None
    for x0 in range(0, nx, ux):
        x1 = min(x0 + ux, nx)
        for y0 in range(0, ny, uy):
            y1 = min(y0 + uy, ny)
            for z0 in range(0, nz, uz):
                z1 = min(z0 + uz, nz)
                shape = (x1 - x0, y1 - y0, z1 - z0, nt)
                out = flat[:math.prod(shape)].reshape(shape) if flat is not None else \
                    np.empty(shape, dtype=raw.dtype)
                planes = out.transpose(2, 1, 0, 3)  # (z, y, x, t) view of the block
                for z in range(z0, z1):
                    planes[z - z0] = src[:, z, y0:y1, x0:x1].transpose(1, 2, 0)
                yield (slice(x0, x1), slice(y0, y1), slice(z0, z1)), out


def _check_finite(raw: np.ndarray, path: str, t0: int) -> None:
    """Raise InputError naming the first NaN/inf voxel of a batch (floating dtypes only).

    Max and min propagate NaN and surface +/-inf: two vectorised passes without
    temporaries (cheaper than the float64 sum used before, and never a false alarm).
    """
    if not np.issubdtype(raw.dtype, np.floating) or raw.size == 0:
        return
    flat = raw.reshape(-1, order="A")  # a view of a contiguous batch
    if np.isfinite(np.maximum.reduce(flat)) and np.isfinite(np.minimum.reduce(flat)):
        return
    bad = ~np.isfinite(raw)
    vox = np.argwhere(bad)[0]
    raise InputError(path, f"contains {int(bad.sum())} NaN/inf voxel values "
                           f"(first at voxel {tuple(int(v) for v in vox[:3])}, "
                           f"volume {t0 + int(vox[3])})")


_DERIVED_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _begin_reducers(reducers: Sequence[BlockReducer], c: _CheckedRun) -> list:
    accs = []
    for r in reducers:
        try:
            if not _DERIVED_NAME.match(str(r.name)):
                raise ValueError(f"invalid derived array name {r.name!r}")
            accs.append((r.name, r.begin(c.bold, c.mask)))
        except Exception:  # a reducer only loses its own result, never the run
            log.warning("%s: reducer %r not applied:\n%s", c.spec.run_id,
                        getattr(r, "name", r), traceback.format_exc())
    return accs


# ----------------------------------------------------------------------------------------
# writing whole chunks without zarr's per-chunk machinery

#: Blosc's header overhead: a compressed chunk is at most this much larger than its input
_BLOSC_MAX_OVERHEAD = 16


@functools.cache
def _blosc_compress_ctx() -> Callable[..., int] | None:
    """c-blosc's ``blosc_compress_ctx`` from the library numcodecs ships, or None.

    numcodecs' ``Blosc.encode`` calls this same function (one thread, its own context)
    but always returns a fresh bytes object: one chunk-sized allocation per chunk, page
    faulted anew in Dask workers (they run with ``MALLOC_TRIM_THRESHOLD_``, so freed
    buffers go back to the OS). Called directly, it compresses into a buffer we reuse.
    Any use is first checked to give numcodecs' bytes (:meth:`_ChunkWriter._verified`).
    ``BOLDFLOW_DIRECT_BLOSC=0`` in the environment turns it off (numcodecs' own encode is
    then used: the same bytes, one allocation per chunk).
    """
    if os.environ.get("BOLDFLOW_DIRECT_BLOSC", "1") == "0":
        return None
    try:
        import ctypes

        import numcodecs.blosc

        fn = ctypes.CDLL(numcodecs.blosc.__file__).blosc_compress_ctx
    except (ImportError, OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p,
                   ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_VERIFIED: dict[tuple, bool] = {}
_VERIFIED_LOCK = threading.Lock()


class _ChunkWriter:
    """Writes whole chunks of a zarr v3 ``bytes`` + ``blosc`` array, byte for byte as zarr.

    ``arr[index] = block`` costs much more than the encode itself: each call goes
    through zarr's event loop and encode thread pool, an edge block is first copied into
    a fresh chunk-shaped array (chunk shapes rarely divide the grid), and numcodecs'
    Blosc returns a fresh bytes object per chunk. Here a block is encoded on the calling
    thread into buffers reused for the whole run (an edge block padded with the fill
    value, as zarr does) and the bytes are stored under the chunk's key with the store's
    own ``set`` (atomic for local stores). Only blocks that are whole chunks (or reach
    the array's end) take this path; anything else returns False and the caller falls
    back to zarr.

    Small compressed chunks are queued (copied, at most ``max_pending`` bytes) and stored
    together, ``async.concurrency`` at a time as zarr itself writes: one store round trip
    per chunk (~1 ms for a local file here, a request latency on an object store) would
    otherwise dominate runs stored as thousands of small chunks. :meth:`flush` stores
    what is queued; call it before the run's commit.

    Use :meth:`for_array` (None when the array's layout is not this simple one).
    """

    #: queued compressed bytes at most (a larger chunk is stored at once, from its buffer)
    max_pending = 16 << 20

    def __init__(self, arr: zarr.Array, blosc: Any) -> None:
        self._pending: list[tuple[str, bytes]] = []
        self._pending_bytes = 0
        self.arr = arr
        self.chunks = tuple(int(n) for n in arr.chunks)
        self.shape = tuple(int(n) for n in arr.shape)
        self.dtype = np.dtype(arr.dtype)
        self.fill = np.asarray(arr.fill_value, dtype=self.dtype)
        # what zarr's BloscCodec encodes with (its numcodecs codec) and the typesize it
        # declares (numcodecs >= 0.16 is given it; the check in _verified covers older)
        self.codec = blosc._blosc_codec
        self.typesize = int(blosc.typesize or self.dtype.itemsize)
        self._pad: np.ndarray | None = None  # chunk-shaped, for edge blocks
        self._dest: np.ndarray | None = None  # compressed bytes
        self._compress = _blosc_compress_ctx() if self._verified() else None

    @classmethod
    def for_array(cls, arr: zarr.Array) -> _ChunkWriter | None:
        """A writer for ``arr``, or None if its codecs or chunking are not supported."""
        try:
            from zarr.codecs import BytesCodec

            meta = arr.metadata
            if meta.zarr_format != 3 or getattr(arr, "shards", None) is not None \
                    or getattr(meta, "storage_transformers", ()):
                return None
            codecs = tuple(meta.codecs)
            dtype = np.dtype(arr.dtype)
            if len(codecs) != 2 or type(codecs[0]) is not BytesCodec \
                    or type(codecs[1]) is not BloscCodec or not dtype.isnative \
                    or dtype.hasobject:
                return None
            endian = codecs[0].endian
            if endian is not None and dtype.itemsize > 1 and endian.value != sys.byteorder:
                return None
            if not hasattr(codecs[1], "_blosc_codec"):
                return None  # another zarr version: its exact encoding is not known here
            return cls(arr, codecs[1])
        except Exception:  # unknown metadata layout: zarr's own path is always right
            log.debug("chunk writer not used:\n%s", traceback.format_exc())
            return None

    def _params(self) -> tuple[str, int, int, int, int]:
        c = self.codec
        return str(c.cname), int(c.clevel), int(c.shuffle), int(c.blocksize), self.typesize

    def _verified(self) -> bool:
        """Whether direct compression gives numcodecs' bytes for these parameters.

        Checked once per process and parameter set, on a sample of this dtype (several
        Blosc blocks, compressible and not), against the codec zarr itself uses; a
        mismatch (another numcodecs, another c-blosc) keeps numcodecs for good.
        """
        key = (*self._params(), self.dtype.str)
        with _VERIFIED_LOCK:
            if key not in _VERIFIED:
                _VERIFIED[key] = self._check_against_numcodecs()
            return _VERIFIED[key]

    def _check_against_numcodecs(self) -> bool:
        if _blosc_compress_ctx() is None:
            return False
        rng = np.random.default_rng(0)
        n = (1 << 19) // self.dtype.itemsize
        if self.dtype.kind == "f":
            sample = (1000 + rng.standard_normal(n) * np.linspace(0, 50, n)).astype(self.dtype)
        elif self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            sample = rng.integers(max(info.min, -500), min(info.max, 500), n,
                                  dtype=self.dtype, endpoint=True)
            sample[: n // 3] = 0
        elif self.dtype.kind == "b":
            sample = rng.random(n) < 0.2
        else:
            return False
        try:
            # numcodecs uses one thread (no Blosc thread pool) off the main thread, as in
            # zarr's encode pool: compare with that
            with ThreadPoolExecutor(1) as pool:
                ref = bytes(pool.submit(self.codec.encode, sample.view(np.uint8)).result())
            got = bytes(self._encode_into(sample, _blosc_compress_ctx()))
        except Exception:
            log.debug("direct Blosc compression not used:\n%s", traceback.format_exc())
            return False
        if got != ref:
            log.info("direct Blosc compression differs from numcodecs' here; not used")
        return got == ref

    def _encode_into(self, src: np.ndarray, compress: Callable[..., int]) -> memoryview:
        cname, clevel, shuffle, blocksize, typesize = self._params()
        nbytes = src.nbytes
        if self._dest is None or self._dest.nbytes < nbytes + _BLOSC_MAX_OVERHEAD:
            self._dest = np.empty(nbytes + _BLOSC_MAX_OVERHEAD, dtype=np.uint8)
        # the destination size numcodecs gives, not the buffer's: Blosc stores a chunk
        # uncompressed when compressing it would not fit in that
        size = compress(clevel, shuffle, typesize, nbytes, src.ctypes.data,
                        self._dest.ctypes.data, nbytes + _BLOSC_MAX_OVERHEAD,
                        cname.encode("ascii"), blocksize, 1)
        if size <= 0:
            raise RuntimeError(f"Blosc compression failed (code {size})")
        return memoryview(self._dest)[:size]

    def _chunk_coords(self, index: tuple[slice, ...], block: np.ndarray
                      ) -> tuple[int, ...] | None:
        coords = []
        for sl, n, c, total in zip(index, block.shape, self.chunks, self.shape, strict=True):
            start = sl.start or 0
            if start % c or (n != c and start + n != total) or n > c:
                return None
            coords.append(start // c)
        return tuple(coords)

    def encode(self, index: tuple[slice, ...], block: np.ndarray) -> memoryview | bytes | None:
        """The stored bytes of the chunk ``block`` fills (None: not a whole chunk).

        The result may be a view of a buffer reused by the next call.
        """
        if block.ndim != len(self.chunks) or block.dtype != self.dtype \
                or self._chunk_coords(index, block) is None:
            return None
        src = block
        if block.shape != self.chunks:
            # an edge chunk: zarr stores it whole, the part outside the array filled
            if self._pad is None:
                self._pad = np.empty(self.chunks, dtype=self.dtype)
            pad = self._pad
            for axis, n in enumerate(block.shape):
                # the complement of block's region, one slab per axis
                pad[(*(slice(0, m) for m in block.shape[:axis]), slice(n, None))] = self.fill
            pad[tuple(slice(0, n) for n in block.shape)] = block
            src = pad
        elif not block.flags.c_contiguous:
            src = np.ascontiguousarray(block)
        if self._compress is not None:
            return self._encode_into(src, self._compress)
        # zarr's own encode call (off the main thread, as here in Dask or ingest's thread
        # pool, numcodecs compresses with one thread, so the bytes are zarr's too)
        return self.codec.encode(src.reshape(-1).view(np.uint8))

    def write(self, index: tuple[slice, ...], block: np.ndarray) -> bool:
        """Store or queue ``block`` as the chunk at ``index`` (see :meth:`flush`); False
        (nothing written) if it is not a whole chunk."""
        data = self.encode(index, block)
        if data is None:
            return False
        key = self.arr.metadata.encode_chunk_key(self._chunk_coords(index, block))
        path = f"{self.arr.path}/{key}" if self.arr.path else key
        if len(data) >= self.max_pending:
            self.flush()
            # synchronous, from the reused buffer: free again when this returns
            self._store([(path, data)])
            return True
        self._pending.append((path, bytes(data)))  # a copy: the buffer is reused
        self._pending_bytes += len(data)
        if self._pending_bytes >= self.max_pending:
            self.flush()
        return True

    def flush(self) -> None:
        """Store every queued chunk (returns when all are stored)."""
        if self._pending:
            pending, self._pending, self._pending_bytes = self._pending, [], 0
            self._store(pending)

    def _store(self, items: list[tuple[str, Any]]) -> None:
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.common import concurrent_map
        from zarr.core.sync import sync

        store = self.arr.store
        proto = default_buffer_prototype()

        async def put(path: str, data: Any) -> None:
            await store.set(path, proto.buffer.from_bytes(data))

        sync(concurrent_map(items, put, limit=int(zarr.config.get("async.concurrency"))))


def _write_run(c: _CheckedRun, zstore, path: str, fingerprint: str,
               options: IngestOptions, reducers: Sequence[BlockReducer] = ()) -> int:
    info = c.bold
    plan = plan_bold_chunks(info.shape, info.dtype.itemsize, chunk_bytes=options.chunk_bytes,
                            batch_bytes=options.batch_bytes, shard_bytes=options.shard_bytes,
                            series_bytes=options.series_bytes, mask=c.mask,
                            masked_series_bytes=(options.series_bytes or 0) // 4 or None)
    attrs = _run_attrs(c, fingerprint, plan)
    # False: no ``bold`` array, only the reducers' results under ``derived/``
    attrs["voxels"] = bool(options.voxels)
    if not options.voxels and not reducers:
        raise ValueError(f"{c.spec.run_id}: ingesting without voxels needs at least one "
                         "reducer (the run would hold no data)")
    ds, encoding = _template(c, plan, attrs, options)
    with warnings.catch_warnings():
        # zarr's notes on v3 string dtypes, and xarray's on scaled integers without a
        # _FillValue (NIfTI has no missing-value marker; NaN input is rejected earlier)
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=xr.SerializationWarning)
        # mode="w" replaces any stale or partial copy of this run (and only this run)
        ds.to_zarr(zstore, group=path, mode="w", compute=False, zarr_format=3,
                   consolidated=False, encoding=encoding)
    accs = _begin_reducers(reducers, c)
    if not options.voxels:
        if len(accs) < len(reducers):
            raise RuntimeError(f"{c.spec.run_id}: a reducer could not start (logged); "
                               "without voxels the run would miss its result")
        nbytes = _reduce_volumes(c, plan, accs)
    else:
        nbytes = _write_voxels(c, zstore, path, plan, accs)
    for name, acc in accs:
        try:
            data, meta = acc.finish()
            data = np.asarray(data)
            zarr.create_array(zstore, name=f"{path}/derived/{name}", data=data,
                              attributes=_jsonable(meta), overwrite=True,
                              dimension_names=[f"dim_{i}" for i in range(data.ndim)])
        except Exception:
            if not options.voxels:
                raise
            log.warning("%s: reducer %r result not written:\n%s", c.spec.run_id, name,
                        traceback.format_exc())
    grp = zarr.open_group(zstore, path=path, mode="r+", use_consolidated=False)
    attrs[STATUS_ATTR] = "complete"
    attrs["ingested_at"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    grp.attrs.put(attrs)  # one key write: the commit
    return nbytes


#: volumes read at once for a run stored without voxels: no chunk needs a long time block,
#: and a batch that stays in cache between the inflate and the reducers is faster
#: (0.65 -> 0.50-0.58 s per 61x73x61x200 run at 4-16 MiB, RESULTS.md session 10)
_REDUCE_BATCH_BYTES = 8 << 20


def _reduce_volumes(c: _CheckedRun, plan: ChunkPlan, accs: list) -> int:
    """A run without voxels: each batch of volumes, checked, goes to the reducers as it
    was read (NIfTI order, no time-series layout); any reducer error fails the run."""
    info = c.bold
    volume = math.prod(info.shape[:3]) * info.dtype.itemsize
    n = max(1, min(plan.time_block, _REDUCE_BATCH_BYTES // volume))
    nbytes = 0
    for t0, raw in iter_volume_batches(info, n, reuse=True):
        _check_finite(raw, info.path, t0)
        index = (slice(None), slice(None), slice(None), slice(t0, t0 + raw.shape[3]))
        view = raw.view()
        view.flags.writeable = False
        for _name, acc in accs:
            acc.update(index, view)
        del view
        nbytes += raw.nbytes
        del raw
    return nbytes


def _write_voxels(c: _CheckedRun, zstore, path: str, plan: ChunkPlan, accs: list) -> int:
    info = c.bold
    # every block is written whole and BOLD chunks are rarely all zero: skip zarr's
    # per-chunk "all fill value?" scan (a full extra pass over the data)
    arr = zarr.open_array(zstore, path=f"{path}/bold", mode="r+").with_config(
        {"write_empty_chunks": True})
    # whole chunks encoded on this thread into reused buffers (zarr's own path otherwise)
    writer = _ChunkWriter.for_array(arr)
    nbytes = 0
    # one batch buffer for the run and one block buffer per batch, refilled in place: no
    # batch- or block-sized allocation (and its page faults) each time. Nothing keeps a
    # reference past its use: a block is written (synchronously) and reduced before the
    # next one is laid out, and a batch is done with before the next one is read.
    for t0, raw in iter_volume_batches(info, plan.time_block, reuse=True):
        _check_finite(raw, info.path, t0)
        # one block (chunk or shard) at a time: the re-laid copy and the encode buffers
        # stay a fraction of the batch
        tsl = slice(t0, t0 + raw.shape[3])
        for idx, block in time_last_blocks(raw, plan.write_unit, reuse=True):
            index = (*idx, tsl)
            if writer is None or not writer.write(index, block):
                arr[index] = block
            if accs:
                view = block.view()
                view.flags.writeable = False  # reducers read; the buffer is refilled next
                for name, acc in list(accs):
                    try:
                        acc.update(index, view)
                    except Exception:
                        log.warning("%s: reducer %r dropped:\n%s", c.spec.run_id, name,
                                    traceback.format_exc())
                        accs.remove((name, acc))
                del view
            del block
        nbytes += raw.nbytes
        del raw
    if writer is not None:
        writer.flush()
    return nbytes


def _jsonable(meta: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(meta, default=lambda o: o.tolist() if hasattr(o, "tolist")
                                 else str(o)))


# ----------------------------------------------------------------------------------------
# many runs


def load_manifest(path: str | os.PathLike) -> list[RunSpec]:
    """Read explicit runs from a YAML/JSON manifest (for data that is not BIDS).

    The file holds a list (or a mapping with key ``runs``) of entries with the
    :class:`RunSpec` fields; ``subject``/``task``/``session``/``run`` are accepted as
    shorthands for the entities. Relative paths are relative to the manifest.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise InputError(str(path), f"cannot read manifest ({e})") from e
    entries = data.get("runs") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise InputError(str(path), "manifest must be a non-empty list of runs (or {runs: [...]})")
    specs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "bold" not in entry:
            raise InputError(str(path), f"runs[{i}]: needs at least a 'bold' key")
        entry = dict(entry)
        entities = dict(entry.pop("entities", {}) or {})
        for short, key in (("subject", "sub"), ("session", "ses"), ("task", "task"),
                           ("run", "run"), ("space", "space"), ("acq", "acq")):
            if short in entry:
                entities[key] = str(entry.pop(short))
        for key in ("bold", "mask", "confounds", "sidecar"):
            if entry.get(key) and "://" not in str(entry[key]):
                entry[key] = str((path.parent / entry[key]).resolve())
        try:
            specs.append(RunSpec(entities=entities, **entry))
        except (TypeError, ValueError) as e:
            raise InputError(str(path), f"runs[{i}]: {e}") from e
    return specs


def _absolute(spec: RunSpec) -> RunSpec:
    """Local paths made absolute: workers may run in another working directory."""
    fields = {}
    for key in ("bold", "mask", "confounds", "sidecar"):
        value = getattr(spec, key)
        if value and "://" not in str(value):
            fields[key] = str(Path(value).expanduser().resolve())
    return dataclasses.replace(spec, **fields) if fields else spec


def _resolve_runs(source, source_options: dict, filters: dict) -> list[RunSpec]:
    if isinstance(source, RunSpec):
        return [_absolute(source)]
    if isinstance(source, Sequence) and not isinstance(source, str | bytes):
        specs = list(source)
        if not all(isinstance(s, RunSpec) for s in specs):
            raise TypeError("a list source must contain RunSpec objects")
        return [_absolute(s) for s in specs]
    src = str(source)
    if src.endswith((".yaml", ".yml", ".json")) and "://" not in src:
        return load_manifest(src)
    return discover(src, storage_options=source_options, **filters)


def _init_root(zstore) -> zarr.Group:
    root = zarr.open_group(zstore, mode="a", zarr_format=3, use_consolidated=False)
    fmt = root.attrs.get("boldflow_format")
    if fmt is None:
        root.attrs.update({"boldflow_format": FORMAT_VERSION, "boldflow_version": _version})
    elif fmt != FORMAT_VERSION:
        raise InputError(str(zstore), f"store has boldflow format {fmt}, this version writes "
                                      f"{FORMAT_VERSION}; use a new store")
    return root


def ingest(source: str | os.PathLike | RunSpec | Iterable[RunSpec],
           store: str | os.PathLike | StoreRef, client=None, *,
           storage_options: dict | None = None, source_options: dict | None = None,
           subjects=None, sessions=None, tasks=None, runs=None, spaces=None,
           chunk_bytes: int | str = "32MiB", batch_bytes: int | str = "128MiB",
           shard_bytes: int | str | None = None, clevel: int = 1,
           shuffle: str = "bitshuffle", cname: str = "lz4",
           series_bytes: int | str | None = "128MiB", voxels: bool = True,
           overwrite: bool = False,
           progress: bool | Callable[[dict, int], None] = False,
           reducers: Sequence[BlockReducer] = ()) -> pd.DataFrame:
    """Ingest fMRI runs into a Zarr v3 store, in parallel, resumably.

    Parameters
    ----------
    source : str, path, RunSpec or list of RunSpec
        A BIDS/fMRIPrep derivatives folder or URL (discovered with
        :func:`storage.discover`), a YAML/JSON manifest of explicit runs, or RunSpecs.
    store : str, path or StoreRef
        Destination: local path or fsspec URL (``s3://bucket/study.zarr``).
    client : distributed.Client, optional
        Where to run. None: the current default client if one exists, else Dask's local
        threaded scheduler in this process.
    storage_options, source_options : dict, optional
        fsspec options of the store and of the source (credentials, endpoints).
    subjects, sessions, tasks, runs, spaces : str or list of str, optional
        Discovery filters (BIDS sources only).
    chunk_bytes, batch_bytes, shard_bytes, clevel, shuffle, cname, series_bytes, voxels
        See :class:`IngestOptions` (``voxels=False`` needs ``reducers``).
    overwrite : bool, default=False
        Rewrite runs that are already complete.
    progress : bool or callable, default=False
        True: show distributed's (or dask's) progress bar. A callable is called as
        ``progress(row, n_runs)`` with each run's catalog row as soon as that run
        finishes (``row["action"]`` is "ingested", "skipped" or "failed") and the number
        of runs being ingested, in this process, e.g. to drive
        :class:`pipeline.progress.StageProgress`.
    reducers : sequence of BlockReducer, optional
        Computed from each ingested run's blocks as they are written, in the same pass,
        and stored as ``<run>/derived/<name>`` (e.g. region sums for an atlas, so a
        labels job never reads the run back). Runs that are skipped get none.

    Returns
    -------
    pandas.DataFrame
        The catalog rows of this ingestion, one per run, with ``status``
        ("complete"/"failed"), ``action`` ("ingested"/"skipped"/"failed") and ``error``.
        The store's full catalog (all runs ever ingested) is
        :func:`storage.read_catalog`.
    """
    source_options = dict(source_options or {})
    ref = StoreRef.coerce(store, storage_options)
    options = IngestOptions(chunk_bytes, batch_bytes, shard_bytes, clevel,
                            shuffle, cname, series_bytes, voxels).normalized()
    if not options.voxels and not reducers:
        raise ValueError("voxels=False needs at least one reducer: without voxels a run "
                         "holds only what its reducers compute")
    filters = {"subjects": subjects, "sessions": sessions, "tasks": tasks, "runs": runs,
               "spaces": spaces}
    specs = _resolve_runs(source, source_options, filters)
    ids = [s.run_id for s in specs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError(str(source), f"several inputs map to the same run id: {dup}")
    zstore = ref.open()
    _init_root(zstore)

    rows = _map_runs(specs, ref, options, source_options, overwrite, client, progress,
                     tuple(reducers))
    frame = pd.DataFrame(rows)
    write_catalog(zstore, rows)
    return frame


def _map_runs(specs, ref, options, source_options, overwrite, client,
              progress: bool | Callable[[dict, int], None],
              reducers: tuple = ()) -> list[dict]:
    """Ingest every run, on ``client`` or with local threads; rows in ``specs`` order.

    A callable ``progress`` gets ``(row, len(specs))`` as each run finishes (always in
    this process).
    """
    callback = progress if callable(progress) else None
    if client is None:
        with contextlib.suppress(ImportError, ValueError):
            from distributed import get_client

            client = get_client()
    if client is not None:
        from distributed import as_completed

        token = dask.base.tokenize(ref.url, options)
        # one graph update for all runs: the scheduler then sees one group larger than the
        # cluster and queues it, handing each worker a run as it frees up (submitted one by
        # one, the first few would be assigned to workers before the group looks large)
        futures = client.map(ingest_run, list(specs), store=ref, options=options,
                             source_options=source_options, overwrite=overwrite,
                             reducers=reducers, pure=False,
                             key=[f"ingest-{spec.run_id}-{token}" for spec in specs])
        if progress and callback is None:
            from distributed import progress as dprogress

            dprogress(futures)
        by_key = {}
        for fut in as_completed(futures):
            by_key[fut.key] = fut.result()
            if callback is not None:
                callback(by_key[fut.key], len(specs))
        return [by_key[f.key] for f in futures]
    if callback is not None:
        from concurrent.futures import ThreadPoolExecutor, as_completed

        # same threads as dask's local scheduler, but each row is reported as it finishes
        with ThreadPoolExecutor(max_workers=dask.system.CPU_COUNT) as pool:
            futures = {pool.submit(ingest_run, spec, ref, options, source_options,
                                   overwrite=overwrite, reducers=reducers): i
                       for i, spec in enumerate(specs)}
            rows: list[dict] = [{}] * len(specs)
            for fut in as_completed(futures):
                rows[futures[fut]] = fut.result()
                callback(rows[futures[fut]], len(specs))
        return rows
    tasks = [dask.delayed(ingest_run, pure=False)(spec, ref, options, source_options,
                                                  overwrite=overwrite, reducers=reducers)
             for spec in specs]
    if progress:
        from dask.diagnostics import ProgressBar

        with ProgressBar():
            return list(dask.compute(*tasks, scheduler="threads"))
    return list(dask.compute(*tasks, scheduler="threads"))


__all__ += ["CATALOG_ATTR", "read_catalog", "run_fingerprint"]
