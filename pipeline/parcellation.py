"""Atlases and region signals, out of core over voxel blocks.

Label atlases give region means (as :class:`nilearn.maskers.NiftiLabelsMasker`),
probabilistic maps give least-squares region signals (as
:class:`nilearn.maskers.NiftiMapsMasker`). Both are reductions over voxels: each voxel
block of the masked ``(time, voxel)`` matrix contributes small partial sums (per-label
sums, or ``M^T M`` and ``M^T Y``), which are added up; no stage holds a run.

Regions that have no voxel inside a subject's mask are kept as NaN columns, so every
subject has the same columns, labelled by the atlas' region names.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import dask
import dask.array as da
import nibabel as nib
import numpy as np
import pandas as pd
import xarray as xr

__all__ = ["Atlas", "LabelSums", "ingested_label_signals", "label_signals", "load_atlas",
           "map_signals"]


@dataclass
class Atlas:
    """An atlas on a data grid.

    Attributes
    ----------
    kind : {"labels", "maps"}
        Label image (one integer per voxel) or probabilistic maps (one volume per region).
    data : numpy.ndarray
        ``(x, y, z)`` int labels, or ``(x, y, z, region)`` float maps, on the data grid.
    labels : list of int
        Label values of the regions (labels atlases), in column order.
    names : list of str
        Region names, in column order.
    affine : numpy.ndarray
        The grid's affine.
    """

    kind: str
    data: np.ndarray
    labels: list[int]
    names: list[str]
    affine: np.ndarray
    source: str = ""
    meta: dict = field(default_factory=dict)


def _read_table(path: str) -> dict[int, str] | None:
    """Region names from a BIDS ``_dseg.tsv`` (index, name) or a FreeSurfer-style LUT."""
    stem = path
    for ext in (".nii.gz", ".nii"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    candidates = [stem + ".tsv"]
    base = os.path.basename(stem)
    if "atlas-" in base:  # tpl-X_atlas-Y_res-02_desc-Z_dseg -> atlas-Y_desc-Z_dseg.tsv
        parts = [p for p in base.split("_") if p.split("-")[0] in ("atlas", "desc", "seg")
                 or "-" not in p]
        candidates.append(os.path.join(os.path.dirname(stem), "_".join(parts) + ".tsv"))
    for cand in candidates:
        if os.path.exists(cand):
            table = pd.read_csv(cand, sep="\t")
            cols = {c.lower(): c for c in table.columns}
            if "index" in cols and ("name" in cols or "label" in cols):
                name_col = cols.get("name", cols.get("label"))
                return {int(i): str(n) for i, n in zip(table[cols["index"]], table[name_col],
                                                       strict=True)}
    return None


def load_atlas(path: str | os.PathLike, *, reference: xr.Dataset | xr.DataArray,
               kind: str = "auto", names: Sequence[str] | None = None,
               split_connected: bool = False, min_region_size: int = 1) -> Atlas:
    """Read an atlas and resample it to a run's grid.

    Parameters
    ----------
    path : str or path
        NIfTI label image (3D integers) or probabilistic maps (4D).
    reference : xarray.Dataset or DataArray
        A run (or anything with ``affine`` and x/y/z sizes) giving the target grid.
    kind : {"auto", "labels", "maps"}
        ``auto``: 3D -> labels, 4D -> maps.
    names : list of str, optional
        Region names; default from a ``.tsv`` next to the atlas (BIDS ``index``/``name``),
        else ``label-<n>`` / ``map-<n>``.
    split_connected : bool, default=False
        Split each label into its 26-connected components
        (:func:`nilearn.regions.connected_label_regions`) before resampling.
    min_region_size : int, default=1
        With ``split_connected``: components smaller than this (in mm^3) are dropped.

    Notes
    -----
    Labels are resampled with nearest-neighbour interpolation, maps with continuous
    interpolation, as nilearn's maskers do with ``resampling_target="data"``.
    """
    from nilearn.image import resample_to_img

    path = str(path)
    img = nib.load(path)
    if kind == "auto":
        kind = "maps" if len(img.shape) == 4 and img.shape[3] > 1 else "labels"
    shape = tuple(int(reference.sizes[d]) for d in ("x", "y", "z"))
    affine = np.asarray(reference.attrs["affine"], dtype=float)
    target = nib.Nifti1Image(np.zeros(shape, dtype=np.int8), affine)
    table = _read_table(path)
    if kind == "labels":
        if len(img.shape) == 4:
            img = nib.Nifti1Image(np.asanyarray(img.dataobj)[..., 0], img.affine, img.header)
        if split_connected:
            from nilearn.regions import connected_label_regions

            if table:
                img, label_names = connected_label_regions(
                    img, min_size=min_region_size,
                    labels=[table.get(i, f"label-{i}") for i in _labels_of(img)])
                table = dict(zip(_labels_of(img), label_names, strict=True))
            else:
                img = connected_label_regions(img, min_size=min_region_size)
        same = img.shape[:3] == shape and np.allclose(img.affine, affine, atol=1e-3)
        res = img if same else resample_to_img(img, target, interpolation="nearest",
                                               force_resample=True, copy_header=True)
        data = np.rint(np.asanyarray(res.dataobj)).astype(np.int32)
        labels = _labels_of(img)  # every atlas label, present on this grid or not
        if names is None:
            names = [table.get(i, f"label-{i}") if table else f"label-{i}" for i in labels]
        return Atlas("labels", data, labels, list(map(str, names)), affine, path)
    if kind != "maps":
        raise ValueError(f"kind must be auto, labels or maps, got {kind!r}")
    same = img.shape[:3] == shape and np.allclose(img.affine, affine, atol=1e-3)
    res = img if same else resample_to_img(img, target, interpolation="continuous",
                                           force_resample=True, copy_header=True)
    data = np.asanyarray(res.dataobj).astype(np.float64)
    n = data.shape[3]
    if names is None:
        names = [table.get(i + 1, f"map-{i}") if table else f"map-{i}" for i in range(n)]
    return Atlas("maps", data, list(range(n)), list(map(str, names)), affine, path)


def _labels_of(img) -> list[int]:
    values = np.unique(np.rint(np.asanyarray(img.dataobj)).astype(np.int64))
    return [int(v) for v in values if v != 0]


# ---------------------------------------------------------------------------- labels


def _label_sums(block: np.ndarray, order: np.ndarray, starts: np.ndarray,
                present: np.ndarray, n_regions: int) -> np.ndarray:
    out = np.zeros((block.shape[0], n_regions), dtype=np.float64)
    if present.size:
        out[:, present] = np.add.reduceat(block[:, order], starts, axis=1)
    return out


def _chunk_label_sums(block: np.ndarray, ridx: np.ndarray, n_regions: int) -> np.ndarray:
    # one stored (x, y, z, t) chunk -> (1, 1, 1, t, region) partial sums; voxel time
    # series are contiguous rows of the chunk, so the gather copies whole rows
    nt = block.shape[3]
    out = np.zeros((1, 1, 1, nt, n_regions), dtype=np.float64)
    order, present, starts = _region_plan(ridx.ravel())
    if order.size:
        rows = block.reshape(-1, nt)[order]
        out[0, 0, 0][:, present] = np.add.reduceat(rows, starts, axis=0, dtype=np.float64).T
    return out


def _volume_label_sums(block: np.ndarray, plan: tuple[np.ndarray, np.ndarray, np.ndarray],
                       n_regions: int, step_bytes: int = 8 << 20) -> np.ndarray:
    # an (x, y, z, t) batch in NIfTI (Fortran) order -> (t, region) sums. Each volume is a
    # contiguous row of block.T: gather the labelled voxels of a few volumes at a time
    # (bounded temporaries) and sum each region's run of columns
    order, present, starts = plan
    nt = block.shape[3]
    out = np.zeros((nt, n_regions), dtype=np.float64)
    if not order.size:
        return out
    vols = block.T.reshape(nt, -1)  # a view when block is Fortran-ordered
    step = max(1, step_bytes // (order.size * 8))
    for t in range(0, nt, step):
        rows = np.take(vols[t:t + step], order, axis=1)
        out[t:t + step, present] = np.add.reduceat(rows, starts, axis=1, dtype=np.float64)
    return out


def _region_plan(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions of the labelled voxels of a flat region index, grouped by region (in
    voxel order within each), the regions present and where each one's group starts."""
    keep = np.flatnonzero(flat >= 0)
    order = keep[np.argsort(flat[keep], kind="stable")]
    present, starts = np.unique(flat[order], return_index=True)
    return order, present, starts


def _region_index(atlas: Atlas, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column of each voxel's region (-1: unlabelled or outside ``mask``), and counts."""
    n_regions = len(atlas.labels)
    keys = np.asarray(atlas.labels, dtype=np.int64)
    # embedded in graphs (one slice per chunk): the smallest integer type that fits
    ridx = np.full(mask.shape, -1, dtype=np.int16 if n_regions < 2**15 else np.int32)
    labelled = mask & np.isin(atlas.data, keys)
    sorter = np.argsort(keys)
    ridx[labelled] = sorter[np.searchsorted(keys, atlas.data[labelled], sorter=sorter)]
    return ridx, np.bincount(ridx[ridx >= 0], minlength=n_regions)


def _bold_label_signals(bold: xr.DataArray, mask: np.ndarray, atlas: Atlas,
                        attrs: dict) -> xr.DataArray:
    """Region means straight from the 4D chunks: one task per chunk, no rechunking.

    Region means need no whole voxel time series, so each stored (space x time) chunk
    is read once and reduced to ``(time block, region)`` sums where it lies.
    """
    bold = bold.transpose("x", "y", "z", "time")
    if mask.shape != bold.shape[:3]:
        raise ValueError(f"mask shape {mask.shape} differs from the data grid "
                         f"{bold.shape[:3]}")
    if atlas.data.shape != bold.shape[:3]:
        raise ValueError(f"atlas grid {atlas.data.shape} differs from the data grid "
                         f"{bold.shape[:3]}; load it with load_atlas(reference=...)")
    n_regions = len(atlas.labels)
    ridx, counts = _region_index(atlas, mask)
    data = bold.data if isinstance(bold.data, da.Array) else da.from_array(bold.data)
    ridx_d = da.from_array(ridx, chunks=data.chunks[:3])
    parts = da.blockwise(
        _chunk_label_sums, "ijktr", data, "ijkt", ridx_d, "ijk", n_regions, None,
        new_axes={"r": n_regions}, adjust_chunks={"i": 1, "j": 1, "k": 1},
        dtype=np.float64, meta=np.empty((0,) * 5, dtype=np.float64))
    sums = parts.sum(axis=(0, 1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / np.where(counts > 0, counts, np.nan)
    out = _region_array(means, bold, atlas, counts)
    if "repetition_time" in attrs:
        out.attrs["repetition_time"] = float(attrs["repetition_time"])
    return out


def label_signals(matrix: xr.DataArray | xr.Dataset, atlas: Atlas, *,
                  mask: xr.DataArray | np.ndarray | None = None) -> xr.DataArray:
    """Mean signal of each atlas region, lazily: -> ``(time, region)``.

    Parameters
    ----------
    matrix : xarray.DataArray or Dataset
        Masked ``(time, voxel)`` data from :func:`pipeline.masking.apply_mask` (raw or
        cleaned); or a run (Dataset from :func:`storage.open_run`, or its 4D ``bold``
        with ``mask=``), reduced chunk by chunk as stored: the fast path for raw region
        means, which reads every stored chunk once and never merges time chunks.
    atlas : Atlas
        A labels atlas on the same grid.
    mask : array-like (x, y, z) of bool, optional
        With a run: the brain mask (default: the run's ``mask``).

    Returns
    -------
    xarray.DataArray
        ``(time, region)``, region names as coordinate ``region`` and label values as
        ``label``; NaN columns for regions without voxels in the mask, and a ``n_voxels``
        coordinate with each region's voxel count.
    """
    if atlas.kind != "labels":
        raise ValueError("label_signals needs a labels atlas; use map_signals for maps")
    if isinstance(matrix, xr.Dataset) or "voxel" not in matrix.dims:
        bold = matrix["bold"] if isinstance(matrix, xr.Dataset) else matrix
        if mask is None:
            if not isinstance(matrix, xr.Dataset):
                raise ValueError("pass mask= when giving a bare 4D bold DataArray")
            mask = matrix["mask"]
        if isinstance(mask, xr.DataArray):
            mask = mask.transpose("x", "y", "z").values
        return _bold_label_signals(bold, np.asarray(mask, dtype=bool), atlas,
                                   {**bold.attrs, **matrix.attrs})
    vox_labels = atlas.data[matrix["i"].values, matrix["j"].values, matrix["k"].values]
    col = {lab: n for n, lab in enumerate(atlas.labels)}
    n_regions = len(atlas.labels)
    region_idx = np.array([col.get(int(v), -1) for v in vox_labels])
    data = matrix.data if isinstance(matrix.data, da.Array) else da.from_array(matrix.data)
    pieces = []
    edges = np.cumsum((0, *data.chunks[1]))
    for c0, c1 in itertools.pairwise(edges):
        idx = region_idx[c0:c1]
        keep = np.flatnonzero(idx >= 0)
        if keep.size == 0:
            continue
        order = keep[np.argsort(idx[keep], kind="stable")]
        sorted_idx = idx[order]
        present, starts = np.unique(sorted_idx, return_index=True)
        task = dask.delayed(_label_sums, pure=True)(data[:, c0:c1], order, starts, present,
                                                    n_regions)
        pieces.append(da.from_delayed(task, shape=(data.shape[0], n_regions),
                                      dtype=np.float64))
    counts = np.bincount(region_idx[region_idx >= 0], minlength=n_regions)
    if pieces:
        sums = da.stack(pieces).sum(axis=0)
    else:
        sums = da.zeros((data.shape[0], n_regions), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / np.where(counts > 0, counts, np.nan)
    return _region_array(means, matrix, atlas, counts)


def _region_array(data, matrix: xr.DataArray, atlas: Atlas, counts) -> xr.DataArray:
    return xr.DataArray(
        data, dims=("time", "region"),
        coords={"time": matrix["time"].values, "region": atlas.names,
                "label": ("region", np.asarray(atlas.labels)),
                "n_voxels": ("region", np.asarray(counts))},
        attrs={k: v for k, v in matrix.attrs.items() if k == "repetition_time"},
        name="region_signals")


# ---------------------------------------------------------------------------- maps


def _map_products(block: np.ndarray, maps_block: np.ndarray) -> np.ndarray:
    # [M^T M | M^T Y^T] for one voxel block, stacked so that one reduction adds both
    mtm = maps_block.T @ maps_block
    mty = maps_block.T @ block.T
    return np.concatenate([mtm, mty], axis=1)


def map_signals(matrix: xr.DataArray, atlas: Atlas) -> xr.DataArray:
    """Least-squares region signals of probabilistic maps (as ``NiftiMapsMasker``).

    Solves ``maps @ signals.T = data`` over the voxels where any map is non-zero, from
    ``M^T M`` and ``M^T Y`` accumulated over voxel blocks; identical to nilearn's
    ``lstsq`` when the maps (restricted to the mask) are linearly independent. Regions
    whose map has no non-zero voxel in the mask are NaN columns.
    """
    if atlas.kind != "maps":
        raise ValueError("map_signals needs a maps atlas; use label_signals for labels")
    maps = atlas.data[matrix["i"].values, matrix["j"].values, matrix["k"].values]  # (V, R)
    n_regions = maps.shape[1]
    present = np.flatnonzero(np.any(maps != 0, axis=0))
    support = np.any(maps != 0, axis=1)
    data = matrix.data if isinstance(matrix.data, da.Array) else da.from_array(matrix.data)
    nt = data.shape[0]
    pieces = []
    edges = np.cumsum((0, *data.chunks[1]))
    for c0, c1 in itertools.pairwise(edges):
        sel = np.flatnonzero(support[c0:c1])
        if sel.size == 0:
            continue
        mblock = maps[c0:c1][sel][:, present]
        task = dask.delayed(_map_products, pure=True)(data[:, c0:c1][:, sel], mblock)
        pieces.append(da.from_delayed(task, shape=(present.size, present.size + nt),
                                      dtype=np.float64))
    if not pieces:
        raise ValueError("no map has a non-zero voxel inside the mask")
    total = da.stack(pieces).sum(axis=0)

    def solve(products: np.ndarray) -> np.ndarray:
        k = present.size
        out = np.full((nt, n_regions), np.nan)
        sol = np.linalg.lstsq(products[:, :k], products[:, k:], rcond=None)[0]
        out[:, present] = sol.T
        return out

    signals = da.from_delayed(dask.delayed(solve, pure=True)(total), shape=(nt, n_regions),
                              dtype=np.float64)
    return _region_array(signals, matrix, atlas, np.count_nonzero(maps, axis=0))



# ------------------------------------------------------------- region sums at ingest


_GRID_ATLASES: dict[tuple, Atlas] = {}


def _atlas_on_grid(path: str, sha256: str, shape: tuple[int, ...], affine: np.ndarray,
                   split_connected: bool) -> Atlas:
    # one atlas per worker process and grid (runs of a study share one grid); the content
    # hash in the key: a file replaced under the same path is never reused
    key = (path, sha256, tuple(int(n) for n in shape),
           np.asarray(affine, float).round(4).tobytes(), split_connected)
    if key not in _GRID_ATLASES:
        nx, ny, nz = (int(n) for n in shape)
        reference = xr.Dataset(coords={"x": np.arange(nx), "y": np.arange(ny),
                                       "z": np.arange(nz)},
                               attrs={"affine": np.asarray(affine, float)})
        if len(_GRID_ATLASES) > 8:
            _GRID_ATLASES.clear()
        _GRID_ATLASES[key] = load_atlas(path, reference=reference, kind="labels",
                                        split_connected=split_connected)
    return _GRID_ATLASES[key]


@dataclass(frozen=True)
class LabelSums:
    """Region sums of a labels atlas, computed by ingestion while it writes a run.

    A :class:`storage.BlockReducer`: ingestion hands it every block it writes (already
    decompressed and time-last), or each batch of volumes as read when the run is
    ingested without voxels, so raw region means cost no second read of the run. The
    result, ``derived/<name>`` in the run's group, holds the ``(time, region)`` sums of
    the scaled voxel values over each region's voxels inside the run's brain mask (all
    voxels when the run has none), with the atlas labels, names and voxel counts as
    attributes. Region means are ``sums / n_voxels`` -- what :func:`label_signals` gives
    for the run and its mask (the same per-chunk partial sums).

    Parameters
    ----------
    atlas : str
        Local path of the label image.
    atlas_sha256 : str
        Its content hash (part of the name: another atlas never matches).
    split_connected : bool, default=False
        As :func:`load_atlas`.
    """

    atlas: str
    atlas_sha256: str
    split_connected: bool = False

    @property
    def name(self) -> str:
        """``labelsums-<hash of atlas content and options>``."""
        import hashlib

        token = f"{self.atlas_sha256}:{int(self.split_connected)}:run-mask:v1"
        return "labelsums-" + hashlib.sha256(token.encode()).hexdigest()[:16]

    def begin(self, info, mask: np.ndarray | None) -> _LabelSumsAccumulator:
        """Start on one run (``info``: :class:`storage.nifti.NiftiInfo`)."""
        atlas = _atlas_on_grid(self.atlas, self.atlas_sha256, info.shape[:3], info.affine,
                               self.split_connected)
        if mask is None:
            mask = np.ones(info.shape[:3], dtype=bool)
        ridx, counts = _region_index(atlas, np.asarray(mask, dtype=bool))
        return _LabelSumsAccumulator(self, atlas, ridx, counts, int(info.shape[3]),
                                     info.slope, info.inter, bool(info.is_scaled))


class _LabelSumsAccumulator:
    def __init__(self, reducer: LabelSums, atlas: Atlas, ridx: np.ndarray,
                 counts: np.ndarray, n_volumes: int, slope: float, inter: float,
                 scaled: bool) -> None:
        self.reducer, self.atlas, self.ridx, self.counts = reducer, atlas, ridx, counts
        self.scale = (slope, inter) if scaled else None
        self.sums = np.zeros((n_volumes, len(atlas.labels)), dtype=np.float64)
        self._plans: dict[tuple, tuple] = {}

    def update(self, index: tuple[slice, ...], block: np.ndarray) -> None:
        sx, sy, sz, st = index
        ridx = self.ridx[sx, sy, sz]
        if block.flags.f_contiguous and not block.flags.c_contiguous:
            # volumes as read from the NIfTI file (a run ingested without voxels)
            key = tuple((s.start, s.stop) for s in (sx, sy, sz))
            if key not in self._plans:
                self._plans[key] = _region_plan(ridx.ravel(order="F"))  # volume order
            self.sums[st] += _volume_label_sums(block, self._plans[key], len(self.atlas.labels))
            return
        part = _chunk_label_sums(block, ridx, len(self.atlas.labels))
        self.sums[st] += part[0, 0, 0]

    def finish(self) -> tuple[np.ndarray, dict]:
        sums = self.sums
        if self.scale is not None:  # sum(slope * x + inter) over n voxels
            slope, inter = self.scale
            sums = slope * sums + inter * self.counts
        return sums, {"boldflow_derived": "label_sums", "atlas_sha256": self.reducer.atlas_sha256,
                      "split_connected": self.reducer.split_connected, "mask": "run",
                      "labels": [int(v) for v in self.atlas.labels],
                      "names": list(self.atlas.names),
                      "n_voxels": [int(n) for n in self.counts]}


def ingested_label_signals(run: xr.Dataset, zarr_group, reducer: LabelSums,
                           atlas: Atlas) -> xr.DataArray | None:
    """Raw region means of ``run`` from sums stored at ingest, or None if there are none.

    Parameters
    ----------
    run : xarray.Dataset
        The run as opened from the store (``time`` coordinate, attributes).
    zarr_group : zarr.Group
        The run's group in the store.
    reducer : LabelSums
        What the sums were computed with (its name locates them).
    atlas : Atlas
        The atlas on the run's grid: labels and names must match the stored ones.

    Returns
    -------
    xarray.DataArray or None
        As :func:`label_signals` with the run's mask, ``(time, region)``; None when the
        run was ingested without these sums (or with another atlas).
    """
    try:
        arr = zarr_group[f"derived/{reducer.name}"]
    except KeyError:
        return None
    meta = dict(arr.attrs)
    if (meta.get("labels") != [int(v) for v in atlas.labels]
            or meta.get("names") != list(atlas.names) or arr.shape[0] != run.sizes["time"]):
        return None
    counts = np.asarray(meta["n_voxels"])
    with np.errstate(invalid="ignore", divide="ignore"):
        means = arr[...] / np.where(counts > 0, counts, np.nan)
    return xr.DataArray(
        means, dims=("time", "region"),
        coords={"time": run["time"].values, "region": atlas.names,
                "label": ("region", np.asarray(atlas.labels)), "n_voxels": ("region", counts)},
        attrs={k: float(v) for k, v in run.attrs.items() if k == "repetition_time"},
        name="region_signals")
