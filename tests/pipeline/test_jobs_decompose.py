"""Decomposition through the job runner: exports and recovery of the simulated networks."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import storage
from pipeline.config import ConfigError, load_config
from pipeline.decomposition.ica import SubjectICA
from pipeline.demo import network_recovery
from pipeline.jobs import Pipeline
from pipeline.masking import apply_mask
from pipeline.simulate import load_truth, simulate_dataset


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate_dataset(tmp_path_factory.mktemp("dec") / "derivs", n_subjects=6,
                            shape=(20, 24, 20), n_volumes=150, seed=0)


def _job(sim, out, store, **decompose):
    return {"input": str(sim.root), "output": str(out), "store": str(store),
            "clean": {"strategy": "simple", "high_pass": 0.01, "low_pass": None,
                      "standardize": "none"},
            "decompose": {"n_components": 10, **decompose}}




def test_config_rules():
    with pytest.raises(ConfigError, match="does not apply"):
        load_config({"input": "i", "output": "o",
                     "decompose": {"level": "subject", "method": "migp"}})
    cfg = load_config({"input": "i", "output": "o", "decompose": {"level": "group"}})
    assert cfg.decompose.method == "migp" and cfg.decompose.n_components == 20


@pytest.mark.parametrize("method", ["migp", "canica", "dictlearning"])
def test_group_ica_job_recovers_networks(tmp_path, sim, client, method):
    out = tmp_path / "out"
    job = _job(sim, out, tmp_path / "s.zarr", level="group", method=method)
    if method == "dictlearning":  # z-scored voxels, as nilearn's DictLearning by default
        job["decompose"]["alpha"] = 1.0
        job["clean"]["standardize"] = "zscore_sample"
    result = Pipeline(job).submit(client).result()
    assert (result.runs["status"] != "failed").all(), result.runs["error"].tolist()
    img = nib.load(out / "group" / f"desc-{method}_components.nii.gz")
    assert img.shape == (20, 24, 20, 10)
    r = network_recovery(out / "group" / f"desc-{method}_components.nii.gz", load_truth(sim.root))
    assert np.median(r) >= 0.9 and r.min() >= 0.8, r
    # dual regression outputs per run
    func = out / "sub-03" / "func"
    prefix = "sub-03_task-rest_space-MNI152NLin2009cAsym"
    tc = pd.read_csv(func / f"{prefix}_desc-dualreg_timeseries.tsv", sep="\t")
    assert tc.shape == (150, 10)
    assert nib.load(func / f"{prefix}_desc-dualreg_components.nii.gz").shape == (20, 24, 20, 10)


def test_subject_ica_job_exports(tmp_path, sim, client):
    out = tmp_path / "out"
    job = _job(sim, out, tmp_path / "s.zarr", level="subject", melodic_export=True)
    job["subjects"] = ["01"]
    result = Pipeline(job).submit(client).result()
    assert (result.runs["status"] != "failed").all(), result.runs["error"].tolist()
    func = out / "sub-01" / "func"
    prefix = "sub-01_task-rest_space-MNI152NLin2009cAsym"
    maps = nib.load(func / f"{prefix}_desc-ica_components.nii.gz")
    mixing = pd.read_csv(func / f"{prefix}_desc-ica_mixing.tsv", sep="\t")
    assert maps.shape[3] == mixing.shape[1] == 10 and len(mixing) == 150
    melodic = func / f"{prefix}_desc-melodic.ica"
    np.testing.assert_allclose(np.loadtxt(melodic / "melodic_mix"), mixing.values, rtol=1e-6)
    r = network_recovery(func / f"{prefix}_desc-ica_components.nii.gz", load_truth(sim.root))
    assert np.median(r) >= 0.8, r
    # a second job with the same inputs and config skips the fit (provenance sidecar)
    before = (func / f"{prefix}_desc-ica_mixing.tsv").stat().st_mtime_ns
    again = Pipeline(job).submit(client).result().runs
    dec = again[again["stage"] == "decompose"]
    assert list(dec["status"]) == ["skipped"]
    assert (func / f"{prefix}_desc-ica_mixing.tsv").stat().st_mtime_ns == before
    # another seed is another result: refitted
    job["decompose"]["seed"] = 7
    third = Pipeline(job).submit(client).result().runs
    assert list(third[third["stage"] == "decompose"]["status"]) == ["complete"]


def test_subject_ica_runs_fit_in_parallel_on_workers(tmp_path, sim, client):
    """Each run's fit is a worker task; same numbers as a fit in this process."""
    out = tmp_path / "out"
    job = _job(sim, out, tmp_path / "s.zarr", level="subject")
    job["subjects"] = ["02", "03"]
    job["clean"] = None
    result = Pipeline(job).submit(client).result()
    assert (result.runs["status"] == "complete").all(), result.runs["error"].tolist()
    prefix = "sub-03_task-rest_space-MNI152NLin2009cAsym"
    mixing = pd.read_csv(out / "sub-03" / "func" / f"{prefix}_desc-ica_mixing.tsv", sep="\t")
    ds = storage.open_run(tmp_path / "s.zarr", subject="03", task="rest")
    local = SubjectICA(n_components=10, random_state=0, t_r=2.0).fit(apply_mask(ds))
    np.testing.assert_allclose(mixing.values, local.mixing_, rtol=1e-6,
                               atol=1e-6 * np.abs(local.mixing_).max())
