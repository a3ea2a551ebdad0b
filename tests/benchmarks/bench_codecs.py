"""Blosc codecs for the stored BOLD: compression ratio and encode/decode speed.

The same time-contiguous blocks that ingestion writes (each voxel's time series
adjacent), from real data (Haxby 2001, int16, in ../shared/data) and from the simulated
benchmark runs (float32, 1 % white noise everywhere). One Blosc thread, CPU time.

Run (not part of the test suite)::

    python tests/benchmarks/bench_codecs.py [--data /tmp/bf-bench-data]

Prints Markdown for RESULTS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numcodecs.blosc as blosc
import numpy as np
from _common import machine_lines
from numcodecs import Blosc

from storage.ingest import time_last_blocks

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "haxby2001"
CODECS = {
    "zstd 1 + bit shuffle (old default)": Blosc("zstd", 1, Blosc.BITSHUFFLE),
    "lz4 1 + bit shuffle (default)": Blosc("lz4", 1, Blosc.BITSHUFFLE),
    "zstd 1 + byte shuffle": Blosc("zstd", 1, Blosc.SHUFFLE),
    "lz4 1 + byte shuffle": Blosc("lz4", 1, Blosc.SHUFFLE),
}


def blocks(path: Path, max_volumes: int, unit=(32, 32, 64)) -> list[np.ndarray]:
    img = nib.load(path)
    raw = np.asfortranarray(np.asanyarray(img.dataobj.get_unscaled())[..., :max_volumes])
    return [b for _, b in time_last_blocks(raw, unit)]


def measure(parts: list[np.ndarray], codec, repeats: int = 3) -> tuple[float, float, float]:
    nbytes = sum(p.nbytes for p in parts)
    enc, dec, size = [], [], 0
    for _ in range(repeats):
        t = time.process_time()
        out = [codec.encode(p) for p in parts]
        enc.append(time.process_time() - t)
        t = time.process_time()
        for o in out:
            codec.decode(o)
        dec.append(time.process_time() - t)
        size = sum(len(o) for o in out)
    return nbytes / size, nbytes / min(enc) / 1e6, nbytes / min(dec) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "bf-bench-data")
    args = ap.parse_args()
    blosc.set_nthreads(1)
    sources = []
    for name in ("bold_1slice", "bold_25mm"):
        files = sorted(SHARED.glob(f"sub001/run-00*/{name}.nii.gz"))
        if files:
            sources.append((f"Haxby {name}, {len(files)} runs (real, int16)",
                            [b for f in files for b in blocks(f, 10_000)]))
    sim = sorted(args.data.glob("pipeline-8-61x73x61-200-float32/sub-01/func/*_bold.nii.gz"))
    if sim:
        sources.append(("simulated 61x73x61 x 200 (float32)", blocks(sim[0], 200)))
    print("```\npython tests/benchmarks/bench_codecs.py\n```\n")
    for line in machine_lines():
        print(line)
    print("\n| data | MB | codec | ratio | encode MB/s | decode MB/s |")
    print("|---|---|---|---|---|---|")
    for label, parts in sources:
        mb = sum(p.nbytes for p in parts) / 1e6
        for cname, codec in CODECS.items():
            ratio, enc, dec = measure(parts, codec)
            print(f"| {label} | {mb:.1f} | {cname} | {ratio:.2f} | {enc:.0f} | {dec:.0f} |")


if __name__ == "__main__":
    main()
