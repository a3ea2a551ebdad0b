"""Peak memory of voxel-level cleaning: boldflow workers vs nilearn, as runs get longer.

The issue's target 4. For one simulated run of 200, 800 and 1600 volumes (same grid):

* nilearn: ``NiftiMasker(mask_img=..., detrend, zscore_sample, 0.009-0.08 Hz, TR 2 s)
  .fit_transform(bold, confounds=6 motion + csf + white_matter)`` in a fresh process; a
  sampler in this process reads its RSS (psutil, every 10 ms);
* boldflow: the run ingested into a Zarr store, then ``open_run -> apply_mask ->
  clean_signals -> .sum(axis=0)`` on a fresh ``LocalCluster`` of single-threaded worker
  processes; the sampler reads the RSS of every worker (PIDs from ``client.run(os.getpid)``).

A stage needs whole voxel time series, so a dask block holds *all* volumes of a block of
voxels: its size grows with the run unless the block of voxels shrinks. ``open_run`` (with
``chunks="time"``) splits a stored spatial block whose time series exceed ``block_bytes``
(default 128 MiB, counted in float64). Settings measured on the same run:

* ``defaults``: ingest defaults (``chunk_bytes="32MiB"``, ``series_bytes="128MiB"``: long
  runs get spatial chunks whose time series fit open_run's default ``block_bytes``; since
  session 7 also halved until the densest block's in-mask series fit a quarter of it),
  ``open_run`` defaults: nothing to split;
* ``chunk-bytes-only``: ingest with ``series_bytes=None`` (the default before session 5:
  chunks sized by ``chunk_bytes`` alone), ``open_run`` defaults: blocks of long runs are
  split, each stored chunk decoded once per part;
* ``unsplit``: that store with ``open_run(block_bytes="64GiB")``: stored blocks are never
  split: the block grows with T;
* ``small-chunks``: a store ingested with ``chunk_bytes`` chosen per run so that a stored
  spatial block times all volumes fits 32 MiB of float64: nothing to split.

The table also gives how many times each stored chunk is read (GETs of bold chunks counted
on the workers) and the workers' CPU seconds.

Run (not part of the test suite)::

    python tests/benchmarks/bench_pipeline_memory.py
    python tests/benchmarks/bench_pipeline_memory.py --volumes 200 --volumes 3200 --shape 40,48,40

Prints a Markdown table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Sampler
from _common import _worker_cpu as worker_cpu
from bench_pipeline import (
    CLEAN,
    CONFOUNDS,
    MB,
    _install_read_counter,
    _pop_read_count,
    find_runs,
    machine_facts,
    no_split_chunk_bytes,
)


def make_run(out: Path, shape, n_volumes: int, dtype: str) -> Path:
    from pipeline.simulate import simulate_dataset

    root = out / f"pipemem-{'x'.join(map(str, shape))}-{n_volumes}-{dtype}"
    marker = root / ".done"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        simulate_dataset(root, n_subjects=1, shape=tuple(shape), voxel_size=3.0,
                         n_volumes=n_volumes, dtype=dtype, seed=0)
        marker.touch()
    return root


# ------------------------------------------------------------------------- nilearn


def _nilearn_child(run: dict, conn) -> None:
    warnings.simplefilter("ignore")
    from nilearn.maskers import NiftiMasker

    conf = pd.read_csv(run["confounds"], sep="\t", na_values="n/a")[CONFOUNDS].to_numpy()
    masker = NiftiMasker(mask_img=run["mask"], **CLEAN)
    conn.send(psutil.Process().memory_info().rss)  # ready, after imports
    conn.recv()  # go
    t0 = time.perf_counter()
    out = masker.fit_transform(run["bold"], confounds=conf)
    conn.send((time.perf_counter() - t0, out.shape, str(out.dtype)))


def nilearn_peak(run: dict) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_nilearn_child, args=(run, child))
    proc.start()
    before = parent.recv()
    sampler = Sampler([proc.pid])
    sampler.start()
    parent.send("go")
    wall, shape, dtype = parent.recv()
    peak = sampler.stop()[proc.pid]
    proc.join()
    return {"before": before, "peak": peak, "wall": wall, "shape": shape, "dtype": dtype}


# ------------------------------------------------------------------------- boldflow


MODES = {
    # name: (ingest chunk_bytes or None for "no split needed", ingest series_bytes,
    #        open_run keyword arguments)
    "defaults": ("32MiB", "128MiB", {}),
    "chunk-bytes-only": ("32MiB", None, {}),
    "unsplit": ("32MiB", None, {"block_bytes": "64GiB"}),
    "small-chunks": (None, None, {}),
}


def ingest_store(root: Path, store: Path, chunk_bytes: int, series_bytes: str | None,
                 args) -> None:
    from distributed import Client, LocalCluster

    import storage

    shutil.rmtree(store, ignore_errors=True)
    with LocalCluster(**cluster_kwargs(args)) as cluster, Client(cluster) as client:
        cat = storage.ingest(root, store, client=client, chunk_bytes=chunk_bytes,
                             series_bytes=series_bytes)
    assert (cat["status"] == "complete").all(), cat["error"].tolist()


def cluster_kwargs(args) -> dict:
    return {"n_workers": args.workers, "threads_per_worker": 1, "processes": True,
            "memory_limit": args.memory_limit, "dashboard_address": None}


def boldflow_peak(store: Path, open_kw: dict, args) -> dict:
    """Worker RSS while a fresh cluster cleans the run (sum of the cleaned values)."""
    from distributed import Client, LocalCluster

    import storage
    from pipeline.masking import apply_mask
    from pipeline.signal import clean_signals

    ds = storage.open_run(store, subject="01", task="rest", **open_kw)
    disk = tuple(ds.attrs["chunks"])
    n_stored = math.prod(len(c) for c in storage.open_run(
        store, subject="01", task="rest", chunks=None)["bold"].data.chunks)
    block = ds["bold"].data.chunksize  # what a stage sees: all volumes of a spatial block
    n_blocks = math.prod(len(c) for c in ds["bold"].data.chunks)
    widest = max(apply_mask(ds).data.chunks[1])
    with LocalCluster(**cluster_kwargs(args)) as cluster, Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
        client.run(lambda: [__import__(m) for m in ("storage", "pipeline.signal")])
        client.run(_install_read_counter)
        time.sleep(0.5)
        before = max(psutil.Process(p).memory_info().rss for p in pids)
        cpu0 = worker_cpu(client)
        sampler = Sampler(pids)
        sampler.start()
        t0 = time.perf_counter()
        ds = storage.open_run(store, subject="01", task="rest", **open_kw)
        matrix = apply_mask(ds)
        conf = ds["confounds"].sel(confound=CONFOUNDS).values
        total = client.compute(clean_signals(matrix.data, confounds=conf, **CLEAN)
                               .sum(axis=0)).result()
        wall = time.perf_counter() - t0
        peaks = sampler.stop()
        cpu = worker_cpu(client) - cpu0
        reads = sum(client.run(_pop_read_count).values())
    assert total.shape == (matrix.shape[1],)
    nt = ds.sizes["time"]
    return {"disk": disk, "block": block, "n_blocks": n_blocks, "before": before,
            "peaks": [peaks[p] for p in pids], "wall": wall, "cpu": cpu,
            "reads": reads / n_stored,
            "block_mb": math.prod(block) * ds["bold"].dtype.itemsize / MB,
            "masked_mb": widest * nt * 8 / MB}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="61,73,61")
    ap.add_argument("--volumes", type=int, action="append")
    ap.add_argument("--dtype", default="float32", choices=["int16", "float32"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="8GiB")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "bf-bench-data")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    from dask.utils import parse_bytes

    t_start = time.perf_counter()
    shape = [int(s) for s in args.shape.split(",")]
    volumes = args.volumes or [200, 800, 1600]
    itemsize = np.dtype(args.dtype).itemsize
    rows = []
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bf-bench-mem-") as tmp:
        for nt in volumes:
            root = make_run(args.data, shape, nt, args.dtype)
            (run,) = find_runs(root)
            nl = nilearn_peak(run)
            stores: dict[int, Path] = {}
            for mode in args.modes.split(","):
                cb_arg, series, open_kw = MODES[mode]
                cb = (parse_bytes(cb_arg) if cb_arg is not None
                      else no_split_chunk_bytes(shape, nt, itemsize))
                if (cb, series) not in stores:
                    stores[cb, series] = Path(tmp) / f"mem-{nt}-{cb}-{series}.zarr"
                    ingest_store(root, stores[cb, series], cb, series, args)
                bf = boldflow_peak(stores[cb, series], open_kw, args)
                rows.append({"nt": nt, "mode": mode, "chunk_bytes": cb, "series": series,
                             "open_kw": open_kw,
                             "nl": nl, "bf": bf, "size": math.prod(shape) * nt * itemsize})
            for st in stores.values():
                shutil.rmtree(st, ignore_errors=True)
    print(f"\ncommand: python {' '.join(sys.argv)}\n")
    ns = argparse.Namespace(subjects=1, shape=args.shape, volumes=0, dtype=args.dtype,
                            workers=args.workers, memory_limit=args.memory_limit)
    for line in machine_facts(ns, 0)[:2]:
        print(line)
    print(f"- data: one simulated run per length, {args.shape.replace(',', 'x')} at 3 mm, "
          f"{args.dtype}, TR 2 s; boldflow: LocalCluster({args.workers} worker processes x 1 "
          f"thread, memory_limit={args.memory_limit})")
    print(f"- load average: {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end; RSS "
          "sampled every 10 ms; nilearn in a fresh process, boldflow on a fresh cluster "
          "(ingest done before, on another cluster)\n")
    print("| volumes | run MB | nilearn peak RSS MB (before) | nilearn s | boldflow mode: "
          "ingest chunk_bytes, series_bytes, open_run | on-disk chunk | block a stage sees "
          "(MB f32 / widest f64 masked MB) | reads per stored chunk | "
          "boldflow peak RSS per worker MB (before) "
          "| worst worker / nilearn | boldflow s | worker CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        nl, bf = r["nl"], r["bf"]
        peaks = " / ".join(f"{p / MB:.0f}" for p in bf["peaks"])
        kw = ", ".join(f"{k}={v!r}" for k, v in r["open_kw"].items()) or "defaults"
        print(f"| {r['nt']} | {r['size'] / MB:.0f} | {nl['peak'] / MB:.0f} "
              f"({nl['before'] / MB:.0f}) | {nl['wall']:.1f} | {r['mode']}: "
              f"{r['chunk_bytes'] / 2**20:.1f} MiB, {r['series']}, {kw} | {bf['disk']} | "
              f"{bf['block'][:3]} x "
              f"{bf['block'][3]}, {bf['n_blocks']} blocks ({bf['block_mb']:.0f} / "
              f"{bf['masked_mb']:.0f}) | {bf['reads']:.1f} | {peaks} ({bf['before'] / MB:.0f}) | "
              f"{max(bf['peaks']) / nl['peak']:.0%} | {bf['wall']:.1f} | {bf['cpu']:.1f} |")
    print(f"\ntotal script time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
