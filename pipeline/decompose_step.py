"""The job's decomposition step: subject ICA per run, or group ICA + dual regression.

Each fit computes on the cluster, block by block (the estimators stream voxel blocks and,
for groups, subjects); exports are written as the BIDS-style files of the issue:
per run ``<prefix>_desc-ica_components.nii.gz`` / ``_desc-ica_mixing.tsv`` (and a MELODIC
folder on request); for groups ``<output>/group/desc-<method>_components.nii.gz`` and, with
dual regression, per run ``<prefix>_desc-dualreg_components.nii.gz`` /
``_desc-dualreg_timeseries.tsv``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
import uuid
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


def run_decomposition(context, runs: list[Any], echo=print, *, client=None) -> list[dict]:
    """Run the configured decomposition on the completed runs; returns report rows.

    Subject-level fits run as one worker task per run (many runs fit in parallel, each
    streaming its voxel blocks on its worker); a run whose outputs were written by an
    earlier job with the same provenance is skipped. Group fits stream subjects from the
    driver (their work is distributed block by block).
    """
    dec = context.cfg.decompose
    if dec.level == "subject":
        if client is None:
            from distributed import get_client

            client = get_client()
        return _subject_level(context, runs, echo, client)
    return _group_level(context, runs, echo, client)


def _prefix(context, ds: xr.Dataset) -> str:
    from .jobs import _join, _run_dir, run_prefix

    ents = dict(ds.attrs["entities"])
    return _join(context.cfg.output, _run_dir(ents), run_prefix(ents))


def _ica_provenance(context, group: str) -> str:
    from .jobs import _sha

    return _sha({"run": context.provenance(group),
                 "decompose": context.cfg.decompose.model_dump()})


def _ica_sidecar(prefix: str) -> str:
    return f"{prefix}_desc-ica_provenance.json"


def _fit_subject_run(config, store, group: str, prefix: str, prov: str) -> int:
    """On a worker: fit one run's ICA from the store, export, then write the sidecar.

    The run's voxel blocks are streamed by this worker's own synchronous scheduler, so a
    task holds a few blocks and the reduced data, never the run. The provenance sidecar
    is written last: a fit killed half-way is redone by the next job.
    """
    import dask

    from .decomposition.ica import SubjectICA
    from .decomposition.melodic import export_ica_bids, export_melodic
    from .jobs import Pipeline, _Context, _write_text

    context = _Context(Pipeline(config), storage.open_store(store))
    dec = config.decompose
    opts = context.opts or None
    with dask.config.set(scheduler="synchronous"):
        ds, matrix = _prepared(context, group)
        ica = SubjectICA(n_components=dec.n_components, random_state=dec.seed,
                         threshold=dec.threshold,
                         t_r=float(ds.attrs["repetition_time"])).fit(matrix)
        export_ica_bids(ica, prefix, storage_options=opts)
        if dec.melodic_export:
            export_melodic(ica, f"{prefix}_desc-melodic.ica", storage_options=opts)
    _write_text(_ica_sidecar(prefix), json.dumps({"provenance": prov}), context.opts)
    return int(ica.n_components_)


def _subject_level(context, runs, echo, client) -> list[dict]:
    from distributed import as_completed

    from .jobs import _join, _read_text, _run_dir, run_prefix

    rows: list[dict] = []
    futures = {}
    for run in runs:
        t0 = time.perf_counter()
        try:
            ents = dict(context.bs.open_group(run.group, chunks=None).attrs["entities"])
            prefix = _join(context.cfg.output, _run_dir(ents), run_prefix(ents))
            prov = _ica_provenance(context, run.group)
            text = _read_text(_ica_sidecar(prefix), context.opts)
            if text is not None and json.loads(text).get("provenance") == prov:
                rows.append(_row(context, run, "skipped", t0))
                continue
            fut = client.submit(_fit_subject_run, context.cfg, context.bs.ref, run.group,
                                prefix, prov, key=f"subject-ica-{uuid.uuid4().hex}")
            futures[fut] = (run, t0)
        except Exception as e:  # one run's failure is recorded, the others go on
            rows.append(_row(context, run, "failed", t0, f"{type(e).__name__}: {e}"))
    for fut in as_completed(list(futures)):
        run, t0 = futures.pop(fut)
        try:
            n = fut.result()
            rows.append(_row(context, run, "complete", t0))
            echo(f"ICA {run.run_id}: {n} components ({time.perf_counter() - t0:.1f} s)")
        except Exception as e:
            rows.append(_row(context, run, "failed", t0, f"{type(e).__name__}: {e}"))
        finally:
            fut.release()
    return rows


def _parallel_runs(client=None) -> int:
    """How many runs' dual regressions to keep in flight: 2 per worker of the client."""
    try:
        if client is None:
            from distributed import get_client

            client = get_client()
        return max(2, 2 * len(client.scheduler_info().get("workers", {})))
    except (ImportError, ValueError):  # no distributed client: one at a time
        return 1


def _group_level(context, runs, echo, client=None) -> list[dict]:
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    from .decomposition.dualreg import dual_regression
    from .decomposition.group import GroupICA
    from .jobs import _join, _write_text

    dec = context.cfg.decompose
    rows: list[dict] = []
    if len(runs) < 2:
        return rows
    t0 = time.perf_counter()
    mask = context.group_mask()  # the same voxels for every subject
    ordered = sorted(runs, key=lambda r: r.run_id)
    if dec.method == "dictlearning":
        from .decomposition.dictlearning import GroupDictLearning

        model = GroupDictLearning(n_components=int(dec.n_components), alpha=dec.alpha,
                                  random_state=dec.seed)
    else:
        model = GroupICA(n_components=int(dec.n_components), method=dec.method,
                         random_state=dec.seed)
    # one BLAS thread in this (client) process: its eigh / FastICA are small, and OpenBLAS
    # threads spinning against the workers on the same cores made each eigh ~50x slower;
    # each run is opened only when MIGP reaches it (no N lazy graphs held at once)
    with threadpool_limits(limits=1, user_api="blas"):
        model.fit([functools.partial(_matrix, context, r.group, mask) for r in ordered])
    template = _matrix(context, ordered[0].group, mask)
    url = _join(context.cfg.output, "group", f"desc-{dec.method}_components.nii.gz")
    storage.to_nifti(maps_image(model.components_, template), url,
                     storage_options=context.opts)
    echo(f"group maps ({dec.method}): {model.components_.shape[0]} components from "
         f"{len(ordered)} runs ({time.perf_counter() - t0:.1f} s) -> {url}")
    context.group_model = model
    if not dec.dual_regression:
        return rows
    names = [f"ICA{i:03d}" for i in range(model.components_.shape[0])]
    if client is None:
        with contextlib.suppress(ImportError, ValueError):
            from distributed import get_client

            client = get_client()
    if client is not None and len(ordered) >= 2:
        return rows + _dual_regression_on_workers(context, ordered, model.components_, mask,
                                                  names, echo, client)

    def one(run) -> dict:
        t1 = time.perf_counter()
        try:
            ds, matrix = _prepared(context, run.group, mask)
            timecourses, maps = dual_regression(model.components_, matrix)
            maps = np.asarray(maps.compute() if hasattr(maps, "compute") else maps)
            prefix = _prefix(context, ds)
            storage.to_nifti(maps_image(maps, template),
                             f"{prefix}_desc-dualreg_components.nii.gz",
                             storage_options=context.opts)
            _write_text(f"{prefix}_desc-dualreg_timeseries.tsv",
                        pd.DataFrame(np.asarray(timecourses), columns=names).to_csv(
                            sep="\t", index=False, float_format="%.10g"), context.opts)
            return _row(context, run, "complete", t1)
        except Exception as e:  # one run's failure is recorded, the others go on
            return _row(context, run, "failed", t1, f"{type(e).__name__}: {e}")

    # runs in flight together (each is a few small computes): the workers stay busy
    # while this process builds and writes the others
    n_parallel = _parallel_runs(client)
    with threadpool_limits(limits=1, user_api="blas"), \
            ThreadPoolExecutor(n_parallel, thread_name_prefix="boldflow-dualreg") as pool:
        rows += list(pool.map(one, ordered))
    return rows


_WORKER_CONTEXTS: dict[tuple[str, str], Any] = {}


def _dualreg_run(config, store, group: str, components: np.ndarray, mask: np.ndarray,
                 names: list[str]) -> None:
    """On a worker: one run's dual regression, computed here, outputs written here.

    The run is streamed block by block by this worker's synchronous scheduler; nothing
    but the small inputs (group maps, mask) and the run's name travels.
    """
    import dask

    from .decomposition.dualreg import dual_regression
    from .jobs import Pipeline, _Context, _write_text

    key = (config.model_dump_json(), str(store))
    context = _WORKER_CONTEXTS.get(key)
    if context is None:  # one per worker process and job (atlas hash, store opened once)
        _WORKER_CONTEXTS.clear()
        context = _WORKER_CONTEXTS[key] = _Context(Pipeline(config), storage.open_store(store))
    with dask.config.set(scheduler="synchronous"):
        ds, matrix = _prepared(context, group, mask)
        timecourses, maps = dual_regression(components, matrix)
        maps = np.asarray(maps.compute() if hasattr(maps, "compute") else maps)
    prefix = _prefix(context, ds)
    storage.to_nifti(maps_image(maps, matrix), f"{prefix}_desc-dualreg_components.nii.gz",
                     storage_options=context.opts)
    _write_text(f"{prefix}_desc-dualreg_timeseries.tsv",
                pd.DataFrame(np.asarray(timecourses), columns=names).to_csv(
                    sep="\t", index=False, float_format="%.10g"), context.opts)


def _dual_regression_on_workers(context, runs, components, mask, names, echo,
                                client) -> list[dict]:
    """One task per run (the maps and the mask scattered once); report rows in run order."""
    from distributed import as_completed

    comps, mask_f = client.scatter([np.asarray(components), np.asarray(mask)],
                                   broadcast=True)
    t0 = {r.run_id: time.perf_counter() for r in runs}
    futures = {client.submit(_dualreg_run, context.cfg, context.bs.ref, r.group, comps,
                             mask_f, names, key=f"dualreg-{r.run_id}-{uuid.uuid4().hex}"): r
               for r in runs}
    out: dict[str, dict] = {}
    for fut in as_completed(list(futures)):
        run = futures.pop(fut)
        try:
            fut.result()
            out[run.run_id] = _row(context, run, "complete", t0[run.run_id])
        except Exception as e:  # one run's failure is recorded, the others go on
            out[run.run_id] = _row(context, run, "failed", t0[run.run_id],
                                   f"{type(e).__name__}: {e}")
        finally:
            fut.release()
    return [out[r.run_id] for r in runs]


def _matrix(context, group: str, mask) -> xr.DataArray:
    """A run's prepared (masked, cleaned) matrix: what MIGP streams, opened on demand."""
    return _prepared(context, group, mask)[1]
