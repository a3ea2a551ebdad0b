"""Group ICA (issue 4): boldflow's ``GroupICA`` against nilearn's ``CanICA``, and MIGP scaling.

1. Side by side on the same simulated subjects (default 16 x 40x48x40 at 4 mm x 200
   volumes): nilearn ``CanICA`` in a fresh subprocess, on the ``.nii.gz`` files, with the
   group mask, against ``GroupICA(method="migp")`` and ``GroupICA(method="canica")`` from the
   ingested Zarr store (``open_run -> apply_mask -> clean_signals``) on a ``LocalCluster`` of
   single-threaded worker processes with a fixed ``memory_limit`` (a fresh cluster per
   measurement). Wall time, CPU seconds, peak RSS of each worker and of the client process
   (sampled every 10 ms), nilearn's peak RSS (sampled, and the child's own ``ru_maxrss``).
   Ingest is measured separately and added to a total. Agreement: Hungarian-matched
   ``|spatial r|`` of boldflow's maps with nilearn's, and recovery of the simulated networks
   (best ``|r|`` of any map with each true network map).
   Targets (issue 4): faster than CanICA; peak memory per worker at least 4x below CanICA's.
2. MIGP scaling: ``GroupICA(method="migp")`` on the first 16, 64 and 256 subjects of one
   simulated dataset (default 20x24x20 x 100 volumes): wall time per subject (linear in
   subjects?) and peak worker / client RSS (constant?).

Part 1 takes several subject counts (``--subjects 16,64``): one dataset of the largest
count is simulated, and each row uses its first N subjects (the store is ingested
incrementally: the runs of the first 16, then the next 48...; a row's ingest time is the sum
of the ingests of its N runs). The workers preload the modules their tasks import
(``pipeline._kernels``, ``pipeline.masking``, ``pipeline.decomposition._blocks``, xarray,
zarr; scipy.signal when filtering) before the idle RSS is read, and report which of
nilearn, scikit-learn, pandas and matplotlib they hold after the fit.

Cleaning, both sides (``--clean``): ``filter`` (default) is a linear detrend, a Butterworth
high-pass at 0.01 Hz and ``zscore_sample`` standardisation per voxel (TR 2 s);
``detrend-zscore`` the same without the filter (nilearn's Butterworth filter loops over
voxels: ~66 s per subject of 61x73x61 x 200 volumes). No confounds, no smoothing (nilearn
``smoothing_fwhm=None``), the same group mask (intersection of the runs' brain masks of the
row's subjects) and the same ``n_components`` and seeds.

Run (not part of the test suite; the machine's load average is printed with each row)::

    python tests/benchmarks/bench_group_ica.py
    python tests/benchmarks/bench_group_ica.py --parts 1 --subjects 16,64 --shape 61,73,61 \
        --voxel-size 3 --clean detrend-zscore --block-bytes 16MiB
    python tests/benchmarks/bench_group_ica.py --parts 2 --sizes 16,64,256

Prints Markdown for RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from _common import Sampler, machine_lines, measured

MB = 1e6
#: cleaning presets (--clean), the same keywords for nilearn's CanICA and clean_signals
CLEANINGS: dict[str, dict[str, Any]] = {
    "filter": {"detrend": True, "standardize": "zscore_sample", "high_pass": 0.01,
               "t_r": 2.0},
    "detrend-zscore": {"detrend": True, "standardize": "zscore_sample", "t_r": 2.0},
}
CLEAN_TEXT = {
    "filter": "detrend + Butterworth high-pass 0.01 Hz + zscore_sample per voxel",
    "detrend-zscore": "detrend + zscore_sample per voxel, no filter",
}
CLEAN: dict[str, Any] = dict(CLEANINGS["filter"])  # set by main() from --clean
#: modules whose presence on the workers after a fit is reported
HEAVY = ("nilearn", "sklearn", "pandas", "matplotlib")


# ------------------------------------------------------------------------- data


def make_data(out: Path, n_subjects: int, shape: tuple[int, int, int], voxel_size: float,
              n_volumes: int) -> Path:
    """Simulated fMRIPrep-like derivatives, cached under ``out`` (``.done`` marker).

    Parameters
    ----------
    out : pathlib.Path
        Cache folder.
    n_subjects, shape, voxel_size, n_volumes
        Passed to :func:`pipeline.simulate.simulate_dataset` (seed 0, float32).

    Returns
    -------
    pathlib.Path
        The dataset root.
    """
    from pipeline.simulate import simulate_dataset

    name = f"groupica-{n_subjects}-{'x'.join(map(str, shape))}-{voxel_size:g}mm-{n_volumes}"
    root = out / name
    marker = root / ".done"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        simulate_dataset(root, n_subjects=n_subjects, shape=shape, voxel_size=voxel_size,
                         n_volumes=n_volumes, seed=0)
        marker.touch()
    return root


def find_bold(root: Path) -> dict[str, str]:
    """``{subject: path of its preprocessed BOLD .nii.gz}``, sorted by subject."""
    out = {}
    for bold in sorted(root.glob("sub-*/func/*_desc-preproc_bold.nii.gz")):
        out[bold.name.split("_")[0].removeprefix("sub-")] = str(bold)
    return out


# ------------------------------------------------------------------------- measuring


def _proc_cpu() -> float:
    # defined here (pickled by value for client.run, the workers need not import _common)
    t = psutil.Process().cpu_times()
    return t.user + t.system


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _heavy_modules() -> list[str]:
    # run on the workers (client.run): which of HEAVY this process has imported
    return [m for m in ("nilearn", "sklearn", "pandas", "matplotlib") if m in sys.modules]


def worker_modules() -> tuple[str, ...]:
    """Modules the GroupICA tasks import on a worker (preloaded before the idle RSS)."""
    mods = ("pipeline._kernels", "pipeline.masking", "pipeline.decomposition._blocks",
            "xarray", "zarr")
    return (*mods, "scipy.signal") if CLEAN.get("high_pass") or CLEAN.get("low_pass") \
        else mods


@contextlib.contextmanager
def cluster(n_workers: int, memory_limit: str) -> Iterator[tuple[Any, list[int]]]:
    """A fresh ``LocalCluster`` of single-threaded worker processes, modules imported.

    Yields
    ------
    (distributed.Client, list of int)
        The client (the default scheduler meanwhile) and the worker pids.
    """
    from distributed import Client, LocalCluster

    mods = worker_modules()
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      memory_limit=memory_limit, dashboard_address=":0") as lc, \
            Client(lc) as client:
        client.run(lambda: [__import__(m) for m in mods])
        yield client, list(client.run(os.getpid).values())


# ------------------------------------------------------------------------- nilearn


def nilearn_child(spec_path: str) -> None:
    """Subprocess entry point: fit nilearn ``CanICA`` as the spec says, save the maps."""
    spec = json.loads(Path(spec_path).read_text())
    t_imp = time.perf_counter()
    from nilearn.decomposition import CanICA

    rss_imported = _rss()
    imports = time.perf_counter() - t_imp
    warnings.simplefilter("ignore")
    ica = CanICA(mask=spec["mask"], n_components=spec["k"], smoothing_fwhm=None,
                 n_init=spec["n_init"], random_state=0, threshold="auto", **spec["clean"])
    c0 = _proc_cpu()
    t0 = time.perf_counter()
    ica.fit(spec["files"])
    wall = time.perf_counter() - t0
    cpu = _proc_cpu() - c0
    np.save(spec["out"], np.asarray(ica.components_, dtype=np.float64))
    Path(spec["out"]).with_suffix(".json").write_text(json.dumps({
        "wall_fit": wall, "cpu_fit": cpu, "imports": imports, "rss_imported": rss_imported,
        "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def run_nilearn(files: list[str], mask: Path, k: int, n_init: int, tmp: Path
                ) -> tuple[dict, np.ndarray]:
    """nilearn ``CanICA`` in a fresh Python process; its measures and ``(k, V)`` maps.

    The child times ``fit`` itself (imports excluded); peak RSS is the larger of the
    parent's 10 ms samples of the child and the child's ``ru_maxrss``.
    """
    out = tmp / "nilearn_components.npy"
    spec = tmp / "nilearn_spec.json"
    spec.write_text(json.dumps({"files": files, "mask": str(mask), "k": k, "n_init": n_init,
                                "out": str(out), "clean": CLEAN}))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--nilearn-child", str(spec)])
    sampler = Sampler([proc.pid])
    sampler.start()
    rc = proc.wait()
    total = time.perf_counter() - t0
    peak = sampler.stop()[proc.pid]
    if rc != 0:
        raise RuntimeError(f"nilearn child failed with exit code {rc}")
    info = json.loads(out.with_suffix(".json").read_text())
    info.update(wall_process=total, rss_sampled=peak, rss=max(peak, info["maxrss"]),
                load=os.getloadavg()[0])
    return info, np.load(out)


# ------------------------------------------------------------------------- boldflow


def ingest(root: Path, store: Path, n_workers: int, memory_limit: str,
           subjects: list[str] | None = None, chunk_bytes: str | None = None) -> dict:
    """``storage.ingest`` of every run (or of these subjects' runs) on a fresh cluster,
    measured; runs already in the store are skipped (``rec["ingested"]`` counts the new)."""
    import storage

    with cluster(n_workers, memory_limit) as (client, pids), measured(client, pids) as rec:
        options = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
        cat = storage.ingest(root, store, client=client, subjects=subjects, **options)
    assert (cat["status"] == "complete").all(), cat["error"].tolist()
    rec["ingested"] = int((cat["action"] == "ingested").sum())
    return rec


def group_mask(store: Path, subs: list[str], path: Path) -> Any:
    """Intersection of the runs' brain masks (an ``(x, y, z)`` DataArray), saved as NIfTI."""
    import nibabel as nib

    import storage
    from pipeline.masking import intersect_masks

    bs = storage.open_store(store)
    runs = [bs.open_run(subject=s, task="rest") for s in subs]
    mask = intersect_masks([r["mask"] for r in runs], threshold=1.0)
    nib.save(nib.Nifti1Image(mask.values.astype(np.uint8), runs[0].attrs["affine"]), path)
    return mask


def subjects(store: Path, subs: list[str], mask: Any, block_bytes: str = "128MiB"
             ) -> list[Any]:
    """Lazy cleaned ``(time, voxel)`` DataArrays, as the pipeline's decompose step builds."""
    import storage
    from pipeline.masking import apply_mask
    from pipeline.signal import clean_signals

    bs = storage.open_store(store)
    out = []
    for s in subs:
        m = apply_mask(bs.open_run(subject=s, task="rest", block_bytes=block_bytes), mask)
        out.append(m.copy(data=clean_signals(m.data, **CLEAN)))
    return out


def fit_boldflow(method: str, store: Path, subs: list[str], mask: Any, k: int, n_init: int,
                 n_workers: int, memory_limit: str, block_bytes: str = "128MiB"
                 ) -> tuple[dict, Any]:
    """``GroupICA(k, method=method)`` on a fresh cluster (graph building included)."""
    from pipeline.decomposition.group import GroupICA

    with cluster(n_workers, memory_limit) as (client, pids):
        with measured(client, pids) as rec:
            ica = GroupICA(k, method=method, n_init=n_init, random_state=0)
            ica.fit(subjects(store, subs, mask, block_bytes))
        rec["heavy"] = sorted({m for mods in client.run(_heavy_modules).values()
                               for m in mods})
    return rec, ica


# ------------------------------------------------------------------------- agreement


def abs_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``|pearson r|`` between every row of ``a`` and every row of ``b``."""
    a = (a - a.mean(1, keepdims=True)) / a.std(1, keepdims=True)
    b = (b - b.mean(1, keepdims=True)) / b.std(1, keepdims=True)
    return np.abs(a @ b.T) / a.shape[1]


def matched(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hungarian matching of the rows of ``a`` and ``b`` on ``|r|``: the matched ``|r|``,
    sorted descending."""
    from scipy.optimize import linear_sum_assignment

    c = abs_corr(a, b)
    rows, cols = linear_sum_assignment(-c)
    return np.sort(c[rows, cols])[::-1]


def recovery(maps: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Best ``|r|`` of any map with each true network map."""
    return abs_corr(truth, maps).max(axis=1)


def network_agreement(ours: np.ndarray, ref: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per true network: ``|r|`` between our map and nilearn's map that match it best."""
    bo, br = abs_corr(truth, ours).argmax(1), abs_corr(truth, ref).argmax(1)
    return np.array([abs_corr(ours[[i]], ref[[j]])[0, 0] for i, j in zip(bo, br, strict=True)])


# ------------------------------------------------------------------------- report


def machine_facts() -> list[str]:
    """Markdown bullet lines: CPU, RAM, OS, library versions."""
    return [
        *machine_lines(),
    ]


def _mb(x: float) -> str:
    return f"{x / MB:.0f}"


def part1(args: argparse.Namespace, tmp: Path, say: Any) -> None:
    """boldflow GroupICA (MIGP, CanICA) vs nilearn CanICA, for each subject count."""
    counts = sorted({int(n) for n in str(args.subjects).split(",")})
    shape = tuple(int(s) for s in args.shape.split(","))
    root = make_data(args.data, max(counts), shape, args.voxel_size, args.volumes)
    bold_all = find_bold(root)
    store = tmp / "p1.zarr"
    ing_wall = ing_cpu = 0.0
    ing_rss: list[float] = []
    summary = []
    for n in counts:
        subs = list(bold_all)[:n]
        ing = ingest(root, store, args.workers, args.memory_limit, subjects=subs,
                     chunk_bytes=args.ingest_chunk_bytes)
        ing_wall += ing["wall"]
        ing_cpu += ing["cpu_workers"]
        ing_rss.append(max(ing["rss_workers"]))
        ing_total = {"wall": ing_wall, "cpu_workers": ing_cpu, "rss_workers": ing_rss,
                     "load": ing["load"], "new": ing["ingested"]}
        summary.append(part1_row(args, tmp, say, root, store, shape,
                                 {s: bold_all[s] for s in subs}, ing_total))
    if len(counts) > 1:
        say(f"\n#### Summary: peak memory vs subjects ({CLEAN_TEXT[args.clean]}, "
            f"block_bytes={args.block_bytes})\n")
        say("| subjects | nilearn CanICA peak MB (above its imports) | fit wall s nilearn / "
            "migp / canica | worst worker MB, migp (above idle) | worst worker MB, canica "
            "(above idle) | nilearn / worker, absolute: migp / canica | same, above idle: "
            "migp / canica | >= 4x? absolute / above idle (migp; canica) |")
        say("|---|---|---|---|---|---|---|---|")
        for row in summary:
            say(row)


def part1_row(args: argparse.Namespace, tmp: Path, say: Any, root: Path, store: Path,
              shape: tuple[int, ...], bold: dict[str, str], ing: dict) -> str:
    """One subject count of part 1: the section's lines; returns its summary-table row."""
    from pipeline.simulate import load_truth

    subs = list(bold)
    mask_path = tmp / "group_mask.nii.gz"
    mask = group_mask(store, subs, mask_path)
    n_vox = int(mask.values.sum())
    n_bytes = float(np.prod(shape)) * args.volumes * 4 * len(subs)

    nl, nl_maps = run_nilearn([bold[s] for s in subs], mask_path, args.components,
                              args.n_init, tmp)
    fits = {m: fit_boldflow(m, store, subs, mask, args.components, args.n_init,
                            args.workers, args.memory_limit, args.block_bytes)
            for m in ("migp", "canica")}

    truth_all = load_truth(root)["network_maps"]
    ijk = fits["migp"][1].voxel_ijk_
    order = np.lexsort(ijk.T[::-1])  # nilearn's maps: C order of the mask grid
    truth = truth_all[(slice(None), *ijk[order].T)]

    say(f"\n#### 1. Group ICA, {len(subs)} subjects: boldflow vs nilearn CanICA\n")
    say(f"- data: {len(subs)} simulated subjects, {'x'.join(map(str, shape))} at "
        f"{args.voxel_size:g} mm x {args.volumes} volumes, float32 ({n_bytes / MB:.0f} MB "
        f"of BOLD uncompressed in all), TR 2 s; group mask (intersection of the brain masks)"
        f" {n_vox} voxels; {truth.shape[0]} simulated networks")
    say(f"- both sides: n_components={args.components}, n_init={args.n_init} (CanICA), "
        f"random_state=0, cleaning = {CLEAN_TEXT[args.clean]} (no confounds, no smoothing)")
    say(f"- nilearn: CanICA(mask=group mask, smoothing_fwhm=None, threshold='auto') on the "
        f".nii.gz files, in a fresh Python process (its `fit` timed inside it; imports took "
        f"{nl['imports']:.1f} s and {_mb(nl['rss_imported'])} MB RSS before the fit; whole "
        f"process {nl['wall_process']:.1f} s)")
    say(f"- boldflow: GroupICA from the ingested store (open_run -> apply_mask -> "
        f"clean_signals, built in the client; open_run block_bytes={args.block_bytes}), "
        f"LocalCluster({args.workers} worker processes "
        f"x 1 thread, memory_limit={args.memory_limit}), a fresh cluster per row; ingest "
        f"({len(subs)} runs, "
        + ("default options" if args.ingest_chunk_bytes is None
           else f"chunk_bytes={args.ingest_chunk_bytes}")
        + f", {ing['new']} of them in this row's ingest, the "
        f"others by the previous rows') on its own cluster: {ing['wall']:.1f} s wall, "
        f"{ing['cpu_workers']:.1f} worker CPU s, peak worker RSS "
        f"{_mb(max(ing['rss_workers']))} MB, load {ing['load']:.1f}")
    say(f"- workers preload {', '.join(worker_modules())} before the idle RSS is read; "
        "imported by the workers after the fit, of " + ", ".join(HEAVY) + ": " + "; ".join(
            f"{m} {', '.join(rec['heavy']) or 'none'}" for m, (rec, _) in fits.items()))
    say("")
    say("| implementation | fit wall s | + ingest = total s | CPU s (workers + client) | "
        "peak RSS per worker MB (idle before) | peak client RSS MB (before) | "
        "nilearn peak / worst worker | same, above the idle process (nilearn: after its "
        "imports) | faster than CanICA? (fit / incl. ingest) | "
        "memory >= 4x below? (absolute / above idle) | load avg |")
    say("|---|---|---|---|---|---|---|---|---|---|---|")
    say(f"| nilearn CanICA (1 process) | {nl['wall_fit']:.1f} | (reads .nii.gz) | "
        f"{nl['cpu_fit']:.1f} | {_mb(nl['rss'])} (sampled {_mb(nl['rss_sampled'])}, "
        f"ru_maxrss {_mb(nl['maxrss'])}) | | 1 | 1 ({_mb(nl['rss'] - nl['rss_imported'])} "
        f"MB above imports) | reference | | {nl['load']:.1f} |")
    for method, (rec, _) in fits.items():
        worst = max(rec["rss_workers"])
        ratio = nl["rss"] / worst
        idle = max(rec["rss_workers_before"])
        ratio_inc = (nl["rss"] - nl["rss_imported"]) / max(worst - idle, 1)
        total = rec["wall"] + ing["wall"]
        faster = ("yes" if rec["wall"] < nl["wall_fit"] else "**no**") + " / " + \
            ("yes" if total < nl["wall_fit"] else "**no**")
        say(f"| **boldflow GroupICA(method='{method}')** | {rec['wall']:.1f} "
            f"({nl['wall_fit'] / rec['wall']:.1f}x) | {total:.1f} "
            f"({nl['wall_fit'] / total:.1f}x) | "
            f"{rec['cpu_workers'] + rec['cpu_client']:.1f} ({rec['cpu_workers']:.1f} + "
            f"{rec['cpu_client']:.1f}) | "
            f"{' / '.join(_mb(r) for r in rec['rss_workers'])} "
            f"({' / '.join(_mb(r) for r in rec['rss_workers_before'])}) | "
            f"{_mb(rec['rss_client'])} ({_mb(rec['rss_client_before'])}) | {ratio:.1f}x | "
            f"{ratio_inc:.1f}x ({_mb(worst - idle)} MB) | {faster} | "
            f"{'yes' if ratio >= 4 else '**no**'} / {'yes' if ratio_inc >= 4 else '**no**'} | "
            f"{rec['load']:.1f} |")

    say("\nAgreement (maps reordered to nilearn's voxel order):\n")
    say("| maps | matched \\|r\\| with nilearn's (Hungarian; median / min over all "
        f"{args.components}; top 6) | per true network: \\|r\\| of the best-matching maps "
        "(ours vs nilearn's) | recovery: best \\|r\\| with each true network (min / median) |")
    say("|---|---|---|---|")
    rec_nl = recovery(nl_maps, truth)
    say(f"| nilearn CanICA | | | {rec_nl.min():.3f} / {np.median(rec_nl):.3f} |")
    for method, (_, ica) in fits.items():
        ours = ica.components_[:, order]
        m = matched(ours, nl_maps)
        agree = network_agreement(ours, nl_maps, truth)
        rec_t = recovery(ours, truth)
        say(f"| boldflow {method} | {np.median(m):.3f} / {m.min():.3f}; "
            f"{' '.join(f'{v:.3f}' for v in m[:6])} | "
            f"{' '.join(f'{v:.3f}' for v in agree)} | {rec_t.min():.3f} / "
            f"{np.median(rec_t):.3f} |")

    nl_above = nl["rss"] - nl["rss_imported"]
    cells = {}
    for method, (rec, _) in fits.items():
        worst = max(rec["rss_workers"])
        above = worst - max(rec["rss_workers_before"])
        cells[method] = (worst, above, nl["rss"] / worst, nl_above / max(above, 1))
    mg, cn = cells["migp"], cells["canica"]

    def ok(x: float) -> str:
        return "yes" if x >= 4 else "no"

    return (f"| {len(subs)} | {_mb(nl['rss'])} ({_mb(nl_above)}) | {nl['wall_fit']:.0f} / "
            f"{fits['migp'][0]['wall']:.0f} / {fits['canica'][0]['wall']:.0f} | "
            f"{_mb(mg[0])} ({_mb(mg[1])}) | {_mb(cn[0])} ({_mb(cn[1])}) | "
            f"{mg[2]:.1f}x / {cn[2]:.1f}x | {mg[3]:.1f}x / {cn[3]:.1f}x | "
            f"{ok(mg[2])} / {ok(mg[3])}; {ok(cn[2])} / {ok(cn[3])} |")


def part2(args: argparse.Namespace, tmp: Path, say: Any) -> None:
    """MIGP time and memory as the number of subjects grows."""
    sizes = sorted(int(s) for s in args.sizes.split(","))
    shape = tuple(int(s) for s in args.scaling_shape.split(","))
    root = make_data(args.data, max(sizes), shape, 3.0, args.scaling_volumes)
    subs_all = list(find_bold(root))
    store = tmp / "p2.zarr"
    ing = ingest(root, store, args.workers, args.memory_limit)
    mask = group_mask(store, subs_all, tmp / "group_mask_p2.nii.gz")
    n_vox = int(mask.values.sum())
    say(f"\n### 2. MIGP scaling: the first N of {max(sizes)} subjects\n")
    say(f"- data: {'x'.join(map(str, shape))} at 3 mm x {args.scaling_volumes} volumes, "
        f"float32, {n_vox} voxels in the group mask; ingest of all {len(subs_all)} runs: "
        f"{ing['wall']:.1f} s wall ({ing['cpu_workers']:.1f} worker CPU s)")
    say(f"- GroupICA(n_components={args.components}, method='migp', random_state=0), "
        f"default d_internal (2 x T = {2 * args.scaling_volumes}); LocalCluster("
        f"{args.workers} x 1 thread, memory_limit={args.memory_limit}), fresh per row; "
        "wall includes building the subjects' lazy arrays in the client")
    say("")
    say("| subjects | wall s | s per subject | CPU s (workers + client) | peak worker RSS MB "
        "(idle before) | peak client RSS MB (before) | load avg |")
    say("|---|---|---|---|---|---|---|")
    for n in sizes:
        rec, ica = fit_boldflow("migp", store, subs_all[:n], mask, args.components, 1,
                                args.workers, args.memory_limit)
        assert ica.n_subjects_ == n
        say(f"| {n} | {rec['wall']:.1f} | {rec['wall'] / n:.2f} | "
            f"{rec['cpu_workers'] + rec['cpu_client']:.1f} ({rec['cpu_workers']:.1f} + "
            f"{rec['cpu_client']:.1f}) | {_mb(max(rec['rss_workers']))} "
            f"({_mb(max(rec['rss_workers_before']))}) | {_mb(rec['rss_client'])} "
            f"({_mb(rec['rss_client_before'])}) | {rec['load']:.1f} |")


def main() -> None:
    """Parse the options, run the parts, print Markdown."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="1,2", help="comma-separated: 1 and/or 2")
    ap.add_argument("--subjects", default="16",
                    help="part 1 numbers of subjects, comma-separated (e.g. 16,64)")
    ap.add_argument("--clean", choices=sorted(CLEANINGS), default="filter",
                    help="cleaning of both sides (part 1; part 2 uses it too)")
    ap.add_argument("--shape", default="40,48,40", help="part 1 grid")
    ap.add_argument("--voxel-size", type=float, default=4.0, help="part 1 voxel size (mm)")
    ap.add_argument("--volumes", type=int, default=200, help="part 1 volumes per run")
    ap.add_argument("--components", type=int, default=20)
    ap.add_argument("--n-init", type=int, default=10, help="CanICA FastICA restarts")
    ap.add_argument("--sizes", default="16,64,256", help="part 2 numbers of subjects")
    ap.add_argument("--scaling-shape", default="20,24,20", help="part 2 grid (3 mm)")
    ap.add_argument("--scaling-volumes", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--block-bytes", default="32MiB",
                    help="open_run block_bytes of the subjects' data (part 1)")
    ap.add_argument("--ingest-chunk-bytes", default=None,
                    help="part 1: storage.ingest chunk_bytes (default: its default, 32MiB); "
                         "blocks of --block-bytes smaller than a Zarr chunk decode whole chunks")
    ap.add_argument("--memory-limit", default="4GiB")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "bf-bench-data")
    ap.add_argument("--nilearn-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.nilearn_child:
        nilearn_child(args.nilearn_child)
        return
    parts = {int(p) for p in args.parts.split(",")}
    CLEAN.clear()
    CLEAN.update(CLEANINGS[args.clean])
    warnings.simplefilter("ignore")  # nilearn's and dask's notes
    t_start = time.perf_counter()

    def say(line: str = "") -> None:
        print(line, flush=True)

    say(f"command: python tests/benchmarks/bench_group_ica.py {' '.join(sys.argv[1:])}\n")
    for line in machine_facts():
        say(line)
    say(f"- load average at start: {os.getloadavg()[0]:.1f} (1 min), "
        f"{os.getloadavg()[1]:.1f} (5 min)")
    with tempfile.TemporaryDirectory(prefix="bf-bench-gica-") as tmp_:
        tmp = Path(tmp_)
        if 1 in parts:
            part1(args, tmp, say)
        if 2 in parts:
            part2(args, tmp, say)
    say(f"\nload average at end: {os.getloadavg()[0]:.1f}; total script time "
        f"{time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
