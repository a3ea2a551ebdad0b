"""Object store end to end: derivatives, store and outputs on an S3 server (moto), with
worker processes that authenticate with their own (environment) credentials."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import s3fs

from pipeline.jobs import Pipeline
from pipeline.simulate import simulate_dataset

pytestmark = [pytest.mark.s3, pytest.mark.distributed]


def test_whole_pipeline_on_s3(tmp_path, s3_bucket):
    from distributed import Client, LocalCluster

    bucket, options = s3_bucket
    options = {**options, "key": "AKIABOLDFLOWTEST", "secret": "s3cret-never-written"}
    sim = simulate_dataset(tmp_path / "derivs", n_subjects=4, shape=(12, 14, 10),
                           n_volumes=60, seed=3)
    fs = s3fs.S3FileSystem(**options)
    fs.put(str(sim.root) + "/", f"{bucket}/derivatives/", recursive=True)
    job = {"input": f"s3://{bucket}/derivatives", "output": f"s3://{bucket}/results",
           "store": f"s3://{bucket}/study.zarr", "storage_options": options,
           "clean": {"strategy": "simple", "high_pass": 0.01, "low_pass": 0.1},
           "parcellate": {"atlas": str(sim.atlas), "name": "sim"},
           "connectivity": {"kinds": ["pearson"], "groups": "group"}}
    # worker processes start after the fixture exported the (dummy) credentials
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        result = Pipeline(job).submit(client).result()
        local = Pipeline({**job, "input": str(sim.root), "output": str(tmp_path / "out"),
                          "store": str(tmp_path / "s.zarr"), "storage_options": {}}
                         ).submit(client).result()
        # region sums only, written to the bucket by the workers
        lean = Pipeline({**job, "output": f"s3://{bucket}/lean-results",
                         "store": f"s3://{bucket}/lean.zarr", "ingest": {"voxels": False}}
                        ).submit(client).result()
    assert (lean.runs["status"] == "complete").all(), lean.runs["error"].tolist()
    np.testing.assert_allclose(lean.matrices["pearson"].values,
                               local.matrices["pearson"].values, rtol=1e-10, atol=1e-12)
    lean_keys = fs.find(f"{bucket}/lean.zarr")
    assert any("/derived/labelsums-" in k for k in lean_keys)
    assert not any("/bold/" in k for k in lean_keys)
    assert any("/bold/" in k for k in fs.find(f"{bucket}/study.zarr"))
    assert (result.runs["status"] == "complete").all(), result.runs["error"].tolist()
    ts = (f"{bucket}/results/sub-02/func/sub-02_task-rest_space-MNI152NLin2009cAsym_"
          "seg-sim_stat-mean_timeseries.tsv")
    with fs.open(ts) as f:
        remote = pd.read_csv(f, sep="\t", na_values="n/a")
    assert remote.shape == (60, len(local.matrices["pearson"]["region"]))
    assert fs.exists(f"{bucket}/results/group/seg-sim_stat-pearsoncorrelation_relmats.zarr")
    np.testing.assert_allclose(result.matrices["pearson"].values,
                               local.matrices["pearson"].values, rtol=1e-10, atol=1e-12)
    # the run report on the bucket; credentials nowhere in metadata, sidecars or reports
    assert fs.exists(f"{bucket}/results/boldflow_runs.tsv")
    texts = "".join(fs.cat_file(p).decode(errors="replace") for p in fs.find(bucket)
                    if p.endswith((".json", ".tsv")))
    assert "s3cret-never-written" not in texts and "AKIABOLDFLOWTEST" not in texts
