"""How far ingestion's time-last re-layout is from a plain copy of the same bytes.

``storage.ingest.time_last_blocks`` turns a Fortran-ordered ``(x, y, z, t)`` batch (what
NIfTI stores: volumes one after another) into C-ordered ``(x, y, z, t)`` blocks (voxel time
series contiguous, what the chunks store). It is one of the non-gunzip costs of ingest
(issue 3, end to end from .nii.gz). This measures, single-threaded and as process CPU
time, on one batch of a benchmark run:

- ``time_last_blocks`` as ingest calls it (``reuse=True``), per spatial block of the
  default chunk plan;
- a contiguous copy of the batch (``np.copyto``): the memory-bandwidth limit of any
  re-layout that writes every byte once, fused into the encode or not.

With ``--layouts``, also the alternative of not re-laying out at all: chunks stored in
volume order (what a zarr v3 ``transpose`` codec in front of ``bytes`` would give), i.e.
each block gathered from the batch as a Fortran-ordered box and encoded as it is, against
ingest's re-layout + encode, both with the store's default Blosc (LZ4 level 1, bit
shuffle), with the compression ratio each gives (session 9: volume order is faster to
write but compresses worse, see RESULTS.md).

Run (not part of the test suite)::

    python tests/benchmarks/bench_relayout.py
    python tests/benchmarks/bench_relayout.py --volumes 200 --unit 16 19 16
    python tests/benchmarks/bench_relayout.py --layouts
    python tests/benchmarks/bench_relayout.py --layouts --file \
        ../shared/data/haxby2001/sub001/run-005/bold_25mm.nii.gz --unit 32 32 32

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if importlib.util.find_spec("storage") is None:  # not installed: this checkout's
    sys.path.insert(0, str(ROOT))

DEFAULT_DATA = Path(tempfile.gettempdir()) / "bf-bench-data" / "pipeline-8-61x73x61-200-float32"


def _batch(data: Path, volumes: int, shape: tuple[int, int, int], file: Path | None = None
           ) -> tuple[np.ndarray, str]:
    """The batch and where it came from (printed with the results)."""
    if file is not None:  # its own dtype (compression depends on it)
        import nibabel as nib

        arr = np.asanyarray(nib.load(file).dataobj)[..., :volumes]
        return np.asfortranarray(arr), str(file)
    files = sorted(data.glob("**/*_bold.nii.gz")) if data.exists() else []
    if files:
        import nibabel as nib

        arr = np.asanyarray(nib.load(files[0]).dataobj)[..., :volumes]
        return np.asfortranarray(arr, dtype=np.float32), str(files[0])
    # no benchmark data: smooth random series of the same grid (speed does not depend on
    # the values)
    rng = np.random.default_rng(0)
    return np.asfortranarray(
        rng.standard_normal((*shape, volumes), dtype=np.float32).cumsum(axis=3)), \
        f"random walks ({data} has no *_bold.nii.gz)"


def _cpu_per_call(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up: page faults of the output buffers
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> None:
    from threadpoolctl import threadpool_limits

    from storage.ingest import time_last_blocks

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--volumes", type=int, default=100,
                   help="volumes in the batch (the default plan's time block is 100)")
    p.add_argument("--unit", type=int, nargs=3, default=(31, 37, 61),
                   help="spatial block (the default plan's at 200 volumes)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--file", type=Path, default=None, help="a 4D NIfTI instead of --data")
    p.add_argument("--layouts", action="store_true",
                   help="also time-last vs volume-order chunks, with the encode")
    a = p.parse_args(argv)
    raw, source = _batch(a.data, a.volumes, (61, 73, 61), a.file)
    unit = tuple(a.unit)
    out = np.empty_like(raw)

    def current() -> None:
        for _ in time_last_blocks(raw, unit, reuse=True):
            pass

    rows = [("time_last_blocks (ingest)", current),
            ("contiguous copy of the batch (bandwidth limit)", lambda: np.copyto(out, raw))]
    with threadpool_limits(1):
        res = [(name, _cpu_per_call(fn, a.repeats)) for name, fn in rows]
        layouts = _layouts(raw, unit, a.repeats) if a.layouts else []
    print(f"command: python tests/benchmarks/bench_relayout.py {' '.join(argv or sys.argv[1:])}")
    print(f"\nbatch {raw.shape} float32 ({raw.nbytes / 1e6:.0f} MB), block {unit}, "
          f"median of {a.repeats}, process CPU time, one thread; data: {source}\n")
    print("| re-layout | CPU ms per batch | MB/s | vs contiguous copy |")
    print("|---|---|---|---|")
    limit = res[-1][1]
    for name, s in res:
        print(f"| {name} | {s * 1e3:.0f} | {raw.nbytes / s / 1e6:.0f} | {s / limit:.1f}x |")
    if layouts:
        print(f"\n| chunk layout ({raw.dtype}, Blosc LZ4 level 1 + bit shuffle) | "
              "CPU ms per batch (lay out + encode) | compression ratio |\n|---|---|---|")
        for name, s, ratio in layouts:
            print(f"| {name} | {s * 1e3:.0f} | {ratio:.2f} |")


def _layouts(raw: np.ndarray, unit: tuple[int, ...], repeats: int
             ) -> list[tuple[str, float, float]]:
    """(layout, CPU s per batch to lay out and encode every block, compression ratio)."""
    from numcodecs import Blosc

    from storage.ingest import time_last_blocks

    codec = Blosc("lz4", 1, Blosc.BITSHUFFLE)  # IngestOptions' defaults
    nx, ny, nz, _ = raw.shape
    box = np.empty(int(np.prod([min(u, n) for u, n in zip(unit, raw.shape[:3], strict=True)]))
                   * raw.shape[3], dtype=raw.dtype)
    sizes: dict[str, int] = {}

    def time_last() -> None:
        sizes["time"] = sum(len(codec.encode(b)) for _, b in
                            time_last_blocks(raw, unit, reuse=True))

    def volume_order() -> None:
        n = 0
        for x0 in range(0, nx, unit[0]):
            for y0 in range(0, ny, unit[1]):
                for z0 in range(0, nz, unit[2]):
                    sub = raw[x0:x0 + unit[0], y0:y0 + unit[1], z0:z0 + unit[2]]
                    dst = box[:sub.size].reshape(sub.shape, order="F")
                    np.copyto(dst, sub)  # Fortran box: volume after volume
                    n += len(codec.encode(dst.T))  # .T: the same bytes, C-contiguous
        sizes["volume"] = n

    out = []
    for name, key, fn in [("time-last (what the store holds; re-layout)", "time", time_last),
                          ("volume order (zarr transpose codec; gather only)", "volume",
                           volume_order)]:
        s = _cpu_per_call(fn, repeats)
        out.append((name, s, raw.nbytes / sizes[key]))
    return out


if __name__ == "__main__":
    main()
