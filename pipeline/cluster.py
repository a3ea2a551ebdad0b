"""Getting a Dask client: an existing scheduler, or an embedded LocalCluster."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import psutil

__all__ = ["cluster_client", "default_local_cluster_kwargs"]

log = logging.getLogger(__name__)


def default_local_cluster_kwargs(n_workers: int | None = None,
                                 memory_limit: str | int | None = None) -> dict:
    """LocalCluster sizing: one single-threaded worker process per core, memory split evenly.

    Single-threaded processes because the heavy parts (gunzip, NumPy kernels) are
    GIL-friendly only in part, and a process per worker gives each its own memory limit.
    """
    cores = os.cpu_count() or 1
    n = int(n_workers or cores)
    if memory_limit is None:
        # leave a quarter of the machine to the client and the OS
        memory_limit = int(psutil.virtual_memory().total * 0.75 / n)
    return {"n_workers": n, "threads_per_worker": 1, "memory_limit": memory_limit,
            "processes": True, "dashboard_address": ":0"}


@contextlib.contextmanager
def cluster_client(address: str | None = None, *, n_workers: int | None = None,
                   memory_limit: str | int | None = None, quiet: bool = False,
                   echo=print) -> Iterator:
    """Yield a :class:`distributed.Client`, printing the dashboard link.

    Parameters
    ----------
    address : str, optional
        Scheduler address (``tcp://host:8786``). None: start a LocalCluster.
    n_workers, memory_limit : optional
        LocalCluster sizing (see :func:`default_local_cluster_kwargs`).
    quiet : bool, default=False
        Do not print the dashboard link.
    """
    from distributed import Client, LocalCluster

    if address:
        client = Client(address)
        cluster = None
    else:
        cluster = LocalCluster(**default_local_cluster_kwargs(n_workers, memory_limit))
        client = Client(cluster)
    try:
        if not quiet:
            echo(f"Dask dashboard: {client.dashboard_link}")
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
