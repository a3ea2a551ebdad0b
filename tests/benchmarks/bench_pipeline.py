"""boldflow's pipeline against nilearn, side by side on the same simulated data.

The issue's targets 1, 2, 3 and 5 (target 4, memory, is ``bench_pipeline_memory.py``):

1. voxel-level cleaning: nilearn ``NiftiMasker(...).fit_transform`` per subject, from the
   ``.nii.gz``, against boldflow from the already-ingested Zarr store (``storage.open_run``
   -> ``apply_mask`` -> ``clean_signals`` -> a per-run ``.sum(axis=0)``, which computes every
   cleaned value without gathering them) on a ``LocalCluster`` of single-threaded worker
   processes. Target: >= 20x. The numbers are checked against nilearn's.
2. labels + connectivity: nilearn ``NiftiLabelsMasker`` + ``ConnectivityMeasure`` over all
   subjects against ``Pipeline(job).submit(client).result()`` with ``clean.level: region``
   and the store as input (no ingest). Target: >= 5x.
3. end to end from ``.nii.gz``: the same nilearn work against a ``Pipeline`` whose input is
   the derivatives folder (ingest + clean + parcellate + connectivity + group comparison),
   store and outputs removed between repetitions. Target: >= 5x.
5. one pass: voxel-level cleaning throughput (uncompressed MB of BOLD per second) as a
   fraction of the raw Zarr read speed (read every chunk of the bold arrays and sum them),
   on the same cluster, interleaved with the cleaning repetitions.

Both sides use the same cleaning: detrend, ``zscore_sample``, Butterworth 0.009-0.08 Hz,
TR 2 s. Parts 1 and 5 regress 6 motion parameters + ``csf`` + ``white_matter``. A Pipeline
job selects confounds by strategy, so parts 2 and 3 use the ``simple`` strategy on both
sides (nilearn: ``load_confounds_strategy(bold, "simple")``): cosines + 24 motion + csf + wm.

nilearn runs serially in this process (how it is used); boldflow uses the cluster (2
workers by default). CPU seconds are printed next to wall seconds: this machine is shared,
and the load average at the end of each measurement is printed too.

Run (not part of the test suite)::

    python tests/benchmarks/bench_pipeline.py
    python tests/benchmarks/bench_pipeline.py --profile /tmp/bf-profile   # + HTML reports

Prints Markdown tables for RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import importlib
import io
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
from _common import machine_lines, measured, profile_job

MOTION = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
CONFOUNDS = [*MOTION, "csf", "white_matter"]
CLEAN = {"detrend": True, "standardize": "zscore_sample", "low_pass": 0.08,
         "high_pass": 0.009, "t_r": 2.0}
MB = 1e6


# ------------------------------------------------------------------------- data


def make_data(out: Path, n_subjects: int, shape, n_volumes: int, dtype: str) -> Path:
    from pipeline.simulate import simulate_dataset

    root = out / f"pipeline-{n_subjects}-{'x'.join(map(str, shape))}-{n_volumes}-{dtype}"
    marker = root / ".done"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        simulate_dataset(root, n_subjects=n_subjects, shape=tuple(shape), voxel_size=3.0,
                         n_volumes=n_volumes, dtype=dtype, seed=0)
        marker.touch()
    return root


def find_runs(root: Path) -> list[dict]:
    """One dict per subject: sub, bold, mask, confounds (paths as str), sorted by subject."""
    runs = []
    for bold in sorted(root.glob("sub-*/func/*_desc-preproc_bold.nii.gz")):
        sub = bold.name.split("_")[0].removeprefix("sub-")
        func = bold.parent
        runs.append({"sub": sub, "bold": str(bold),
                     "mask": str(next(func.glob(f"sub-{sub}_*desc-brain_mask.nii.gz"))),
                     "confounds": str(next(func.glob(f"sub-{sub}_*desc-confounds_timeseries"
                                                     ".tsv")))})
    return runs


# ------------------------------------------------------------------------- measuring


def _proc_cpu() -> float:
    # defined here (pickled by value for client.run, the workers need not import _common)
    t = psutil.Process().cpu_times()
    return t.user + t.system


def median(recs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in recs)


def task_breakdown(ts_data: list[dict], wall: float, n_workers: int) -> list[str]:
    """Markdown rows: compute seconds per (fused) task name in a task stream, share, span."""
    from dask.utils import key_split

    agg: dict[str, float] = collections.defaultdict(float)
    span: dict[str, list[float]] = {}
    t_min = min((ss["start"] for t in ts_data for ss in t["startstops"]), default=0.0)
    for t in ts_data:
        for ss in t["startstops"]:
            name = key_split(t["key"]) if ss["action"] == "compute" else f"({ss['action']})"
            agg[name] += ss["stop"] - ss["start"]
            lo, hi = span.get(name, [np.inf, -np.inf])
            span[name] = [min(lo, ss["start"] - t_min), max(hi, ss["stop"] - t_min)]
    total = sum(agg.values()) or 1.0
    rows = ["| task (fused name) | worker s | share | from-to s (first task = 0) |",
            "|---|---|---|---|"]
    for name, sec in sorted(agg.items(), key=lambda kv: -kv[1]):
        if sec / total < 0.005:
            continue
        lo, hi = span[name]
        rows.append(f"| {name} | {sec:.2f} | {sec / total:.0%} | {lo:.1f}-{hi:.1f} |")
    rows.append(f"| **all tasks** | {total:.2f} | occupancy {total / (n_workers * wall):.0%} "
                f"of {n_workers} workers x {wall:.1f} s wall | |")
    return rows


def worker_gaps(ts_data: list[dict], min_gap: float = 0.05) -> list[str]:
    """Markdown rows: per worker, busy seconds and the idle gaps inside the task span.

    Tells whether a low occupancy is a late start, a tail, or holes between tasks (each
    gap named by the tasks on either side).
    """
    from dask.utils import key_split

    by_worker: dict[str, list[tuple[float, float, str]]] = collections.defaultdict(list)
    for t in ts_data:
        for ss in t["startstops"]:
            if ss["action"] == "compute":
                by_worker[t["worker"]].append((ss["start"], ss["stop"], key_split(t["key"])))
    if not by_worker:
        return []
    t0 = min(iv[0] for ivs in by_worker.values() for iv in ivs)
    t1 = max(iv[1] for ivs in by_worker.values() for iv in ivs)
    rows = ["| worker | busy s | first task s | last task ends s | idle gaps > "
            f"{min_gap:g} s (at s: length, after -> before) |", "|---|---|---|---|---|"]
    for w, ivs in sorted(by_worker.items()):
        ivs.sort()
        busy, gaps, end, prev = 0.0, [], ivs[0][0], ivs[0][2]
        for start, stop, name in ivs:
            busy += stop - start
            if start - end > min_gap:
                gaps.append(f"{end - t0:.1f}: {start - end:.2f} ({prev} -> {name})")
            if stop > end:
                end, prev = stop, name
        rows.append(f"| {w} | {busy:.2f} | {ivs[0][0] - t0:.2f} | {end - t0:.2f} "
                    f"(span {t1 - t0:.2f}) | {'; '.join(gaps) or 'none'} |")
    return rows


# ------------------------------------------------------------------------- nilearn


def nilearn_voxel(run: dict) -> np.ndarray:
    """Part 1 reference: one subject's voxel-level cleaning with NiftiMasker."""
    from nilearn.maskers import NiftiMasker

    conf = pd.read_csv(run["confounds"], sep="\t", na_values="n/a")[CONFOUNDS].to_numpy()
    masker = NiftiMasker(mask_img=run["mask"], **CLEAN)
    return masker.fit_transform(run["bold"], confounds=conf)


def nilearn_labels(runs: list[dict], atlas: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Parts 2/3 reference: NiftiLabelsMasker per subject + one ConnectivityMeasure."""
    from nilearn.connectome import ConnectivityMeasure
    from nilearn.interfaces.fmriprep import load_confounds_strategy
    from nilearn.maskers import NiftiLabelsMasker

    series = []
    for run in runs:
        conf, sample_mask = load_confounds_strategy(run["bold"], denoise_strategy="simple")
        masker = NiftiLabelsMasker(labels_img=atlas, mask_img=run["mask"], **CLEAN)
        series.append(masker.fit_transform(run["bold"], confounds=conf,
                                           sample_mask=sample_mask))
    mats = ConnectivityMeasure(kind="correlation").fit_transform(series)
    return series, mats


# ------------------------------------------------------------------------- boldflow


def boldflow_voxel_graphs(store: Path, subs: list[str], **open_kw):
    """Part 1: lazy per-run ``clean_signals(...).sum(axis=0)`` (and the cleaned arrays)."""
    import storage
    from pipeline.masking import apply_mask
    from pipeline.signal import clean_signals

    sums, cleaned = [], []
    for sub in subs:
        ds = storage.open_run(store, subject=sub, task="rest", **open_kw)
        matrix = apply_mask(ds)
        conf = ds["confounds"].sel(confound=CONFOUNDS).values
        data = clean_signals(matrix.data, confounds=conf, **CLEAN)
        cleaned.append((matrix, data))
        sums.append(data.sum(axis=0))
    return sums, cleaned


def raw_read_graphs(store: Path, subs: list[str], merged: bool):
    """Part 5: sum of every bold chunk of each run (on-disk chunks, or time-merged)."""
    import storage

    return [storage.open_run(store, subject=s, task="rest",
                             chunks="time" if merged else None)["bold"].data.sum(dtype="f8")
            for s in subs]


def no_split_chunk_bytes(shape, n_volumes: int, itemsize: int,
                         block_bytes: int = 32 * 2**20, batch_bytes: int = 128 * 2**20) -> int:
    """``chunk_bytes`` whose stored spatial block x all volumes x 8 B fits ``block_bytes``.

    ``open_run`` splits a stored block whose whole time series exceed ``block_bytes``
    (float64); a store ingested with this chunk size needs no split.
    """
    from storage import plan_bold_chunks

    tb = plan_bold_chunks((*shape, n_volumes), itemsize, batch_bytes=batch_bytes).time_block
    return max(itemsize * tb, block_bytes * tb * itemsize // (8 * n_volumes))


def stored_chunks(store: Path, subs: list[str]) -> int:
    import math

    import storage

    total = 0
    for sub in subs:
        data = storage.open_run(store, subject=sub, task="rest", chunks=None)["bold"].data
        total += math.prod(len(c) for c in data.chunks)
    return total


def _install_read_counter() -> None:
    """On a worker: count GETs of bold chunks from local Zarr stores (diagnostics only)."""
    import zarr.storage

    cls = zarr.storage.LocalStore
    if getattr(cls, "_bf_bench_reads", None) is not None:
        return
    original = cls.get

    async def get(self, key, prototype=None, byte_range=None):
        if "/bold/c/" in key:
            cls._bf_bench_reads += 1
        return await original(self, key, prototype, byte_range)

    cls._bf_bench_reads = 0
    cls.get = get


def _pop_read_count() -> int:
    import zarr.storage

    n = zarr.storage.LocalStore._bf_bench_reads
    zarr.storage.LocalStore._bf_bench_reads = 0
    return n


def count_reads(client, fn) -> int:
    """Bold chunk reads done by the workers while ``fn()`` runs (an untimed extra run)."""
    client.run(_install_read_counter)
    client.run(_pop_read_count)
    fn()
    return sum(client.run(_pop_read_count).values())


def reads_note(n_reads: int, n_stored: int) -> str:
    return (f"{n_reads} bold chunk reads for {n_stored} stored chunks (each chunk read "
            f"{n_reads / max(n_stored, 1):.1f} times; counted in an extra, untimed run).")


def pipeline_job(input_: str, output: Path, atlas: str, *, store: Path | None = None,
                 groups: bool = False, voxels: bool = True) -> dict:
    job = {"input": input_, "output": str(output),
           "clean": {"strategy": "simple", "level": "region", **{
               k: v for k, v in CLEAN.items() if k != "t_r"}},
           "parcellate": {"atlas": atlas, "name": "sim"},
           "connectivity": {"kinds": ["correlation"]}}
    if store is not None:
        job["store"] = str(store)
    if groups:
        job["connectivity"]["groups"] = "group"
    if not voxels:
        job["ingest"] = {"voxels": False}
    return job


def gunzip_file(path: str) -> int:
    """Decompress a .nii.gz fully (ISA-L, as boldflow's ingest does); bytes out."""
    try:
        from isal import igzip as gz
    except ImportError:  # pragma: no cover
        import gzip as gz
    n = 0
    with gz.open(path, "rb") as f:
        while block := f.read(64 << 20):
            n += len(block)
    return n


def run_pipeline(job: dict, client):
    from pipeline.jobs import Pipeline

    result = Pipeline(job).submit(client, echo=lambda *a, **k: None).result()
    failed = result.failures
    if len(failed):
        raise RuntimeError(f"pipeline runs failed: {failed[['run_id', 'error']].to_dict()}")
    if result.group_errors:
        raise RuntimeError(f"group step failed: {result.group_errors}")
    return result


# ------------------------------------------------------------------------- checks


def check_voxels(client, cleaned_sub01, ref: np.ndarray, n_series: int = 5) -> dict:
    """Max |boldflow - nilearn| over a few voxels' series, and over all voxels (sub-01)."""
    matrix, data = cleaned_sub01
    ours = client.compute(data).result()
    order = np.lexsort((matrix["k"].values, matrix["j"].values, matrix["i"].values))
    ours = ours[:, order]  # nilearn's C order of the mask
    picks = np.linspace(0, ref.shape[1] - 1, n_series).astype(int)
    return {"shape": ref.shape, "picks": picks.tolist(),
            "few": float(np.max(np.abs(ours[:, picks] - ref[:, picks]))),
            "all": float(np.max(np.abs(ours - ref))), "ref_dtype": str(ref.dtype)}


def check_matrices(result, ref_mats: np.ndarray) -> dict:
    mats = result.matrices["correlation"]
    mats = mats.sortby("subject")
    out = {"max": 0.0, "shapes": None}
    for n in range(mats.sizes["subject"]):
        m = mats.isel(subject=n).values
        valid = ~np.all(np.isnan(m), axis=1)
        m = m[np.ix_(valid, valid)]
        if m.shape != ref_mats[n].shape:
            out["shapes"] = (m.shape, ref_mats[n].shape)
            return out
        out["max"] = max(out["max"], float(np.max(np.abs(m - ref_mats[n]))))
    out["shapes"] = ref_mats[0].shape
    return out


# ------------------------------------------------------------------------- stage costs


def stage_costs(store: Path, sub: str) -> list[tuple[str, float]]:
    """CPU seconds of each stage of part 1 for one run, serially in this process."""
    import storage
    from pipeline.signal import clean_signals

    ds = storage.open_run(store, subject=sub, task="rest", chunks=None)
    bold = ds["bold"].data
    mask = ds["mask"].values
    conf = ds["confounds"].sel(confound=CONFOUNDS).values
    cost: dict[str, float] = collections.defaultdict(float)
    xb, yb, zb, tb = (np.cumsum((0, *c)) for c in bold.chunks)

    def tick(name: str, t0: float) -> float:
        now = _proc_cpu()
        cost[name] += now - t0
        return now

    for i in range(len(xb) - 1):
        for j in range(len(yb) - 1):
            for k in range(len(zb) - 1):
                sl = (slice(xb[i], xb[i + 1]), slice(yb[j], yb[j + 1]),
                      slice(zb[k], zb[k + 1]))
                t = _proc_cpu()
                pieces = [np.asarray(bold[(*sl, slice(tb[n], tb[n + 1]))].compute(
                    scheduler="sync")) for n in range(len(tb) - 1)]
                t = tick("read + decompress the Zarr chunks", t)
                block = np.concatenate(pieces, axis=3) if len(pieces) > 1 else pieces[0]
                t = tick("merge time chunks (rechunk)", t)
                x = np.ascontiguousarray(block[mask[sl]].T, dtype=np.float64)
                t = tick("apply_mask: select voxels, transpose, to float64", t)
                y = clean_signals(x, confounds=conf, **CLEAN)
                t = tick("clean_signals on the block", t)
                y.sum(axis=0)
                tick("sum", t)
    return list(cost.items())


# ------------------------------------------------------------------------- report


def machine_facts(args, n_bytes: float) -> list[str]:
    return [
        *machine_lines(),
        f"- data: {args.subjects} simulated subjects, {args.shape.replace(',', 'x')} at 3 mm "
        f"x {args.volumes} volumes, {args.dtype} ({n_bytes / MB:.0f} MB of BOLD "
        "uncompressed in all); TR 2 s",
        f"- boldflow: LocalCluster({args.workers} worker processes x 1 thread, memory_limit="
        f"{args.memory_limit}) as `boldflow run` starts it (pipeline.cluster.make_cluster); "
        "nilearn: serial, in the client process",
    ]


def fmt_row(name: str, recs: list[dict], cpu_key: str, rss_key: str, ref_wall: float | None,
            ref_cpu: float | None, target: float | None) -> str:
    wall = median(recs, "wall")
    wmin = min(r["wall"] for r in recs)
    keys = cpu_key.split("+")
    cpu = statistics.median(sum(r[k] for k in keys) for r in recs)
    cpu_txt = f"{cpu:.1f}"
    if len(keys) > 1:  # workers + client process
        cpu_txt += " (" + " + ".join(f"{median(recs, k):.1f}" for k in keys) + ")"
    rss = max(r[rss_key] for r in recs) / MB
    load = max(r["load"] for r in recs)
    if ref_wall is None:
        ratio, cratio, tgt, met = "1 (reference)", "1", "", ""
    else:
        ratio = f"**{ref_wall / wall:.1f}x**"
        cratio = f"{ref_cpu / cpu:.1f}x"
        tgt = f">= {target:g}x"
        met = "yes" if ref_wall / wall >= target else "**no**"
    n = f" (median of {len(recs)}, min {wmin:.1f})" if len(recs) > 1 else ""
    return (f"| {name} | {wall:.1f}{n} | {cpu_txt} | {rss:.0f} | {ratio} | {cratio} | {tgt} "
            f"| {met} | {load:.1f} |")


HEADER = ("| implementation | wall s | CPU s (workers + client) | peak RSS MB | speed-up (wall) "
          "| CPU-time ratio | target | met? | load avg |\n|---|---|---|---|---|---|---|---|---|")


# ------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--shape", default="61,73,61")
    ap.add_argument("--volumes", type=int, default=200)
    ap.add_argument("--dtype", default="float32", choices=["int16", "float32"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="8GiB")
    ap.add_argument("--repeats", type=int, default=3, help="repetitions of boldflow runs")
    ap.add_argument("--e2e-repeats", type=int, default=2,
                    help="repetitions of the end-to-end boldflow job (part 3)")
    ap.add_argument("--paired", type=int, default=0,
                    help="part 3: rounds of nilearn, boldflow and the gunzip limit run back "
                         "to back, reported as per-round ratios (for hosts whose speed "
                         "drifts)")
    ap.add_argument("--nilearn-repeats", type=int, default=1,
                    help="repetitions of nilearn (parts 1 and 2/3)")
    ap.add_argument("--parts", default="1,2,3,5")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "bf-bench-data")
    ap.add_argument("--profile", type=Path, default=None,
                    help="folder for performance_report HTML files and cProfile text")
    args = ap.parse_args()
    parts = {int(p) for p in args.parts.split(",")}
    warnings.simplefilter("ignore")  # nilearn's deprecation/future notes, dask's UserWarnings
    t_start = time.perf_counter()

    from distributed import Client, get_task_stream, performance_report

    import storage
    from pipeline.cluster import make_cluster
    from pipeline.config import ClusterConfig

    shape = [int(s) for s in args.shape.split(",")]
    root = make_data(args.data, args.subjects, shape, args.volumes, args.dtype)
    runs = find_runs(root)
    subs = [r["sub"] for r in runs]
    atlas = str(root / "atlas-simulated_dseg.nii.gz")
    itemsize = np.dtype(args.dtype).itemsize
    n_bytes = float(np.prod(shape)) * args.volumes * itemsize * len(runs)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    out: list[str] = []

    def say(line: str = "") -> None:
        out.append(line)
        print(line, flush=True)

    with tempfile.TemporaryDirectory(prefix="bf-bench-") as tmp_, \
            make_cluster(ClusterConfig(n_workers=args.workers,  # what `boldflow run` starts
                                       memory_limit=args.memory_limit)) as cluster, \
            Client(cluster) as client:
        tmp = Path(tmp_)
        pids = list(client.run(os.getpid).values())
        # import cost is not pipeline cost, on either side: nilearn.connectome alone
        # takes ~0.8 s (it imports sklearn.utils.estimator_checks, hence pytest), paid by
        # each worker's first connectivity otherwise
        warm = ("storage", "pipeline.signal", "pipeline.jobs", "pipeline.connectivity",
                "nilearn.signal", "nilearn.connectome")
        client.run(lambda: [importlib.import_module(m) for m in warm])
        for mod in (*warm, "nilearn.maskers"):
            importlib.import_module(mod)

        store = tmp / "study.zarr"
        with measured(client, pids) as ingest_rec:
            cat = storage.ingest(root, store, client=client)
        assert (cat["status"] == "complete").all(), cat["error"].tolist()
        chunks = storage.open_run(store, subject=subs[0], task="rest",
                                  chunks=None).attrs["chunks"]
        store_small = tmp / "study-small-chunks.zarr"
        small_cb = no_split_chunk_bytes(shape, args.volumes, itemsize)
        if parts & {1, 2, 5}:
            cat = storage.ingest(root, store_small, client=client, chunk_bytes=small_cb)
            assert (cat["status"] == "complete").all(), cat["error"].tolist()
        say(f"\ncommand: python {' '.join(sys.argv)}\n")
        for line in machine_facts(args, n_bytes):
            say(line)
        say(f"- store: default ingest options (chunk_bytes 32MiB, batch_bytes 128MiB) -> "
            f"on-disk chunks {tuple(chunks)}; ingest of the {len(runs)} runs took "
            f"{ingest_rec['wall']:.1f} s")
        sat = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.WORKER_SATURATION)
        say(f"- scheduler: distributed.scheduler.worker-saturation = {sat}")
        say(f"- load average at start: {load0[0]:.1f} (1 min), {load0[1]:.1f} (5 min)")

        # ---------------------------------------------------------------- part 1 + 5
        # diagnostic variants, same data: "unsplit" opens the runs with blocks that are not
        # split in space (open_run's behaviour before block_bytes existed); "small chunks"
        # is a store ingested with chunks small enough that open_run never splits them
        variants = [("defaults", store, {}), ("unsplit", store, {"block_bytes": "64GiB"}),
                    ("small chunks", store_small, {})]
        if parts & {1, 5}:
            nl_vox: list[dict] = []
            ref01 = None
            if 1 in parts:
                for _ in range(args.nilearn_repeats):
                    with measured() as rec:
                        for n, run in enumerate(runs):
                            res = nilearn_voxel(run)
                            if n == 0 and ref01 is None:
                                ref01 = res
                            del res
                    nl_vox.append(rec)
            bf_vox: dict[str, list[dict]] = {v[0]: [] for v in variants}
            reads: dict[str, list[dict]] = {"disk": [], "merged": []}
            streams: dict[str, tuple] = {}
            for _rep in range(args.repeats):
                for merged in (False, True):
                    name = "merged" if merged else "disk"
                    with get_task_stream(client) as ts, measured(client, pids) as rec:
                        client.gather(client.compute(raw_read_graphs(store, subs, merged)))
                    reads[name].append(rec)
                    streams[name] = (ts.data, rec["wall"])
                for name, st, kw in variants:
                    with get_task_stream(client) as ts, measured(client, pids) as rec:
                        t0 = time.perf_counter()
                        sums, cleaned = boldflow_voxel_graphs(st, subs, **kw)
                        rec["build"] = time.perf_counter() - t0
                        client.gather(client.compute(sums))
                    bf_vox[name].append(rec)
                    streams[name] = (ts.data, rec["wall"])
                    if name == "defaults":
                        cleaned_defaults = cleaned[0]
                    del sums, cleaned
            check = (check_voxels(client, cleaned_defaults, ref01) if ref01 is not None
                     else None)
            del cleaned_defaults
            if args.profile:
                with performance_report(filename=str(args.profile / "boldflow-voxel.html")):
                    sums, _ = boldflow_voxel_graphs(store, subs)
                    client.gather(client.compute(sums))
                if 1 in parts:
                    prof = cProfile.Profile()
                    prof.runcall(nilearn_voxel, runs[0])
                    text = io.StringIO()
                    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(15)
                    (args.profile / "nilearn-voxel.txt").write_text(text.getvalue())

            n_stored = {name: stored_chunks(st, subs) for name, st, _ in variants}

            def voxel_run(st, kw):
                return lambda: client.gather(client.compute(
                    boldflow_voxel_graphs(st, subs, **kw)[0]))

            n_reads = {name: count_reads(client, voxel_run(st, kw))
                       for name, st, kw in variants}
            if 1 in parts:
                say("\n### 1. Voxel-level cleaning (all voxels of every run)\n")
                say(HEADER)
                ref_w = median(nl_vox, "wall")
                ref_c = median(nl_vox, "cpu_client")
                say(fmt_row(f"nilearn NiftiMasker, {len(runs)} subjects serially", nl_vox,
                            "cpu_client", "rss_client", None, None, None))
                labels = {
                    "defaults": f"**boldflow, defaults** (store -> open_run -> apply_mask -> "
                                f"clean_signals -> sum), {args.workers} workers",
                    "unsplit": "diagnostic: same, open_run(block_bytes='64GiB') (stored "
                               "blocks not split)",
                    "small chunks": f"diagnostic: same, store ingested with chunk_bytes="
                                    f"{small_cb / 2**20:.0f}MiB (no split needed)"}
                for name, _, _ in variants:
                    say(fmt_row(labels[name], bf_vox[name], "cpu_workers+cpu_client",
                                "rss_workers_max", ref_w, ref_c, 20))
                say(f"\nnilearn: {ref_w / len(runs):.1f} s per subject "
                    f"({ref_c / len(runs):.1f} CPU s); boldflow (defaults): "
                    f"{median(bf_vox['defaults'], 'wall') / len(runs):.2f} s per subject, of "
                    f"which {median(bf_vox['defaults'], 'build'):.2f} s (all subjects) building "
                    "the graphs in the client. Peak RSS: nilearn = this process (it held "
                    f"{nl_vox[0]['rss_client_before'] / MB:.0f} MB before), "
                    "boldflow = the largest worker. The target is judged on the defaults row.")
                if check:
                    say(f"\nAgreement (sub-01, {check['shape'][1]} voxels, nilearn output "
                        f"{check['ref_dtype']}): max |boldflow - nilearn| = {check['few']:.2e} "
                        f"over the series of voxels {check['picks']} (nilearn's column order),"
                        f" {check['all']:.2e} over all voxels (values are z-scores).")
                for name, _, _ in variants:
                    say(f"\nWorker time, {name} (task stream of the last repetition; dask "
                        "fuses linear chains such as read -> split -> merge -> mask into single "
                        "tasks). " + reads_note(n_reads[name], n_stored[name]) + "\n")
                    for line in task_breakdown(*streams[name], args.workers):
                        say(line)
                say(f"\nIntrinsic CPU seconds per stage for one run (sub-{subs[0]}), each "
                    "stored chunk read once, serially in one process:\n")
                say("| stage | CPU s | share |\n|---|---|---|")
                costs = stage_costs(store, subs[0])
                total = sum(c for _, c in costs)
                for name, c in costs:
                    say(f"| {name} | {c:.2f} | {c / total:.0%} |")
                say(f"| **total** | {total:.2f} | |")

            if 5 in parts:
                say("\n### 5. One pass: voxel-level cleaning vs raw Zarr read, same cluster\n")
                say("| what | wall s (median) | MB/s | worker CPU s | MB per worker CPU-s | "
                    "fraction of raw read (wall) | fraction (per CPU-s) |")
                say("|---|---|---|---|---|---|---|")
                base_w = median(reads["disk"], "wall")
                base_c = median(reads["disk"], "cpu_workers")
                rows5 = [("raw read: sum of every on-disk chunk (the reference)", reads["disk"]),
                         ("raw read through open_run (time chunks merged, blocks split)",
                          reads["merged"]),
                         ("**voxel-level cleaning, defaults (part 1)**", bf_vox["defaults"]),
                         ("voxel-level cleaning, unsplit (diagnostic)", bf_vox["unsplit"]),
                         ("voxel-level cleaning, small chunks (diagnostic)",
                          bf_vox["small chunks"])]
                for name, recs in rows5:
                    w, c = median(recs, "wall"), median(recs, "cpu_workers")
                    say(f"| {name} | {w:.2f} | {n_bytes / MB / w:.0f} | {c:.1f} | "
                        f"{n_bytes / MB / c:.0f} | {base_w / w:.0%} | {base_c / c:.0%} |")
                say("\nRaw read task stream (last repetition):\n")
                for line in task_breakdown(*streams["disk"], args.workers):
                    say(line)

        # ---------------------------------------------------------------- part 2 + 3
        if parts & {2, 3}:
            nl_lab: list[dict] = []
            for _ in range(args.nilearn_repeats):
                with measured() as rec:
                    ref_series, ref_mats = nilearn_labels(runs, atlas)
                nl_lab.append(rec)
            ref_w = median(nl_lab, "wall")
            ref_c = median(nl_lab, "cpu_client")
            n_regions = ref_series[0].shape[1]
            if 2 in parts:
                bf_lab: list[dict] = []
                for rep in range(args.repeats):
                    outdir = tmp / f"out-region-{rep}"
                    with get_task_stream(client) as ts, measured(client, pids) as rec:
                        result = run_pipeline(pipeline_job(str(store), outdir, atlas), client)
                    bf_lab.append(rec)
                    stream2 = (ts.data, rec["wall"])
                    shutil.rmtree(outdir, ignore_errors=True)
                bf_lab_small: list[dict] = []
                for rep in range(args.repeats):
                    outdir = tmp / f"out-region-small-{rep}"
                    with get_task_stream(client) as ts, measured(client, pids) as rec:
                        run_pipeline(pipeline_job(str(store_small), outdir, atlas), client)
                    bf_lab_small.append(rec)
                    stream2s = (ts.data, rec["wall"])
                    shutil.rmtree(outdir, ignore_errors=True)
                if args.profile:
                    outdir = tmp / "out-region-prof"
                    _, text = profile_job(pipeline_job(str(store), outdir, atlas), client)
                    (args.profile / "pipeline-driver-region.txt").write_text(text)
                    shutil.rmtree(outdir, ignore_errors=True)
                check2 = check_matrices(result, ref_mats)
                say("\n### 2. Labels + connectivity, boldflow from the store (no ingest)\n")
                say(HEADER)
                say(fmt_row(f"nilearn NiftiLabelsMasker + ConnectivityMeasure, {len(runs)} "
                            "subjects", nl_lab, "cpu_client", "rss_client", None, None, None))
                say(fmt_row("**boldflow Pipeline, defaults**, input = store, clean.level "
                            "region", bf_lab, "cpu_workers+cpu_client", "rss_workers_max", ref_w,
                            ref_c, 5))
                say(fmt_row(f"diagnostic: same, store ingested with chunk_bytes="
                            f"{small_cb / 2**20:.0f}MiB (no split needed)", bf_lab_small,
                            "cpu_workers+cpu_client", "rss_workers_max", ref_w, ref_c, 5))
                say(f"\n{n_regions} regions. Agreement: max |boldflow - nilearn| over the "
                    f"{len(runs)} correlation matrices = {check2['max']:.2e} "
                    f"(matrix shape {check2['shapes']}). Client-process peak RSS during "
                    f"the Pipeline: {max(r['rss_client'] for r in bf_lab) / MB:.0f} MB.")
                for name, stream, st in (("defaults", stream2, store),
                                         ("small chunks", stream2s, store_small)):
                    outdir = tmp / "out-region-count"
                    n = count_reads(client, lambda st=st, outdir=outdir: run_pipeline(
                        pipeline_job(str(st), outdir, atlas), client))
                    shutil.rmtree(outdir, ignore_errors=True)
                    say(f"\nTask stream of the last boldflow repetition, {name}. "
                        + reads_note(n, stored_chunks(st, subs)) + "\n")
                    for line in task_breakdown(*stream, args.workers):
                        say(line)
            if 3 in parts:
                bf_e2e: list[dict] = []
                for rep in range(args.e2e_repeats):
                    outdir, st = tmp / f"out-e2e-{rep}", tmp / f"e2e-{rep}.zarr"
                    job = pipeline_job(str(root), outdir, atlas, store=st, groups=True)
                    with get_task_stream(client) as ts, measured(client, pids) as rec:
                        result = run_pipeline(job, client)
                    bf_e2e.append(rec)
                    stream3 = (ts.data, rec["wall"])
                    shutil.rmtree(outdir, ignore_errors=True)
                    shutil.rmtree(st, ignore_errors=True)
                if args.profile:
                    outdir, st = tmp / "out-e2e-prof", tmp / "e2e-prof.zarr"
                    job = pipeline_job(str(root), outdir, atlas, store=st, groups=True)
                    with performance_report(filename=str(args.profile / "boldflow-e2e.html")):
                        run_pipeline(job, client)
                    shutil.rmtree(outdir, ignore_errors=True)
                    shutil.rmtree(st, ignore_errors=True)
                gz: list[dict] = []
                for _ in range(args.e2e_repeats):
                    with measured(client, pids) as rec:
                        client.gather(client.map(gunzip_file, [r["bold"] for r in runs],
                                                 pure=False))
                    gz.append(rec)
                # (nilearn, boldflow, gunzip, boldflow without voxels) wall s
                paired: list[tuple[float, float, float, float]] = []
                bf_lean: list[dict] = []
                for rep in range(args.paired):
                    # neighbours in time: one round of each, so that a host whose speed
                    # drifts (shared VM) slows both sides of a ratio alike
                    with measured() as nl_rec:
                        nilearn_labels(runs, atlas)
                    outdir, st = tmp / f"out-pair-{rep}", tmp / f"pair-{rep}.zarr"
                    job = pipeline_job(str(root), outdir, atlas, store=st, groups=True)
                    with measured(client, pids) as bf_rec:
                        run_pipeline(job, client)
                    shutil.rmtree(outdir, ignore_errors=True)
                    shutil.rmtree(st, ignore_errors=True)
                    with measured(client, pids) as gz_rec:
                        client.gather(client.map(gunzip_file, [r["bold"] for r in runs],
                                                 pure=False))
                    outdir, st = tmp / f"out-lean-{rep}", tmp / f"lean-{rep}.zarr"
                    job = pipeline_job(str(root), outdir, atlas, store=st, groups=True,
                                       voxels=False)
                    with get_task_stream(client) as ts_lean, \
                            measured(client, pids) as lean_rec:
                        lean_result = run_pipeline(job, client)
                    stream_lean = (ts_lean.data, lean_rec["wall"])
                    lean_bytes = sum(p.stat().st_size for p in st.rglob("*") if p.is_file())
                    shutil.rmtree(outdir, ignore_errors=True)
                    shutil.rmtree(st, ignore_errors=True)
                    bf_lean.append(lean_rec)
                    paired.append((nl_rec["wall"], bf_rec["wall"], gz_rec["wall"],
                                   lean_rec["wall"]))
                check3 = check_matrices(result, ref_mats)
                say("\n### 3. End to end from .nii.gz (boldflow includes ingest and the group "
                    "comparison)\n")
                say(HEADER)
                say(fmt_row("nilearn NiftiLabelsMasker + ConnectivityMeasure (same "
                            "measurement as part 2)", nl_lab, "cpu_client", "rss_client",
                            None, None, None))
                say(fmt_row("**boldflow Pipeline**, input = derivatives folder", bf_e2e,
                            "cpu_workers+cpu_client", "rss_workers_max", ref_w, ref_c, 5))
                say(fmt_row("limit: only gunzip the .nii.gz files on the same workers (ISA-L, "
                            "what ingest uses); the best any pipeline reading them can do",
                            gz, "cpu_workers+cpu_client", "rss_workers_max", ref_w, ref_c, 5))
                if bf_lean:
                    say(fmt_row("**boldflow Pipeline, `ingest.voxels: false`** (region sums "
                                "stored, not the voxels; paired rounds below)", bf_lean,
                                "cpu_workers+cpu_client", "rss_workers_max", ref_w, ref_c, 5))
                if paired:
                    say(f"\nPaired rounds (nilearn, boldflow, the gunzip limit, boldflow "
                        f"without voxels, {len(paired)} times; wall s):\n")
                    say("| round | nilearn | boldflow | gunzip limit | no voxels | boldflow "
                        "speed-up | limit speed-up | no-voxels speed-up |\n"
                        "|---|---|---|---|---|---|---|---|")
                    for i, (a, b, g, v) in enumerate(paired):
                        say(f"| {i + 1} | {a:.1f} | {b:.1f} | {g:.1f} | {v:.1f} | {a / b:.2f}x "
                            f"| {a / g:.2f}x | {a / v:.2f}x |")
                    r_bf = statistics.median(p[0] / p[1] for p in paired)
                    r_gz = statistics.median(p[0] / p[2] for p in paired)
                    r_lean = statistics.median(p[0] / p[3] for p in paired)
                    say(f"| **median of the rounds' ratios** |  |  |  |  | **{r_bf:.2f}x** "
                        f"({'met' if r_bf >= 5 else 'not met'}: >= 5x) | {r_gz:.2f}x | "
                        f"**{r_lean:.2f}x** |")
                    check_lean = check_matrices(lean_result, ref_mats)
                    say(f"\nWithout voxels: max |boldflow - nilearn| over the correlation "
                        f"matrices = {check_lean['max']:.2e}; store {lean_bytes / MB:.1f} MB "
                        f"(the run's sums, confounds, mask, metadata).")
                cmp = result.comparisons.get("correlation")
                say(f"\nAgreement: max |boldflow - nilearn| over the correlation matrices = "
                    f"{check3['max']:.2e}; group comparison: "
                    f"{'done' if cmp is not None else 'missing'} "
                    f"({len(result.group_outputs)} group outputs). Client-process peak RSS: "
                    f"{max(r['rss_client'] for r in bf_e2e) / MB:.0f} MB.")
                outdir, st = tmp / "out-e2e-count", tmp / "e2e-count.zarr"
                n_back = count_reads(client, lambda: run_pipeline(
                    pipeline_job(str(root), outdir, atlas, store=st, groups=True), client))
                shutil.rmtree(outdir, ignore_errors=True)
                shutil.rmtree(st, ignore_errors=True)
                say(f"\nBOLD chunks read back from the store after ingestion: {n_back} (counted "
                    "in an extra, untimed run; region sums come from ingestion's own pass).")
                streams = [("the last boldflow repetition (ingest_run = gunzip + re-layout + "
                            "compress + write + region sums of one run)", stream3)]
                if bf_lean:
                    streams.append(("the last round without voxels (ingest_run = gunzip + "
                                    "region sums of one run)", stream_lean))
                for what, (data, wall) in streams:
                    say(f"\nTask stream of {what}, and per worker:\n")
                    for line in [*task_breakdown(data, wall, args.workers), "",
                                 *worker_gaps(data)]:
                        say(line)

    say(f"\nload average at end: {os.getloadavg()[0]:.1f}; total script time "
        f"{time.perf_counter() - t_start:.0f} s")
    if args.profile:
        say(f"profiles written to {args.profile}")


if __name__ == "__main__":
    main()
