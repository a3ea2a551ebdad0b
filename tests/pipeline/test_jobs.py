"""Jobs end to end on a real LocalCluster: config, failure isolation, resume, invariance."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.config import ConfigError, load_config
from pipeline.demo import effect_edges
from pipeline.jobs import Pipeline
from pipeline.progress import format_bytes
from pipeline.simulate import load_truth, simulate_dataset


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0", memory_limit="2GiB") as cluster, \
            Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate_dataset(tmp_path_factory.mktemp("jobs") / "derivs", n_subjects=6,
                            shape=(14, 16, 12), n_volumes=80, seed=5)


def _job(sim, out, **extra):
    job = {"input": str(sim.root), "output": str(out),
           "clean": {"strategy": "simple", "high_pass": 0.01, "low_pass": 0.1},
           "parcellate": {"atlas": str(sim.atlas), "name": "sim"},
           "connectivity": {"kinds": ["pearson", "correlation"], "groups": "group"}}
    for key, value in extra.items():
        job[key] = {**job.get(key, {}), **value} if isinstance(value, dict) else value
    return job


# ---------------------------------------------------------------------------- config


def test_unknown_and_invalid_keys_name_their_path(tmp_path):
    bad = {"input": "x", "output": "y", "clean": {"hihg_pass": 0.01},
           "connectivity": {"kinds": ["corr"]}, "parcellate": {"atlas": "a", "name": "b"}}
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "clean.hihg_pass: unknown key" in str(err.value)
    assert "connectivity.kinds.0" in str(err.value)
    with pytest.raises(ConfigError, match="high_pass"):
        load_config({"input": "x", "output": "y",
                     "clean": {"high_pass": 0.1, "low_pass": 0.05}})
    with pytest.raises(ConfigError, match="connectivity needs a parcellate"):
        load_config({"input": "x", "output": "y", "connectivity": {}})
    with pytest.raises(ConfigError) as err:
        load_config({"input": "x", "output": "y",
                     "ingest": {"chunk_bytes": "lots", "codec": "gzip", "chunks": 1}})
    for where in ("ingest.chunk_bytes: Value error, not a byte size: 'lots'",
                  "ingest.codec", "ingest.chunks: unknown key"):
        assert where in str(err.value)
    path = tmp_path / "job.yaml"
    path.write_text("input: derivs\noutput: out\nparcellate: {atlas: a.nii.gz, name: x}\n")
    cfg = load_config(path)
    assert cfg.input == str(tmp_path / "derivs")  # relative to the YAML file
    assert cfg.parcellate.atlas == str(tmp_path / "a.nii.gz")


def test_cli_dry_run_and_error(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"input": "d", "output": "o", "clean": {"oops": 1}}))
    exe = Path(sys.executable).parent / "boldflow"
    res = subprocess.run([str(exe), "run", str(path), "--dry-run"], capture_output=True,
                         text=True)
    assert res.returncode == 2 and "clean.oops: unknown key" in res.stderr
    path.write_text(yaml.safe_dump({"input": "d", "output": "o"}))
    res = subprocess.run([str(exe), "run", str(path), "--dry-run"], capture_output=True,
                         text=True)
    assert res.returncode == 0 and "strategy: simple" in res.stdout


# ---------------------------------------------------------------------------- jobs


def _check_report(report: pd.DataFrame, store: Path, source: Path | None,
                  fused: bool = False) -> None:
    """Report columns, and per complete run the bytes its graph read, from the store.

    ``fused``: the job ingested its input with region sums (``derived/labelsums-*``), so
    the graph read those instead of the BOLD array.
    """
    import zarr

    import storage

    assert list(report.columns[:16]) == [
        "run_id", "sub", "ses", "task", "run", "space", "status", "stage", "seconds",
        "bytes_read", "stored_bytes", "error", "outputs", "ingest", "ingest_seconds",
        "source_bytes"]
    bs = storage.open_store(store)
    groups = bs.runs().set_index("run_id")["group"]
    done = report[report["status"] == "complete"]
    assert len(done) and (done["seconds"] > 0).all() and done["error"].isna().all()
    for _, row in done.iterrows():
        derived = sorted((store / groups[row["run_id"]] / "derived").glob("labelsums-*"))
        assert len(derived) == int(fused)
        if fused:  # (time, region) float64 sums: all the run's graph read
            folder = derived[0]
            sums = zarr.open_array(folder)
            assert row["bytes_read"] == sums.nbytes == sums.shape[0] * sums.shape[1] * 8
        else:
            bold = bs.open_group(groups[row["run_id"]], chunks=None)["bold"]
            # bytes_read: the uncompressed stored array, every voxel and volume of the run
            assert row["bytes_read"] == bold.size * bold.dtype.itemsize == bold.nbytes
            folder = store / groups[row["run_id"]] / "bold"
        chunks = [p for p in folder.rglob("*") if p.is_file() and p.name != "zarr.json"]
        assert len(chunks) == np.prod(zarr.open_array(folder).cdata_shape)
        assert row["stored_bytes"] == sum(p.stat().st_size for p in chunks)
        if source is not None:  # ingested in this job: the source file was read whole
            assert row["ingest"] == "ingested"
            nifti = next(source.rglob(f"{row['run_id']}_desc-preproc_bold.nii.gz"))
            assert row["source_bytes"] == nifti.stat().st_size


@pytest.mark.parametrize("change,fused", [
    ({}, True),
    ({"mask": {"strategy": "group"}}, False),  # known only after every run is ingested
    ({"mask": {"strategy": "epi"}}, False),
    ({"clean": {"level": "voxel"}}, False),  # voxel-wise stages read the store anyway
    ({"export": {"cleaned_bold": True}}, False),
    ({"parcellate": {"kind": "maps"}}, False),
])
def test_which_jobs_get_region_sums_from_ingestion(sim, tmp_path, change, fused):
    from pipeline.jobs import label_sums_reducer

    cfg = Pipeline(_job(sim, tmp_path / "out", **change)).config
    reducer = label_sums_reducer(cfg)
    assert (reducer is not None) == fused
    if fused:  # named by the atlas' content: another atlas file never matches
        assert reducer.name.startswith("labelsums-")
        import nibabel as nib

        img = nib.load(sim.atlas)
        other = tmp_path / "atlas.nii.gz"
        nib.Nifti1Image(np.asanyarray(img.dataobj)[::-1].copy(), img.affine).to_filename(other)
        changed = label_sums_reducer(Pipeline(_job(sim, tmp_path / "o", parcellate={
            "atlas": str(other)})).config)
        assert changed.name != reducer.name


def test_job_outputs_failures_and_resume(tmp_path, sim, client):
    src = tmp_path / "derivs"
    shutil.copytree(sim.root, src)
    bad = next(src.rglob("sub-03_*desc-confounds_timeseries.tsv"))
    frame = pd.read_csv(bad, sep="\t")
    frame.drop(columns=["csf"]).to_csv(bad, sep="\t", index=False, na_rep="n/a")
    job = _job(sim, tmp_path / "out", input=str(src))
    lines: list[str] = []
    handle = Pipeline(job).submit(client, echo=lines.append)
    result = handle.result()
    # every ingested run's task was submitted as soon as that run was in the store
    assert sorted(handle.overlapped) == sorted(result.runs["run_id"])
    runs = result.runs.set_index("sub")
    assert runs.loc["03", "status"] == "failed"
    assert runs.loc["03", "stage"] == "confounds"
    assert "csf" in runs.loc["03", "error"] and bad.name in runs.loc["03", "error"]
    assert (runs.drop(index="03")["status"] == "complete").all()

    func = tmp_path / "out" / "sub-01" / "func"
    prefix = "sub-01_task-rest_space-MNI152NLin2009cAsym"
    ts = pd.read_csv(func / f"{prefix}_seg-sim_stat-mean_timeseries.tsv", sep="\t",
                     na_values="n/a")
    atlas_names = pd.read_csv(str(sim.atlas).replace(".nii.gz", ".tsv"), sep="\t")["name"]
    assert list(ts.columns) == list(atlas_names) and len(ts) == 80
    rel = pd.read_csv(func / f"{prefix}_seg-sim_stat-pearsoncorrelation_relmat.tsv", sep="\t",
                      index_col=0)
    np.testing.assert_allclose(rel.values, np.corrcoef(ts.values.T), atol=1e-12)
    assert (func / f"{prefix}_seg-sim_stat-correlation_relmat.tsv").exists()
    edges = pd.read_csv(tmp_path / "out" / "group" /
                        "seg-sim_stat-pearsoncorrelation_desc-patientvscontrol_edges.tsv",
                        sep="\t")
    assert {"region_a", "region_b", "statistic", "p", "p_fdr"} <= set(edges.columns)
    assert result.matrices["pearson"].sizes["subject"] == 5
    report = pd.read_csv(tmp_path / "out" / "boldflow_runs.tsv", sep="\t")
    assert sorted(report["status"]) == ["complete"] * 5 + ["failed"]
    # ingested in the job's pass with region sums: the runs' graphs never read the BOLD
    _check_report(report, tmp_path / "out" / "boldflow.zarr", src, fused=True)
    # per-stage progress and the final summary (plain lines: echo is not a terminal)
    assert "ingest: 6/6 (6 ingested, 0 skipped, 0 failed)" in "\n".join(lines)
    assert any(ln.startswith("runs: sub-03_") and "[confounds]" in ln for ln in lines)
    assert any(ln.startswith("runs: 6/6 (5 complete, 0 skipped, 1 failed)") for ln in lines)
    assert any(ln.startswith("group: 1/1 (1 complete") for ln in lines)
    summary = next(ln for ln in lines if "run(s) done" in ln)
    total = report["bytes_read"].fillna(0).sum()
    assert summary.startswith("6 run(s) done: 5 complete, 0 skipped, 1 failed; ")
    assert f"{format_bytes(total)} of BOLD read" in summary and "report: " in summary

    # re-run: nothing recomputed (provenance matches), identical group result
    before = (func / f"{prefix}_seg-sim_stat-mean_timeseries.tsv").stat().st_mtime_ns
    handle = Pipeline(job).submit(client)
    again = handle.result()
    # runs whose outputs stand are not submitted early (sub-03 failed: it is recomputed)
    assert [r.split("_")[0] for r in handle.overlapped] == ["sub-03"]
    runs2 = again.runs.set_index("sub")
    assert (runs2.drop(index="03")["status"] == "skipped").all()
    ok = runs2.drop(index="03")
    assert (ok["bytes_read"] == 0).all() and (ok["stored_bytes"] == 0).all()  # nothing read
    assert (ok["ingest"] == "skipped").all() and (ok["source_bytes"] == 0).all()
    assert (func / f"{prefix}_seg-sim_stat-mean_timeseries.tsv").stat().st_mtime_ns == before
    pd.testing.assert_frame_equal(again.comparisons["pearson"].edges,
                                  result.comparisons["pearson"].edges)
    # a changed option invalidates the provenance: recomputed
    job["clean"]["low_pass"] = 0.09
    third = Pipeline(job).submit(client).result()
    assert (third.runs.set_index("sub").drop(index="03")["status"] == "complete").all()
    sidecar = json.loads((func / f"{prefix}_desc-boldflow_provenance.json").read_text())
    assert sidecar["config"]["clean"]["low_pass"] == 0.09


def test_voxel_level_and_seed_maps(tmp_path, sim, client):
    import nibabel as nib

    truth = load_truth(sim.root)
    region = truth["regions"][0]["name"]
    job = _job(sim, tmp_path / "out", clean={"level": "voxel"},
               seeds=[{"name": "a", "region": region},
                      {"name": "b", "coords": [0.0, 0.0, 0.0], "radius": 5.0}],
               subjects=["01", "02", "03", "04"])
    result = Pipeline(job).submit(client).result()
    assert (result.runs["status"] == "complete").all(), result.runs["error"].tolist()
    func = tmp_path / "out" / "sub-01" / "func"
    img = nib.load(func / "sub-01_task-rest_space-MNI152NLin2009cAsym_seed-a_stat-"
                          "pearsoncorrelation_boldmap.nii.gz")
    r = img.get_fdata()
    label = truth["regions"][0]["index"]
    inside = np.asarray(truth["atlas"]) == label
    # voxels of the seed region correlate strongly with the seed; values are correlations
    assert np.nanmean(r[inside]) > 0.5
    assert np.nanmax(np.abs(r)) <= 1 + 1e-9


def test_same_results_with_other_chunks_and_workers(tmp_path, sim, client):
    job_a = _job(sim, tmp_path / "a", subjects=["01", "02", "04"])
    job_b = _job(sim, tmp_path / "b", subjects=["01", "02", "04"])
    res_a = Pipeline(job_a).submit(client).result()
    # another store layout (tiny chunks) and a single-worker cluster
    from distributed import Client, LocalCluster

    import storage

    store = tmp_path / "tiny.zarr"
    storage.ingest(sim.root, store, chunk_bytes="40KiB", subjects=["01", "02", "04"])
    job_b["input"] = str(store)
    job_b["connectivity"]["participants"] = str(sim.participants)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as c1:
        res_b = Pipeline(job_b).submit(c1).result()
    for kind in ("pearson", "correlation"):
        np.testing.assert_allclose(res_b.matrices[kind].values, res_a.matrices[kind].values,
                                   rtol=1e-9, atol=1e-12)
    # many small chunks: still the whole stored array, chunk objects counted one by one
    assert (res_b.runs["status"] == "complete").all()
    _check_report(res_b.runs, store, None)
    assert res_b.runs["ingest"].isna().all()  # the input was a store: nothing ingested
    # one subject in a group: no comparison, but the matrices and per-run outputs stand
    assert any("at least 2 subjects" in e for e in res_a.group_errors)


def test_known_group_effect_is_found(tmp_path, client):
    """Ground truth: designated edges significant after FDR, truly null edges not."""
    sim = simulate_dataset(tmp_path / "derivs", n_subjects=16, shape=(16, 18, 14),
                           n_volumes=150, seed=2)
    job = _job(sim, tmp_path / "out", clean={"strategy": "36p"})
    result = Pipeline(job).submit(client).result()
    cmp = result.comparisons["pearson"]
    designated, affected = effect_edges(load_truth(sim.root))
    sig = {frozenset(p) for p in cmp.significant_edges()[["region_a", "region_b"]]
           .itertuples(index=False)}
    null = {frozenset(p) for p in cmp.edges[["region_a", "region_b"]]
            .itertuples(index=False)} - affected
    assert designated <= sig
    assert len(sig & null) <= max(1, int(0.05 * len(null)))


def test_cleaned_bold_export_equals_voxel_cleaning(tmp_path, sim, client):
    import nibabel as nib

    import storage
    from pipeline.masking import apply_mask
    from pipeline.signal import clean_signals

    job = _job(sim, tmp_path / "out", export={"cleaned_bold": True}, subjects=["02"],
               clean={"strategy": "none"})
    job.pop("connectivity")
    result = Pipeline(job).submit(client).result()
    assert (result.runs["status"] == "complete").all(), result.runs["error"].tolist()
    path = (tmp_path / "out" / "sub-02" / "func" /
            "sub-02_task-rest_space-MNI152NLin2009cAsym_desc-clean_bold.nii.gz")
    img = nib.load(path)
    assert img.shape == (14, 16, 12, 80) and img.header.get_zooms()[3] == 2.0
    ds = storage.open_run(tmp_path / "out" / "boldflow.zarr", subject="02", task="rest")
    matrix = apply_mask(ds)
    ref = np.asarray(clean_signals(matrix.data, t_r=2.0, low_pass=0.1, high_pass=0.01))
    got = img.get_fdata()[matrix["i"].values, matrix["j"].values, matrix["k"].values].T
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)  # float32 NIfTI
    np.testing.assert_allclose(img.affine, ds.attrs["affine"])


def test_group_rules_and_cancel(tmp_path, sim, client):
    # groups from glob rules on subject ids instead of participants.tsv
    job = _job(sim, tmp_path / "out", connectivity={"groups": None, "group_rules": {
        "low": "sub-0[1-3]", "high": "sub-0[4-6]"}})
    result = Pipeline(job).submit(client).result()
    cmp = result.comparisons["pearson"]
    assert cmp.groups == ("high", "low") and cmp.n_subjects == {"high": 3, "low": 3}
    # cancel: every run is accounted for, none left running
    job2 = _job(sim, tmp_path / "out2")
    handle = Pipeline(job2).submit(client)
    handle.cancel()
    runs = handle.result().runs
    assert len(runs) == 6 and handle.done()
    assert set(runs["status"]) <= {"complete", "failed", "skipped"}


def test_group_mask_job_equals_region_means_on_the_intersection(tmp_path, sim, client):
    """mask: group on a job run as one worker task per run (the mask is sent once)."""
    import storage
    from pipeline.masking import intersect_masks
    from pipeline.parcellation import label_signals, load_atlas

    job = _job(sim, tmp_path / "out", store=str(tmp_path / "s.zarr"),
               mask={"strategy": "group", "group_threshold": 1.0})
    job["clean"] = None
    job["connectivity"] = {"kinds": ["pearson"]}
    result = Pipeline(job).submit(client).result()
    assert (result.runs["status"] == "complete").all(), result.runs["error"].tolist()
    bs = storage.open_store(tmp_path / "s.zarr")
    runs = [bs.open_group(g, chunks=None) for g in bs.runs()["group"]]
    mask = intersect_masks([r["mask"] for r in runs], threshold=1.0).values
    assert mask.sum() > 0  # (the simulated subjects share one brain mask)
    atlas = load_atlas(sim.atlas, reference=runs[0])
    for ds in runs:
        ents = ds.attrs["entities"]
        prefix = f"sub-{ents['sub']}_task-{ents['task']}_space-{ents['space']}"
        ours = pd.read_csv(tmp_path / "out" / f"sub-{ents['sub']}" / "func" /
                           f"{prefix}_seg-sim_stat-mean_timeseries.tsv", sep="\t",
                           na_values="n/a")
        ref = label_signals(ds, atlas, mask=mask)
        np.testing.assert_allclose(ours.to_numpy(float), ref.values, rtol=1e-6,
                                   equal_nan=True)


def test_ingest_section_sets_the_store_layout(tmp_path, sim, client):
    """The job's ``ingest:`` options are the store's: chunks, codec; results unchanged."""
    import zarr

    job = _job(sim, tmp_path / "out", subjects=["01", "02"],
               ingest={"chunk_bytes": "64KiB", "series_bytes": None, "codec": "zstd"})
    result = Pipeline(job).submit(client).result()
    assert (result.runs["status"] == "complete").all(), result.runs["error"].tolist()
    root = zarr.open_group(str(tmp_path / "out" / "boldflow.zarr"), mode="r")
    group = next(g for g in root.group_keys() if g.startswith("sub-01"))
    arr = next(iter(root[group].group_values()))["bold"]
    assert 4 * np.prod(arr.chunks) <= 64 * 1024
    assert arr.compressors[0].cname.value == "zstd"
    ref = Pipeline(_job(sim, tmp_path / "ref", subjects=["01", "02"])).submit(client).result()
    np.testing.assert_allclose(result.matrices["pearson"].values,
                               ref.matrices["pearson"].values, rtol=1e-9, atol=1e-12)


def test_ingest_without_voxels_gives_the_same_outputs_from_a_smaller_store(tmp_path, sim,
                                                                           client):
    """``ingest.voxels: false``: region sums only; outputs equal the voxel store's job."""
    from pipeline.summary import describe_store

    subjects = ["01", "02", "04"]
    ref = Pipeline(_job(sim, tmp_path / "ref", subjects=subjects)).submit(client).result()
    job = _job(sim, tmp_path / "out", subjects=subjects, ingest={"voxels": False})
    result = Pipeline(job).submit(client).result()
    assert (result.runs["status"] == "complete").all(), result.runs["error"].tolist()
    for kind in ("pearson", "correlation"):
        np.testing.assert_allclose(result.matrices[kind].values, ref.matrices[kind].values,
                                   rtol=1e-9, atol=1e-12)
    name = "sub-01_task-rest_space-MNI152NLin2009cAsym_seg-sim_stat-mean_timeseries.tsv"
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "out" / "sub-01" / "func" / name, sep="\t"),
        pd.read_csv(tmp_path / "ref" / "sub-01" / "func" / name, sep="\t"),
        check_exact=False, rtol=1e-9)
    store = tmp_path / "out" / "boldflow.zarr"
    assert not list(store.rglob("bold/zarr.json"))  # no voxel array at all
    _check_report(result.runs, store, Path(sim.root), fused=True)  # the sums were read
    size = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    ref_size = sum(p.stat().st_size for p in (tmp_path / "ref" / "boldflow.zarr").rglob("*")
                   if p.is_file())
    assert size < ref_size / 5
    assert "ingested without voxels" in describe_store(store)
    # that store as a job's input: a job that needs voxels fails each run, saying why
    needs = Pipeline(_job(sim, tmp_path / "v", input=str(store), clean={"level": "voxel"},
                          connectivity={"participants": str(sim.participants)})
                     ).submit(client).result()
    assert (needs.runs["status"] == "failed").all()
    assert needs.runs["error"].str.contains("ingested without voxels").all()
    # a re-run skips ingestion and the runs; a job that needs voxels re-ingests with them
    again = Pipeline(job).submit(client).result()
    assert (again.runs["ingest"] == "skipped").all()
    assert (again.runs["status"] == "skipped").all()
    voxel = Pipeline(_job(sim, tmp_path / "out", subjects=subjects,
                          clean={"level": "voxel"})).submit(client).result()
    assert (voxel.runs["ingest"] == "ingested").all()
    assert (voxel.runs["status"] == "complete").all(), voxel.runs["error"].tolist()
    assert len(list(store.rglob("bold/zarr.json"))) == len(subjects)


@pytest.mark.parametrize("change,needs", [
    ({"clean": {"level": "voxel"}}, "clean.level region"),
    ({"mask": {"strategy": "epi"}}, "mask.strategy run"),
    ({"seeds": [{"name": "a", "coords": [0, 0, 0]}]}, "no seeds"),
    ({"export": {"cleaned_bold": True}}, "no export.cleaned_bold"),
    ({"parcellate": {"kind": "maps"}}, "a labels atlas"),
])
def test_ingest_without_voxels_refuses_jobs_that_need_them(sim, tmp_path, change, needs):
    job = _job(sim, tmp_path / "out", ingest={"voxels": False}, **change)
    with pytest.raises(ConfigError, match=r"ingest\.voxels: false") as err:
        load_config(job)
    assert needs in str(err.value)
