"""Shared fixtures: a real S3-compatible server and real Dask processes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ S3 (moto)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on a random loopback port (as s3fs and zarr test themselves).

    Yields the endpoint URL. Credentials are dummies exported as environment variables,
    so that worker processes started by tests authenticate like real ones would.
    """
    import logging

    from moto.server import ThreadedMotoServer

    # dummy credentials; real AWS configuration of the machine is hidden for the session
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/nonexistent/aws/config",
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws/credentials",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_PROFILE", "AWS_SESSION_TOKEN"]}
    os.environ.update(env)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(key, None)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket; yields ``(bucket_name, storage_options)``."""
    import boto3

    name = f"bf-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"},
               "use_listings_cache": False}
    return name, options


# ------------------------------------------------------------------- real Dask processes


def _dask_cli() -> list[str]:
    exe = Path(sys.executable).parent / "dask"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dask"]


@contextlib.contextmanager
def dask_cluster_processes(workdir: Path, n_workers: int = 2, *,
                           worker_args: tuple[str, ...] = ("--memory-limit", "2GiB")):
    """Start ``dask scheduler`` + ``n_workers`` ``dask worker`` processes on 127.0.0.1.

    Yields ``(address, scheduler_popen, worker_popens)``; tests may kill workers. Every
    process is stopped on exit.
    """
    from distributed import Client

    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(workdir / "dask.log", "w")  # noqa: SIM115 - closed in the finally below
    sched = subprocess.Popen([*_dask_cli(), "scheduler", "--host", "127.0.0.1", "--port",
                              str(port), "--dashboard-address", ":0"],
                             cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    workers = [subprocess.Popen([*_dask_cli(), "worker", address, "--nthreads", "1",
                                 "--host", "127.0.0.1", "--no-dashboard",
                                 "--local-directory", str(workdir / f"w{i}"), *worker_args],
                                cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
               for i in range(n_workers)]
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with Client(address, timeout=5) as client:
                    client.wait_for_workers(n_workers, timeout=60)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        yield address, sched, workers
    finally:
        for p in [*workers, sched]:
            p.terminate()
        for p in [*workers, sched]:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()


@pytest.fixture(scope="module")
def dask_processes(tmp_path_factory):
    """A ``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1.

    Yields ``(address, procs)`` where ``procs["workers"]`` are the worker Popen objects.
    """
    workdir = tmp_path_factory.mktemp("dask") / "dask-cwd"
    with dask_cluster_processes(workdir) as (address, sched, workers):
        yield address, {"scheduler": sched, "workers": workers}
    shutil.rmtree(workdir, ignore_errors=True)
