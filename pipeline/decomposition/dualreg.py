"""Dual regression of group maps on one subject, out of core across voxels.

Stage 1 (spatial regression): the subject's time courses are the least-squares fit of its
data by the group maps, ``timecourses = data @ pinv(maps)``, computed from ``maps maps^T``
(``k x k``) and ``data maps^T`` (``time x k``) accumulated over voxel blocks in one compute.
Stage 2 (temporal regression): the subject's maps are the least-squares fit of the data by
the (demeaned, variance-normalised) time courses, ``maps_s = pinv(timecourses) @ data``,
one voxel block per task, lazily.

This is FSL's ``dual_regression`` (``fsl_glm --demean`` at both stages, ``--des_norm`` at
stage 2 with variance normalisation): with ``demean=True`` the group maps are demeaned over
voxels at stage 1 and the data and time courses over time at stage 2 (since the regressors
are demeaned, demeaning the data as well changes nothing at stage 1, and is done per block at
stage 2).
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from scipy import linalg

__all__ = ["dual_regression"]


def _as_dask_2d(x: Any, name: str) -> da.Array:
    data = x.data if isinstance(x, xr.DataArray) else x
    if not isinstance(data, da.Array):
        data = np.asarray(data)
        data = da.from_array(data, chunks=(-1, max(1, min(data.shape[-1], 8192))))
    if data.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {data.shape}")
    if data.dtype != np.float64:
        data = data.astype(np.float64)
    return data


def _check_voxels(maps: Any, subject: xr.DataArray) -> None:
    if not isinstance(maps, xr.DataArray):
        return
    for c in ("i", "j", "k"):
        if c in maps.coords and c in subject.coords and not np.array_equal(
                np.asarray(maps[c].values), np.asarray(subject[c].values)):
            raise ValueError(f"group maps and subject have different voxels ({c})")


def _stage2_block(block: np.ndarray, p: np.ndarray, demean: bool) -> np.ndarray:
    if demean:
        block = block - block.mean(axis=0)
    return p @ block


def dual_regression(group_maps: Any, subject: Any, *, variance_normalize: bool = True,
                    demean: bool = True) -> tuple[np.ndarray, Any]:
    """Subject time courses and subject maps of group spatial maps (FSL dual regression).

    Parameters
    ----------
    group_maps : array-like, shape (n_components, n_voxels)
        Group maps (e.g. ``GroupICA.components_``); NumPy, dask or a DataArray
        ``(component, voxel)``.
    subject : xarray.DataArray or array-like, shape (n_time, n_voxels)
        The subject's masked ``(time, voxel)`` data, on the voxels of the maps (a lazy
        dask-backed DataArray from :func:`pipeline.masking.apply_mask`, optionally cleaned).
        A DataArray is checked against the maps' ``i, j, k`` coordinates when both have them.
    variance_normalize : bool, default=True
        Scale each stage-1 time course to unit standard deviation (ddof=1) before stage 2
        (``--des_norm``), so that the subject maps measure amplitude and shape together.
    demean : bool, default=True
        Demean the maps over voxels (stage 1) and the time courses and data over time
        (stage 2), as ``fsl_glm --demean``.

    Returns
    -------
    timecourses : numpy.ndarray, shape (n_time, n_components)
        Stage-1 time courses (not normalised).
    maps : dask.array.Array or xarray.DataArray, shape (n_components, n_voxels)
        Stage-2 subject maps (regression coefficients), lazy: nothing is computed before
        ``.compute()``. A DataArray ``(component, voxel)`` with the subject's voxel
        coordinates and attributes when ``subject`` is a DataArray, else a dask array;
        chunked along voxels like ``subject``.

    Notes
    -----
    Stage 1 is one compute over the voxel blocks returning ``maps maps^T`` and
    ``data maps^T``; the time courses are ``(data maps^T) pinv(maps maps^T)``, which equals
    ``data @ pinv(maps)`` (also for rank-deficient maps). Per task, memory is one
    ``(time, block)`` block of the data and the matching ``(k, block)`` block of the maps.
    """
    template = None
    if isinstance(subject, xr.DataArray):
        if set(subject.dims) != {"time", "voxel"}:
            raise ValueError(f"subject dims must be (time, voxel), got {subject.dims}")
        template = subject.transpose("time", "voxel")
        _check_voxels(group_maps, template)
    y = _as_dask_2d(template if template is not None else subject, "subject")
    if len(y.chunks[0]) != 1:
        y = y.rechunk({0: -1})
    m_data = group_maps.data if isinstance(group_maps, xr.DataArray) else group_maps
    if isinstance(m_data, da.Array):
        m = m_data.astype(np.float64)
    else:
        m = np.asarray(m_data, dtype=np.float64)
    if m.ndim != 2 or m.shape[1] != y.shape[1]:
        raise ValueError(f"group maps of shape {m.shape} do not match the subject's "
                         f"{y.shape[1]} voxels")
    k = m.shape[0]
    if demean:
        m = m - m.mean(axis=1, keepdims=True)
    m_t = da.asarray(m.T).rechunk((y.chunks[1], k)) if isinstance(m, da.Array) else (
        da.from_array(m.T, chunks=(y.chunks[1], k)))

    # stage 1: accumulate over voxel blocks (one bounded compute: k x k and T x k)
    mmt, ymt = da.compute(m_t.T @ m_t, y @ m_t)
    timecourses = np.asarray(ymt) @ linalg.pinvh(np.asarray(mmt))

    # stage 2: temporal regression on the (demeaned, normalised) time courses, lazily
    x = timecourses.copy()
    if demean:
        x -= x.mean(axis=0)
    if variance_normalize:
        std = x.std(axis=0, ddof=1)
        std[~(std > 0)] = 1.0
        x /= std
    p = np.linalg.pinv(x)  # (k, T)
    maps = y.map_blocks(_stage2_block, p=p, demean=demean,
                        chunks=(k, y.chunks[1]), dtype=np.float64)
    if template is None:
        return timecourses, maps
    coords = {c: ("voxel", template[c].values) for c in ("i", "j", "k")
              if c in template.coords}
    coords["component"] = np.arange(k)
    out = xr.DataArray(maps, dims=("component", "voxel"), coords=coords,
                       attrs=dict(template.attrs), name="dualreg_maps")
    return timecourses, out
