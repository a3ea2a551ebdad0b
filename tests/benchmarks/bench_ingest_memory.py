"""Peak worker memory while ingesting one large run (>= 2 GB uncompressed).

One LocalCluster worker process (1 thread) ingests a single simulated run; a sampler in
this process reads the worker's RSS (psutil, every 10 ms) before and during ingestion.
The claim checked: peak RSS stays under 25 % of the run's uncompressed size, and is set by
``batch_bytes`` (so it stays flat as runs get longer), not by the run.

Run (not part of the test suite)::

    python tests/benchmarks/bench_ingest_memory.py --volumes 1200 --volumes 300
    python tests/benchmarks/bench_ingest_memory.py --volumes 1200 --volumes 300 --no-voxels

``--no-voxels``: ingest as a labels job with ``ingest.voxels: false`` does (region sums of
the simulated atlas, computed from the volume batches; no ``bold`` array). ``--sums``:
with voxels and the same region-sum reducer (what a labels job's ingest does).

Prints a Markdown table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil


def make_run(out: Path, shape, n_volumes: int, dtype: str) -> Path:
    from pipeline.simulate import simulate_dataset

    root = out / f"mem-{'x'.join(map(str, shape))}-{n_volumes}-{dtype}"
    marker = root / ".done"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        simulate_dataset(root, n_subjects=1, shape=tuple(shape), n_volumes=n_volumes,
                         dtype=dtype, seed=0)
        marker.touch()
    return root


class Sampler(threading.Thread):
    """Polls the RSS of one process until stopped; keeps the maximum."""

    def __init__(self, pid: int, period: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.period = period
        self.peak = 0
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.period)

    def stop(self) -> int:
        self._stop_evt.set()
        self.join()
        return self.peak


def _set_max_pending(n: int) -> None:
    import importlib

    importlib.import_module("storage.ingest")._ChunkWriter.max_pending = n


def measure(root: Path, batch: str, tmp: Path, voxels: bool = True,
            sums: bool = False, max_pending: int | None = None) -> dict:
    import os

    from distributed import Client, LocalCluster

    import storage

    store = tmp / "mem.zarr"
    shutil.rmtree(store, ignore_errors=True)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, memory_limit="8GiB",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        (pid,) = client.run(os.getpid).values()
        client.run(lambda: __import__("storage"))
        if max_pending is not None:
            client.run(_set_max_pending, max_pending)
        time.sleep(0.5)
        baseline = psutil.Process(pid).memory_info().rss
        sampler = Sampler(pid)
        sampler.start()
        t0 = time.perf_counter()
        kw: dict = {"voxels": voxels}
        if sums or not voxels:
            from pipeline.jobs import _file_sha
            from pipeline.parcellation import LabelSums

            atlas = str(root / "atlas-simulated_dseg.nii.gz")
            kw["reducers"] = [LabelSums(atlas, _file_sha(atlas))]
        cat = storage.ingest(root, store, client=client, batch_bytes=batch, **kw)
        wall = time.perf_counter() - t0
        peak = sampler.stop()
    assert (cat["status"] == "complete").all(), cat["error"].tolist()
    size = int(cat["bytes"].iloc[0])
    shutil.rmtree(store, ignore_errors=True)
    return {"size": size, "baseline": baseline, "peak": peak, "wall": wall,
            "volumes": int(cat["n_volumes"].iloc[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="91,109,91")
    ap.add_argument("--volumes", type=int, action="append")
    ap.add_argument("--dtype", default="int16", choices=["int16", "float32"])
    ap.add_argument("--batch", default="128MiB")
    ap.add_argument("--no-voxels", action="store_true",
                    help="region sums only (IngestOptions.voxels=False)")
    ap.add_argument("--max-pending", type=int, default=None,
                    help="queued chunk bytes before a concurrent store (0: one chunk at a "
                         "time, as before session 10)")
    ap.add_argument("--sums", action="store_true",
                    help="with the region-sum reducer a labels job adds (implied by "
                         "--no-voxels)")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "bf-bench-data")
    args = ap.parse_args()
    shape = [int(s) for s in args.shape.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.volumes or [1200]:
            root = make_run(args.data, shape, n, args.dtype)
            rows.append(measure(root, args.batch, Path(tmp), voxels=not args.no_voxels,
                                sums=args.sums, max_pending=args.max_pending))
    print(f"\n1 run of {'x'.join(map(str, shape))} {args.dtype}, batch_bytes={args.batch}, "
          f"{'without voxels (region sums), ' if args.no_voxels else ''}"
          f"{'with region sums, ' if args.sums and not args.no_voxels else ''}"
          f"{'' if args.max_pending is None else f'max_pending={args.max_pending}, '}"
          "1 worker process, RSS sampled every 10 ms\n")
    print("| volumes | run size (MB) | worker RSS before (MB) | peak RSS (MB) | "
          "peak / run size | ingest MB/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['volumes']} | {r['size'] / 1e6:.0f} | {r['baseline'] / 1e6:.0f} | "
              f"{r['peak'] / 1e6:.0f} | {r['peak'] / r['size']:.1%} | "
              f"{r['size'] / 1e6 / r['wall']:.0f} |")


if __name__ == "__main__":
    main()
