"""A worker killed mid-run, and runs larger than a worker's memory limit."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import storage
from pipeline.jobs import Pipeline
from pipeline.simulate import simulate_dataset
from tests.conftest import dask_cluster_processes

pytestmark = pytest.mark.distributed


@pytest.fixture
def three_workers(tmp_path):
    """``dask scheduler`` + 3 ``dask worker`` processes (no nanny: a killed one stays dead)."""
    with dask_cluster_processes(tmp_path / "dask", 3,
                                worker_args=("--memory-limit", "1GiB", "--no-nanny")) as (
            address, _, workers):
        yield address, workers


def _job(sim, out, store):
    return {"input": str(sim.root), "output": str(out), "store": str(store),
            "clean": {"strategy": "simple", "high_pass": 0.01, "low_pass": 0.1,
                      "level": "voxel"},
            "parcellate": {"atlas": str(sim.atlas), "name": "sim"},
            "connectivity": {"kinds": ["pearson"], "groups": "group"}}


def test_worker_killed_mid_run_gives_identical_results(tmp_path, three_workers):
    from distributed import Client

    address, workers = three_workers
    sim = simulate_dataset(tmp_path / "derivs", n_subjects=6, shape=(24, 28, 22),
                           n_volumes=120, seed=4)
    with Client(address) as client:
        ref = Pipeline(_job(sim, tmp_path / "ref", tmp_path / "ref.zarr")).submit(client).result()
        job = Pipeline(_job(sim, tmp_path / "out", tmp_path / "out.zarr")).submit(client)
        # kill a worker while it works (ingest or per-run graphs are in flight)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(client.processing().values()):
            time.sleep(0.01)
        victim = workers[0]
        os.kill(victim.pid, signal.SIGKILL)
        result = job.result(timeout=600)
    assert victim.poll() is not None
    assert (result.runs["status"] == "complete").all(), result.runs["error"].tolist()
    np.testing.assert_allclose(result.matrices["pearson"].values,
                               ref.matrices["pearson"].values, rtol=1e-10, atol=1e-12)
    # every run in the store is complete: nothing partial is marked complete
    root = zarr.open_group(storage.StoreRef.coerce(tmp_path / "out.zarr").open(), mode="r")
    for group in storage.open_store(tmp_path / "out.zarr").runs()["group"]:
        assert root[group].attrs["boldflow_status"] == "complete"
        a = storage.open_store(tmp_path / "out.zarr").open_group(group)["bold"].values
        b = storage.open_store(tmp_path / "ref.zarr").open_group(group)["bold"].values
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_runs_larger_than_worker_memory(tmp_path):
    """A run whose float64 working data is > 2x a worker's memory limit (and larger than
    the limit on disk): it completes, and no worker is killed or restarted for memory."""
    from distributed import Client, LocalCluster

    n_volumes = 700
    sim = simulate_dataset(tmp_path / "derivs", n_subjects=1, shape=(64, 72, 56),
                           n_volumes=n_volumes, seed=1)
    voxels = 64 * 72 * 56 * n_volumes
    limit = 600 * 2**20  # a worker with nilearn imported sits at ~250 MB
    assert voxels * 4 > limit and voxels * 8 > 2 * limit
    job = _job(sim, tmp_path / "out", tmp_path / "s.zarr")
    job["connectivity"] = None
    job["block_bytes"] = "32MiB"  # small workers: smaller blocks per task
    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit=limit,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        storage.ingest(sim.root, tmp_path / "s.zarr", client=client, chunk_bytes="4MiB",
                       batch_bytes="32MiB")
        job["input"] = str(tmp_path / "s.zarr")
        before = set(client.scheduler_info()["workers"])
        result = Pipeline(job).submit(client).result()
        after = set(client.scheduler_info()["workers"])
    assert (result.runs["status"] == "complete").all(), result.runs["error"].tolist()
    assert before == after  # the same worker processes: none was restarted
    ts = next(Path(tmp_path / "out").rglob("*_stat-mean_timeseries.tsv"))
    assert len(ts.read_text().splitlines()) == n_volumes + 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
