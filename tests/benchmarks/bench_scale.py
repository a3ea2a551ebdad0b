"""Scale test (issue 5): a boldflow job over 100 -> 1000 simulated subjects.

For each subject count ``N`` (default 100, 250, 500, 1000) on a fresh ``LocalCluster``
(``--workers`` single-threaded worker processes with a fixed ``--memory-limit`` each):

1. **ingest**: ``storage.ingest`` of the first ``N`` subjects (a hard-linked view of one
   cached simulated dataset) into a new store;
2. one :class:`pipeline.jobs.Pipeline` job with ``input`` = that store: per-run graphs
   (mask -> region signals -> clean, ``clean.level: region``) and connectivity, the group
   step (stacked matrices, group means, the two-group Welch comparison,
   ``connectivity.groups: group``) and group ICA via MIGP + dual regression
   (``decompose: {level: group, method: migp}``).

The job's phases are timed from the job's own messages (``echo``) and from thin timing
wrappers installed by this script around ``pipeline.decompose_step.run_decomposition``,
``_Context.group_step`` and the driver-side calls of a run (``BoldStore.open_group``,
``_Context.provenance`` / ``cached`` / ``build`` / ``write_run``, ``Client.compute``); the
wrappers only read clocks and count calls made from the job's driver thread. Per phase:
wall seconds, seconds per subject, CPU seconds of the workers and of the client process
split by thread (the driver thread ``boldflow-job``; the event-loop thread, which on a
LocalCluster runs the *scheduler* and the client's comms in this same process), peak RSS of
each worker and of the client process (sampled every 50 ms), the tasks the scheduler
finished (a scheduler plugin logs every task that reaches ``memory``) and tasks per second,
worker occupancy (task compute seconds / workers x wall), and the 1-minute load average.

Graph size per run: ``len`` of the dask graph that the driver submits for one run (before
and after ``dask.optimize``), and the tasks the scheduler ran per subject in each phase.

The client process is shared by the sizes of one invocation (each size gets a fresh
cluster): measure one size per invocation to read the client's peak RSS.

``--profile-size N`` repeats the job at that size (fresh outputs, same store) with cProfile
on the driver thread and prints the top functions (cProfile slows Python code down: read
the profile for shares, the timed run for seconds).

Run (not part of the test suite; the data are generated once: ~5 CPU min, 5 GB)::

    python tests/benchmarks/bench_scale.py --sizes 100
    python tests/benchmarks/bench_scale.py --sizes 100,250,500,1000 --profile-size 100

Prints Markdown tables for RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import itertools
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
from _common import machine_lines, profile_job
from dask.utils import key_split
from distributed.diagnostics.plugin import SchedulerPlugin

MB = 1e6
JOB_THREAD = "boldflow-job"
CLEAN = {"strategy": "simple", "level": "region", "detrend": True,
         "standardize": "zscore_sample", "low_pass": 0.08, "high_pass": 0.009}


# ------------------------------------------------------------------------- data


def make_data(data: Path, n_subjects: int, shape: tuple[int, int, int], n_volumes: int,
              dtype: str) -> tuple[Path, float]:
    """The cached simulated dataset of ``n_subjects`` (generated once); generation seconds."""
    from pipeline.simulate import simulate_dataset

    root = data / f"scale-{n_subjects}-{'x'.join(map(str, shape))}-{n_volumes}-{dtype}"
    marker = root / ".done"
    seconds = float("nan")
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        simulate_dataset(root, n_subjects=n_subjects, shape=shape, voxel_size=3.0,
                         n_volumes=n_volumes, dtype=dtype, seed=0)
        seconds = time.perf_counter() - t0
        marker.write_text(f"{seconds:.1f}\n")
    else:
        with contextlib.suppress(ValueError):
            seconds = float(marker.read_text())
    return root, seconds


def subset_view(full: Path, n: int) -> Path:
    """A derivatives folder with the first ``n`` subjects of ``full`` (hard links, cached)."""
    view = full.parent / f"{full.name}-first{n}"
    if (view / ".done").exists():
        return view
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    table = pd.read_csv(full / "participants.tsv", sep="\t", dtype=str)
    if len(table) < n:
        raise ValueError(f"{full} has {len(table)} subjects, {n} asked")
    table.iloc[:n].to_csv(view / "participants.tsv", sep="\t", index=False)
    for name in ("dataset_description.json", "atlas-simulated_dseg.nii.gz",
                 "atlas-simulated_dseg.tsv"):
        os.link(full / name, view / name)
    for sub in table["participant_id"].iloc[:n]:
        for src in (full / sub).rglob("*"):
            dst = view / src.relative_to(full)
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(src, dst)
    (view / ".done").touch()
    return view


def job_config(store: Path, output: Path, view: Path, decompose: bool) -> dict:
    """The measured job: region-level cleaning, connectivity + group comparison, MIGP."""
    job: dict[str, Any] = {
        "input": str(store), "output": str(output), "clean": dict(CLEAN),
        "parcellate": {"atlas": str(view / "atlas-simulated_dseg.nii.gz"), "name": "sim"},
        "connectivity": {"kinds": ["correlation"], "groups": "group",
                         "participants": str(view / "participants.tsv")}}
    if decompose:
        job["decompose"] = {"level": "group", "method": "migp"}
    return job


# ------------------------------------------------------------------------- measuring


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's live threads, summed by thread kind."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = collections.defaultdict(float)
    for th in psutil.Process().threads():
        name = names.get(th.id, "other")
        if name == JOB_THREAD:
            kind = "driver"
        elif name.startswith("IO loop") or "loop" in name.lower():
            kind = "loop"
        else:
            kind = "other"
        out[kind] += th.user_time + th.system_time
    return dict(out)


class Sampler(threading.Thread):
    """Polls the RSS of some processes every ``period`` s, keeping timestamped samples."""

    def __init__(self, pids: list[int], period: float = 0.05) -> None:
        super().__init__(daemon=True, name="bf-rss-sampler")
        self.procs = {pid: psutil.Process(pid) for pid in pids}
        self.period = period
        self.samples: list[tuple[float, int, int]] = []
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            now = time.perf_counter()
            for pid, proc in self.procs.items():
                with contextlib.suppress(psutil.Error):
                    self.samples.append((now, pid, proc.memory_info().rss))
            time.sleep(self.period)

    def stop(self) -> None:
        self._stop_evt.set()
        self.join()

    def peaks(self, t0: float, t1: float) -> dict[int, int]:
        out = dict.fromkeys(self.procs, 0)
        for t, pid, rss in self.samples:
            if t0 <= t <= t1:
                out[pid] = max(out[pid], rss)
        return out


class TaskLog(SchedulerPlugin):
    """Scheduler plugin (in-process scheduler): one row per task that finished.

    Rows: (finish time, key prefix, compute seconds, compute start) with times in
    ``time.time()`` seconds.
    """

    name = "bf-scale-tasklog"

    def __init__(self) -> None:
        self.rows: list[tuple[float, str, float, float]] = []

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if start != "processing" or finish not in ("memory", "erred"):
            return
        comp = [(s["start"], s["stop"]) for s in kwargs.get("startstops") or ()
                if s.get("action") == "compute"]
        busy = sum(b - a for a, b in comp)
        first = min((a for a, _ in comp), default=time.time())
        self.rows.append((time.time(), key_split(key), busy, first))


class Probe:
    """Phase boundaries with CPU/transition snapshots, and driver-side call timings."""

    def __init__(self, worker_pids: list[int], scheduler: Any) -> None:
        self.workers = [psutil.Process(p) for p in worker_pids]
        self.scheduler = scheduler
        self.marks: list[tuple[str, dict]] = []
        self.calls: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
        self.n_runs = 0
        self.lock = threading.Lock()

    def snapshot(self) -> dict:
        return {"t": time.perf_counter(), "wall": time.time(),
                "cpu_workers": sum(_cpu(p) for p in self.workers),
                "cpu_client": _cpu(psutil.Process()), "threads": thread_cpu(),
                "transitions": int(getattr(self.scheduler, "transition_counter", 0)),
                "load": os.getloadavg()[0]}

    def mark(self, name: str) -> None:
        snap = self.snapshot()
        with self.lock:
            self.marks.append((name, snap))

    def echo(self, *args: Any, **_: Any) -> None:
        msg = " ".join(str(a) for a in args)
        m = re.match(r"(\d+) run\(s\) selected", msg)
        if m:
            self.n_runs = int(m.group(1))
            self.mark("runs")
            return
        if re.match(r"group (ICA|maps) \(", msg):  # the fit is done: dual regression
            self.mark("dual-regression")
        elif " run(s) done" in msg:
            self.mark("end")

    def timed(self, name: str, fn: Callable) -> Callable:
        """Wrap ``fn``: count calls and seconds when called from the job's driver thread."""
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread().name != JOB_THREAD:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                rec = self.calls[name]
                rec[0] += 1
                rec[1] += time.perf_counter() - t0
        return wrapper


@contextlib.contextmanager
def instrumented(probe: Probe) -> Iterator[None]:
    """Install the timing wrappers (restored on exit)."""
    import distributed

    import pipeline.decompose_step as dstep
    import storage.dataset
    from pipeline import jobs

    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, attr: str, new: Any) -> None:
        saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, new)

    for attr in ("provenance", "cached", "build"):
        patch(jobs._Context, attr, probe.timed(attr, getattr(jobs._Context, attr)))
    write_run = probe.timed("write_run", jobs._Context.write_run)

    def write_run_(*args: Any, **kwargs: Any) -> Any:
        try:
            return write_run(*args, **kwargs)
        finally:  # the last run written ends the runs phase
            if probe.calls["write_run"][0] == probe.n_runs:
                probe.mark("runs-done")

    patch(jobs._Context, "write_run", write_run_)
    patch(storage.dataset.BoldStore, "open_group",
          probe.timed("open_group", storage.dataset.BoldStore.open_group))
    if hasattr(jobs, "_bold_bytes"):  # the bytes-read report (a zarr open per run)
        patch(jobs, "_bold_bytes", probe.timed("_bold_bytes", jobs._bold_bytes))
    patch(distributed.Client, "compute",
          probe.timed("client.compute", distributed.Client.compute))
    run_dec, group_step = dstep.run_decomposition, jobs._Context.group_step

    def run_decomposition(*args: Any, **kwargs: Any) -> Any:
        probe.mark("decompose")
        try:
            return run_dec(*args, **kwargs)
        finally:
            probe.mark("decompose-done")

    def group_step_(self: Any, *args: Any, **kwargs: Any) -> Any:
        probe.mark("group-step")
        try:
            return group_step(self, *args, **kwargs)
        finally:
            probe.mark("group-step-done")

    patch(dstep, "run_decomposition", run_decomposition)
    patch(jobs._Context, "group_step", group_step_)
    try:
        yield
    finally:
        for owner, attr, old in reversed(saved):
            setattr(owner, attr, old)


def phases(marks: list[tuple[str, dict]]) -> list[tuple[str, dict, dict]]:
    """(phase name, start snapshot, end snapshot) from the ordered marks."""
    names = {"submit": "setup (open store, select runs)", "runs": "runs (per-run graphs)",
             "runs-done": "between runs and decomposition", "decompose": "group ICA fit (MIGP)",
             "dual-regression": "dual regression", "decompose-done": "(gap)",
             "group-step": "group step (stack, means, Welch)", "group-step-done":
                 "report (runs TSV)", "ingest": "ingest", "ingest-done": "(gap)"}
    out = []
    for (a, sa), (_, sb) in itertools.pairwise(marks):
        out.append((names.get(a, a), sa, sb))
    return out


def graph_size(job: dict, store: Path, decompose: bool) -> dict[str, float]:
    """Tasks of one run's graph as submitted by the driver, and build costs (ms)."""
    import dask

    import storage
    from pipeline.jobs import Pipeline, _Context

    pipe = Pipeline(job)
    bs = storage.open_store(store)
    ctx = _Context(pipe, bs)
    groups = list(bs.runs()["group"][:20])
    out: dict[str, float] = {}
    graph, _ = ctx.build(groups[0])
    d = dask.delayed(graph)
    out["tasks"] = len(d.__dask_graph__())
    (opt,) = dask.optimize(d)
    out["tasks_optimized"] = len(opt.__dask_graph__())
    for name, fn in (("open_group", lambda g: bs.open_group(g, chunks=None)),
                     ("provenance", ctx.provenance), ("build", ctx.build)):
        t0 = time.perf_counter()
        for g in groups:
            fn(g)
        out[f"{name}_ms"] = 1e3 * (time.perf_counter() - t0) / len(groups)
    if decompose:
        from pipeline.decompose_step import _prepared

        mask = ctx.group_mask()
        _, matrix = _prepared(ctx, groups[0], mask)
        out["decompose_tasks"] = len(matrix.data.__dask_graph__())
    return out


def profile_job_text(job: dict, client: Any, top: int = 25) -> str:
    """cProfile of the Pipeline's driver thread for ``job``; the top functions as text."""
    wall, text = profile_job(job, client, (top, top))
    return f"profiled job wall time: {wall:.1f} s (with cProfile overhead)\n" + text


# ------------------------------------------------------------------------- one size


def measure_size(n: int, full: Path, args: argparse.Namespace, work: Path) -> dict:
    """Ingest + job for the first ``n`` subjects on a fresh cluster; all measurements."""
    from distributed import Client, LocalCluster

    import storage
    from pipeline.cluster import default_local_cluster_kwargs
    from pipeline.jobs import Pipeline

    view = subset_view(full, n)
    store, output = work / f"n{n}.zarr", work / f"out-n{n}"
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(output, ignore_errors=True)
    res: dict[str, Any] = {"n": n}
    with LocalCluster(**default_local_cluster_kwargs(args.workers, args.memory_limit)) \
            as cluster, Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
        client.run(lambda: [__import__(m) for m in (
            "storage", "pipeline.jobs", "pipeline.signal", "pipeline.parcellation",
            "pipeline.decomposition.group", "nilearn.signal")])
        for mod in ("pipeline.jobs", "pipeline.signal", "pipeline.decompose_step",
                    "pipeline.decomposition.group", "pipeline.decomposition.dualreg",
                    "pipeline.connectivity", "nilearn", "scipy"):
            __import__(mod)  # import cost is not pipeline cost
        tasklog = TaskLog()
        cluster.scheduler.add_plugin(tasklog)
        probe = Probe(pids, cluster.scheduler)
        sampler = Sampler([os.getpid(), *pids])
        sampler.start()
        clock = time.time() - time.perf_counter()
        try:
            probe.mark("ingest")
            cat = storage.ingest(view, store, client=client)
            probe.mark("ingest-done")
            if not (cat["status"] == "complete").all():
                raise RuntimeError(f"ingest failures: {cat['error'].dropna().tolist()[:3]}")
            job = job_config(store, output, view, args.decompose)
            with instrumented(probe):
                probe.mark("submit")
                handle = Pipeline(job).submit(client, echo=probe.echo)
                result = handle.result()
                if probe.marks[-1][0] != "end":
                    probe.mark("end")
        finally:
            sampler.stop()
        restarted = sorted(set(client.run(os.getpid).values()) ^ set(pids))
        failed = result.failures
        res.update({
            "marks": probe.marks, "calls": {k: tuple(v) for k, v in probe.calls.items()},
            "tasks": tasklog.rows, "clock": clock, "sampler": sampler, "pids": pids,
            "n_runs": probe.n_runs, "failed": len(failed),
            "failed_examples": failed[["run_id", "stage", "error"]].head(3).to_dict("records"),
            "group_errors": list(result.group_errors),
            "compared": "correlation" in result.comparisons,
            "n_edges_sig": int((result.comparisons["correlation"].edges["p_fdr"] < 0.05).sum())
            if "correlation" in result.comparisons
            and "p_fdr" in result.comparisons["correlation"].edges else None,
            "restarted_workers": restarted,
            "store_mb": sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / MB,
        })
        del result
        res["graph"] = graph_size(job_config(store, output, view, args.decompose), store,
                                  args.decompose)
        if args.profile_size == n:
            prof_out = work / f"out-n{n}-profile"
            shutil.rmtree(prof_out, ignore_errors=True)
            res["profile"] = profile_job_text(job_config(store, prof_out, view, args.decompose),
                                         client)
            shutil.rmtree(prof_out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(output, ignore_errors=True)
    return res


# ------------------------------------------------------------------------- report


def phase_rows(res: dict) -> list[dict]:
    """Per-phase numbers of one size."""
    rows = []
    n = res["n"]
    sampler, pids, clock = res["sampler"], res["pids"], res["clock"]
    me = os.getpid()
    for name, a, b in phases(res["marks"]):
        wall = b["t"] - a["t"]
        if name == "(gap)" or (wall < 0.05 and name.startswith(("between", "report"))):
            continue
        t0w, t1w = a["t"] + clock, b["t"] + clock
        done = [r for r in res["tasks"] if t0w <= r[0] <= t1w]
        busy = sum(r[2] for r in done)
        peaks = sampler.peaks(a["t"], b["t"])
        threads_a, threads_b = a["threads"], b["threads"]
        driver = threads_b.get("driver", 0.0) - threads_a.get("driver", 0.0)
        loop = threads_b.get("loop", 0.0) - threads_a.get("loop", 0.0)
        rows.append({
            "n": n, "phase": name, "wall": wall, "per_sub": wall / n,
            "cpu_workers": b["cpu_workers"] - a["cpu_workers"],
            "cpu_client": b["cpu_client"] - a["cpu_client"],
            "cpu_driver": max(driver, 0.0), "cpu_loop": max(loop, 0.0),
            "tasks": len(done), "tasks_per_s": len(done) / wall if wall > 0 else 0.0,
            "occupancy": busy / (len(pids) * wall) if wall > 0 else 0.0,
            "transitions": b["transitions"] - a["transitions"],
            "rss_workers": [peaks[p] / MB for p in pids], "rss_client": peaks[me] / MB,
            "load": b["load"],
            "prefixes": collections.Counter(r[1] for r in done),
        })
    return rows


def machine_facts(args: argparse.Namespace, gen_seconds: float) -> list[str]:
    return [
        *machine_lines(),
        f"- data: simulated subjects (`simulate_dataset`, seed 0), {args.shape.replace(',', 'x')}"
        f" at 3 mm x {args.volumes} volumes, {args.dtype}, 1 run each; generated once "
        f"({args.max_subjects} subjects in {gen_seconds:.0f} s, serially) and hard-linked into "
        "one folder per size",
        f"- cluster: LocalCluster({args.workers} worker processes x 1 thread, memory_limit="
        f"{args.memory_limit} each); the scheduler runs in the client process (LocalCluster)",
        f"- job: clean {CLEAN['strategy']} at region level (detrend, zscore_sample, 0.009-0.08 "
        "Hz), labels of the simulated atlas, correlation + Welch two-group comparison"
        + (", group ICA (MIGP, 20 components) + dual regression" if args.decompose else ""),
    ]


def report(results: list[dict], args: argparse.Namespace, say: Callable[[str], None]) -> None:
    rows = [r for res in results for r in phase_rows(res)]
    say("\n### Phases\n")
    say("| subjects | phase | wall s | s/subject | CPU s workers | CPU s client (driver "
        "thread / event loop = scheduler) | tasks | tasks/s | worker occupancy | peak RSS "
        "workers MB | peak RSS client MB | load avg |")
    say("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        say(f"| {r['n']} | {r['phase']} | {r['wall']:.1f} | {r['per_sub']:.3f} | "
            f"{r['cpu_workers']:.1f} | {r['cpu_client']:.1f} ({r['cpu_driver']:.1f} / "
            f"{r['cpu_loop']:.1f}) | {r['tasks']} | {r['tasks_per_s']:.0f} | "
            f"{r['occupancy']:.0%} | "
            + " / ".join(f"{v:.0f}" for v in r["rss_workers"])
            + f" | {r['rss_client']:.0f} | {r['load']:.1f} |")

    say("\n### Per-subject cost vs subjects (flat = scales linearly)\n")
    keys = ["ingest", "runs (per-run graphs)", "group ICA fit (MIGP)", "dual regression",
            "group step (stack, means, Welch)"]
    say("| subjects | " + " | ".join(f"{k} s/subject" for k in keys)
        + " | whole job (excl. ingest) s | total s/subject | client peak RSS MB | "
          "max worker peak RSS MB | failed runs | group comparison |")
    say("|---|" + "---|" * (len(keys) + 6))
    for res in results:
        mine = {r["phase"]: r for r in rows if r["n"] == res["n"]}
        marks = dict(res["marks"])
        job_wall = marks["end"]["t"] - marks["submit"]["t"]
        total = marks["end"]["t"] - marks["ingest"]["t"]
        cells = [f"{mine[k]['per_sub']:.3f}" if k in mine else "-" for k in keys]
        peak_c = max(r["rss_client"] for r in mine.values())
        peak_w = max(max(r["rss_workers"]) for r in mine.values())
        cmp_txt = "done" if res["compared"] else f"**missing** {res['group_errors']}"
        if res.get("n_edges_sig") is not None:
            cmp_txt += f" ({res['n_edges_sig']} edges p_FDR < 0.05)"
        say(f"| {res['n']} | " + " | ".join(cells)
            + f" | {job_wall:.1f} | {total / res['n']:.3f} | {peak_c:.0f} | {peak_w:.0f} | "
              f"{res['failed']} | {cmp_txt} |")

    say("\n### Driver thread: where the runs phase goes (wrapped calls, inclusive, from the "
        "job thread only)\n")
    say("| subjects | runs wall s | driver CPU s | driver CPU / wall | call | calls | ms/call "
        "| s total | share of runs wall |")
    say("|---|---|---|---|---|---|---|---|---|")
    for res in results:
        run_row = next((r for r in rows if r["n"] == res["n"]
                        and r["phase"] == "runs (per-run graphs)"), None)
        if run_row is None:
            continue
        first = True
        for name, (count, sec) in sorted(res["calls"].items(), key=lambda kv: -kv[1][1]):
            lead = (f"| {res['n']} | {run_row['wall']:.1f} | {run_row['cpu_driver']:.1f} | "
                    f"{run_row['cpu_driver'] / run_row['wall']:.0%} |" if first
                    else "| | | | |")
            first = False
            say(f"{lead} {name} | {count} | {1e3 * sec / max(count, 1):.1f} | {sec:.1f} | "
                f"{sec / run_row['wall']:.0%} |")
    say("\n(The wrapped calls are counted over the whole job, runs and decomposition; "
        "`open_group` is also counted inside `provenance` and `build`.)")

    say("\n### Graph size and scheduler load\n")
    say("| subjects | tasks per run graph (submitted / after dask.optimize) | tasks run per "
        "subject, runs phase | tasks per subject, decomposition | build ms/run | provenance "
        "ms/run | open_group ms | scheduler transitions per task (runs) |")
    say("|---|---|---|---|---|---|---|---|")
    for res in results:
        g = res["graph"]
        mine = {r["phase"]: r for r in rows if r["n"] == res["n"]}
        runs_r = mine.get("runs (per-run graphs)")
        dec = sum(mine[k]["tasks"] for k in ("group ICA fit (MIGP)", "dual regression")
                  if k in mine)
        dec_txt = f"{dec / res['n']:.1f}" if dec else "-"
        if "decompose_tasks" in g:
            dec_txt += f" (one subject's prepared matrix: {g['decompose_tasks']} tasks)"
        say(f"| {res['n']} | {g['tasks']} / {g['tasks_optimized']} | "
            f"{runs_r['tasks'] / res['n']:.1f} | {dec_txt} | {g['build_ms']:.1f} | "
            f"{g['provenance_ms']:.1f} | {g['open_group_ms']:.1f} | "
            f"{runs_r['transitions'] / max(runs_r['tasks'], 1):.1f} |")
    for res in results:
        mine = [r for r in rows if r["n"] == res["n"]]
        for r in mine:
            if r["tasks"] and r["phase"] in ("runs (per-run graphs)", "group ICA fit (MIGP)",
                                             "dual regression", "ingest"):
                top = ", ".join(f"{k} {v}" for k, v in r["prefixes"].most_common(6))
                say(f"- {res['n']} subjects, {r['phase']}: {top}")
        if res["failed"] or res["restarted_workers"] or res["group_errors"]:
            say(f"- {res['n']} subjects: {res['failed']} failed runs "
                f"{res['failed_examples']}, restarted workers {res['restarted_workers']}, "
                f"group errors {res['group_errors']}")
        say(f"- {res['n']} subjects: store {res['store_mb']:.0f} MB on disk")


# ------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,250,500,1000",
                    help="comma-separated subject counts, each measured on a fresh cluster")
    ap.add_argument("--max-subjects", type=int, default=1000,
                    help="subjects generated once (the sizes are views of the first N)")
    ap.add_argument("--shape", default="20,24,20")
    ap.add_argument("--volumes", type=int, default=150)
    ap.add_argument("--dtype", default="float32", choices=["int16", "float32"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="2GiB")
    ap.add_argument("--no-decompose", dest="decompose", action="store_false",
                    help="skip the group ICA step")
    ap.add_argument("--profile-size", type=int, default=None,
                    help="repeat the job at this size with cProfile on the driver thread")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "bf-bench-data")
    ap.add_argument("--work", type=Path, default=None,
                    help="folder for stores and outputs (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep stores and outputs")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    sizes = sorted(int(s) for s in args.sizes.split(","))
    if sizes[-1] > args.max_subjects:
        ap.error(f"--max-subjects ({args.max_subjects}) < largest size ({sizes[-1]})")
    shape = tuple(int(s) for s in args.shape.split(","))
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    full, gen_seconds = make_data(args.data, args.max_subjects, shape, args.volumes,
                                  args.dtype)
    out: list[str] = []

    def say(line: str = "") -> None:
        out.append(line)
        print(line, flush=True)

    results = []
    with contextlib.ExitStack() as stack:
        if args.work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bf-scale-")))
        else:
            work = args.work
            work.mkdir(parents=True, exist_ok=True)
        for n in sizes:
            t0 = time.perf_counter()
            res = measure_size(n, full, args, work)
            results.append(res)
            print(f"# {n} subjects measured in {time.perf_counter() - t0:.0f} s", flush=True)
        say(f"\ncommand: python {' '.join(sys.argv)}\n")
        for line in machine_facts(args, gen_seconds):
            say(line)
        say(f"- load average at start: {load0[0]:.1f} (1 min), {load0[1]:.1f} (5 min)")
        report(results, args, say)
        for res in results:
            if "profile" in res:
                say(f"\n### cProfile of the driver thread, {res['n']} subjects\n")
                say("```")
                for line in res["profile"].splitlines():
                    say(line)
                say("```")
    say(f"\nload average at end: {os.getloadavg()[0]:.1f}; total script time "
        f"{time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
