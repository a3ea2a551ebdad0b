"""Ingestion: exact round trips, real data, bad input, idempotency and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

import storage
from storage import IncompleteRunError, RunSpec, StoreError
from storage.catalog import STATUS_ATTR
from tests._builders import AFFINE, HAXBY, bold_array, make_run, write_bold


def _nib_data(path):
    return np.asanyarray(nib.load(path).dataobj)


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype,slope", [("float32", None), ("int16", None), ("int16", 0.25),
                                         ("uint8", None)])
def test_roundtrip_exact(tmp_path, dtype, slope):
    spec = make_run(tmp_path / "in", "01", dtype=dtype, slope=slope, inter=3.0 if slope else None)
    cat = storage.ingest([spec], tmp_path / "s.zarr", batch_bytes=2000)  # many small batches
    assert list(cat["status"]) == ["complete"]
    ds = storage.open_run(tmp_path / "s.zarr", subject="01", task="rest")
    src = nib.load(spec.bold)
    # values as nibabel scales them, same affine and TR
    np.testing.assert_array_equal(ds["bold"].values, np.asanyarray(src.dataobj))
    np.testing.assert_allclose(ds.attrs["affine"], src.affine)
    assert ds.attrs["repetition_time"] == 2.0
    np.testing.assert_allclose(ds["time"].values, np.arange(20) * 2.0)
    assert set(ds["bold"].dims) == {"x", "y", "z", "time"}
    # the stored integers are the file's integers, not a float copy
    raw = zarr.open_array(storage.StoreRef.coerce(tmp_path / "s.zarr").open(),
                          path="sub-01/task-rest/bold")[:]
    np.testing.assert_array_equal(raw, np.asanyarray(src.dataobj.get_unscaled()))
    assert raw.dtype == np.dtype(dtype)
    # NIfTI -> Zarr -> NIfTI is exact: dtype, raw values, scaling, affine
    out = storage.to_nifti(ds["bold"], tmp_path / "out.nii.gz")
    back = nib.load(out)
    assert back.get_data_dtype() == src.get_data_dtype()
    np.testing.assert_array_equal(np.asanyarray(back.dataobj.get_unscaled()),
                                  np.asanyarray(src.dataobj.get_unscaled()))
    np.testing.assert_array_equal(back.get_fdata(), src.get_fdata())
    np.testing.assert_allclose(back.affine, src.affine)
    assert back.header.get_zooms() == src.header.get_zooms()
    # mask and confounds
    mask_src = _nib_data(spec.mask) != 0
    np.testing.assert_array_equal(ds["mask"].values, mask_src)
    conf = pd.read_csv(spec.confounds, sep="\t", na_values="n/a")
    assert list(ds["confound"].values) == list(conf.columns)
    np.testing.assert_array_equal(ds["confounds"].values, conf.to_numpy())
    storage.to_nifti(ds["mask"], tmp_path / "mask.nii.gz")
    np.testing.assert_array_equal(_nib_data(tmp_path / "mask.nii.gz"), mask_src.astype(np.uint8))


def test_chunks_time_contiguous_and_bounded(tmp_path):
    spec = make_run(tmp_path / "in", "01", shape=(16, 16, 12, 40))
    vol = 16 * 16 * 12 * 4
    storage.ingest([spec], tmp_path / "s.zarr", chunk_bytes=vol * 40 // 6, batch_bytes=vol * 15)
    raw = storage.open_run(tmp_path / "s.zarr", subject="01", task="rest", chunks=None)
    enc = raw["bold"].encoding["chunks"]
    assert enc[3] == 14  # 40 volumes in 3 equal batches of at most 15
    assert np.prod(enc) * 4 <= vol * 40 // 6
    ds = storage.open_run(tmp_path / "s.zarr", subject="01", task="rest")
    assert ds["bold"].chunks[3] == (40,)  # readers see whole time series per block
    np.testing.assert_array_equal(ds["bold"].values, _nib_data(spec.bold))


def test_sharded_layout_roundtrip(tmp_path):
    spec = make_run(tmp_path / "in", "01", shape=(16, 16, 12, 10))
    storage.ingest([spec], tmp_path / "s.zarr", chunk_bytes=16 * 16 * 12 * 10 * 4 // 8,
                   shard_bytes="1MiB")
    ds = storage.open_run(tmp_path / "s.zarr", subject="01", task="rest", chunks=None)
    assert ds["bold"].encoding["shards"] is not None
    np.testing.assert_array_equal(ds["bold"].values, _nib_data(spec.bold))


# ---------------------------------------------------------------------------- reducers


class _VoxelStats:
    """Test reducer: each voxel's sum over time and the volumes' mean inside the mask."""

    name = "voxelstats"

    def begin(self, info, mask):
        return _VoxelStatsAcc(info, mask)


class _VoxelStatsAcc:
    def __init__(self, info, mask):
        self.mask = np.ones(info.shape[:3], bool) if mask is None else mask
        self.sums = np.zeros(info.shape[:3])
        self.means = np.zeros(info.shape[3])
        self.seen = np.zeros(info.shape, dtype=np.int8)

    def update(self, index, block):
        # time last as stored, or (a run without voxels) volumes as read from the file
        assert block.flags.c_contiguous or block.flags.f_contiguous
        assert not block.flags.writeable
        self.sums[index[:3]] += block.sum(axis=3)
        self.means[index[3]] += block[self.mask[index[:3]]].sum(axis=0) / self.mask.sum()
        self.seen[index] += 1

    def finish(self):
        assert (self.seen == 1).all()  # every value handed over exactly once
        return self.sums, {"means": self.means, "note": "ok"}


class _Broken:
    name = "broken"

    def begin(self, info, mask):
        raise RuntimeError("boom")


@pytest.mark.parametrize("layout", [{}, {"shard_bytes": "64KiB"}])
def test_reducers_see_every_block_once_and_are_stored_before_commit(tmp_path, layout):
    spec = make_run(tmp_path / "in", "01", shape=(16, 16, 12, 30), dtype="int16",
                    slope=0.5, inter=2.0)
    vol = 16 * 16 * 12 * 2
    cat = storage.ingest([spec], tmp_path / "s.zarr", chunk_bytes=vol * 10 // 5,
                         batch_bytes=vol * 10, reducers=[_Broken(), _VoxelStats()], **layout)
    assert list(cat["status"]) == ["complete"]  # a failing reducer never fails the run
    raw = np.asanyarray(nib.load(spec.bold).dataobj.get_unscaled())
    mask = np.asanyarray(nib.load(spec.mask).dataobj) != 0
    grp = zarr.open_group(str(tmp_path / "s.zarr"), path="sub-01/task-rest", mode="r")
    assert set(grp["derived"].array_keys()) == {"voxelstats"}  # nothing from the broken one
    stats = grp["derived/voxelstats"]
    # the reducer sees the stored (unscaled) values, in several time batches
    np.testing.assert_allclose(stats[...], raw.sum(axis=3, dtype=np.float64), rtol=1e-12)
    np.testing.assert_allclose(stats.attrs["means"], raw[mask].mean(axis=0), rtol=1e-12)
    assert stats.attrs["note"] == "ok"
    # the run's dataset is unchanged by derived arrays (a subgroup, not a variable)
    ds = storage.open_run(tmp_path / "s.zarr", subject="01", task="rest")
    assert set(ds.data_vars) == {"bold", "mask", "confounds"}
    # a skipped run is not read again: reducers do not run
    again = storage.ingest([spec], tmp_path / "s.zarr", chunk_bytes=vol * 10 // 5,
                           batch_bytes=vol * 10, reducers=[_Broken()], **layout)
    assert list(again["action"]) == ["skipped"]


class _Late:
    """Test reducer that fails on the second batch it is given."""

    name = "late"

    def begin(self, info, mask):
        return _LateAcc()


class _LateAcc:
    calls = 0

    def update(self, index, block):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("second batch refused")

    def finish(self):
        return np.zeros(1), {}


def test_without_voxels_reducers_get_the_file_order_and_resume_rules(tmp_path):
    """voxels=False: no bold array, the reducers' results equal the stored-voxels path's;
    re-runs skip, a request with voxels rewrites, a run with voxels serves both."""
    spec = make_run(tmp_path / "in", "01", shape=(16, 16, 12, 30), dtype="int16",
                    slope=0.5, inter=2.0)
    vol = 16 * 16 * 12 * 2
    kw = {"chunk_bytes": vol * 10 // 5, "batch_bytes": vol * 7}  # 5 batches, one short
    full, lean = tmp_path / "full.zarr", tmp_path / "lean.zarr"
    storage.ingest([spec], full, reducers=[_VoxelStats()], **kw)
    cat = storage.ingest([spec], lean, reducers=[_VoxelStats()], voxels=False, **kw)
    assert list(cat["status"]) == ["complete"] and list(cat["action"]) == ["ingested"]
    assert list(cat["voxels"]) == [False]
    assert list(storage.open_store(full).catalog["voxels"]) == [True]
    g_full = zarr.open_group(str(full), path="sub-01/task-rest", mode="r")
    g_lean = zarr.open_group(str(lean), path="sub-01/task-rest", mode="r")
    assert "bold" not in g_lean and g_lean.attrs["voxels"] is False
    assert g_full.attrs["voxels"] is True
    np.testing.assert_allclose(g_lean["derived/voxelstats"][...],
                               g_full["derived/voxelstats"][...], rtol=1e-12)
    np.testing.assert_allclose(g_lean["derived/voxelstats"].attrs["means"],
                               g_full["derived/voxelstats"].attrs["means"], rtol=1e-12)
    ds = storage.open_run(lean, subject="01", task="rest")
    assert set(ds.data_vars) == {"mask", "confounds"} and ds.sizes["time"] == 30
    # the same request again: skipped; with voxels: rewritten with them
    again = storage.ingest([spec], lean, reducers=[_VoxelStats()], voxels=False, **kw)
    assert list(again["action"]) == ["skipped"]
    other = storage.ingest([spec], lean, reducers=[_Late()], voxels=False, **kw)
    assert list(other["action"]) == ["failed"]  # other reducers: re-ingested (and failed)
    assert "second batch refused" in other["error"].iloc[0]
    assert "sub-01/task-rest" not in zarr.open_group(str(lean), mode="r")  # nothing left
    # a run stored with voxels serves a request without them (nothing is dropped)
    skip = storage.ingest([spec], full, reducers=[_VoxelStats()], voxels=False, **kw)
    assert list(skip["action"]) == ["skipped"] and list(skip["voxels"]) == [True]
    assert "bold" in zarr.open_group(str(full), path="sub-01/task-rest", mode="r")
    with pytest.raises(ValueError, match="needs at least one reducer"):
        storage.ingest([spec], lean, voxels=False)


def test_default_codec_is_lz4_bitshuffle_and_zstd_is_an_option(tmp_path):
    spec = make_run(tmp_path / "in", "01", shape=(16, 16, 12, 20))
    for cname in ("lz4", "zstd"):
        store = tmp_path / f"{cname}.zarr"
        kw = {} if cname == "lz4" else {"cname": "zstd"}
        storage.ingest([spec], store, **kw)
        arr = zarr.open_array(str(store), path="sub-01/task-rest/bold", mode="r")
        (codec,) = arr.compressors
        assert (codec.cname.value, codec.shuffle.value, codec.clevel) == (cname, "bitshuffle", 1)
        np.testing.assert_array_equal(arr[...], _nib_data(spec.bold))
    with pytest.raises(ValueError, match="cname"):
        storage.ingest([spec], tmp_path / "x.zarr", cname="snappy2")


def test_haxby_real_data(tmp_path):
    """Real int16 native-space runs with FSL-style motion files and a separate mask."""
    specs = [RunSpec(bold=str(HAXBY / f"run-00{i}" / "bold_25mm.nii.gz"),
                     entities={"sub": "001", "task": "objects", "run": str(i)},
                     mask=str(HAXBY / "masks" / "25mm" / "brain.nii.gz"),
                     confounds=str(HAXBY / f"run-00{i}" / "bold_moest.txt"))
             for i in (1, 2, 3)]
    cat = storage.ingest(specs, tmp_path / "h.zarr")
    assert (cat["status"] == "complete").all(), cat["error"].tolist()
    for i, spec in enumerate(specs, start=1):
        ds = storage.open_run(tmp_path / "h.zarr", subject="001", task="objects", run=i)
        img = nib.load(spec.bold)
        assert ds["bold"].dtype == np.int16
        np.testing.assert_array_equal(ds["bold"].values, np.asanyarray(img.dataobj))
        np.testing.assert_allclose(ds.attrs["affine"], img.affine)
        assert ds.attrs["repetition_time"] == pytest.approx(2.5)
        assert ds.sizes["time"] == 121
        motion = np.loadtxt(spec.confounds)
        # FSL order: rotations (rad) then translations (mm)
        np.testing.assert_allclose(ds["confounds"].sel(confound="rot_x").values, motion[:, 0])
        np.testing.assert_allclose(ds["confounds"].sel(confound="trans_z").values, motion[:, 5])
        mask = _nib_data(spec.mask) != 0
        np.testing.assert_array_equal(ds["mask"].values, mask)
    # world coordinates follow the native-space affine
    wc = storage.world_coordinates(ds)
    np.testing.assert_allclose(wc.isel(x=2, y=3, z=4).values,
                               nib.affines.apply_affine(img.affine, [2, 3, 4]))


def test_manifest_source(tmp_path):
    manifest = tmp_path / "runs.yaml"
    manifest.write_text(
        "runs:\n"
        f"  - bold: {HAXBY / 'run-001' / 'bold_25mm.nii.gz'}\n"
        "    subject: '001'\n    task: objects\n    run: 1\n"
        f"    mask: {HAXBY / 'masks' / '25mm' / 'brain.nii.gz'}\n")
    cat = storage.ingest(str(manifest), tmp_path / "m.zarr")
    assert list(cat["run_id"]) == ["sub-001_task-objects_run-1"]
    assert list(cat["status"]) == ["complete"]


# ---------------------------------------------------------------------------- bad input


def _with_good_runs(tmp_path, bad: RunSpec, **kw) -> pd.DataFrame:
    good = [make_run(tmp_path / f"good{i}", f"g{i}", seed=i) for i in range(2)]
    cat = storage.ingest([good[0], bad, good[1]], tmp_path / "s.zarr", **kw)
    by_id = cat.set_index("run_id")
    # the others are ingested, the bad one is failed with nothing left in the store
    assert by_id.loc[good[0].run_id, "status"] == "complete"
    assert by_id.loc[good[1].run_id, "status"] == "complete"
    assert by_id.loc[bad.run_id, "status"] == "failed"
    root = zarr.open_group(storage.StoreRef.coerce(tmp_path / "s.zarr").open(), mode="r")
    assert bad.group_path not in root
    # recorded in the store's catalog, too
    stored = storage.read_catalog(storage.StoreRef.coerce(tmp_path / "s.zarr").open())
    assert stored.set_index("run_id").loc[bad.run_id, "status"] == "failed"
    with pytest.raises(StoreError, match="failed to ingest"):
        storage.open_run(tmp_path / "s.zarr", subject=bad.entities["sub"], task="rest")
    return by_id.loc[bad.run_id]


@pytest.mark.parametrize("voxels", [True, False])
def test_bad_truncated_gzip(tmp_path, voxels):
    spec = make_run(tmp_path / "bad", "bad", shape=(64, 64, 32, 12))
    blob = Path(spec.bold).read_bytes()
    Path(spec.bold).write_bytes(blob[: int(len(blob) * 0.6)])
    # without voxels the volumes only pass through the reducers: the same errors, nothing left
    row = _with_good_runs(tmp_path, spec, **({} if voxels else {
        "voxels": False, "reducers": [_VoxelStats()]}))
    assert "sub-bad_task-rest_bold.nii.gz" in row["error"]
    assert "truncated" in row["error"]


def test_bad_corrupt_gzip(tmp_path):
    spec = make_run(tmp_path / "bad", "bad", shape=(64, 64, 32, 12))
    blob = bytearray(Path(spec.bold).read_bytes())
    mid = len(blob) // 2
    blob[mid:mid + 64] = os.urandom(64)
    Path(spec.bold).write_bytes(bytes(blob))
    row = _with_good_runs(tmp_path, spec)
    assert "sub-bad_task-rest_bold.nii.gz" in row["error"]
    assert "corrupt" in row["error"]


def test_bad_3d_bold(tmp_path):
    spec = make_run(tmp_path / "bad", "bad")
    volume = bold_array((7, 8, 6, 20))[..., 0]
    write_bold(tmp_path / "bad" / "sub-bad_task-rest_bold.nii.gz", volume)
    row = _with_good_runs(tmp_path, spec)
    assert "sub-bad_task-rest_bold.nii.gz" in row["error"] and "3D" in row["error"]


def test_bad_mask_shape(tmp_path):
    spec = make_run(tmp_path / "bad", "bad")
    nib.Nifti1Image(np.ones((7, 8, 5), np.uint8), AFFINE).to_filename(spec.mask)
    row = _with_good_runs(tmp_path, spec)
    assert "sub-bad_task-rest_mask.nii.gz" in row["error"] and "shape" in row["error"]


def test_bad_mask_affine(tmp_path):
    spec = make_run(tmp_path / "bad", "bad")
    shifted = AFFINE.copy()
    shifted[0, 3] += 2.0
    nib.Nifti1Image(np.ones((7, 8, 6), np.uint8), shifted).to_filename(spec.mask)
    row = _with_good_runs(tmp_path, spec)
    assert "sub-bad_task-rest_mask.nii.gz" in row["error"] and "affine" in row["error"]


def test_bad_confound_rows(tmp_path):
    spec = make_run(tmp_path / "bad", "bad")
    conf = pd.read_csv(spec.confounds, sep="\t")
    conf.iloc[:-2].to_csv(spec.confounds, sep="\t", index=False, na_rep="n/a")
    row = _with_good_runs(tmp_path, spec)
    assert "sub-bad_task-rest_confounds.tsv" in row["error"]
    assert "18" in row["error"] and "20" in row["error"]


def test_bad_missing_tr(tmp_path):
    spec = make_run(tmp_path / "bad", "bad", tr=None)
    row = _with_good_runs(tmp_path, spec)
    assert "sub-bad_task-rest_bold.nii.gz" in row["error"]
    assert "repetition time" in row["error"]


def test_bad_zero_tr_in_sidecar(tmp_path):
    spec = make_run(tmp_path / "bad", "bad", tr=None, sidecar_tr=0.0)
    row = _with_good_runs(tmp_path, spec)
    assert "sub-bad_task-rest_bold.json" in row["error"]


def test_sidecar_tr_wins_over_header(tmp_path):
    spec = make_run(tmp_path / "in", "01", tr=3.0, sidecar_tr=2.2)
    storage.ingest([spec], tmp_path / "s.zarr")
    ds = storage.open_run(tmp_path / "s.zarr", subject="01", task="rest")
    assert ds.attrs["repetition_time"] == pytest.approx(2.2)
    assert ds.attrs["repetition_time_source"] == "sidecar"


@pytest.mark.parametrize("voxels", [True, False])
@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_bad_nonfinite_voxels(tmp_path, bad_value, voxels):
    spec = make_run(tmp_path / "bad", "bad")
    data = bold_array((7, 8, 6, 20))
    data[3, 4, 2, 17] = bad_value
    write_bold(tmp_path / "bad" / "sub-bad_task-rest_bold.nii.gz", data)
    row = _with_good_runs(tmp_path, spec, **({} if voxels else {
        "voxels": False, "reducers": [_VoxelStats()]}))
    assert "sub-bad_task-rest_bold.nii.gz" in row["error"]
    assert "NaN/inf" in row["error"] and "(3, 4, 2)" in row["error"] and "volume 17" in row["error"]


def test_bad_unreadable_url(tmp_path):
    spec = RunSpec(bold="http://127.0.0.1:9/nothing/sub-bad_task-rest_bold.nii.gz",
                   entities={"sub": "bad", "task": "rest"})
    row = _with_good_runs(tmp_path, spec)
    assert "http://127.0.0.1:9/nothing/sub-bad_task-rest_bold.nii.gz" in row["error"]


def test_bad_missing_file(tmp_path):
    spec = RunSpec(bold=str(tmp_path / "nope_bold.nii.gz"), entities={"sub": "bad", "task": "rest"})
    row = _with_good_runs(tmp_path, spec)
    assert "nope_bold.nii.gz" in row["error"]


# ---------------------------------------------------------------------------- idempotency


def _store_files(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = os.stat(p).st_mtime_ns
    return out


def test_reingest_skips_and_changes_nothing(tmp_path):
    specs = [make_run(tmp_path / f"in{i}", f"0{i}", seed=i) for i in range(3)]
    store = tmp_path / "s.zarr"
    first = storage.ingest(specs, store)
    assert (first["action"] == "ingested").all()
    chunks_before = {k: v for k, v in _store_files(store).items() if "/c/" in k}
    second = storage.ingest(specs, store)
    assert (second["action"] == "skipped").all()
    chunks_after = {k: v for k, v in _store_files(store).items() if "/c/" in k}
    assert chunks_after == chunks_before  # no chunk was rewritten
    # a changed input is re-ingested, the others are not
    write_bold(tmp_path / "in1" / "sub-01_task-rest_bold.nii.gz",
               bold_array((7, 8, 6, 20), seed=99))
    third = storage.ingest(specs, store).set_index("run_id")
    assert third.loc["sub-01_task-rest", "action"] == "ingested"
    assert third.loc["sub-00_task-rest", "action"] == "skipped"
    ds = storage.open_run(store, subject="01", task="rest")
    np.testing.assert_array_equal(ds["bold"].values, bold_array((7, 8, 6, 20), seed=99))


def test_failed_run_then_fixed_is_ingested(tmp_path):
    spec = make_run(tmp_path / "in", "01", shape=(64, 64, 32, 12))
    good = Path(spec.bold).read_bytes()
    Path(spec.bold).write_bytes(good[: len(good) // 2])
    store = tmp_path / "s.zarr"
    assert storage.ingest([spec], store)["status"].tolist() == ["failed"]
    Path(spec.bold).write_bytes(good)
    assert storage.ingest([spec], store)["action"].tolist() == ["ingested"]
    cat = storage.read_catalog(storage.StoreRef.coerce(store).open())
    assert cat["status"].tolist() == ["complete"] and cat["error"].isna().all()
    np.testing.assert_array_equal(storage.open_run(store, subject="01", task="rest")["bold"],
                                  _nib_data(spec.bold))


_KILL_SCRIPT = """
import sys, storage
from storage import RunSpec
spec = RunSpec(bold=sys.argv[1], entities={"sub": "01", "task": "rest"})
storage.ingest([spec], sys.argv[2], batch_bytes=200_000)
"""


def test_killed_ingest_is_invisible_then_resumed(tmp_path):
    """SIGKILL mid-run: the run is not readable as complete; a re-run redoes it."""
    data = bold_array((64, 64, 40, 120), "float32")
    bold = write_bold(tmp_path / "sub-01_task-rest_bold.nii.gz", data)
    store = tmp_path / "s.zarr"
    zjson = store / "sub-01" / "task-rest" / "zarr.json"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(bold), str(store)],
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            chunk_dir = store / "sub-01" / "task-rest" / "bold" / "c"
            if zjson.exists() and chunk_dir.exists() and any(chunk_dir.rglob("*")):
                break
            assert proc.poll() is None, "ingest finished before it could be killed"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert json.loads(zjson.read_text())["attributes"][STATUS_ATTR] == "writing"
    ref = storage.StoreRef.coerce(store)
    with pytest.raises(IncompleteRunError):
        storage.open_store(ref).open_group("sub-01/task-rest")
    cat = storage.ingest([RunSpec(bold=str(bold), entities={"sub": "01", "task": "rest"})],
                         store, batch_bytes=200_000)
    assert cat["action"].tolist() == ["ingested"]
    ds = storage.open_run(store, subject="01", task="rest")
    np.testing.assert_array_equal(ds["bold"].values, data)


def test_open_run_errors(tmp_path):
    specs = [make_run(tmp_path / "a", "01", task="rest"), make_run(tmp_path / "b", "01",
                                                                     task="motor")]
    storage.ingest(specs, tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="2 runs match"):
        storage.open_run(tmp_path / "s.zarr", subject="01")
    with pytest.raises(StoreError, match="no complete run"):
        storage.open_run(tmp_path / "s.zarr", subject="02", task="rest")
    with pytest.raises(StoreError, match="no boldflow store"):
        storage.open_store(tmp_path / "nothing.zarr")
    ds = storage.open_run(tmp_path / "s.zarr", subject="sub-01", task="motor")
    assert isinstance(ds, xr.Dataset) and ds.attrs["entities"]["task"] == "motor"
