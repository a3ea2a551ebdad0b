"""Object stores: source and store on a real S3-compatible server on 127.0.0.1 (moto)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import s3fs

import storage
from storage import RunSpec
from tests._builders import make_run

pytestmark = pytest.mark.s3


def _upload(fs: s3fs.S3FileSystem, spec: RunSpec, prefix: str) -> RunSpec:
    urls = {}
    for key in ("bold", "mask", "confounds"):
        local = getattr(spec, key)
        if local:
            url = f"{prefix}/{local.rsplit('/', 1)[-1]}"
            fs.put_file(local, url)
            urls[key] = f"s3://{url}"
    return RunSpec(entities=spec.entities, **urls)


def test_s3_source_and_store(tmp_path, s3_bucket):
    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    local = [make_run(tmp_path / f"in{i}", f"0{i}", seed=i, dtype="int16", slope=0.5)
             for i in range(2)]
    remote = [_upload(fs, spec, f"{bucket}/derivatives/sub-0{i}") for i, spec in
              enumerate(local)]
    url = f"s3://{bucket}/study.zarr"
    cat = storage.ingest(remote, url, storage_options=options, source_options=options,
                         shard_bytes="1MiB")
    assert (cat["status"] == "complete").all(), cat["error"].tolist()
    for spec in local:
        ds = storage.open_run(url, subject=spec.entities["sub"], task="rest",
                              storage_options=options)
        np.testing.assert_array_equal(ds["bold"].values, np.asanyarray(nib.load(spec.bold).dataobj))
        assert ds["confounds"].shape[0] == 20
    # idempotent on object stores too
    again = storage.ingest(remote, url, storage_options=options, source_options=options,
                           shard_bytes="1MiB")
    assert (again["action"] == "skipped").all()
    # export straight to the bucket, streaming
    storage.to_nifti(ds["bold"], f"s3://{bucket}/export/bold.nii.gz", storage_options=options)
    fs.get_file(f"{bucket}/export/bold.nii.gz", str(tmp_path / "back.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(nib.load(tmp_path / "back.nii.gz").dataobj),
                                  np.asanyarray(nib.load(local[-1].bold).dataobj))


def test_s3_no_credentials_in_store(tmp_path, s3_bucket):
    bucket, options = s3_bucket
    options = {**options, "key": "AKIASECRETKEYID", "secret": "sup3r-s3cret-value"}
    spec = make_run(tmp_path / "in", "01")
    url = f"s3://{bucket}/study.zarr"
    storage.ingest([spec], url, storage_options=options)
    fs = s3fs.S3FileSystem(**options)
    everything = "".join(fs.cat_file(p).decode(errors="replace")
                         for p in fs.find(f"{bucket}/study.zarr") if p.endswith("zarr.json"))
    assert "sup3r-s3cret-value" not in everything and "AKIASECRETKEYID" not in everything
    assert "s3cret" not in repr(storage.StoreRef.coerce(url, options))
    # catalog readable through the API
    bs = storage.open_store(url, storage_options=options)
    assert bs.catalog["status"].tolist() == ["complete"]
    assert json.loads(fs.cat_file(f"{bucket}/study.zarr/zarr.json"))["attributes"][
        "boldflow_format"] == 1


def test_s3_missing_object_is_named(tmp_path, s3_bucket):
    bucket, options = s3_bucket
    good = make_run(tmp_path / "in", "01")
    missing = RunSpec(bold=f"s3://{bucket}/nope/sub-02_task-rest_bold.nii.gz",
                      entities={"sub": "02", "task": "rest"})
    cat = storage.ingest([good, missing], f"s3://{bucket}/s.zarr", storage_options=options,
                         source_options=options).set_index("run_id")
    assert cat.loc["sub-01_task-rest", "status"] == "complete"
    assert cat.loc["sub-02_task-rest", "status"] == "failed"
    assert f"s3://{bucket}/nope/sub-02_task-rest_bold.nii.gz" in cat.loc["sub-02_task-rest",
                                                                         "error"]
