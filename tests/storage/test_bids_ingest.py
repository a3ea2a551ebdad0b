"""Discovery + ingestion of a simulated fMRIPrep tree, locally and on S3."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import s3fs

import storage
from pipeline.simulate import simulate_dataset


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate_dataset(tmp_path_factory.mktemp("sim"), n_subjects=2, shape=(9, 10, 8),
                            n_volumes=20, sessions=["pre", "post"], n_runs=2, dtype="int16",
                            seed=7)


def _check_run(ds, run):
    img = nib.load(run.bold)
    np.testing.assert_array_equal(ds["bold"].values, np.asanyarray(img.dataobj))
    np.testing.assert_allclose(ds.attrs["affine"], img.affine)
    assert ds.attrs["repetition_time_source"] == "sidecar"
    conf = pd.read_csv(run.confounds, sep="\t", na_values="n/a")
    assert list(ds["confound"].values) == list(conf.columns)
    np.testing.assert_array_equal(ds["confounds"].values, conf.to_numpy(dtype=float))
    assert np.isnan(ds["confounds"].sel(confound="trans_x_derivative1").values[0])
    np.testing.assert_array_equal(ds["mask"].values, np.asanyarray(nib.load(run.mask).dataobj) > 0)


def test_discover_and_ingest_local(tmp_path, sim):
    cat = storage.ingest(sim.root, tmp_path / "s.zarr")
    assert len(cat) == 8 and (cat["status"] == "complete").all(), cat["error"].tolist()
    assert set(cat["ses"]) == {"pre", "post"} and set(cat["run"]) == {"1", "2"}
    for run in sim.runs:
        ent = run.entities
        ds = storage.open_run(tmp_path / "s.zarr", subject=ent["sub"], session=ent["ses"],
                              task=ent["task"], run=ent["run"])
        assert ds.attrs["entities"] == ent
        _check_run(ds, run)
    # the layout groups runs by subject and session
    root = storage.open_store(tmp_path / "s.zarr")
    assert "sub-01/ses-pre/task-rest_run-1_space-MNI152NLin2009cAsym" in set(root.runs()["group"])


@pytest.mark.s3
def test_discover_and_ingest_from_s3_to_s3(sim, s3_bucket):
    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    fs.put(str(sim.root) + "/", f"{bucket}/derivatives/", recursive=True)
    cat = storage.ingest(f"s3://{bucket}/derivatives", f"s3://{bucket}/study.zarr",
                         storage_options=options, source_options=options, subjects="02",
                         sessions="post")
    assert len(cat) == 2 and (cat["status"] == "complete").all(), cat["error"].tolist()
    assert all(b.startswith(f"s3://{bucket}/derivatives/sub-02/ses-post/") for b in cat["bold"])
    for run in [r for r in sim.runs if r.subject == "02" and r.session == "post"]:
        ds = storage.open_run(f"s3://{bucket}/study.zarr", subject="02", session="post",
                              task="rest", run=run.entities["run"], storage_options=options)
        _check_run(ds, run)


def test_confounds_sidecar_metadata_is_kept(tmp_path, sim):
    import json

    storage.ingest(sim.root, tmp_path / "s.zarr", subjects="01", sessions="pre", runs="1")
    ds = storage.open_run(tmp_path / "s.zarr", subject="01", session="pre", task="rest", run=1)
    sidecar = json.loads(sim.runs[0].confounds.with_suffix(".json").read_text())
    assert ds["confounds"].attrs["metadata"] == sidecar
    assert any(k.startswith("a_comp_cor") for k in ds["confounds"].attrs["metadata"])
