"""Getting a Dask client from a job's ``cluster`` section.

:func:`make_cluster` builds the cluster object a :class:`~pipeline.config.ClusterConfig`
describes (a LocalCluster, a dask-jobqueue SLURM/PBS cluster, a dask-kubernetes
``KubeCluster`` or a Dask Gateway cluster) without asking for workers;
:func:`client_from_config` adds the scaling (``n_workers`` or ``adapt``) and the client,
and is what :meth:`pipeline.jobs.Pipeline.submit` and :func:`cluster_client` use.
The optional cluster managers are imported only when their kind is asked for; a missing
one is a :class:`~pipeline.config.ConfigError` naming the extra to install.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import psutil

from .config import ClusterConfig, ConfigError

__all__ = ["client_from_config", "cluster_client", "default_local_cluster_kwargs",
           "make_cluster"]

log = logging.getLogger(__name__)

#: kind -> (module, attribute, distribution, extra)
_MANAGERS: dict[str, tuple[str, str, str, str]] = {
    "slurm": ("dask_jobqueue", "SLURMCluster", "dask-jobqueue", "slurm"),
    "pbs": ("dask_jobqueue", "PBSCluster", "dask-jobqueue", "pbs"),
    "kubernetes": ("dask_kubernetes.operator", "KubeCluster", "dask-kubernetes", "kubernetes"),
    "gateway": ("dask_gateway", "Gateway", "dask-gateway", "gateway"),
}


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


#: distributed's shipped default for ``distributed.scheduler.worker-saturation``
_DASK_DEFAULT_SATURATION = 1.1


@contextlib.contextmanager
def _in_process_scheduler_config() -> Iterator[None]:
    """Config for a scheduler started in this process (read when it starts).

    Queued (root-ish) tasks go to a worker only while it has fewer than
    ``ceil(worker-saturation * nthreads)`` tasks; for the single-threaded workers used
    here the default 1.1 means two: each worker holds one task ready behind the running
    one, and queued tasks are not stolen. With runs ingested as one task of seconds each,
    a worker then starts the last run queued behind its current one while the other
    worker idles (measured: one worker busy 10.6 s, the other 8.8 s, of a 10.9 s job;
    tests/benchmarks/RESULTS.md, session 9). 1.0 hands a task to a worker only when it
    is free, at the cost of one scheduler round trip (~ms) between tasks. A value the
    user configured (anything but distributed's default) is kept.
    """
    import dask

    key = "distributed.scheduler.worker-saturation"
    current = dask.config.get(key, _DASK_DEFAULT_SATURATION)
    if str(current) != str(_DASK_DEFAULT_SATURATION):
        yield
        return
    with dask.config.set({key: 1.0}):
        yield


def _manager(kind: str) -> Any:
    """The cluster-manager class (or Gateway) of ``kind``; a clear error if not installed."""
    module, attr, dist, extra = _MANAGERS[kind]
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise ConfigError(f"cluster.kind: {kind!r} needs {dist}, which is not installed: "
                          f'pip install "boldflow[{extra}]"') from e


def _options(cfg: ClusterConfig) -> dict[str, Any]:
    # keys as in jobqueue.yaml (job-script-prologue) or as keyword arguments (job_script_...)
    return {str(k).replace("-", "_"): v for k, v in cfg.options.items()}


def make_cluster(cfg: ClusterConfig) -> Any:
    """The cluster ``cfg`` describes, started but not scaled (no batch job is submitted).

    Parameters
    ----------
    cfg : ClusterConfig
        A validated ``cluster`` section of any kind but ``address``.

    Returns
    -------
    distributed.deploy.Cluster or dask_gateway.GatewayCluster
        The caller owns it (``close()`` it). ``kind: local`` gives a
        :class:`distributed.LocalCluster` sized by :func:`default_local_cluster_kwargs`
        (``n_workers`` workers, or none to start with when ``adapt`` is set), with
        ``options`` overriding; ``kubernetes`` passes ``n_workers`` to ``KubeCluster``.

    Notes
    -----
    The schedulers started here (``local``, ``slurm``, ``pbs``) give a worker a queued
    task only when it is free (``distributed.scheduler.worker-saturation`` 1.0 unless
    configured otherwise; see ``_in_process_scheduler_config``); ``deploy/k8s`` sets the same
    for its scheduler pod.

    Raises
    ------
    ConfigError
        For kind ``address`` (nothing to start), a missing optional package (naming the
        extra to install) or options the cluster class does not accept.

    Examples
    --------
    >>> cfg = ClusterConfig(kind="slurm", options={"cores": 4, "memory": "16GiB",
    ...                                            "queue": "short"})
    >>> print(make_cluster(cfg).job_script())  # doctest: +SKIP
    """
    kind = cfg.kind
    options = _options(cfg)
    if kind == "address":
        raise ConfigError("cluster.kind: 'address' connects to a running scheduler; there "
                          "is no cluster to start (use client_from_config)")
    if kind == "local":
        from distributed import LocalCluster

        kwargs = default_local_cluster_kwargs(cfg.n_workers, cfg.memory_limit)
        if cfg.adapt is not None and cfg.n_workers is None:
            kwargs["n_workers"] = cfg.adapt.minimum
        manager: Any = LocalCluster
        options = {**kwargs, **options}
    else:
        manager = _manager(kind)
        if kind == "kubernetes" and cfg.n_workers is not None:
            options.setdefault("n_workers", cfg.n_workers)
    try:
        if kind == "gateway":
            gateway = manager(address=cfg.address) if cfg.address else manager()
            return gateway.new_cluster(**options)
        if kind in ("local", "slurm", "pbs"):  # their scheduler starts in this process
            with _in_process_scheduler_config():
                # slurm, pbs: no job is submitted here; workers come with scale() / adapt()
                return manager(**options)
        return manager(**options)
    except (TypeError, ValueError) as e:  # an option the class does not take, or lacks
        what = "Gateway.new_cluster" if kind == "gateway" else manager.__name__
        raise ConfigError(f"cluster.options: {what} (kind {kind!r}): {e}") from e


def client_from_config(cfg: ClusterConfig | dict | None = None) -> tuple[Any, Any | None]:
    """A :class:`distributed.Client` for ``cfg``, and the cluster it started (if any).

    Parameters
    ----------
    cfg : ClusterConfig or dict, optional
        The job's ``cluster`` section (default: a LocalCluster sized to the machine).

    Returns
    -------
    client : distributed.Client
        Connected; the caller closes it.
    cluster : cluster object or None
        The cluster started here (the caller closes it after the client), or None when
        connecting to an existing scheduler (``kind: address``).

    Notes
    -----
    After start, ``adapt`` (if set) calls ``cluster.adapt(minimum=, maximum=)``; otherwise
    ``n_workers`` calls ``cluster.scale(n_workers)`` for the batch-system and gateway kinds
    (LocalCluster and KubeCluster take it at start).
    """
    from distributed import Client

    if cfg is None:
        cfg = ClusterConfig()
    elif isinstance(cfg, dict):
        cfg = ClusterConfig.model_validate(cfg)
    if cfg.kind == "address":
        try:
            return Client(cfg.address), None
        except OSError as e:
            raise ConfigError(f"cluster.address: cannot reach the scheduler at "
                              f"{cfg.address} ({e})") from e
    cluster = make_cluster(cfg)
    try:
        if cfg.adapt is not None:
            cluster.adapt(minimum=cfg.adapt.minimum, maximum=cfg.adapt.maximum)
        elif cfg.n_workers is not None and cfg.kind in ("slurm", "pbs", "gateway"):
            cluster.scale(cfg.n_workers)
        client = cluster.get_client() if cfg.kind == "gateway" else Client(cluster)
    except BaseException:
        with contextlib.suppress(Exception):
            cluster.close()
        raise
    log.debug("started %s cluster %r", cfg.kind, cluster)
    return client, cluster


@contextlib.contextmanager
def cluster_client(address: str | None = None, *, n_workers: int | None = None,
                   memory_limit: str | int | None = None, quiet: bool = False,
                   echo: Callable[..., object] = print,
                   config: ClusterConfig | dict | None = None) -> Iterator[Any]:
    """Yield a :class:`distributed.Client`, printing the dashboard link; close on exit.

    Parameters
    ----------
    address : str, optional
        Scheduler address (``tcp://host:8786``). None: start a LocalCluster.
    n_workers, memory_limit : optional
        LocalCluster sizing (see :func:`default_local_cluster_kwargs`).
    quiet : bool, default=False
        Do not print the dashboard link.
    echo : callable, default=print
        Prints the dashboard line.
    config : ClusterConfig or dict, optional
        A full ``cluster`` section instead of ``address``/``n_workers``/``memory_limit``
        (any kind: see :func:`client_from_config`).
    """
    if config is None:
        config = ClusterConfig(address=address, n_workers=None if address else n_workers,
                               memory_limit=None if address else memory_limit)
    client, cluster = client_from_config(config)
    try:
        if not quiet:
            echo(f"Dask dashboard: {client.dashboard_link}")
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
