"""The ``boldflow`` command as users run it: a real process, a real LocalCluster."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import storage
from pipeline.simulate import simulate_dataset


def _boldflow(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "boldflow"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pipeline.cli"]
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_demo(tmp_path):
    res = _boldflow("demo", "--out", str(tmp_path / "d"), "--subjects", "4", "--volumes", "60",
                    "--workers", "1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Dask dashboard: http://" in res.stdout
    assert "store == source NIfTI voxel for voxel" in res.stdout and ": True" in res.stdout
    assert "group comparison (patient vs control" in res.stdout
    bs = storage.open_store(tmp_path / "d" / "study.zarr")
    assert list(bs.runs()["n_volumes"]) == [60] * 4
    edges = list((tmp_path / "d" / "results" / "group").glob("*pearson*_edges.tsv"))
    assert len(edges) == 1


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate_dataset(tmp_path_factory.mktemp("sim"), n_subjects=3, shape=(10, 12, 9),
                            n_volumes=24, seed=3)


def test_ingest_reports_failures_and_keeps_successes(tmp_path, sim):
    src = tmp_path / "derivs"
    shutil.copytree(sim.root, src)
    bad = next(src.rglob("sub-02_*desc-preproc_bold.nii.gz"))
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    res = _boldflow("ingest", str(src), str(tmp_path / "s.zarr"), "--workers", "1",
                    cwd=tmp_path)
    assert res.returncode == 1
    assert bad.name in res.stderr and "error:" in res.stderr
    assert "2 ingested" in res.stdout and "1 failed" in res.stdout
    # progress: the failing run as it fails, then the stage's final line (not a terminal)
    assert "ingest: sub-02_task-rest" in res.stdout and " failed" in res.stdout
    assert "ingest: 3/3 (2 ingested, 0 skipped, 1 failed)" in res.stdout
    assert "\r" not in res.stdout
    cat = storage.open_store(tmp_path / "s.zarr").catalog.set_index("sub")
    assert cat.loc["01", "status"] == "complete" and cat.loc["03", "status"] == "complete"
    assert cat.loc["02", "status"] == "failed"
    # inspect shows the same
    res = _boldflow("inspect", str(tmp_path / "s.zarr"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "2 complete, 1 failed" in res.stdout and bad.name in res.stdout


def test_ingest_filters_and_rerun(tmp_path, sim):
    store = str(tmp_path / "s.zarr")
    res = _boldflow("ingest", str(sim.root), store, "--workers", "1", "--subject", "01",
                    "--subject", "03", "--codec", "zstd", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "2 ingested" in res.stdout
    res = _boldflow("ingest", str(sim.root), store, "--workers", "1", "--codec", "zstd",
                    cwd=tmp_path)
    assert "1 ingested" in res.stdout and "2 skipped" in res.stdout
    import zarr

    group = storage.open_store(store).runs().set_index("sub").loc["02", "group"]
    (codec,) = zarr.open_array(store, path=f"{group}/bold", mode="r").compressors
    assert codec.cname.value == "zstd"
    ds = storage.open_run(store, subject="02", task="rest")
    np.testing.assert_array_equal(ds["bold"].values,
                                  np.asanyarray(nib.load(sim.runs[1].bold).dataobj))


def test_cli_errors_exit_2(tmp_path):
    res = _boldflow("inspect", str(tmp_path / "missing.zarr"), cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.startswith("error:") and "missing.zarr" in res.stderr
    res = _boldflow("ingest", str(tmp_path / "empty"), str(tmp_path / "s.zarr"), cwd=tmp_path)
    assert res.returncode == 2 and "error:" in res.stderr


def test_run_cluster_section_and_scheduler_override(tmp_path):
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"input": "d", "output": "o", "cluster": {
        "kind": "slurm", "adapt": {"minimum": 1, "maximum": 8},
        "options": {"cores": 4, "memory": "16GiB", "queue": "short"}}}))
    res = _boldflow("run", str(path), "--dry-run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    cluster = yaml.safe_load(res.stdout)["cluster"]
    assert cluster["kind"] == "slurm" and cluster["options"]["queue"] == "short"
    # --scheduler replaces the whole section (sizing belongs to the other cluster)
    res = _boldflow("run", str(path), "--dry-run", "--scheduler", "tcp://10.0.0.1:8786",
                    cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    cluster = yaml.safe_load(res.stdout)["cluster"]
    assert cluster["kind"] == "address" and cluster["address"] == "tcp://10.0.0.1:8786"
    assert cluster["adapt"] is None and cluster["options"] == {}
    path.write_text(yaml.safe_dump({"input": "d", "output": "o", "cluster": {"kind": "lsf"}}))
    res = _boldflow("run", str(path), "--dry-run", cwd=tmp_path)
    assert res.returncode == 2 and "cluster.kind" in res.stderr
