"""Column-tile size of the cleaning kernels: time and temporary memory of one block.

``pipeline._kernels.block_clean`` cleans a ``(time, voxel-block)`` array by column tiles of
at most ``TILE_BYTES`` of float64, so that its temporaries (detrending, filtering and the
regression hold a few arrays of the size of what they clean) do not grow with the block.
This measures, for one block of a given width, the best-of-N time and the peak memory
allocated beyond the input (tracemalloc: numpy reports its allocations to it), which
includes the output (one block of float64), for several tile sizes and run lengths. The
plan is the one the dask path builds for a run of ``--features`` voxels (the operator or
stepwise evaluation the pipeline would pick for that run). BLAS runs on one thread, as in
a dask worker (distributed's nanny sets ``OMP_NUM_THREADS=1`` and friends).

Run (not part of the test suite)::

    python tests/benchmarks/bench_clean_tiles.py

Prints a Markdown table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy is imported: as in a dask worker

import time  # noqa: E402
import tracemalloc  # noqa: E402

import dask.array as da  # noqa: E402
import numpy as np  # noqa: E402

import pipeline  # noqa: E402
from pipeline import _kernels  # noqa: E402
from pipeline._kernels import CleanPlan  # noqa: E402

CLEAN = {"detrend": True, "standardize": "zscore_sample", "low_pass": 0.08,
         "high_pass": 0.009, "t_r": 2.0}
MiB = 2**20


def plan_for(x: np.ndarray, confounds: np.ndarray, n_features: int) -> CleanPlan:
    """The plan clean_signals builds for a dask input of ``n_features`` columns."""
    copies = max(1, -(-n_features // x.shape[1]))
    big = da.concatenate([da.from_array(x, chunks=x.shape)] * copies, axis=1)
    lazy = pipeline.clean_signals(big, confounds=confounds, **CLEAN)
    for task in dict(lazy.__dask_graph__()).values():
        obj = getattr(task, "value", task)
        if isinstance(obj, CleanPlan):
            return obj
    raise RuntimeError("no CleanPlan in the graph")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-mib", type=float, default=31.0,
                    help="float64 size of the block (time x voxels)")
    ap.add_argument("--volumes", type=int, action="append")
    ap.add_argument("--features", type=int, default=70000,
                    help="voxels of the run the plan is built for (61x73x61 brain: ~70k)")
    ap.add_argument("--tiles", default="1,2,4,8,1024", help="tile sizes in MiB")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    volumes = args.volumes or [200, 800, 1600]
    tiles = [float(t) for t in args.tiles.split(",")]
    rng = np.random.default_rng(0)
    print("command: python tests/benchmarks/bench_clean_tiles.py"
          f" --block-mib {args.block_mib:g} --features {args.features}"
          f" --tiles {args.tiles} --repeats {args.repeats}"
          + "".join(f" --volumes {v}" for v in volumes))
    print()
    print("| volumes | block | evaluation | tile MiB | best time ms | vs untiled "
          "| peak beyond input MiB (output included) |")
    print("|---|---|---|---|---|---|---|")
    for n_time in volumes:
        n_vox = int(args.block_mib * MiB // (8 * n_time))
        x = rng.normal(size=(n_time, n_vox))
        confounds = rng.normal(size=(n_time, 8))
        plan = plan_for(x, confounds, args.features)
        how = "operator" if plan.runs[0].operator is not None else "stepwise"
        rows, untiled = [], None
        for tile in tiles:
            _kernels.TILE_BYTES = int(tile * MiB)
            best = np.inf
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                _kernels.block_clean(x, plan)
                best = min(best, time.perf_counter() - t0)
            tracemalloc.start()
            _kernels.block_clean(x, plan)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            rows.append((tile, best, peak))
            if tile == max(tiles):
                untiled = best
        for tile, best, peak in rows:
            print(f"| {n_time} | {n_time} x {n_vox} | {how} | {tile:g} | {best * 1e3:.0f} "
                  f"| {best / untiled:.2f} | {peak / MiB:.1f} |")


if __name__ == "__main__":
    main()
