"""Shared measuring helpers of the benchmark scripts (not collected by pytest)."""

from __future__ import annotations

import contextlib
import cProfile
import io
import os
import platform
import pstats
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import cloudpickle
import numpy as np
import psutil

__all__ = ["Sampler", "machine_lines", "measured", "proc_cpu", "profile_job"]

# functions of this module sent with client.run are pickled by value: the workers need
# not import tests/benchmarks/_common.py
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Sampler(threading.Thread):
    """Polls the RSS of some processes until stopped; keeps each one's maximum.

    Parameters
    ----------
    pids : iterable of int
        Processes to watch.
    period : float, default=0.01
        Seconds between polls.
    """

    def __init__(self, pids: Iterable[int], period: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.procs = {pid: psutil.Process(pid) for pid in pids}
        self.period = period
        self.peaks = dict.fromkeys(self.procs, 0)
        self._stop_evt = threading.Event()

    def run(self) -> None:
        """Poll until :meth:`stop`."""
        while not self._stop_evt.is_set():
            for pid, proc in self.procs.items():
                with contextlib.suppress(psutil.Error):
                    self.peaks[pid] = max(self.peaks[pid], proc.memory_info().rss)
            time.sleep(self.period)

    def stop(self) -> dict[int, int]:
        """Stop polling; the peak RSS (bytes) of each process."""
        self._stop_evt.set()
        self.join()
        return self.peaks


def proc_cpu() -> float:
    """CPU seconds (user + system) of this process so far."""
    t = psutil.Process().cpu_times()
    return t.user + t.system


def machine_lines() -> list[str]:
    """Markdown bullet lines: CPU, RAM, OS, Python and the library versions."""
    import dask
    import distributed
    import nilearn
    import scipy
    import sklearn
    import zarr

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return [
        f"- machine: {os.cpu_count()} cores ({cpu}), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {platform.system()} "
        f"{platform.release()}; Python {platform.python_version()}",
        f"- numpy {np.__version__}, scipy {scipy.__version__}, scikit-learn "
        f"{sklearn.__version__}, nilearn {nilearn.__version__}, dask/distributed "
        f"{dask.__version__}/{distributed.__version__}, zarr {zarr.__version__}",
    ]


def _worker_cpu(client) -> float:
    return sum(client.run(proc_cpu).values())


@contextlib.contextmanager
def measured(client=None, worker_pids: Iterable[int] = ()) -> Iterator[dict]:
    """Wall time, CPU s (client process, workers) and peak RSS (client, each worker).

    Parameters
    ----------
    client : distributed.Client, optional
        Its workers' CPU time is read before and after.
    worker_pids : iterable of int
        Worker processes whose RSS is sampled.

    Yields
    ------
    dict
        Filled on exit: ``wall``, ``cpu_client``, ``cpu_workers``, ``rss_client``,
        ``rss_client_before``, ``rss_workers`` (list, one per worker), ``rss_workers_max``,
        ``rss_workers_before``, ``load`` (1-minute load average at the end).
    """
    worker_pids = list(worker_pids)
    me = os.getpid()
    rec: dict = {"rss_client_before": psutil.Process(me).memory_info().rss,
                 "rss_workers_before": [psutil.Process(p).memory_info().rss
                                        for p in worker_pids]}
    sampler = Sampler([me, *worker_pids])
    sampler.start()
    w0 = _worker_cpu(client) if client is not None else 0.0
    c0 = proc_cpu()
    t0 = time.perf_counter()
    try:
        yield rec
    finally:
        rec["wall"] = time.perf_counter() - t0
        rec["cpu_client"] = proc_cpu() - c0
        rec["cpu_workers"] = _worker_cpu(client) - w0 if client is not None else 0.0
        peaks = sampler.stop()
        rec["rss_client"] = peaks[me]
        rec["rss_workers"] = [peaks[p] for p in worker_pids]
        rec["rss_workers_max"] = max(rec["rss_workers"], default=0)
        rec["load"] = os.getloadavg()[0]


def profile_job(job: dict, client, top: tuple[int, int] = (40, 20)) -> tuple[float, str]:
    """cProfile of a Pipeline's driver thread ("boldflow-job") while ``job`` runs.

    Returns the job's wall time (with the profiler's overhead) and the top functions by
    cumulative and by own time.
    """
    from pipeline.jobs import Pipeline

    prof = cProfile.Profile()

    def hook(*_: object) -> None:
        sys.setprofile(None)
        if threading.current_thread().name == "boldflow-job":
            prof.enable()

    threading.setprofile(hook)
    try:
        handle = Pipeline(job).submit(client, echo=lambda *a, **k: None)
    finally:
        threading.setprofile(None)
    t0 = time.perf_counter()
    handle.result()
    wall = time.perf_counter() - t0
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("cumulative").print_stats(top[0])
    stats.sort_stats("tottime").print_stats(top[1])
    return wall, text.getvalue()
