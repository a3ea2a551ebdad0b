"""Shared measuring helpers of the benchmark scripts (not collected by pytest)."""

from __future__ import annotations

import contextlib
import os
import platform
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import psutil

__all__ = ["Sampler", "machine_lines", "proc_cpu"]


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
