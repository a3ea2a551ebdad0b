"""The job's decomposition step: subject ICA per run, or group ICA + dual regression.

Each fit computes on the cluster, block by block (the estimators stream voxel blocks and,
for groups, subjects); exports are written as the BIDS-style files of the issue:
per run ``<prefix>_desc-ica_components.nii.gz`` / ``_desc-ica_mixing.tsv`` (and a MELODIC
folder on request); for groups ``<output>/group/desc-<method>_components.nii.gz`` and, with
dual regression, per run ``<prefix>_desc-dualreg_components.nii.gz`` /
``_desc-dualreg_timeseries.tsv``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

import storage

__all__ = ["maps_image", "run_decomposition"]


def maps_image(maps: np.ndarray, template: xr.DataArray) -> xr.DataArray:
    """``(component, voxel)`` maps on ``template``'s voxels -> lazy ``(x, y, z, time)``.

    The component axis is written as NIfTI's 4th dimension (one volume per component).
    """
    from .masking import unmask

    arr = xr.DataArray(np.asarray(maps, dtype=np.float32), dims=("time", "voxel"),
                       coords={"time": np.arange(maps.shape[0], dtype=float),
                               **{c: ("voxel", template[c].values) for c in ("i", "j", "k")}},
                       attrs={"affine": template.attrs["affine"],
                              "shape": template.attrs["shape"]})
    img = unmask(arr)
    img.attrs["repetition_time"] = 1.0
    return img


def _prepared(context, group: str, mask=None) -> tuple[xr.Dataset, xr.DataArray]:
    """A run's masked data, cleaned lazily at voxel level when the job cleans."""
    from .masking import apply_mask
    from .signal import clean_signals

    cfg = context.cfg
    ds = context.bs.open_group(group, block_bytes=cfg.block_bytes)
    if cfg.clean and cfg.clean.dummy_scans:
        ds = ds.isel(time=slice(cfg.clean.dummy_scans, None))
    matrix = apply_mask(ds, context._mask(ds) if mask is None else mask)
    if cfg.clean:
        kwargs = context._clean_kwargs(ds)
        times = matrix["time"].values
        if kwargs["sample_mask"] is not None:
            times = times[np.asarray(kwargs["sample_mask"])]
        data = clean_signals(matrix.data, **kwargs)
        matrix = matrix.isel(time=slice(0, data.shape[0])).copy(data=data)
        matrix = matrix.assign_coords(time=times)
    return ds, matrix


def _row(context, run, status: str, t0: float, error: str | None = None) -> dict:
    return context.pipeline._row({"sub": run.sub, "task": run.task, "ses": run.ses,
                                  "run": run.run, "space": run.space},
                                 f"{run.run_id}:decompose", status, stage="decompose",
                                 error=error, seconds=time.perf_counter() - t0)


def run_decomposition(context, runs: list[Any], echo=print) -> list[dict]:
    """Run the configured decomposition on the completed runs; returns report rows."""
    dec = context.cfg.decompose
    if dec.level == "subject":
        return _subject_level(context, runs, echo)
    return _group_level(context, runs, echo)


def _prefix(context, ds: xr.Dataset) -> str:
    from .jobs import _join, _run_dir, run_prefix

    ents = dict(ds.attrs["entities"])
    return _join(context.cfg.output, _run_dir(ents), run_prefix(ents))


def _subject_level(context, runs, echo) -> list[dict]:
    from .decomposition.ica import SubjectICA
    from .decomposition.melodic import export_ica_bids, export_melodic

    dec = context.cfg.decompose
    rows = []
    for run in runs:
        t0 = time.perf_counter()
        try:
            ds, matrix = _prepared(context, run.group)
            ica = SubjectICA(n_components=dec.n_components, random_state=dec.seed,
                             threshold=dec.threshold,
                             t_r=float(ds.attrs["repetition_time"])).fit(matrix)
            prefix = _prefix(context, ds)
            export_ica_bids(ica, prefix, storage_options=context.opts or None)
            if dec.melodic_export:
                export_melodic(ica, f"{prefix}_desc-melodic.ica",
                               storage_options=context.opts or None)
            rows.append(_row(context, run, "complete", t0))
            echo(f"ICA {run.run_id}: {ica.n_components_} components "
                 f"({time.perf_counter() - t0:.1f} s)")
        except Exception as e:  # one run's failure is recorded, the others go on
            rows.append(_row(context, run, "failed", t0, f"{type(e).__name__}: {e}"))
    return rows


def _group_level(context, runs, echo) -> list[dict]:
    from .decomposition.dualreg import dual_regression
    from .decomposition.group import GroupICA
    from .jobs import _join, _write_text

    dec = context.cfg.decompose
    rows: list[dict] = []
    if len(runs) < 2:
        return rows
    t0 = time.perf_counter()
    mask = context.group_mask()  # the same voxels for every subject
    prepared = [_prepared(context, r.group, mask) for r in sorted(runs, key=lambda r: r.run_id)]
    model = GroupICA(n_components=int(dec.n_components), method=dec.method,
                     random_state=dec.seed)
    model.fit([m for _, m in prepared])
    template = prepared[0][1]
    url = _join(context.cfg.output, "group", f"desc-{dec.method}_components.nii.gz")
    storage.to_nifti(maps_image(model.components_, template), url,
                     storage_options=context.opts)
    echo(f"group ICA ({dec.method}): {model.components_.shape[0]} components from "
         f"{len(prepared)} runs ({time.perf_counter() - t0:.1f} s) -> {url}")
    context.group_model = model
    if not dec.dual_regression:
        return rows
    names = [f"ICA{i:03d}" for i in range(model.components_.shape[0])]
    for run, (ds, matrix) in zip(sorted(runs, key=lambda r: r.run_id), prepared, strict=True):
        t1 = time.perf_counter()
        try:
            timecourses, maps = dual_regression(model.components_, matrix)
            maps = np.asarray(maps.compute() if hasattr(maps, "compute") else maps)
            prefix = _prefix(context, ds)
            storage.to_nifti(maps_image(maps, template),
                             f"{prefix}_desc-dualreg_components.nii.gz",
                             storage_options=context.opts)
            _write_text(f"{prefix}_desc-dualreg_timeseries.tsv",
                        pd.DataFrame(np.asarray(timecourses), columns=names).to_csv(
                            sep="\t", index=False, float_format="%.10g"), context.opts)
            rows.append(_row(context, run, "complete", t1))
        except Exception as e:  # one run's failure is recorded, the others go on
            rows.append(_row(context, run, "failed", t1, f"{type(e).__name__}: {e}"))
    return rows
