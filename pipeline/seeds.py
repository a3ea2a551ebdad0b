"""Seed-to-voxel correlation maps, out of core across voxel blocks."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import dask
import dask.array as da
import numpy as np
import xarray as xr

__all__ = ["seed_correlation", "sphere_voxels"]


def sphere_voxels(matrix: xr.DataArray, coords: Sequence[float], radius: float) -> np.ndarray:
    """Columns of ``matrix`` within ``radius`` mm of ``coords`` (mm, world space).

    As :class:`nilearn.maskers.NiftiSpheresMasker`: when no voxel centre is inside the
    sphere, the voxel nearest to the seed is used.
    """
    affine = np.asarray(matrix.attrs["affine"], dtype=float)
    ijk = np.stack([matrix[c].values for c in ("i", "j", "k")], axis=1)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    dist = np.linalg.norm(world - np.asarray(coords, dtype=float), axis=1)
    inside = np.flatnonzero(dist <= radius)
    return inside if inside.size else np.array([int(np.argmin(dist))])


def _block_corr(block: np.ndarray, seed: np.ndarray) -> np.ndarray:
    y = block - block.mean(axis=0)
    s = seed - seed.mean()
    denom = np.sqrt((y * y).sum(axis=0) * (s * s).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (s @ y) / denom
    return np.where(denom > 0, r, 0.0)


def seed_correlation(matrix: xr.DataArray, *, coords: Sequence[float] | None = None,
                     radius: float = 6.0, region_mask: np.ndarray | None = None,
                     fisher_z: bool = False) -> xr.DataArray:
    """Pearson correlation of every voxel's time series with a seed's mean time series.

    Parameters
    ----------
    matrix : xarray.DataArray
        ``(time, voxel)`` data (usually cleaned) from :func:`pipeline.masking.apply_mask`.
    coords, radius : optional
        Sphere seed: centre in mm (world space of the run's affine) and radius in mm.
    region_mask : (x, y, z) bool array, optional
        Region seed (e.g. one atlas label) instead of a sphere.
    fisher_z : bool, default=False
        Return ``arctanh(r)``.

    Returns
    -------
    xarray.DataArray
        Lazy ``(voxel,)`` map with the ``i``/``j``/``k`` coordinates and attributes of
        ``matrix``; :func:`pipeline.masking.unmask` turns it into a 3D image. The seed
        signal is a small reduction over the seed's voxels; the correlations are then one
        pass over the voxel blocks.
    """
    if (coords is None) == (region_mask is None):
        raise ValueError("give exactly one of coords or region_mask")
    if coords is not None:
        cols = sphere_voxels(matrix, coords, radius)
    else:
        inside = np.asarray(region_mask, dtype=bool)[matrix["i"].values, matrix["j"].values,
                                                      matrix["k"].values]
        cols = np.flatnonzero(inside)
        if cols.size == 0:
            raise ValueError("the seed region has no voxel inside the mask")
    data = matrix.data if isinstance(matrix.data, da.Array) else da.from_array(matrix.data)
    seed = data[:, cols].mean(axis=1)
    pieces = []
    edges = np.cumsum((0, *data.chunks[1]))
    for c0, c1 in itertools.pairwise(edges):
        task = dask.delayed(_block_corr, pure=True)(data[:, c0:c1], seed)
        pieces.append(da.from_delayed(task, shape=(c1 - c0,), dtype=np.float64))
    r = da.concatenate(pieces)
    if fisher_z:
        r = da.arctanh(da.clip(r, -1 + 1e-7, 1 - 1e-7))
    return xr.DataArray(r, dims=("voxel",),
                        coords={c: ("voxel", matrix[c].values) for c in ("i", "j", "k")},
                        attrs={k: v for k, v in matrix.attrs.items()
                               if k in ("affine", "shape")}, name="seed_correlation")
