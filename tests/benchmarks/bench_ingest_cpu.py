"""CPU cost of ingesting one run, phase by phase, in one process and in a Dask worker.

What ``storage.ingest.ingest_run`` spends per run (61x73x61x200 float32 ``.nii.gz`` of
the pipeline benchmark by default), measured as process CPU time (user + system of every
thread: zarr's event loop and encode pool, Blosc's threads) and minor page faults, so the
numbers hold on a shared machine where wall time does not:

- phases, each timed on its own over the same run: gunzip of the volumes into the batch
  array, the finite-value check, the time-last re-layout, the encode of each block to its
  stored chunk bytes, the write of those bytes to the store, zarr's own ``arr[...] = block``
  (encode + write, for comparison), and the region-sum reducer (``LabelSums``);
- the whole ``ingest_run`` (with the reducer, ``overwrite=True``), and ``other`` = what
  it costs beyond the phases (header checks, fingerprint, template, commit);
- the same, run inside a worker process of a ``LocalCluster(n_workers=1,
  threads_per_worker=1)`` (the task thread, distributed's malloc settings), reading the
  worker's CPU and faults before and after with ``client.run``.

Each number is the median over ``--runs`` runs (different subjects) after one warm-up run.

Run (not part of the test suite)::

    python tests/benchmarks/bench_ingest_cpu.py --runs 3
    python tests/benchmarks/bench_ingest_cpu.py --runs 5 --no-worker
    # another version of storage/ (e.g. ``git archive HEAD~1 storage | tar -x -C /tmp/old``)
    PYTHONPATH=/tmp/old python tests/benchmarks/bench_ingest_cpu.py --runs 3

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import inspect
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if importlib.util.find_spec("storage") is None:  # not installed: this checkout's
    sys.path.insert(0, str(ROOT))               # (PYTHONPATH=<old checkout> compares)

DEFAULT_DATA = Path(tempfile.gettempdir()) / "bf-bench-data"
PHASES = ("gunzip", "finite check", "re-layout", "encode", "write", "reducers",
          "zarr setitem (encode + write)", "ingest_run", "other")


def _usage() -> tuple[float, int]:
    """(CPU seconds of every thread of this process, minor page faults)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_minflt


def _timed(fn: Callable[[], object]) -> tuple[float, int]:
    c0, f0 = _usage()
    fn()
    c1, f1 = _usage()
    return c1 - c0, f1 - f0


def _reducer(data: Path):
    from pipeline.parcellation import LabelSums

    atlas = data / "atlas-simulated_dseg.nii.gz"
    return LabelSums(str(atlas), hashlib.sha256(atlas.read_bytes()).hexdigest())


def measure_run(spec, store_dir: str, reducer) -> dict[str, tuple[float, int]]:
    """(CPU s, minor faults) of each phase and of the whole ``ingest_run`` of one run.

    Runs in whatever process calls it (the client or a worker task). The phases use the
    same functions as ingestion (whichever version of ``storage`` is imported: the
    buffer-reusing paths when they exist).
    """
    import zarr

    from storage import nifti
    from storage.chunking import plan_bold_chunks
    from storage.stores import StoreRef

    ing = importlib.import_module("storage.ingest")  # storage.ingest is also a function
    options = ing.IngestOptions().normalized()
    ref = StoreRef.coerce(store_dir)
    zstore = ref.open()
    ing._init_root(zstore)
    c = ing._check_run(spec, {})
    info = c.bold
    plan = plan_bold_chunks(info.shape, info.dtype.itemsize, chunk_bytes=options.chunk_bytes,
                            batch_bytes=options.batch_bytes, shard_bytes=options.shard_bytes)
    out: dict[str, tuple[float, int]] = {}

    reuse = "reuse" in inspect.signature(nifti.iter_volume_batches).parameters
    kw = {"reuse": True} if reuse else {}

    def gunzip() -> None:
        for _t0, _raw in nifti.iter_volume_batches(info, plan.time_block, **kw):
            pass

    out["gunzip"] = _timed(gunzip)
    batches = [(t0, raw.copy(order="F")) for t0, raw in
               nifti.iter_volume_batches(info, plan.time_block)]

    check = getattr(ing, "_check_finite", None)

    def finite() -> None:
        for t0, raw in batches:
            if check is not None:
                check(raw, info.path, t0)
            else:  # the check as _write_run did it before _check_finite existed
                assert np.isfinite(raw.sum(dtype=np.float64))

    out["finite check"] = _timed(finite)

    relayout_kw = ({"reuse": True} if "reuse" in
                   inspect.signature(ing.time_last_blocks).parameters else {})

    def relayout() -> None:
        for _t0, raw in batches:
            for _idx, _block in ing.time_last_blocks(raw, plan.write_unit, **relayout_kw):
                pass

    out["re-layout"] = _timed(relayout)
    blocks = [((*idx, slice(t0, t0 + raw.shape[3])), block)
              for t0, raw in batches for idx, block in ing.time_last_blocks(raw, plan.write_unit)]
    batches.clear()

    # a scratch array with the run's chunking and codecs (what _write_run writes into)
    path = "bench-scratch/bold"
    attrs = ing._run_attrs(c, "bench", plan)
    ds, encoding = ing._template(c, plan, attrs, options)
    ds[["bold"]].to_zarr(zstore, group="bench-scratch", mode="w", compute=False,
                         zarr_format=3, consolidated=False,
                         encoding={"bold": encoding["bold"]})
    arr = zarr.open_array(zstore, path=path, mode="r+").with_config(
        {"write_empty_chunks": True})
    writer_cls = getattr(ing, "_ChunkWriter", None)
    writer = writer_cls.for_array(arr) if writer_cls is not None else None
    encoded: list = []

    def encode(keep: bool = False) -> None:
        # the stored bytes of each chunk (kept only for the write phase, outside timing)
        if writer is not None:
            for idx, block in blocks:
                data = writer.encode(idx, block)
                if keep:
                    encoded.append((idx, bytes(data)))
            return
        # zarr's own encoding of each chunk: bytes codec (C order) + Blosc, edge blocks
        # padded to the chunk shape with the fill value
        import numcodecs

        blosc = arr.metadata.codecs[-1]
        codec = numcodecs.Blosc(cname=blosc.cname.name, clevel=blosc.clevel,
                                shuffle={"noshuffle": 0, "shuffle": 1,
                                         "bitshuffle": 2}[blosc.shuffle.value],
                                blocksize=blosc.blocksize, typesize=blosc.typesize)
        for idx, block in blocks:
            if block.shape != arr.chunks:
                full = np.full(arr.chunks, arr.fill_value, dtype=arr.dtype)
                full[tuple(slice(0, n) for n in block.shape)] = block
                block = full
            data = codec.encode(block)
            if keep:
                encoded.append((idx, data))

    out["encode"] = _timed(encode)
    encode(keep=True)
    raw_bytes = sum(b.nbytes for _, b in blocks)
    stored = sum(len(e) for _, e in encoded)

    def write() -> None:
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        proto = default_buffer_prototype()
        for idx, data in encoded:
            coords = tuple(s.start // n for s, n in zip(idx, arr.chunks, strict=True))
            key = f"{path}/{arr.metadata.encode_chunk_key(coords)}"
            sync(zstore.set(key, proto.buffer.from_bytes(data)))

    out["write"] = _timed(write)

    def setitem() -> None:
        for idx, block in blocks:
            arr[idx] = block

    out["zarr setitem (encode + write)"] = _timed(setitem)

    def reducers() -> None:
        acc = reducer.begin(info, c.mask)
        for idx, block in blocks:
            acc.update(idx, block)
        acc.finish()

    out["reducers"] = _timed(reducers) if reducer is not None else (0.0, 0)
    blocks.clear()
    encoded.clear()

    def whole() -> None:
        row = ing.ingest_run(spec, ref, options, {}, overwrite=True,
                             reducers=(reducer,) if reducer is not None else ())
        if row["status"] != "complete":
            raise RuntimeError(row["error"])

    out["ingest_run"] = _timed(whole)
    parts = ("gunzip", "finite check", "re-layout", "encode", "write", "reducers")
    out["other"] = (out["ingest_run"][0] - sum(out[p][0] for p in parts),
                    out["ingest_run"][1] - sum(out[p][1] for p in parts))
    out["ratio"] = (raw_bytes / stored, 0)
    return out


def _median(rows: list[dict]) -> dict[str, tuple[float, float]]:
    return {k: (statistics.median(r[k][0] for r in rows),
                statistics.median(r[k][1] for r in rows)) for k in rows[0]}


def run_local(specs, store_dir: str, reducer) -> list[dict]:
    """Warm-up run, then one measurement per spec, in this process."""
    measure_run(specs[0], store_dir, reducer)
    return [measure_run(s, store_dir, reducer) for s in specs]


def run_worker(specs, store_dir: str, reducer) -> tuple[list[dict], list[tuple[float, int]]]:
    """The same inside one single-threaded worker process; plus ``ingest_run`` measured
    from outside (worker process CPU and faults before and after the task)."""
    from distributed import Client, LocalCluster

    from storage.stores import StoreRef

    ing = importlib.import_module("storage.ingest")

    def usage() -> tuple[float, int]:
        import psutil

        t = psutil.Process().cpu_times()
        r = resource.getrusage(resource.RUSAGE_SELF)
        return t.user + t.system, r.ru_minflt

    ref = StoreRef.coerce(store_dir)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None, memory_limit="8GiB") as cluster, \
            Client(cluster) as client:
        client.submit(measure_run, specs[0], store_dir, reducer, pure=False).result()
        phases = [client.submit(measure_run, s, store_dir, reducer, pure=False).result()
                  for s in specs]
        outside = []
        for s in specs:
            (before,) = client.run(usage).values()
            row = client.submit(ing.ingest_run, s, ref, None, {}, overwrite=True,
                                reducers=(reducer,) if reducer is not None else (),
                                pure=False).result()
            (after,) = client.run(usage).values()
            if row["status"] != "complete":
                raise RuntimeError(row["error"])
            outside.append((after[0] - before[0], after[1] - before[1]))
    return phases, outside


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path,
                   default=DEFAULT_DATA / "pipeline-8-61x73x61-200-float32",
                   help="BIDS/fMRIPrep derivatives folder (made by bench_pipeline.py's "
                        "make_data when missing)")
    p.add_argument("--runs", type=int, default=3, help="runs measured (median reported)")
    p.add_argument("--no-worker", action="store_true", help="skip the in-worker measurement")
    p.add_argument("--no-reducer", action="store_true", help="ingest without LabelSums")
    args = p.parse_args()

    if not (args.data / ".done").exists():
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_pipeline import make_data

        args.data = make_data(args.data.parent, 8, (61, 73, 61), 200, "float32")
    from storage.bids import discover

    specs = discover(str(args.data))
    specs = [specs[i % len(specs)] for i in range(args.runs)]
    reducer = None if args.no_reducer else _reducer(args.data)
    tmp = Path(tempfile.mkdtemp(prefix="bf-ingest-cpu-"))
    try:
        t0 = time.perf_counter()
        local = _median(run_local(specs, str(tmp / "local.zarr"), reducer))
        worker = outside = None
        if not args.no_worker:
            rows, out = run_worker(specs, str(tmp / "worker.zarr"), reducer)
            worker = _median(rows)
            outside = (statistics.median(o[0] for o in out),
                       statistics.median(o[1] for o in out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    import storage

    print(f"command: python {' '.join(sys.argv)}\n")
    print(f"- storage from {Path(storage.__file__).parent}")
    print(f"- data: {args.data.name}, {args.runs} runs (median), "
          f"reducer: {'none' if reducer is None else 'LabelSums'}; compression ratio "
          f"{local['ratio'][0]:.2f}; load average at end {os.getloadavg()[0]:.1f}\n")
    head = "| phase | CPU s (process) | minor faults |"
    sep = "|---|---|---|"
    if worker is not None:
        head += " CPU s (in worker) | minor faults (in worker) |"
        sep += "---|---|"
    print(head)
    print(sep)
    for k in PHASES:
        line = f"| {k} | {local[k][0]:.3f} | {local[k][1]:.0f} |"
        if worker is not None:
            line += f" {worker[k][0]:.3f} | {worker[k][1]:.0f} |"
        print(line)
    if outside is not None:
        print(f"| ingest_run task, worker process CPU before/after (psutil) |  |  | "
              f"{outside[0]:.3f} | {outside[1]:.0f} |")
    print(f"\n(total script time {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
