"""Ingest throughput against the raw read limit, measured in the same run.

The raw limit is nibabel reading and gunzipping the same files in full
(``np.asanyarray(img.dataobj.get_unscaled())``: decompression plus one copy, no scaling).
boldflow's throughput is uncompressed voxel bytes written to the store per second of wall
time, and per CPU-second actually used by the Dask workers ("per core used"), on a
LocalCluster with 1 and then 2 single-threaded worker processes.

Run (not part of the test suite)::

    python tests/benchmarks/bench_ingest.py --subjects 4 --volumes 200

Prints a Markdown table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil


def make_data(out: Path, n_subjects: int, shape, n_volumes: int, dtype: str) -> Path:
    from pipeline.simulate import simulate_dataset

    root = out / f"throughput-{n_subjects}-{'x'.join(map(str, shape))}-{n_volumes}-{dtype}"
    marker = root / ".done"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        simulate_dataset(root, n_subjects=n_subjects, shape=tuple(shape), n_volumes=n_volumes,
                         dtype=dtype, seed=0)
        marker.touch()
    return root


def raw_limit(files: list[str]) -> tuple[float, float, float]:
    """(bytes, wall seconds, cpu seconds) of nibabel's full read + gunzip."""
    nbytes = 0
    gc.collect()
    w0, c0 = time.perf_counter(), time.process_time()
    for f in files:
        arr = np.asanyarray(nib.load(f).dataobj.get_unscaled())
        nbytes += arr.nbytes
        del arr
    return nbytes, time.perf_counter() - w0, time.process_time() - c0


def _cpu(client) -> float:
    def cpu():
        t = psutil.Process().cpu_times()
        return t.user + t.system

    return sum(client.run(cpu).values())


def boldflow_ingest(root: Path, n_workers: int, tmp: Path) -> tuple[float, float, int]:
    """(wall seconds, worker cpu seconds, runs) of ``storage.ingest`` on a LocalCluster."""
    from distributed import Client, LocalCluster

    import storage

    store = tmp / f"bench-{n_workers}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      memory_limit="6GiB", dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.run(lambda: __import__("storage"))  # import cost is not ingest cost
        c0 = _cpu(client)
        w0 = time.perf_counter()
        cat = storage.ingest(root, store, client=client)
        wall = time.perf_counter() - w0
        cpu = _cpu(client) - c0
    assert (cat["status"] == "complete").all(), cat["error"].tolist()
    shutil.rmtree(store, ignore_errors=True)
    return wall, cpu, len(cat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--shape", default="91,109,91")
    ap.add_argument("--volumes", type=int, default=200)
    ap.add_argument("--dtype", default="int16", choices=["int16", "float32"])
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "bf-bench-data")
    args = ap.parse_args()
    shape = [int(s) for s in args.shape.split(",")]
    root = make_data(args.data, args.subjects, shape, args.volumes, args.dtype)
    files = sorted(str(p) for p in root.rglob("*desc-preproc_bold.nii.gz"))
    with tempfile.TemporaryDirectory() as tmp:
        raw_bytes, raw_wall, raw_cpu = raw_limit(files)
        mb = raw_bytes / 1e6
        rows = [("nibabel full read + gunzip (1 process)", raw_wall, raw_cpu)]
        for n in (1, 2):
            wall, cpu, _ = boldflow_ingest(root, n, Path(tmp))
            rows.append((f"boldflow ingest, {n} worker(s)", wall, cpu))
    raw_per_core = mb / raw_cpu
    print(f"\n{len(files)} runs, {'x'.join(map(str, shape))} x {args.volumes} {args.dtype}, "
          f"{mb:.0f} MB uncompressed; {os.cpu_count()} cores, {platform.processor() or ''}\n")
    print("| what | wall s | MB/s | CPU s | MB per CPU-s | vs raw limit per core |")
    print("|---|---|---|---|---|---|")
    for name, wall, cpu in rows:
        print(f"| {name} | {wall:.2f} | {mb / wall:.0f} | {cpu:.2f} | {mb / cpu:.0f} | "
              f"{(mb / cpu) / raw_per_core:.0%} |")
    one, two = rows[1][1], rows[2][1]
    print(f"\nscaling 1 -> 2 workers: {one / two:.2f}x wall-time speed-up")


if __name__ == "__main__":
    main()
