"""Brain masks and the masked ``(time, voxel)`` matrix, out of core.

Masks are small 3D arrays, computed eagerly with nilearn on small inputs (a mean image,
a list of masks). The 4D data never are: :func:`apply_mask` turns each spatial block of a
run (all volumes of a block of voxels) into one ``(time, voxel-block)`` chunk, lazily, and
:func:`unmask` does the reverse, so cleaning, projections and reductions over voxels run
one block at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise, product

import dask
import dask.array as da
import numpy as np
import xarray as xr

__all__ = ["apply_mask", "compute_epi_mask", "intersect_masks", "mean_image", "unmask"]

_SPATIAL = ("x", "y", "z")


def _bold(obj: xr.Dataset | xr.DataArray) -> xr.DataArray:
    return obj["bold"] if isinstance(obj, xr.Dataset) else obj


def _affine(obj) -> np.ndarray:
    affine = obj.attrs.get("affine")
    if affine is None and isinstance(obj, xr.DataArray):
        raise ValueError("the array has no 'affine' attribute (open it with storage.open_run)")
    return np.asarray(affine, dtype=float)


def mean_image(bold: xr.Dataset | xr.DataArray) -> xr.DataArray:
    """Lazy mean over time, ``(x, y, z)``."""
    b = _bold(bold)
    out = b.mean("time", dtype=np.float64)
    out.attrs = {"affine": _affine(bold if isinstance(bold, xr.Dataset) else b)}
    return out


def compute_epi_mask(bold: xr.Dataset | xr.DataArray, *, lower_cutoff: float = 0.2,
                     upper_cutoff: float = 0.85, connected: bool = True, opening: int = 2,
                     exclude_zeros: bool = False) -> xr.DataArray:
    """EPI brain mask from the mean image, exactly as :func:`nilearn.masking.compute_epi_mask`.

    The mean over time is a reduction computed block by block; nilearn's histogram-gap
    threshold, opening and largest-connected-component steps then run on that 3D image.

    Returns
    -------
    xarray.DataArray
        Boolean ``(x, y, z)`` mask with the run's affine.
    """
    import nibabel as nib
    from nilearn.masking import compute_epi_mask as _nilearn_epi

    mean = mean_image(bold)
    affine = mean.attrs["affine"]
    values = mean.transpose(*_SPATIAL).values  # the one small compute: a 3D image
    img = nib.Nifti1Image(values, affine)
    mask = _nilearn_epi(img, lower_cutoff=lower_cutoff, upper_cutoff=upper_cutoff,
                        connected=connected, opening=opening, exclude_zeros=exclude_zeros,
                        ensure_finite=True)
    return _mask_array(np.asanyarray(mask.dataobj).astype(bool), affine, mean)


def intersect_masks(masks: Sequence[xr.DataArray | np.ndarray], *, threshold: float = 0.5,
                    connected: bool = True, affine: np.ndarray | None = None) -> xr.DataArray:
    """Group mask: voxels in at least ``threshold`` of the masks (nilearn ``intersect_masks``).

    ``threshold=1`` is the intersection, ``0`` the union.
    """
    import nibabel as nib
    from nilearn.masking import intersect_masks as _nilearn_intersect

    if not masks:
        raise ValueError("intersect_masks needs at least one mask")
    first = masks[0]
    if affine is None:
        affine = _affine(first) if isinstance(first, xr.DataArray) else np.eye(4)
    imgs = [nib.Nifti1Image(np.asarray(_ordered(m), dtype=np.uint8), affine) for m in masks]
    out = _nilearn_intersect(imgs, threshold=threshold, connected=connected)
    template = first if isinstance(first, xr.DataArray) else None
    return _mask_array(np.asanyarray(out.dataobj).astype(bool), affine, template)


def _ordered(m):
    return m.transpose(*_SPATIAL).values if isinstance(m, xr.DataArray) else np.asarray(m)


def _mask_array(values: np.ndarray, affine: np.ndarray, template) -> xr.DataArray:
    coords = {d: template[d].values for d in _SPATIAL} if template is not None else None
    return xr.DataArray(values, dims=_SPATIAL, coords=coords, attrs={"affine": affine},
                        name="mask")


def _bounds(chunks: tuple[int, ...]) -> list[tuple[int, int]]:
    edges = np.cumsum((0, *chunks))
    return [(int(a), int(b)) for a, b in pairwise(edges)]


#: bytes of the input block gathered at a time by :func:`_extract`.
_GATHER_BYTES = 4 * 2**20


def _extract(block: np.ndarray, sub_mask: np.ndarray, dtype) -> np.ndarray:
    # (cx, cy, cz, T) -> (T, n_in_mask); boolean indexing keeps C order within the block.
    # Gather a few volumes at a time straight into the output: a one-shot
    # ``block[sub_mask].T`` would hold a second copy of the block in the input dtype.
    n_time = block.shape[-1]
    out = np.empty((n_time, int(sub_mask.sum())), dtype=dtype)
    step = max(1, _GATHER_BYTES // max(1, block[..., :1].nbytes))
    for t0 in range(0, n_time, step):
        out[t0:t0 + step] = block[..., t0:t0 + step][sub_mask].T
    return out


def apply_mask(bold: xr.Dataset | xr.DataArray, mask: xr.DataArray | np.ndarray | None = None,
               *, dtype=np.float64) -> xr.DataArray:
    """The masked data as a lazy ``(time, voxel)`` DataArray, one chunk per spatial block.

    Parameters
    ----------
    bold : xarray.Dataset or DataArray
        A run from :func:`storage.open_run` (``bold`` with dims x, y, z, time; each dask
        chunk holding all volumes of a block of voxels).
    mask : array-like (x, y, z) of bool, optional
        Default: the run's ``mask`` variable.
    dtype : numpy dtype, default=float64
        Output dtype (the pipeline's arithmetic precision).

    Returns
    -------
    xarray.DataArray
        ``(time, voxel)``; ``voxel`` carries coordinates ``i``, ``j``, ``k`` (voxel indices),
        ordered block by block (C order within a block). Attributes: ``affine``,
        ``shape`` (the 3D grid), ``repetition_time``.
    """
    b = _bold(bold)
    if mask is None:
        if not isinstance(bold, xr.Dataset):
            raise ValueError("pass mask= when giving a bare bold DataArray")
        mask = bold["mask"]
    mask_np = np.asarray(_ordered(mask), dtype=bool)
    b = b.transpose(*_SPATIAL, "time")
    if mask_np.shape != b.shape[:3]:
        raise ValueError(f"mask shape {mask_np.shape} differs from the data grid {b.shape[:3]}")
    data = b.data if isinstance(b.data, da.Array) else da.from_array(b.data, chunks=-1)
    if len(data.chunks[3]) != 1:
        data = data.rechunk({3: -1})  # per-voxel temporal stages need whole time series
    nt = data.shape[3]
    pieces, coords = [], []
    for (bi, (x0, x1)), (bj, (y0, y1)), (bk, (z0, z1)) in product(
            enumerate(_bounds(data.chunks[0])), enumerate(_bounds(data.chunks[1])),
            enumerate(_bounds(data.chunks[2]))):
        sub = mask_np[x0:x1, y0:y1, z0:z1]
        n = int(sub.sum())
        if n == 0:
            continue
        block = data.blocks[bi, bj, bk, 0]
        task = dask.delayed(_extract, pure=True)(block, sub, np.dtype(dtype))
        pieces.append(da.from_delayed(task, shape=(nt, n), dtype=dtype))
        ii, jj, kk = np.nonzero(sub)
        coords.append(np.stack([ii + x0, jj + y0, kk + z0]))
    if not pieces:
        raise ValueError("the mask selects no voxel")
    matrix = da.concatenate(pieces, axis=1)
    ijk = np.concatenate(coords, axis=1)
    attrs = {"affine": _affine(bold if isinstance(bold, xr.Dataset) else b),
             "shape": tuple(int(s) for s in mask_np.shape)}
    if "repetition_time" in (bold.attrs if isinstance(bold, xr.Dataset) else b.attrs):
        attrs["repetition_time"] = float((bold if isinstance(bold, xr.Dataset) else b)
                                         .attrs["repetition_time"])
    return xr.DataArray(
        matrix, dims=("time", "voxel"),
        coords={"time": b["time"].values, "i": ("voxel", ijk[0]), "j": ("voxel", ijk[1]),
                "k": ("voxel", ijk[2])},
        attrs=attrs, name="masked")


def _scatter(block: np.ndarray, ii, jj, kk, shape, fill) -> np.ndarray:
    out = np.full((*shape, block.shape[0]), fill, dtype=block.dtype)
    out[ii, jj, kk] = block.T
    return out


def unmask(matrix: xr.DataArray, *, fill: float = 0.0) -> xr.DataArray:
    """Inverse of :func:`apply_mask`: ``(time, voxel)`` -> lazy ``(x, y, z, time)``.

    Also accepts a ``(voxel,)`` array (a map), returned as a computed ``(x, y, z)`` array.
    Voxels outside the mask get ``fill``.
    """
    shape = tuple(matrix.attrs["shape"])
    ii, jj, kk = (matrix[c].values for c in ("i", "j", "k"))
    attrs = {k: v for k, v in matrix.attrs.items() if k in ("affine", "repetition_time")}
    if matrix.dims == ("voxel",):
        out = np.full(shape, fill, dtype=matrix.dtype)
        out[ii, jj, kk] = np.asarray(matrix.values)
        return xr.DataArray(out, dims=_SPATIAL, attrs=attrs, name=matrix.name)
    if matrix.dims != ("time", "voxel"):
        raise ValueError(f"unmask needs dims (time, voxel) or (voxel,), got {matrix.dims}")
    data = matrix.data if isinstance(matrix.data, da.Array) else da.from_array(matrix.data)
    nt = data.shape[0]
    # one 4D piece per voxel chunk, placed in the full grid and summed lazily would cost a
    # full-grid array per chunk; instead scatter each chunk into the bounding box of its
    # voxels and assemble the grid block-wise
    bounds = _bounds(data.chunks[1])
    total = None
    for c0, c1 in bounds:
        bi, bj, bk = ii[c0:c1], jj[c0:c1], kk[c0:c1]
        lo = (bi.min(), bj.min(), bk.min())
        hi = (bi.max() + 1, bj.max() + 1, bk.max() + 1)
        box = tuple(int(h - lo_) for h, lo_ in zip(hi, lo, strict=True))
        task = dask.delayed(_scatter, pure=True)(
            data[:, c0:c1], bi - lo[0], bj - lo[1], bk - lo[2], box, fill)
        piece = da.from_delayed(task, shape=(*box, nt), dtype=data.dtype)
        pad = [(int(lo[d]), int(shape[d] - hi[d])) for d in range(3)] + [(0, 0)]
        padded = da.pad(piece, pad, mode="constant", constant_values=0)
        total = padded if total is None else total + padded
    if fill != 0:
        inside = np.zeros(shape, dtype=bool)
        inside[ii, jj, kk] = True
        total = da.where(inside[..., None], total, fill)
    return xr.DataArray(total, dims=(*_SPATIAL, "time"),
                        coords={"time": matrix["time"].values}, attrs=attrs,
                        name=matrix.name)
