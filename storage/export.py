"""Export of (x, y, z[, time]) DataArrays to NIfTI, streaming over time."""

from __future__ import annotations

import os
from typing import Any

import nibabel as nib
import numpy as np
import xarray as xr

from .chunking import parse_bytes
from .nifti import NiftiStreamWriter, header_from_b64

__all__ = ["to_nifti"]

_SPATIAL = ("x", "y", "z")


def _raw_dtype_and_scaling(da: xr.DataArray, dtype) -> tuple[np.dtype, float, float]:
    enc = da.encoding
    if dtype is not None:
        return np.dtype(dtype), 1.0, 0.0
    if "scale_factor" in enc or "add_offset" in enc:
        return (np.dtype(enc.get("dtype", np.int16)), float(enc.get("scale_factor", 1.0)),
                float(enc.get("add_offset", 0.0)))
    if da.dtype == bool:
        return np.dtype(np.uint8), 1.0, 0.0
    if da.dtype == np.float64:
        # NIfTI consumers expect float32; float64 doubles the size for no real precision
        return np.dtype(np.float32), 1.0, 0.0
    return np.dtype(da.dtype), 1.0, 0.0


def to_nifti(dataarray: xr.DataArray, path: str | os.PathLike, *,
             affine: np.ndarray | None = None, dtype: Any = None,
             batch_bytes: int | str = "128MiB", storage_options: dict | None = None,
             compresslevel: int = 1) -> str:
    """Write a DataArray with dims ``x, y, z`` (and optionally ``time``) to NIfTI.

    The array is computed in batches of volumes and appended to the file in time order,
    so a lazily computed 4D result is never held in memory at once.

    Parameters
    ----------
    dataarray : xarray.DataArray
        Dims ``(x, y, z)`` or ``(x, y, z, time)`` in any order. Its ``affine`` attribute
        (as set by :func:`storage.open_run`) is used unless ``affine`` is given.
    path : str or path
        ``.nii`` or ``.nii.gz`` destination (local or fsspec URL).
    affine : (4, 4) array, optional
        Voxel-to-world affine; overrides the attribute.
    dtype : dtype, optional
        On-disk dtype. Default: the stored dtype and scaling of data read from a store
        (so BOLD round-trips exactly), uint8 for booleans, float32 for float64.
    batch_bytes : int or str, default="128MiB"
        Memory used per written batch of volumes.
    storage_options : dict, optional
        fsspec options for remote paths.
    compresslevel : int, default=1
        gzip level for ``.nii.gz``.

    Returns
    -------
    str
        The path written.

    Notes
    -----
    When the array carries the source NIfTI header (``nifti_header`` attribute), that
    header is the template: qform/sform codes, units, TR, slice timing and description
    are kept. Otherwise a fresh NIfTI-1 header is built from the affine, with spatial
    units mm and time units s (``repetition_time`` attribute as ``pixdim[4]``).
    """
    dims = set(dataarray.dims)
    if not set(_SPATIAL) <= dims or not dims <= {*_SPATIAL, "time"}:
        raise ValueError(f"to_nifti needs dims (x, y, z[, time]); got {dataarray.dims}")
    order = [*_SPATIAL, "time"] if "time" in dims else list(_SPATIAL)
    da = dataarray.transpose(*order)
    if affine is None:
        if "affine" not in da.attrs:
            raise ValueError("no affine: pass affine= or use a DataArray from storage.open_run")
        affine = np.asarray(da.attrs["affine"], dtype=float)
    raw_dtype, slope, inter = _raw_dtype_and_scaling(da, dtype)

    if "nifti_header" in da.attrs:
        header = header_from_b64(da.attrs["nifti_header"])
        if isinstance(header, nib.Nifti2Header):
            header = nib.Nifti1Header.from_header(header)
    else:
        header = nib.Nifti1Header()
        header.set_xyzt_units("mm", "sec")
    header.set_data_shape(da.shape)
    header.set_data_dtype(raw_dtype)
    sform_code = int(header["sform_code"]) or 2
    qform_code = int(header["qform_code"]) or 2
    header.set_sform(affine, code=sform_code)
    header.set_qform(affine, code=qform_code)
    header.set_slope_inter(slope if (slope, inter) != (1.0, 0.0) else np.nan,
                           inter if (slope, inter) != (1.0, 0.0) else np.nan)
    if "time" in dims:
        zooms = [*list(header.get_zooms()[:3]), float(da.attrs.get("repetition_time", 1.0))]
        header.set_zooms(zooms)
        # repetition time is always written in seconds
        header.set_xyzt_units(header.get_xyzt_units()[0] or "mm", "sec")

    def encode(block: np.ndarray) -> np.ndarray:
        if (slope, inter) != (1.0, 0.0):
            block = np.rint((block - inter) / slope)
        if np.issubdtype(raw_dtype, np.integer):
            info = np.iinfo(raw_dtype)
            block = np.clip(np.rint(block) if block.dtype.kind == "f" else block,
                            info.min, info.max)
        return block.astype(raw_dtype, copy=False)

    with NiftiStreamWriter(str(path), header, compresslevel=compresslevel,
                           storage_options=storage_options) as writer:
        if "time" not in dims:
            writer.write(encode(np.asarray(da.values)))
        else:
            nt = da.sizes["time"]
            per_volume = int(np.prod(da.shape[:3])) * max(da.dtype.itemsize, 4)
            step = max(1, parse_bytes(batch_bytes) // max(per_volume, 1))
            for t0 in range(0, nt, step):
                writer.write(encode(np.asarray(da.isel(time=slice(t0, t0 + step)).values)))
    return str(path)
