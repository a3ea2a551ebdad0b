"""Clusters from a job's ``cluster`` section: validation, job scripts, real schedulers.

No batch job is ever submitted: SLURM/PBS clusters are built (their scheduler starts in
this process) and their job scripts checked, never scaled.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import dask
import pytest

from pipeline.cluster import client_from_config, cluster_client, make_cluster
from pipeline.config import ClusterConfig, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
JOB = {"input": "derivs", "output": "out"}
QUIET = {"scheduler_options": {"dashboard_address": ":0"}}


def _cluster_error(section: dict) -> str:
    with pytest.raises(ConfigError) as err:
        load_config({**JOB, "cluster": section})
    return str(err.value)


# ---------------------------------------------------------------------------- validation


def test_kind_defaults_and_errors_name_the_key_path():
    assert load_config(JOB).cluster.kind == "local"
    assert load_config({**JOB, "cluster": {"address": "tcp://h:8786"}}).cluster.kind == \
        "address"
    msg = _cluster_error({"kind": "slurmm"})
    assert "cluster.kind" in msg and "'slurm'" in msg and "'kubernetes'" in msg
    assert "cluster.adapt.maximum: Field required" in _cluster_error({"adapt": {"minimum": 1}})
    assert "cluster.adapt: Value error, minimum (3) is above maximum (2)" in _cluster_error(
        {"adapt": {"minimum": 3, "maximum": 2}})
    assert "cluster.options_: unknown key" in _cluster_error({"options_": {}})
    assert "needs address" in _cluster_error({"kind": "address"})
    assert "n_workers do(es) not apply" in _cluster_error(
        {"address": "tcp://h:8786", "n_workers": 4})
    assert "address is for kind 'address'" in _cluster_error(
        {"kind": "slurm", "address": "tcp://h:8786"})
    assert "options: {memory: 16GiB}" in _cluster_error(
        {"kind": "slurm", "memory_limit": "4GiB"})


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_kubernetes", None)
    monkeypatch.setitem(sys.modules, "dask_kubernetes.operator", None)
    with pytest.raises(ConfigError) as err:
        make_cluster(ClusterConfig(kind="kubernetes", n_workers=2,
                                   options={"name": "bf", "image": "boldflow:latest"}))
    msg = str(err.value)
    assert "dask-kubernetes" in msg and 'pip install "boldflow[kubernetes]"' in msg
    assert isinstance(err.value.__cause__, ImportError)
    monkeypatch.setitem(sys.modules, "dask_gateway", None)
    with pytest.raises(ConfigError, match=r'pip install "boldflow\[gateway\]"'):
        client_from_config({"kind": "gateway", "address": "https://gw.example.org"})


# ---------------------------------------------------------------------------- SLURM / PBS


def test_slurm_job_script_from_the_config():
    pytest.importorskip("dask_jobqueue")
    cfg = ClusterConfig(kind="slurm", options={
        "cores": 4, "processes": 2, "memory": "16GiB", "queue": "short",
        "walltime": "01:30:00", "account": "lab",
        "job-script-prologue": ["source /opt/bf/bin/activate"], **QUIET})
    cluster = make_cluster(cfg)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH -p short" in script and "#SBATCH -A lab" in script
    assert "#SBATCH --cpus-per-task=4" in script
    assert "#SBATCH --mem=16G" in script and "#SBATCH -t 01:30:00" in script
    assert "source /opt/bf/bin/activate" in script  # dashed key, as in jobqueue.yaml
    worker = next(line for line in script.splitlines() if "dask_worker" in line)
    assert worker.startswith(sys.executable) and cluster.scheduler_address in worker
    assert "--nworkers 2" in worker and "--nthreads 2" in worker
    assert "--memory-limit 8.00GiB" in worker


def test_deploy_slurm_job_file_builds_its_cluster():
    pytest.importorskip("dask_jobqueue")
    cfg = load_config(ROOT / "deploy" / "slurm" / "job.yaml").cluster
    assert cfg.kind == "slurm" and cfg.adapt.maximum == 64
    options = {**cfg.options, **QUIET}  # the file asks for the usual dashboard port
    cluster = make_cluster(cfg.model_copy(update={"options": options}))
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH -p normal" in script and "#SBATCH -t 04:00:00" in script
    assert "--nworkers 4" in script and "OMP_NUM_THREADS=1" in script


def test_pbs_job_script_and_bad_options():
    pytest.importorskip("dask_jobqueue")
    cluster = make_cluster(ClusterConfig(kind="pbs", options={
        "cores": 2, "memory": "8GiB", "queue": "workq", "walltime": "00:30:00", **QUIET}))
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#PBS -q workq" in script and "walltime=00:30:00" in script
    with pytest.raises(ConfigError, match=r"cluster.options: SLURMCluster.*bogus"):
        make_cluster(ClusterConfig(kind="slurm", options={"cores": 1, "memory": "1GiB",
                                                          "bogus": 3, **QUIET}))


# ---------------------------------------------------------------------------- real clusters


@pytest.mark.distributed
def test_address_connects_to_a_running_scheduler(dask_processes):
    address, _ = dask_processes
    client, cluster = client_from_config({"address": address})
    try:
        assert cluster is None  # not ours to close
        assert client.scheduler.address == address
        assert len(client.scheduler_info()["workers"]) == 2
        assert client.submit(sum, [1, 2]).result() == 3
    finally:
        client.close()
    lines: list[str] = []
    with cluster_client(config={"kind": "address", "address": address},
                        echo=lines.append) as c:
        assert c.submit(len, "abc").result() == 3
    assert lines[0].startswith("Dask dashboard: http://")


def test_unreachable_scheduler_is_a_config_error():
    from tests.conftest import free_port

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}), \
            pytest.raises(ConfigError, match=r"cluster\.address: cannot reach"):
        client_from_config({"address": f"tcp://127.0.0.1:{free_port()}"})


def test_local_cluster_options_and_adapt():
    client, cluster = client_from_config({"adapt": {"minimum": 0, "maximum": 2},
                                          "options": {"processes": False}})
    try:
        assert cluster.processes is False and not cluster.workers  # adaptive, from zero
        assert cluster._adaptive is not None and cluster._adaptive.maximum == 2
    finally:
        client.close()
        cluster.close()
    with cluster_client(n_workers=1, memory_limit="1GiB", quiet=True) as c:
        info = c.scheduler_info()["workers"]
        assert len(info) == 1
        assert next(iter(info.values()))["memory_limit"] == 2**30


def _wait_event(name: str, i: int) -> int:
    from distributed import Event

    Event(name).wait(30)
    return i


def _processing_per_worker(dask_scheduler) -> list[int]:
    return sorted(len(ws.processing) for ws in dask_scheduler.workers.values())


def test_local_scheduler_gives_a_queued_task_only_to_a_free_worker():
    # single-threaded workers under distributed's default saturation (1.1) each hold a
    # second queued task behind the running one, which is never stolen: the last long
    # task can start behind another while a worker idles
    from distributed import Event, wait

    client, cluster = client_from_config({"n_workers": 2, "options": {"processes": False}})
    try:
        gate = Event("bf-gate", client=client)
        # one graph update, as ingestion submits its runs
        futs = client.map(_wait_event, ["bf-gate"] * 8, range(8), pure=False)
        deadline = time.monotonic() + 30
        while client.run_on_scheduler(_processing_per_worker) != [1, 1]:
            assert time.monotonic() < deadline, client.run_on_scheduler(_processing_per_worker)
            time.sleep(0.05)
        time.sleep(0.2)  # nothing more is handed out while both run
        assert client.run_on_scheduler(_processing_per_worker) == [1, 1]
        queued = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.queued))
        assert queued == 6
        gate.set()
        wait(futs)
        assert client.gather(futs) == list(range(8))
    finally:
        client.close()
        cluster.close()
    # a value the user configured is theirs
    with dask.config.set({"distributed.scheduler.worker-saturation": 2.0}):
        client, cluster = client_from_config({"n_workers": 1,
                                              "options": {"processes": False}})
    try:
        assert client.run_on_scheduler(
            lambda dask_scheduler: dask_scheduler.WORKER_SATURATION) == 2.0
    finally:
        client.close()
        cluster.close()
