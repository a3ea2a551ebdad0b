"""Running a job: ingest -> per-run graphs (mask, clean, parcellate) -> group connectivity.

:class:`Pipeline` turns a validated :class:`~pipeline.config.JobConfig` into work on a
Dask cluster. :meth:`Pipeline.submit` returns a :class:`Job` at once: a handle with the
dashboard link, one future per run, progress, ``result()`` and ``cancel()``. A driver
thread in the client process does the orchestration:

1. ingest the input (unless it already is a boldflow store);
2. for each selected run, build one lazy graph (mask -> clean -> region signals, and seed
   maps) and compute it on the cluster; at most a few runs are in flight at a time, so
   the scheduler holds compact graphs whatever the number of runs;
3. as each run finishes, write its outputs (region time series, connectivity matrices,
   a JSON sidecar with a provenance hash); a run that fails is recorded with its stage and
   error and the others go on; a run whose outputs exist with the same provenance hash is
   not recomputed;
4. group step: stacked matrices (Zarr), group means, and the two-group comparison.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dask
import fsspec
import numpy as np
import pandas as pd
import xarray as xr

import storage

from .config import ConfigError, JobConfig, load_config

__all__ = ["Job", "JobResult", "Pipeline", "run_prefix"]

log = logging.getLogger(__name__)

STAT_NAMES = {"pearson": "pearsoncorrelation", "correlation": "correlation",
              "partial correlation": "partialcorrelation", "covariance": "covariance",
              "precision": "precision", "tangent": "tangent"}
_ENTITY_ORDER = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo", "space",
                 "res", "den")


def run_prefix(entities: dict) -> str:
    """BIDS file-name prefix of a run's outputs (``sub-01_ses-1_task-rest_run-1_space-X``)."""
    keys = [k for k in _ENTITY_ORDER if entities.get(k)]
    keys += sorted(k for k in entities if k not in _ENTITY_ORDER and entities.get(k))
    return "_".join(f"{k}-{entities[k]}" for k in keys)


def _run_dir(entities: dict) -> str:
    parts = [f"sub-{entities['sub']}"]
    if entities.get("ses"):
        parts.append(f"ses-{entities['ses']}")
    return "/".join([*parts, "func"])


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _write_text(url: str, text: str, options: dict) -> None:
    fs, path = fsspec.core.url_to_fs(url, **options)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.partial"
    with fs.open(tmp, "w") as f:
        f.write(text)
    fs.mv(tmp, path)  # readers never see half a file


def _read_text(url: str, options: dict) -> str | None:
    fs, path = fsspec.core.url_to_fs(url, **options)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return f.read()


def _versions() -> dict[str, str]:
    import nilearn
    import scipy

    return {"boldflow": storage.__version__, "nilearn": nilearn.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__}


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha(path: str) -> str:
    fs, p = fsspec.core.url_to_fs(path)
    h = hashlib.sha256()
    with fs.open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_store(url: str, options: dict) -> bool:
    try:
        storage.open_store(url, storage_options=options)
    except (storage.StoreError, OSError, ValueError):
        return False
    return True


@dataclass
class JobResult:
    """What a finished job produced.

    Attributes
    ----------
    runs : pandas.DataFrame
        One row per run (columns :data:`REPORT_COLUMNS`, also written to
        ``<output>/boldflow_runs.tsv``): entities, ``status`` ("complete", "skipped"
        (outputs up to date), "failed"), ``stage`` and ``error`` for failures, ``seconds``,
        ``bytes_read`` (uncompressed BOLD bytes the run's graph reads) and
        ``stored_bytes`` (their compressed size), ``outputs``, and for ingested inputs
        ``ingest`` (ingested/skipped/failed), ``ingest_seconds`` and ``source_bytes``.
        Decomposition fits add rows with ``stage`` "decompose".
    comparisons : dict
        Per connectivity kind, the :class:`pipeline.connectivity.GroupComparison`.
    matrices : dict
        Per kind, the stacked ``(subject, region, region_)`` matrices.
    output : str
        The output folder.
    group_outputs : list of str
        Files of the group step.
    group_errors : list of str
        Why the group step (or part of it) failed, e.g. a group with a single subject.
    """

    runs: pd.DataFrame
    comparisons: dict = field(default_factory=dict)
    matrices: dict = field(default_factory=dict)
    output: str = ""
    group_outputs: list[str] = field(default_factory=list)
    group_errors: list[str] = field(default_factory=list)

    @property
    def failures(self) -> pd.DataFrame:
        """The failed runs: file, stage and error."""
        return self.runs[self.runs["status"] == "failed"].reset_index(drop=True)


class Job:
    """Handle of a submitted job (returned by :meth:`Pipeline.submit`).

    Attributes
    ----------
    dashboard_link : str
        The Dask dashboard of the cluster running the job.
    futures : dict
        ``run_id -> distributed.Future`` of the per-run graphs submitted so far.
    overlapped : list of str
        Runs whose task was submitted while ingestion was still going on (as soon as the
        run itself was in the store), in submission order.
    """

    def __init__(self, pipeline: Pipeline, client, owns_cluster: Any) -> None:
        self.pipeline = pipeline
        self.client = client
        self._owned = owns_cluster
        self.futures: dict[str, Any] = {}
        self.overlapped: list[str] = []
        self.dashboard_link = getattr(client, "dashboard_link", "")
        self._cancelled = threading.Event()
        self._result: JobResult | None = None
        self._error: BaseException | None = None
        self._status: dict[str, str] = {}
        self._thread = threading.Thread(target=self._drive, name="boldflow-job", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public handle

    def done(self) -> bool:
        """Whether the job has finished (successfully or not)."""
        return not self._thread.is_alive()

    def result(self, timeout: float | None = None) -> JobResult:
        """Wait for the job and return its :class:`JobResult` (re-raises job-level errors)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"job still running after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        """Stop submitting runs and cancel the ones in flight."""
        self._cancelled.set()
        with contextlib.suppress(Exception):
            self.client.cancel(list(self.futures.values()))

    def status(self) -> dict[str, str]:
        """``run_id -> state`` ("pending", "running", "complete", "skipped", "failed")."""
        return dict(self._status)

    def progress(self, notebook: bool | None = None) -> None:
        """Show distributed's progress bar of the submitted runs (blocks in a terminal)."""
        from distributed import progress

        progress(list(self.futures.values()), notebook=notebook)

    def __repr__(self) -> str:
        counts = pd.Series(list(self._status.values()), dtype=object).value_counts().to_dict()
        return f"<boldflow Job {self.pipeline.config.output}: {counts} {self.dashboard_link}>"

    # ------------------------------------------------------------------ driver

    def _drive(self) -> None:
        try:
            self._result = self.pipeline._execute(self)
        except BaseException as e:
            self._error = e
        finally:
            if self._owned is not None:
                with contextlib.suppress(Exception):
                    self.client.close()
                    self._owned.close()


class Pipeline:
    """A configured boldflow job.

    Examples
    --------
    >>> job = Pipeline.from_yaml("job.yaml").submit()  # doctest: +SKIP
    >>> print(job.dashboard_link)  # doctest: +SKIP
    >>> result = job.result()  # doctest: +SKIP
    >>> result.failures  # doctest: +SKIP
    """

    def __init__(self, config: JobConfig | dict) -> None:
        self.config = config if isinstance(config, JobConfig) else load_config(config)
        self.echo = print
        self._warm = False

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Pipeline:
        """Load and validate a YAML job file."""
        return cls(load_config(path))

    def submit(self, client=None, *, echo: Callable[..., object] | None = None,
               live: bool | None = None) -> Job:
        """Start the job on ``client`` (default: the cluster of the job's ``cluster`` section).

        Parameters
        ----------
        client : distributed.Client, optional
            Where to run. None: the cluster the config describes
            (:func:`pipeline.cluster.client_from_config`: a LocalCluster by default, an
            existing scheduler, SLURM/PBS, Kubernetes or a Dask Gateway); the job closes
            the client and the cluster it started when it ends.
        echo : callable, optional
            Prints the job's lines (default: :func:`print`).
        live : bool, optional
            Progress as one terminal line redrawn in place (True) or as plain lines every
            few seconds (False). Default: live when ``echo`` is ``print``/``click.echo``
            and standard output is a terminal.

        Returns
        -------
        Job
            At once; the dashboard link is printed.
        """
        if echo is not None:
            self.echo = echo
        self._live = live
        owned = None
        if client is None:
            from .cluster import client_from_config

            client, cluster = client_from_config(self.config.cluster)
            # the job closes what it opened: the client always, the cluster if it started it
            owned = cluster if cluster is not None else _NullCluster()
            if cluster is not None and self.config.cluster.kind != "local":
                self.echo(f"Dask cluster: {self.config.cluster.kind} ({type(cluster).__name__})")
        self.echo(f"Dask dashboard: {client.dashboard_link}")
        return Job(self, client, owned)

    def run(self, client=None) -> JobResult:
        """``submit(client).result()``."""
        return self.submit(client).result()

    # ------------------------------------------------------------------ execution

    def _execute(self, job: Job) -> JobResult:
        from .progress import StageProgress, format_bytes, is_live

        cfg = self.config
        opts = dict(cfg.storage_options)
        t_job = time.perf_counter()
        live = getattr(self, "_live", None)
        live = is_live(self.echo) if live is None else bool(live)

        def stage(name: str, total: int, **kw: Any) -> StageProgress:
            return StageProgress(name, total, **{"echo": self.echo, "live": live, **kw})

        rows: list[dict] = []
        ingested: dict[str, dict] = {}  # run_id -> what ingestion did and read
        results: dict[str, xr.DataArray] = {}
        in_flight: dict[Any, tuple[str, dict, float, dict]] = {}
        n_workers = len(job.client.scheduler_info().get("workers", {}))
        contexts: list[_Context] = []  # the job context (store, atlas), opened once

        def context_for(store_url: str) -> _Context:
            if not contexts:
                contexts.append(_Context(self, storage.open_store(store_url,
                                                                  storage_options=opts)))
            return contexts[0]

        def track(context: _Context, run_id: str, group: str, fut: Any, ents: dict,
                  t0: float, **info: Any) -> Any:
            """Record a submitted run: its future, what it reads, its state."""
            job.futures[run_id] = fut
            in_flight[fut] = (run_id, ents, t0, {
                **info, "read": _bold_bytes(context.bs, group, context.sums_name)})
            job._status[run_id] = "running"
            return fut

        def submit(context: _Context, run_id: str, group: str, ents: dict, prov: str,
                   group_mask: Any, t0: float) -> Any:
            """One run's task on a worker: built, computed and written there."""
            fut = job.client.submit(_run_on_worker, cfg, context.bs.ref, group, ents, prov,
                                    group_mask, pure=False, key=f"run-{run_id}-{prov[:12]}")
            return track(context, run_id, group, fut, ents, t0, prov=prov, stage="compute",
                         on_worker=True)

        store = cfg.input
        early: dict[str, Any] = {}  # run_id -> its task, submitted while ingestion goes on
        if not _is_store(cfg.input, opts):
            store = cfg.store or _join(cfg.output, "boldflow.zarr")
            self.echo(f"ingesting {storage.stores.redact_url(cfg.input)} -> {store}")
            ing = stage("ingest", 0, labels={"complete": "ingested"})
            actions = {"ingested": "complete", "skipped": "skipped"}
            # A run's own task can start as soon as that run is in the store: the workers
            # then clean and write the first runs while the last ones are still ingested
            # (no idle tail). Not with a group mask (it needs every run) nor with fewer
            # runs than workers (their graphs are spread over the cluster instead).
            early_ok = cfg.mask.strategy != "group"

            def on_ingest(row: dict, total: int) -> None:
                ing.total = total
                ing.update(actions.get(row["action"], "failed"), row["run_id"],
                           nbytes=row.get("source_bytes"), error=row.get("error"))
                if (early_ok and row["status"] == "complete" and total >= max(2, n_workers)
                        and not job._cancelled.is_set()):
                    submit_early(row)

            def submit_early(row: dict) -> None:
                """Submit a freshly ingested run's task; anything unusual (not selected,
                outputs already there, an error) is left to the normal path below."""
                if row["run_id"] in early or self._select(pd.DataFrame([row])).empty:
                    return
                try:
                    context = context_for(store)
                    attrs = context.run_attrs(row["group"])
                    ents = dict(attrs["entities"])
                    prov = context.provenance(row["group"], attrs)
                    if context.cached(ents, prov) is not None:
                        return
                    early[row["run_id"]] = submit(context, row["run_id"], row["group"], ents,
                                                  prov, None, time.perf_counter())
                    job.overlapped.append(row["run_id"])
                except Exception:  # reported by the normal path
                    return

            try:
                # region sums in ingestion's own pass when that is all the runs need
                reducer = label_sums_reducer(cfg)
                ic = cfg.ingest
                if not ic.voxels and reducer is None:
                    raise ConfigError(f"ingest.voxels: false needs a labels atlas read "
                                      f"from a local file; {cfg.parcellate.atlas} is a "
                                      "maps atlas (4D) or cannot be read here")
                catalog = storage.ingest(
                    cfg.input, store, client=job.client, storage_options=opts,
                    source_options=opts, subjects=cfg.subjects, sessions=cfg.sessions,
                    tasks=cfg.task, runs=cfg.runs, spaces=cfg.space, progress=on_ingest,
                    reducers=(reducer,) if reducer is not None else (),
                    chunk_bytes=ic.chunk_bytes, batch_bytes=ic.batch_bytes,
                    shard_bytes=ic.shard_bytes, series_bytes=ic.series_bytes,
                    cname=ic.codec, clevel=ic.clevel, voxels=ic.voxels)
            except BaseException:
                for fut in early.values():
                    fut.cancel()
                raise
            finally:
                ing.close()
            for _, r in catalog.iterrows():
                ingested[r["run_id"]] = {"ingest": r["action"],
                                         "ingest_seconds": r["seconds"],
                                         "source_bytes": r.get("source_bytes")}
            for _, r in catalog[catalog["status"] == "failed"].iterrows():
                rows.append(self._row(dict(sub=r["sub"], ses=r["ses"], task=r["task"],
                                           run=r["run"], space=r["space"]), r["run_id"],
                                      "failed", stage="ingest", error=r["error"]))
        context = context_for(store)
        bs = context.bs
        selected = self._select(bs.runs())
        for run_id in selected["run_id"]:
            job._status.setdefault(run_id, "pending")
        self.echo(f"{len(selected)} run(s) selected from {bs.ref}")
        # many runs: one task per run, built, computed and written by a worker (the driver
        # only submits and collects); few runs: the run's graph spread over the workers
        on_workers = len(selected) >= max(2, n_workers)
        max_in_flight = max(2, (4 if on_workers else 2) * n_workers)
        group_mask = None
        if on_workers and cfg.mask.strategy == "group":
            # computed once here, sent to the workers once (not embedded in every task)
            group_mask = job.client.scatter(context.group_mask(), broadcast=True)
        pending = [r for r in selected.itertuples(index=False) if r.run_id not in early]
        prog = stage("runs", len(selected))
        t_runs = time.perf_counter()

        from distributed import as_completed

        ac = as_completed(list(early.values()))

        def failed(ents: dict, run_id: str, stage_: str, error: str, t0: float | None) -> None:
            rows.append(self._row(ents, run_id, "failed", stage=stage_, error=error,
                                  seconds=0.0 if t0 is None else time.perf_counter() - t0))
            job._status[run_id] = "failed"
            prog.update("failed", run_id, error=f"[{stage_}] {error}")

        def launch(row) -> None:
            run_id, group = row.run_id, row.group
            t0 = time.perf_counter()
            ents: dict = {}
            try:
                attrs = context.run_attrs(group)  # one metadata read, no xarray dataset
                ents = dict(attrs["entities"])
                prov = context.provenance(group, attrs)
                cached = context.cached(ents, prov)
                if cached is not None:
                    results[run_id] = cached
                    rows.append({**self._row(ents, run_id, "skipped",
                                             seconds=time.perf_counter() - t0),
                                 "bytes_read": 0, "stored_bytes": 0})
                    job._status[run_id] = "skipped"
                    prog.update("skipped", run_id)
                    return
                if on_workers:
                    fut = submit(context, run_id, group, ents, prov, group_mask, t0)
                else:
                    graph, stage_ = context.build(group)
                    fut = track(context, run_id, group, job.client.compute(dask.delayed(graph)),
                                ents, t0, prov=prov, stage=stage_)
                ac.add(fut)
            except Exception as e:  # one run's failure is recorded, the others go on
                failed(ents or {"sub": row.sub, "task": row.task}, run_id,
                       e.stage if isinstance(e, StageError) else "build", _msg(e, row.bold),
                       t0)

        while pending and len(in_flight) < max_in_flight and not job._cancelled.is_set():
            launch(pending.pop(0))
        while in_flight:
            fut = next(ac)
            run_id, ents, t0, info = in_flight.pop(fut)
            try:
                computed = fut.result()
                if info.get("on_worker"):
                    outputs = computed.pop("outputs")
                else:
                    outputs = context.write_run(ents, computed, info["prov"])
                if "signals" in computed:
                    results[run_id] = computed["signals"]
                nbytes, nstored = info["read"]
                rows.append({**self._row(ents, run_id, "complete", outputs=outputs,
                                         seconds=time.perf_counter() - t0),
                             "bytes_read": nbytes, "stored_bytes": nstored})
                job._status[run_id] = "complete"
                prog.update("complete", run_id, nbytes=nbytes)
            except Exception as e:
                stage_ = e.stage if isinstance(e, StageError) else info["stage"]
                failed(ents, run_id, stage_, _msg(e, run_id), t0)
            finally:
                with contextlib.suppress(Exception):
                    fut.release()
            while pending and len(in_flight) < max_in_flight and not job._cancelled.is_set():
                launch(pending.pop(0))
        if job._cancelled.is_set():
            for row in pending:
                failed({"sub": row.sub, "task": row.task}, row.run_id, "cancelled",
                       "job cancelled", None)
        prog.close()
        runs_seconds = time.perf_counter() - t_runs
        if cfg.decompose is not None and not job._cancelled.is_set():
            from .decompose_step import run_decomposition

            done = [r for r in selected.itertuples(index=False)
                    if job._status.get(r.run_id) in ("complete", "skipped")]
            dec = stage("decompose", len(done))
            try:
                dec_rows = run_decomposition(context, done, dec.message, client=job.client)
                dec.total = max(dec.total, len(dec_rows))
                for r in dec_rows:
                    dec.update(r["status"] if r["status"] in dec.counts else "complete",
                               r["run_id"], error=r.get("error"))
            finally:
                dec.close()
            rows += dec_rows
        runs = _report_frame(rows, ingested)
        result = JobResult(runs=runs, output=cfg.output)
        if cfg.connectivity is not None and results:
            grp = stage("group", 1, live=False)  # the group step prints its own lines
            try:
                context.group_step(results, result)
                grp.update("failed" if result.group_errors else "complete")
            except Exception as e:  # per-run outputs stand; the group error is reported
                result.group_errors.append(f"{type(e).__name__}: {e}")
                grp.update("failed", error=str(e))
            finally:
                grp.close()
        report = _join(cfg.output, "boldflow_runs.tsv")
        _write_text(report, runs.to_csv(sep="\t", index=False, na_rep="n/a"), opts)
        self.echo(_summary(runs, runs_seconds, time.perf_counter() - t_job, format_bytes)
                  + f"; report: {report}")
        return result

    def _select(self, runs: pd.DataFrame) -> pd.DataFrame:
        cfg = self.config
        sel = runs
        for key, wanted in (("sub", cfg.subjects), ("ses", cfg.sessions), ("run", cfg.runs)):
            if wanted:
                wanted = [str(w).removeprefix(f"{key}-") for w in wanted]
                sel = sel[sel[key].astype(str).isin(wanted)]
        if cfg.task:
            sel = sel[sel["task"] == cfg.task]
        if cfg.space:
            sel = sel[sel["space"] == cfg.space]
        return sel.reset_index(drop=True)

    @staticmethod
    def _row(ents: dict, run_id: str, status: str, *, stage: str | None = None,
             error: str | None = None, seconds: float = 0.0, outputs=None) -> dict:
        return {"run_id": run_id, **{k: ents.get(k) for k in ("sub", "ses", "task", "run",
                                                              "space")},
                "status": status, "stage": stage, "error": error,
                "seconds": round(float(seconds), 2),
                "outputs": ";".join(outputs) if outputs else None}


_WORKER_CONTEXTS: dict[tuple[str, str, str | None], _Context] = {}


def _run_on_worker(config: JobConfig, store, group: str, ents: dict, prov: str,
                   group_mask: np.ndarray | None = None) -> dict:
    """On a worker: one run's graph built, computed here and its outputs written.

    The graph runs on this worker's synchronous scheduler (one block at a time, so memory
    stays bounded by ``block_bytes``); only the region signals (``time x region``) and the
    list of written files go back to the driver. The job context (atlas, group mask) is
    kept per worker process and job.
    """
    # the atlas' content is part of the key: a long-lived worker must not reuse an atlas
    # replaced on disk under the same path since an earlier job
    atlas = _file_sha(config.parcellate.atlas) if config.parcellate else None
    key = (config.model_dump_json(), str(store), atlas)
    context = _WORKER_CONTEXTS.get(key)
    if context is None:
        _WORKER_CONTEXTS.clear()  # one job at a time per worker process is kept
        context = _Context(Pipeline(config), storage.open_store(store))
        context._group_mask = group_mask
        _WORKER_CONTEXTS[key] = context
    graph, stage = context.build(group)  # raises StageError naming the stage
    try:
        with dask.config.set(scheduler="synchronous"):
            (computed,) = dask.compute(graph)
        outputs = context.write_run(ents, computed, prov)
    except Exception as e:  # reported like the driver-side path: the last stage built
        raise StageError(stage, e) from e
    return {**({"signals": computed["signals"]} if "signals" in computed else {}),
            "outputs": outputs}


class StageError(Exception):
    """A run failed while its graph was built; ``stage`` says where."""

    def __init__(self, stage: str, error: BaseException) -> None:
        self.stage = stage
        self.error = error
        super().__init__(str(error))

    def __reduce__(self):  # raised on workers: pickled back to the driver
        return (StageError, (self.stage, self.error))


class _NullCluster:
    def close(self) -> None:
        pass


#: columns of ``boldflow_runs.tsv`` / ``JobResult.runs``, in this order (then any others)
REPORT_COLUMNS = ("run_id", "sub", "ses", "task", "run", "space", "status", "stage", "seconds",
                  "bytes_read", "stored_bytes", "error", "outputs", "ingest", "ingest_seconds",
                  "source_bytes")


def _needs_voxels(cfg: JobConfig) -> bool:
    """Whether a stage needs whole voxel time series (not only region means)."""
    return bool(cfg.seeds) or cfg.export.cleaned_bold or bool(cfg.clean
                                                              and cfg.clean.level == "voxel")


def label_sums_reducer(cfg: JobConfig, atlas_sha: str | None = None):
    """The region sums ingestion can compute for ``cfg`` in its single pass, or None.

    Only when the region means are all a run's graph needs from its voxels: a labels
    atlas, the runs' own brain masks (a group mask is only known after every run is
    ingested) and no voxel-wise stage.
    """
    p = cfg.parcellate
    if p is None or cfg.mask.strategy != "run" or _needs_voxels(cfg):
        return None
    kind = p.kind
    if kind == "auto":
        import nibabel as nib

        try:
            shape = nib.load(p.atlas).shape
        except Exception:  # the run's graph reports an unreadable atlas, not ingestion
            return None
        kind = "maps" if len(shape) == 4 and shape[3] > 1 else "labels"
    if kind != "labels":
        return None
    from .parcellation import LabelSums

    return LabelSums(str(p.atlas), atlas_sha or _file_sha(p.atlas), p.split_connected)


def _bold_bytes(bs, group: str, derived: str | None = None) -> tuple[int | None, int | None]:
    """``(bytes_read, stored_bytes)`` of a run's graph: its whole stored ``bold`` array.

    ``bytes_read`` is the uncompressed size of the stored array (shape x stored dtype);
    ``stored_bytes`` the size of its chunk (or shard) objects in the store, metadata
    excluded. With ``derived`` (a ``derived/`` array name), that array's sizes when the
    run has it (the graph reads it instead of ``bold``). ``(None, None)`` if the store
    cannot tell (the run is not failed for it).
    """
    import zarr
    from zarr.core.sync import sync

    try:
        arr = None
        if derived is not None:
            with contextlib.suppress(Exception):
                arr = zarr.open_array(bs.zarr_store, path=f"{group}/derived/{derived}",
                                      mode="r")
        if arr is None:
            arr = zarr.open_array(bs.zarr_store, path=f"{group}/bold", mode="r")
        nbytes = int(arr.nbytes)
    except Exception:
        log.debug("bytes of %s: %s", group, traceback.format_exc())
        return None, None
    try:
        meta = sync(arr.store_path.store.getsize(f"{arr.path}/zarr.json"))
        stored = int(arr.nbytes_stored()) - int(meta)
    except Exception:
        log.debug("stored bytes of %s: %s", group, traceback.format_exc())
        stored = None
    return nbytes, stored


def _report_frame(rows: list[dict], ingested: dict[str, dict]) -> pd.DataFrame:
    """The run report: :data:`REPORT_COLUMNS` first, ingestion details joined by run id."""
    frame = pd.DataFrame(rows)
    for col in REPORT_COLUMNS:
        if col not in frame:
            frame[col] = None
    if ingested and len(frame):
        for col in ("ingest", "ingest_seconds", "source_bytes"):
            frame[col] = [ingested.get(r, {}).get(col) for r in frame["run_id"]]
    for col in ("bytes_read", "stored_bytes", "source_bytes"):
        frame[col] = frame[col].astype("Int64")
    return frame[[*REPORT_COLUMNS, *(c for c in frame.columns if c not in REPORT_COLUMNS)]]


def _summary(runs: pd.DataFrame, runs_seconds: float, job_seconds: float, fmt) -> str:
    """``6 run(s) done: 5 complete, 0 skipped, 1 failed; 4.1 MiB read (...) ...``."""
    base = runs[~runs["run_id"].astype(str).str.contains(":")] if len(runs) else runs
    counts = {s: int((base["status"] == s).sum()) if len(base) else 0
              for s in ("complete", "skipped", "failed")}
    nbytes = int(base["bytes_read"].fillna(0).sum()) if len(base) else 0
    stored = int(base["stored_bytes"].fillna(0).sum()) if len(base) else 0
    rate = f"{fmt(nbytes / runs_seconds)}/s" if runs_seconds > 0 and nbytes else "n/a"
    return (f"{len(base)} run(s) done: " + ", ".join(f"{v} {k}" for k, v in counts.items())
            + f"; {fmt(nbytes)} of BOLD read ({fmt(stored)} stored) in {runs_seconds:.1f} s "
            f"({rate}); job {job_seconds:.1f} s")


def _msg(e: BaseException, where: str) -> str:
    text = str(e)
    if where and where not in text:
        text = f"{where}: {type(e).__name__}: {text}"
    log.debug("%s", traceback.format_exc())
    return text


class _Context:
    """Per-job state shared by the runs: atlas cache, group mask, provenance."""

    def __init__(self, pipeline: Pipeline, bs) -> None:
        self.pipeline = pipeline
        self.cfg = pipeline.config
        self.bs = bs
        self.opts = dict(self.cfg.storage_options)
        self._atlases: dict = {}
        self._group_mask = None
        self._prov_static: dict | None = None
        self._atlas_sha = _file_sha(self.cfg.parcellate.atlas) if self.cfg.parcellate else None

    # ----------------------------------------------------------- provenance / cache

    def run_attrs(self, group: str) -> dict:
        """A complete run group's attributes: one metadata read (no xarray dataset)."""
        import zarr

        from storage.catalog import STATUS_ATTR

        attrs = dict(zarr.open_group(self.bs.zarr_store, path=group, mode="r",
                                     use_consolidated=False).attrs)
        if attrs.get(STATUS_ATTR) != "complete":
            raise storage.IncompleteRunError(f"{self.bs.ref}: run {group!r} is not complete")
        return attrs

    def provenance(self, group: str, attrs: dict | None = None) -> str:
        if attrs is None:
            attrs = self.run_attrs(group)
        if self._prov_static is None:  # the same for every run of the job
            self._prov_static = self._provenance_static()
        return _sha({"run": attrs.get("boldflow_fingerprint"), **self._prov_static})

    def _provenance_static(self) -> dict:
        cfg = self.cfg
        payload = {
            "clean": cfg.clean.model_dump() if cfg.clean else None,
            "mask": cfg.mask.model_dump(),
            "parcellate": cfg.parcellate.model_dump(exclude={"atlas"}) if cfg.parcellate
            else None,
            "atlas": self._atlas_sha,
            "kinds": cfg.connectivity.kinds if cfg.connectivity else None,
            "seeds": [s.model_dump() for s in cfg.seeds],
            "export": cfg.export.model_dump(),
            "versions": _versions(),
        }
        if cfg.mask.strategy == "group":
            payload["group_mask"] = hashlib.sha256(
                np.packbits(self.group_mask()).tobytes()).hexdigest()
        return payload

    def _paths(self, ents: dict) -> dict[str, str]:
        base = _join(self.cfg.output, _run_dir(ents))
        prefix = run_prefix(ents)
        name = self.cfg.parcellate.name if self.cfg.parcellate else None
        out = {"sidecar": _join(base, f"{prefix}_desc-boldflow_provenance.json")}
        if name:
            out["timeseries"] = _join(base, f"{prefix}_seg-{name}_stat-mean_timeseries.tsv")
            out["relmat"] = _join(base, f"{prefix}_seg-{name}_stat-{{stat}}_relmat.tsv")
        return out

    def cached(self, ents: dict, prov: str) -> xr.DataArray | None:
        """Region signals from outputs written by an earlier run with the same provenance."""
        paths = self._paths(ents)
        text = _read_text(paths["sidecar"], self.opts)
        if text is None or json.loads(text).get("provenance") != prov:
            return None
        if "timeseries" not in paths:
            return xr.DataArray(np.zeros((0, 0)), dims=("time", "region"))
        ts = _read_text(paths["timeseries"], self.opts)
        if ts is None:
            return None
        from io import StringIO

        frame = pd.read_csv(StringIO(ts), sep="\t", na_values="n/a")
        return xr.DataArray(frame.to_numpy(float), dims=("time", "region"),
                            coords={"region": list(frame.columns)}, name="region_signals")

    # ----------------------------------------------------------- graph of one run

    def group_mask(self) -> np.ndarray:
        if self._group_mask is None:
            from .masking import intersect_masks

            groups = list(self.bs.runs()["group"])
            # read here (synchronous scheduler): N small reads, not N cluster round trips
            with dask.config.set(scheduler="synchronous"):
                masks = [self.bs.open_group(g, chunks=None)["mask"].values for g in groups]
            first = self.bs.open_group(groups[0], chunks=None)
            self._group_mask = intersect_masks(
                masks, threshold=self.cfg.mask.group_threshold,
                affine=first.attrs["affine"]).values
        return self._group_mask

    def _mask(self, ds: xr.Dataset):
        strategy = self.cfg.mask.strategy
        if strategy == "run":
            # a small array: read in this process, not a round trip through the cluster
            with dask.config.set(scheduler="synchronous"):
                return ds["mask"].values
        if strategy == "epi":
            from .masking import compute_epi_mask

            return compute_epi_mask(ds).values
        return self.group_mask()

    def atlas(self, ds: xr.Dataset):
        from .parcellation import load_atlas

        key = (tuple(ds.sizes[d] for d in ("x", "y", "z")),
               np.asarray(ds.attrs["affine"]).round(4).tobytes())
        if key not in self._atlases:
            p = self.cfg.parcellate
            self._atlases[key] = load_atlas(p.atlas, reference=ds, kind=p.kind,
                                            split_connected=p.split_connected)
        return self._atlases[key]

    def _confounds(self, ds: xr.Dataset):
        from .strategies import strategy_confounds

        c = self.cfg.clean
        with dask.config.set(scheduler="synchronous"):  # small: read here, not on the cluster
            conf = ds["confounds"].load()
        frame = pd.DataFrame(conf.values, columns=[str(v) for v in conf["confound"].values])
        overrides = {}
        if c.strategy == "scrubbing":
            overrides = {"fd_threshold": c.fd_threshold,
                         "std_dvars_threshold": c.std_dvars_threshold, "scrub": c.scrub}
        source = ds.attrs.get("sources", {}).get("confounds") or ds.attrs.get("run_id", "")
        selected, sample_mask = strategy_confounds(
            frame, strategy=c.strategy, metadata=conf.attrs.get("metadata") or None,
            source=str(source), **overrides)
        return (None if selected is None or selected.shape[1] == 0
                else selected.to_numpy(float)), sample_mask

    def _clean_kwargs(self, ds: xr.Dataset) -> dict:
        c = self.cfg.clean
        confounds, sample_mask = self._confounds(ds)
        return {"detrend": c.detrend,
                "standardize": None if c.standardize in (None, "none") else c.standardize,
                "confounds": confounds, "sample_mask": sample_mask,
                "standardize_confounds": c.standardize_confounds, "filter": c.filter,
                "low_pass": c.low_pass, "high_pass": c.high_pass,
                "t_r": float(ds.attrs["repetition_time"])}

    def build(self, group: str) -> tuple[dict, str]:
        """The lazy graph of one run: ``{"signals": (time, region), "seeds": {...}}``.

        Raises
        ------
        StageError
            Naming the stage (open, mask, confounds, clean, parcellate, seeds) that failed.
        """
        state = {"stage": "open"}
        try:
            return self._build(group, state)
        except Exception as e:
            raise StageError(state["stage"], e) from e

    def _build(self, group: str, state: dict) -> tuple[dict, str]:
        from .masking import apply_mask
        from .parcellation import label_signals, map_signals
        from .signal import clean_signals

        cfg = self.cfg
        # on-disk chunks first: raw label means reduce them where they lie; voxel-wise
        # stages get whole time series (time chunks merged) below
        stored = full = self.bs.open_group(group, chunks=None)
        dummy = slice(cfg.clean.dummy_scans if cfg.clean else 0, None)
        stored = full.isel(time=dummy) if dummy.start else full
        chunk_labels = False
        ingested = None  # raw region means from sums stored at ingest: no bold read at all
        if cfg.parcellate is not None and not _needs_voxels(cfg):
            state["stage"] = "parcellate"
            chunk_labels = self.atlas(stored).kind == "labels"
            if chunk_labels:
                ingested = self._ingested_signals(group, full)
                if ingested is not None and dummy.start:
                    ingested = ingested.isel(time=dummy)
        if ingested is None and "bold" not in full:
            raise storage.StoreError(
                f"{self.bs.ref}: run {group!r} was ingested without voxels and holds no "
                "region sums for this job's atlas and mask; ingest it again (with "
                "ingest.voxels: true, or without voxels for this atlas)")
        ds = stored
        if not chunk_labels:
            ds = stored.copy()
            ds["bold"] = stored["bold"].chunk(
                storage.dataset.time_blocks(stored["bold"], cfg.block_bytes))
        state["stage"] = "mask"
        mask = None if ingested is not None else self._mask(ds)
        matrix = None if chunk_labels else apply_mask(ds, mask)
        out: dict[str, Any] = {}
        kwargs = None
        time_out = ds["time"].values
        if cfg.clean:
            state["stage"] = "confounds"
            kwargs = self._clean_kwargs(ds)
            if kwargs["sample_mask"] is not None:
                time_out = time_out[np.asarray(kwargs["sample_mask"])]
        cleaned_voxels = None
        if cfg.clean and _needs_voxels(cfg):
            state["stage"] = "clean"
            data = clean_signals(matrix.data, **kwargs)
            cleaned_voxels = matrix.isel(time=slice(0, data.shape[0])).copy(data=data)
            cleaned_voxels = cleaned_voxels.assign_coords(time=time_out)
        if cfg.parcellate:
            state["stage"] = "parcellate"
            atlas = self.atlas(ds)
            extract = label_signals if atlas.kind == "labels" else map_signals
            if cleaned_voxels is not None and cfg.clean.level == "voxel":
                signals = extract(cleaned_voxels, atlas)
            else:
                raw = (ingested if ingested is not None
                       else label_signals(ds, atlas, mask=mask) if chunk_labels
                       else extract(matrix, atlas))
                signals = raw if not cfg.clean else _clean_regions(raw, kwargs, time_out)
            out["signals"] = signals
        if cfg.export.cleaned_bold:
            state["stage"] = "export"
            voxels = cleaned_voxels if cleaned_voxels is not None else matrix
            out["cleaned"] = self._write_cleaned(ds, voxels)
        if cfg.seeds:
            state["stage"] = "seeds"
            out["seeds"] = {s.name: self._seed_map(s, ds, cleaned_voxels if cfg.clean
                                                   else matrix) for s in cfg.seeds}
        return out, state["stage"]

    def label_sums(self):
        """The :class:`~pipeline.parcellation.LabelSums` ingestion computes for this job.

        None unless the job's region means need nothing else from the voxels: a labels
        atlas, the runs' own masks and no voxel-wise stage.
        """
        return label_sums_reducer(self.cfg, self._atlas_sha)

    @functools.cached_property
    def sums_name(self) -> str | None:
        """Name of :meth:`label_sums`' derived array in a run's group (None: no sums)."""
        sums = self.label_sums()
        return sums.name if sums is not None else None

    def _ingested_signals(self, group: str, run: xr.Dataset) -> xr.DataArray | None:
        import zarr

        from .parcellation import ingested_label_signals

        reducer = self.label_sums()
        if reducer is None:
            return None
        grp = zarr.open_group(self.bs.zarr_store, path=group, mode="r",
                              use_consolidated=False)
        return ingested_label_signals(run, grp, reducer, self.atlas(run))

    def _cleaned_url(self, ents: dict) -> str:
        return _join(self.cfg.output, _run_dir(ents), f"{run_prefix(ents)}_desc-clean_bold.zarr")

    def _write_cleaned(self, ds: xr.Dataset, voxels: xr.DataArray):
        """Cleaned (time, voxel) data written chunk by chunk by the workers (lazy)."""
        url = self._cleaned_url(dict(ds.attrs["entities"]))
        attrs = {"affine": np.asarray(voxels.attrs["affine"]).tolist(),
                 "shape": list(voxels.attrs["shape"]),
                 "repetition_time": float(ds.attrs["repetition_time"])}
        out = voxels.rename("cleaned").to_dataset()
        out["cleaned"].attrs = attrs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return out.to_zarr(url, mode="w", compute=False, zarr_format=3,
                               consolidated=False, storage_options=self.opts or None)

    def _seed_map(self, seed, ds, voxels: xr.DataArray) -> xr.DataArray:
        from .seeds import seed_correlation

        if seed.coords is not None:
            return seed_correlation(voxels, coords=seed.coords, radius=seed.radius)
        atlas = self.atlas(ds)
        if seed.region not in atlas.names:
            raise ValueError(f"seed region {seed.region!r} is not in the atlas")
        label = atlas.labels[atlas.names.index(seed.region)]
        return seed_correlation(voxels, region_mask=atlas.data == label)

    # ----------------------------------------------------------- outputs

    def write_run(self, ents: dict, computed: dict, prov: str) -> list[str]:
        from .connectivity import connectivity

        paths = self._paths(ents)
        written = []
        if "signals" in computed:
            sig = computed["signals"]
            frame = pd.DataFrame(np.asarray(sig.transpose("time", "region").values),
                                 columns=[str(r) for r in sig["region"].values])
            _write_text(paths["timeseries"], frame.to_csv(sep="\t", index=False,
                                                          na_rep="n/a"), self.opts)
            written.append(paths["timeseries"])
            kinds = ["pearson"]
            if self.cfg.connectivity:
                kinds += [k for k in self.cfg.connectivity.kinds
                          if k not in ("pearson", "tangent")]
            for kind in kinds:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # empty regions: NaN
                    mat = connectivity(sig, kind)
                names = [str(r) for r in mat["region"].values]
                table = pd.DataFrame(mat.values, index=names, columns=names)
                table.index.name = "Node"
                url = paths["relmat"].format(stat=STAT_NAMES[kind])
                _write_text(url, table.to_csv(sep="\t", na_rep="n/a"), self.opts)
                written.append(url)
        for name, smap in computed.get("seeds", {}).items():
            from .masking import unmask

            url = _join(self.cfg.output, _run_dir(ents),
                        f"{run_prefix(ents)}_seed-{name}_stat-pearsoncorrelation_boldmap"
                        ".nii.gz")
            storage.to_nifti(unmask(smap), url, storage_options=self.opts)
            written.append(url)
        if "cleaned" in computed:
            from .masking import unmask

            url = self._cleaned_url(ents)
            cleaned = xr.open_zarr(url, zarr_format=3, consolidated=False,
                                   storage_options=self.opts or None)["cleaned"]
            cleaned.attrs["affine"] = np.asarray(cleaned.attrs["affine"])
            nifti = url.removesuffix(".zarr") + ".nii.gz"
            storage.to_nifti(unmask(cleaned).astype(np.float32), nifti,
                             storage_options=self.opts)
            written += [url, nifti]
        sidecar = {"provenance": prov, "entities": ents, "versions": _versions(),
                   "config": self.cfg.model_dump(exclude={"storage_options"}),
                   "outputs": [os.path.basename(w) for w in written]}
        _write_text(paths["sidecar"], json.dumps(sidecar, indent=2, default=str), self.opts)
        return written

    def _participants(self) -> pd.DataFrame | None:
        conn = self.cfg.connectivity
        if conn.group_rules:
            import fnmatch

            subs = sorted({f"sub-{s}" for s in self.bs.runs()["sub"]})
            rows = []
            for sub in subs:
                hits = [g for g, pat in conn.group_rules.items() if fnmatch.fnmatch(sub, pat)]
                if len(hits) > 1:
                    raise ValueError(f"{sub} matches several group rules: {hits}")
                rows.append({"participant_id": sub, conn.groups: hits[0] if hits else None})
            return pd.DataFrame(rows)
        url = conn.participants or _join(self.cfg.input, "participants.tsv")
        text = _read_text(url, self.opts)
        if text is None:
            if conn.groups:
                raise storage.InputError(url, "participants table not found; needed for "
                                              f"groups={conn.groups!r}")
            return None
        from io import StringIO

        table = pd.read_csv(StringIO(text), sep="\t", dtype=str)
        if conn.groups and conn.groups not in table:
            raise storage.InputError(url, f"has no column {conn.groups!r} (columns: "
                                          f"{list(table.columns)})")
        return table

    def group_step(self, results: dict[str, xr.DataArray], result: JobResult) -> None:
        from .connectivity import group_connectivity

        conn = self.cfg.connectivity
        runs = result.runs.set_index("run_id")
        ok = sorted(r for r in results if r in runs.index)  # deterministic subject order
        subjects = [run_id for run_id in ok]
        signals = [results[r] for r in ok]
        metadata = self._participants()
        meta = None
        if metadata is not None:
            by_sub = metadata.set_index(metadata.columns[0])
            rows = []
            for r in ok:
                sub = f"sub-{runs.loc[r, 'sub']}"
                row = by_sub.loc[sub].to_dict() if sub in by_sub.index else {}
                rows.append({"participant_id": r, **row})
            meta = pd.DataFrame(rows)
        group_dir = _join(self.cfg.output, "group")
        name = self.cfg.parcellate.name
        for kind in dict.fromkeys([*conn.kinds]):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                mats = group_connectivity(signals, kind, subjects=subjects, metadata=meta)
            result.matrices[kind] = mats
            stat = STAT_NAMES[kind]
            store_url = _join(group_dir, f"seg-{name}_stat-{stat}_relmats.zarr")
            ds = mats.to_dataset(name="relmat")
            for c in ds.coords:
                if ds[c].dtype == object:
                    ds[c] = ds[c].astype(str)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds.to_zarr(store_url, mode="w", zarr_format=3, consolidated=False,
                           storage_options=self.opts or None)
            result.group_outputs.append(store_url)
            if conn.groups:
                try:
                    self._compare(mats, kind, name, group_dir, result)
                except Exception as e:  # the matrices stand; report why not compared
                    result.group_errors.append(f"{kind}: {type(e).__name__}: {e}")
                    self.pipeline.echo(f"group comparison ({kind}) failed: {e}")

    def _compare(self, mats, kind: str, name: str, group_dir: str, result) -> None:
        from .connectivity import compare_groups, group_mean

        conn = self.cfg.connectivity
        stat = STAT_NAMES[kind]
        means = group_mean(mats, conn.groups)
        for g in means["group"].values:
            names = [str(r) for r in means["region"].values]
            table = pd.DataFrame(means.sel(group=g).values, index=names, columns=names)
            table.index.name = "Node"
            url = _join(group_dir, f"seg-{name}_stat-{stat}_desc-{_label(g)}mean"
                                   "_relmat.tsv")
            _write_text(url, table.to_csv(sep="\t", na_rep="n/a"), self.opts)
            result.group_outputs.append(url)
        cmp = compare_groups(mats, conn.groups, test=conn.test,
                             n_permutations=conn.n_permutations, alpha=conn.alpha,
                             random_state=conn.seed)
        result.comparisons[kind] = cmp
        g1, g2 = (_label(g) for g in cmp.groups)
        url = _join(group_dir, f"seg-{name}_stat-{stat}_desc-{g2}vs{g1}_edges.tsv")
        _write_text(url, cmp.edges.to_csv(sep="\t", index=False, na_rep="n/a"),
                    self.opts)
        result.group_outputs.append(url)
        for what in ("statistic", "p_fdr"):
            arr = getattr(cmp, what)
            names = [str(r) for r in arr["region"].values]
            table = pd.DataFrame(arr.values, index=names, columns=names)
            table.index.name = "Node"
            url = _join(group_dir, f"seg-{name}_stat-{stat}_desc-{g2}vs{g1}"
                                   f"{what.replace('_', '')}_relmat.tsv")
            _write_text(url, table.to_csv(sep="\t", na_rep="n/a"), self.opts)
            result.group_outputs.append(url)


def _label(value: Any) -> str:
    return "".join(ch for ch in str(value) if ch.isalnum()) or "group"


def _clean_regions(raw: xr.DataArray, kwargs: dict, time_out: np.ndarray) -> xr.DataArray:
    """NiftiLabelsMasker order: average raw voxels, then clean the region signals."""
    import dask

    from .signal import clean_signals

    def clean(values: np.ndarray) -> np.ndarray:
        out = np.full((len(time_out), values.shape[1]), np.nan)
        valid = np.flatnonzero(np.all(np.isfinite(values), axis=0))
        if valid.size:
            out[:, valid] = clean_signals(values[:, valid], **kwargs)
        return out

    import dask.array as da

    task = dask.delayed(clean, pure=True)(raw.data)
    data = da.from_delayed(task, shape=(len(time_out), raw.shape[1]), dtype=np.float64)
    return xr.DataArray(data, dims=raw.dims,
                        coords={**{k: v for k, v in raw.coords.items() if k != "time"},
                                "time": time_out},
                        attrs=raw.attrs, name=raw.name)
