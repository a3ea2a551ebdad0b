"""Tests of the ground-truth simulator (pipeline.simulate)."""

from __future__ import annotations

import filecmp
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pipeline.simulate import (
    MOTION_COLUMNS,
    SPACE,
    load_truth,
    simulate_dataset,
)

SHAPE = (12, 14, 10)
T = 40
T_R = 2.0
SMALL = dict(n_subjects=4, shape=SHAPE, n_volumes=T, t_r=T_R, n_networks=4, seed=0)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return simulate_dataset(tmp_path_factory.mktemp("small"), **SMALL)


@pytest.fixture(scope="module")
def small_truth(small):
    return load_truth(small.root)


@pytest.fixture(scope="module")
def small_int16(tmp_path_factory):
    return simulate_dataset(tmp_path_factory.mktemp("int16"), dtype="int16", **SMALL)


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    return simulate_dataset(tmp_path_factory.mktemp("multi"), n_subjects=2, shape=SHAPE,
                            n_volumes=30, sessions=["1", "2"], n_runs=2, n_dummy=3, seed=5,
                            n_networks=3)


def _bold(path) -> np.ndarray:
    """BOLD as (voxel, time) with voxels in Fortran order (like the truth maps raveled 'F')."""
    data = nib.load(path).get_fdata()
    return data.reshape(-1, data.shape[-1], order="F")


def _flat(a: np.ndarray) -> np.ndarray:
    """3D map -> (voxel,), or (n, x, y, z) -> (n, voxel), in Fortran voxel order."""
    if a.ndim == 3:
        return a.ravel(order="F").astype(np.float64)
    return a.reshape(a.shape[0], -1, order="F").astype(np.float64)


def _confounds(path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values="n/a")


def _known_timecourses(truth: dict, r: int) -> np.ndarray:
    """Every known time course of run r as columns, plus a constant."""
    n = truth["motion"].shape[1]
    return np.column_stack([
        np.ones(n), truth["network_timeseries"][r], truth["motion"][r], truth["drift_basis"],
        truth["physio"][r], truth["wm_signal"][r]])


# --------------------------------------------------------------------------------------
# layout, names, metadata
# --------------------------------------------------------------------------------------
def test_layout_and_names(small):
    root = small.root
    assert len(small.runs) == 4
    desc = json.loads((root / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] == "1.9.0"
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "boldflow-simulate"
    for i, run in enumerate(small.runs):
        sub = f"{i + 1:02d}"
        func = root / f"sub-{sub}" / "func"
        prefix = f"sub-{sub}_task-rest"
        assert run.bold == func / f"{prefix}_space-{SPACE}_desc-preproc_bold.nii.gz"
        assert run.mask == func / f"{prefix}_space-{SPACE}_desc-brain_mask.nii.gz"
        assert run.confounds == func / f"{prefix}_desc-confounds_timeseries.tsv"
        assert run.confounds_json == func / f"{prefix}_desc-confounds_timeseries.json"
        for p in (run.bold, run.mask, run.confounds, run.confounds_json, run.bold_json):
            assert p.is_file(), p
        side = json.loads(run.bold_json.read_text())
        assert side["RepetitionTime"] == T_R
        assert side["TaskName"] == "rest"
        assert run.entities == {"sub": sub, "task": "rest", "space": SPACE}
    assert small.bold == [r.bold for r in small.runs]
    assert small.truth == root / "sourcedata" / "simulation" / "truth.npz"
    assert small.truth_json.is_file()


def test_participants_alternate_groups(small, small_truth):
    df = pd.read_csv(small.participants, sep="\t")
    assert list(df.columns) == ["participant_id", "group", "age"]
    assert list(df["participant_id"]) == ["sub-01", "sub-02", "sub-03", "sub-04"]
    assert list(df["group"]) == ["control", "patient", "control", "patient"]
    assert [r.group for r in small.runs] == list(df["group"])
    assert small_truth["groups"] == {"control": ["sub-01", "sub-03"],
                                     "patient": ["sub-02", "sub-04"]}


def test_sessions_runs_and_dummies(multi):
    root = multi.root
    assert len(multi.runs) == 2 * 2 * 2
    names = {r.bold.relative_to(root).as_posix() for r in multi.runs}
    assert (f"sub-02/ses-2/func/sub-02_ses-2_task-rest_run-1_space-{SPACE}"
            "_desc-preproc_bold.nii.gz") in names
    run = multi.runs[3]
    assert (run.subject, run.session, run.run) == ("01", "2", "2")
    assert run.entities == {"sub": "01", "ses": "2", "task": "rest", "run": "2", "space": SPACE}
    assert run.confounds.name == "sub-01_ses-2_task-rest_run-2_desc-confounds_timeseries.tsv"
    truth = load_truth(root)
    assert [r["bold"] for r in truth["runs"]] == [
        r.bold.relative_to(root).as_posix() for r in multi.runs]
    assert truth["network_timeseries"].shape == (8, 30, 3)
    # every run has its own time courses
    flat = truth["network_timeseries"].reshape(8, -1)
    assert np.all(np.abs(np.corrcoef(flat) - np.eye(8)) < 0.9)

    conf = _confounds(run.confounds)
    dummies = [c for c in conf.columns if c.startswith("non_steady_state_outlier")]
    assert dummies == ["non_steady_state_outlier00", "non_steady_state_outlier01",
                       "non_steady_state_outlier02"]
    np.testing.assert_array_equal(conf[dummies].to_numpy()[:3], np.eye(3))
    assert np.all(conf[dummies].to_numpy()[3:] == 0)
    # aCompCor and cosines are computed on steady-state volumes, zero on the dummies
    acc = conf.filter(like="a_comp_cor_").to_numpy()
    assert np.all(acc[:3] == 0) and np.all(np.abs(acc[3:]).sum(axis=0) > 0)
    n_cos = int(np.floor(2 * (30 - 3) * 2.0 / 128))
    assert conf.filter(like="cosine").shape[1] == n_cos
    # the T1 transient makes the first volume much brighter than the steady state
    g = conf["global_signal"].to_numpy()
    assert g[0] > 1.3 * np.median(g[3:])


# --------------------------------------------------------------------------------------
# NIfTI headers
# --------------------------------------------------------------------------------------
def test_nifti_headers(small, small_truth):
    img = nib.load(small.bold[0])
    hdr = img.header
    assert img.shape == (*SHAPE, T)
    assert hdr.get_data_dtype() == np.float32
    assert hdr.get_zooms() == (3.0, 3.0, 3.0, T_R)
    assert hdr.get_xyzt_units() == ("mm", "sec")
    assert int(hdr["sform_code"]) == 4
    assert int(hdr["qform_code"]) == 1
    centre = img.affine @ np.array([*((np.array(SHAPE) - 1) / 2), 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-6)
    np.testing.assert_allclose(img.affine, small_truth["affine"])
    mask = nib.load(small.masks[0])
    assert mask.get_data_dtype() == np.uint8
    m = np.asarray(mask.dataobj)
    assert set(np.unique(m)) == {0, 1}
    np.testing.assert_array_equal(m, small_truth["mask"])
    frac = m.mean()
    assert 0.2 < frac < 0.4  # ellipsoid with semi-axes 40 % of the box: pi/6 * 0.8**3 = 0.27


def test_atlas_regions_and_networks(small, small_truth):
    img = nib.load(small.atlas)
    assert img.get_data_dtype() == np.int16
    atlas = np.asarray(img.dataobj)
    np.testing.assert_array_equal(atlas, small_truth["atlas"])
    np.testing.assert_allclose(img.affine, small_truth["affine"])
    tissue, mask = small_truth["tissue"], small_truth["mask"].astype(bool)
    assert np.all(mask[atlas > 0])
    assert np.all(tissue[atlas > 0] == 1)  # grey matter only
    tsv = pd.read_csv(small.atlas_tsv, sep="\t")
    assert list(tsv.columns) == ["index", "name"]
    regions = small_truth["regions"]
    assert list(tsv["index"]) == [r["index"] for r in regions]
    assert set(np.unique(atlas)) - {0} == set(tsv["index"])
    maps = small_truth["network_maps"]
    for net in small_truth["networks"]:
        assert 1 <= len(net["regions"]) <= 2
        for label in net["regions"]:
            (reg,) = [r for r in regions if r["index"] == label]
            assert reg["network"] == net["index"]
            sel = atlas == label
            assert sel.sum() == reg["n_voxels"] > 0
            # a network region is its map thresholded at 0.5
            assert np.all(maps[net["index"]][sel] > 0.5)
    background = [r for r in regions if r["network"] is None]
    assert background and all(r["name"].startswith("background_") for r in background)
    # the GM voxels of no network region all belong to a background parcel
    in_net = np.isin(atlas, [r["index"] for r in regions if r["network"] is not None])
    assert np.all(atlas[(tissue == 1) & ~in_net] > 0)


# --------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------
def test_same_seed_identical_different_seed_differs(small, tmp_path):
    again = simulate_dataset(tmp_path / "again", **SMALL)
    for a, b in zip(small.runs, again.runs, strict=True):
        np.testing.assert_array_equal(_bold(a.bold), _bold(b.bold))
        assert filecmp.cmp(a.confounds, b.confounds, shallow=False)
    ta, tb = load_truth(small.root), load_truth(again.root)
    for key in ("network_timeseries", "motion", "baseline", "atlas", "subject_corr"):
        np.testing.assert_array_equal(ta[key], tb[key])
    other = simulate_dataset(tmp_path / "other", **{**SMALL, "seed": 1, "n_subjects": 1})
    assert not np.allclose(_bold(other.bold[0]), _bold(small.bold[0]))
    assert not np.allclose(load_truth(other.root)["motion"][0], ta["motion"][0])


def test_batch_size_does_not_change_output(small, tmp_path):
    batched = simulate_dataset(tmp_path / "batched", batch_size=7, **SMALL)
    for a, b in zip(small.runs, batched.runs, strict=True):
        np.testing.assert_array_equal(_bold(a.bold), _bold(b.bold))
        pd.testing.assert_frame_equal(_confounds(a.confounds), _confounds(b.confounds))


def test_subject_does_not_depend_on_cohort_size(small, tmp_path):
    two = simulate_dataset(tmp_path / "two", **{**SMALL, "n_subjects": 2})
    np.testing.assert_array_equal(_bold(two.bold[1]), _bold(small.bold[1]))


# --------------------------------------------------------------------------------------
# confounds
# --------------------------------------------------------------------------------------
EXPANDED = [*MOTION_COLUMNS, "csf", "white_matter", "global_signal"]


def test_confounds_columns_and_first_row(small):
    conf = _confounds(small.confounds[0])
    assert len(conf) == T
    required = [f"{b}{s}" for b in EXPANDED
                for s in ("", "_derivative1", "_power2", "_derivative1_power2")]
    required += ["framewise_displacement", "std_dvars", "dvars"]
    required += [f"a_comp_cor_{i:02d}" for i in range(5)]
    n_cos = int(np.floor(2 * T * T_R / 128))
    required += [f"cosine{i:02d}" for i in range(n_cos)]
    assert set(required) <= set(conf.columns)
    assert not any(c.startswith("cosine") for c in set(conf.columns) - set(required))
    assert not any(c.startswith("non_steady_state") for c in conf.columns)
    first_nan = [c for c in conf.columns if "_derivative1" in c]
    first_nan += ["framewise_displacement", "std_dvars", "dvars"]
    assert conf.loc[0, first_nan].isna().all()
    assert not conf.loc[0, [c for c in conf.columns if c not in first_nan]].isna().any()
    assert not conf.iloc[1:].isna().any().any()
    # written exactly as fMRIPrep: tab separated, literal n/a
    with open(small.confounds[0]) as f:
        header, row0 = f.readline().rstrip("\n").split("\t"), f.readline().split("\t")
    assert header == list(conf.columns)
    assert row0[header.index("framewise_displacement")] == "n/a"
    for base in EXPANDED:
        x = conf[base].to_numpy()
        np.testing.assert_allclose(conf[f"{base}_power2"], x**2, rtol=1e-12)
        np.testing.assert_allclose(conf[f"{base}_derivative1"][1:], np.diff(x), rtol=1e-9,
                                   atol=1e-12)
        np.testing.assert_allclose(conf[f"{base}_derivative1_power2"][1:], np.diff(x) ** 2,
                                   rtol=1e-9, atol=1e-15)


def test_motion_and_framewise_displacement(small, small_truth):
    for run in small.runs:
        conf = _confounds(run.confounds)
        motion = conf[list(MOTION_COLUMNS)].to_numpy()
        np.testing.assert_allclose(motion, small_truth["motion"][run.index], rtol=1e-12)
        d = np.abs(np.diff(motion, axis=0))
        fd = d[:, :3].sum(axis=1) + 50.0 * d[:, 3:].sum(axis=1)
        np.testing.assert_allclose(conf["framewise_displacement"][1:], fd, rtol=1e-10)
        # small smooth motion with a few spikes above the usual 0.5 mm threshold
        n_high = int((conf["framewise_displacement"] > 0.5).sum())
        assert 1 <= n_high <= 6
        assert conf["framewise_displacement"].median() < 0.3
        assert np.abs(motion[:, :3]).max() < 1.5 and np.abs(motion[:, 3:]).max() < 0.02


def test_tissue_means_match_image(small, small_truth):
    run = small.runs[1]
    conf = _confounds(run.confounds)
    y = _bold(run.bold)
    tissue, mask = _flat(small_truth["tissue"]), _flat(small_truth["mask"]).astype(bool)
    np.testing.assert_allclose(conf["global_signal"], y[mask].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(conf["csf"], y[tissue == 3].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(conf["white_matter"], y[tissue == 2].mean(axis=0), rtol=1e-6)


def _nipype_dvars(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """nipype.algorithms.confounds.compute_dvars on (voxel, time) brain data."""
    f = y.astype(np.float32)
    f = f / np.median(f) * 1000
    sd = (np.percentile(f, 75, axis=1, method="lower")
          - np.percentile(f, 25, axis=1, method="lower")) / 1.349
    f, sd = f[sd > 1e-7], sd[sd > 1e-7]
    xc = (f - f.mean(axis=1, keepdims=True)).astype(np.float64)
    ar1 = (xc[:, 1:] * xc[:, :-1]).sum(axis=1) / (xc**2).sum(axis=1)
    diff_sd_mean = np.mean(np.sqrt(2 * (1 - ar1)) * sd)
    nstd = np.sqrt(np.mean(np.diff(f.astype(np.float64), axis=1) ** 2, axis=0))
    return nstd / diff_sd_mean, nstd


def test_dvars_matches_nipype_formula(small, small_truth):
    run = small.runs[2]
    conf = _confounds(run.confounds)
    y = _bold(run.bold)[_flat(small_truth["mask"]).astype(bool)]
    std, nstd = _nipype_dvars(y)
    np.testing.assert_allclose(conf["dvars"][1:], nstd, rtol=1e-4)
    np.testing.assert_allclose(conf["std_dvars"][1:], std, rtol=1e-3)


def test_cosines_match_nilearn(small):
    from nilearn.glm.first_level import make_first_level_design_matrix

    conf = _confounds(small.confounds[0])
    dm = make_first_level_design_matrix(np.arange(T) * T_R, drift_model="cosine",
                                        high_pass=1 / 128)
    ref = dm.filter(like="drift").to_numpy()
    ours = conf.filter(like="cosine").to_numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-10)


def test_acompcor_is_pca_of_wm_csf(small, small_truth):
    run = small.runs[0]
    conf = _confounds(run.confounds)
    side = json.loads(run.confounds_json.read_text())
    acc = conf[[f"a_comp_cor_{i:02d}" for i in range(5)]].to_numpy()
    cos = conf.filter(like="cosine").to_numpy()
    np.testing.assert_allclose(acc.T @ acc, np.eye(5), atol=1e-8)  # orthonormal
    np.testing.assert_allclose(acc.T @ cos, 0.0, atol=1e-8)  # high-passed
    np.testing.assert_allclose(acc.sum(axis=0), 0.0, atol=1e-8)  # demeaned
    # recompute: WM+CSF voxels (all of them on a tiny grid), cosine + mean removed, unit var
    tissue = _flat(small_truth["tissue"])
    x = _bold(run.bold)[(tissue == 2) | (tissue == 3)].T
    d = np.column_stack([cos, np.ones(T)])
    x = x - d @ np.linalg.lstsq(d, x, rcond=None)[0]
    u, s, _ = np.linalg.svd(x / x.std(axis=0), full_matrices=False)
    np.testing.assert_allclose(np.abs(np.sum(u[:, :5] * acc, axis=0)), 1.0, atol=1e-6)
    var = s**2 / np.sum(s**2)
    for i in range(5):
        meta = side[f"a_comp_cor_{i:02d}"]
        assert meta["Method"] == "aCompCor"
        assert meta["Mask"] == "combined"
        assert meta["Retained"] is True
        assert meta["VarianceExplained"] == pytest.approx(var[i], rel=1e-6)
        assert meta["CumulativeVarianceExplained"] == pytest.approx(var[: i + 1].sum(),
                                                                    rel=1e-6)


def test_nilearn_reads_the_confounds(multi):
    from nilearn.interfaces.fmriprep import load_confounds_strategy

    conf, sample_mask = load_confounds_strategy(str(multi.bold[0]), denoise_strategy="compcor")
    assert conf.shape[0] == 30
    assert {f"a_comp_cor_{i:02d}" for i in range(5)} <= set(conf.columns)
    assert sample_mask is not None and sample_mask[0] == 3  # the 3 dummy volumes are dropped


# --------------------------------------------------------------------------------------
# scaled integer output
# --------------------------------------------------------------------------------------
def test_int16_is_the_float_simulation_quantised(small, small_int16):
    truth = load_truth(small_int16.root)
    for a, b in zip(small.runs, small_int16.runs, strict=True):
        img = nib.load(b.bold)
        assert img.get_data_dtype() == np.int16
        slope, inter = img.dataobj.slope, img.dataobj.inter
        assert slope != 1.0 and inter != 0.0
        raw = np.asarray(img.dataobj.get_unscaled())
        assert 30000 < np.abs(raw).max() <= 32767  # most of the int16 range is used
        diff = np.abs(img.get_fdata() - nib.load(a.bold).get_fdata())
        assert diff.max() <= 0.5 * slope + 1e-3
        ca, cb = _confounds(a.confounds), _confounds(b.confounds)
        np.testing.assert_allclose(cb["global_signal"], ca["global_signal"], rtol=1e-5)
        np.testing.assert_allclose(cb["dvars"][1:], ca["dvars"][1:], rtol=1e-2)
        assert truth["runs"][b.index]["scl_slope"] == pytest.approx(float(slope), rel=1e-6)
        assert truth["runs"][b.index]["scl_inter"] == pytest.approx(float(inter), rel=1e-6)


# --------------------------------------------------------------------------------------
# the data contain the truth
# --------------------------------------------------------------------------------------
def test_data_equal_the_model_plus_noise(small, small_truth):
    tr = small_truth
    for run in small.runs:
        r = run.index
        y = _bold(run.bold)
        model = _flat(tr["baseline"])[:, None]
        model = model + _flat(tr["network_coef"]).T @ tr["network_timeseries"][r].T
        model += _flat(tr["motion_coef"]).T @ tr["motion"][r].T
        model += _flat(tr["drift_coef"][r]).T @ tr["drift_basis"].T
        model += np.outer(_flat(tr["physio_coef"]), tr["physio"][r])
        model += np.outer(_flat(tr["wm_coef"]), tr["wm_signal"][r])
        z = (y - model) / _flat(tr["noise_sigma"])[:, None]
        assert abs(z.mean()) < 0.02
        assert z.std() == pytest.approx(1.0, abs=0.02)
        assert np.abs(np.corrcoef(z[:, 1:].ravel(), z[:, :-1].ravel())[0, 1]) < 0.02


def test_regression_on_known_sources_leaves_the_noise(small, small_truth):
    tr = small_truth
    noise_std = tr["parameters"]["noise_std"]
    mask = _flat(tr["mask"]).astype(bool)
    base = _flat(tr["baseline"])[mask]
    for run in small.runs:
        y = _bold(run.bold)[mask].T
        x = _known_timecourses(tr, run.index)
        resid = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
        sd = np.sqrt((resid**2).sum(axis=0) / (T - x.shape[1])) / base
        assert np.median(sd) == pytest.approx(noise_std, rel=0.2)
        # without the motion regressors the voxels at the brain edge keep a lot of variance
        x_nomotion = np.delete(x, np.s_[1 + 4:1 + 4 + 6], axis=1)
        resid2 = y - x_nomotion @ np.linalg.lstsq(x_nomotion, y, rcond=None)[0]
        sd2 = np.sqrt((resid2**2).sum(axis=0) / (T - x_nomotion.shape[1])) / base
        assert np.percentile(sd2, 90) > 1.5 * np.percentile(sd, 90)


def test_network_voxels_follow_their_network(small, small_truth):
    tr = small_truth
    k_net = tr["network_timeseries"].shape[2]
    gm = _flat(tr["tissue"]) == 1
    for run in small.runs:
        r = run.index
        y = _bold(run.bold)
        # joint least squares on every known time course: the network betas estimate the
        # maps without bias, with the standard errors the noise level predicts
        x = _known_timecourses(tr, r)
        beta = np.linalg.lstsq(x, y.T, rcond=None)[0][1:1 + k_net]
        se = np.sqrt(np.diag(np.linalg.inv(x.T @ x)))[1:1 + k_net, None]
        z = (beta - _flat(tr["network_coef"])) / (se * _flat(tr["noise_sigma"]))
        assert np.abs(z[:, gm].mean(axis=1)).max() < 0.25
        np.testing.assert_allclose(z[:, gm].std(axis=1), 1.0, atol=0.15)
        # remove the known nuisance contributions: a blob peak then follows its network
        nuisance = (_flat(tr["motion_coef"]).T @ tr["motion"][r].T
                    + _flat(tr["drift_coef"][r]).T @ tr["drift_basis"].T
                    + np.outer(_flat(tr["physio_coef"]), tr["physio"][r])
                    + np.outer(_flat(tr["wm_coef"]), tr["wm_signal"][r]))
        yc = y - nuisance
        for k in range(k_net):
            v = int(np.argmax(_flat(tr["network_maps"][k]) * gm))
            c = np.corrcoef(yc[v], tr["network_timeseries"][r][:, k])[0, 1]
            assert c > 0.8, (run.subject, k, c)
        # white-matter voxels carry no network signal
        wm = _flat(tr["tissue"]) == 2
        c_wm = np.corrcoef(yc[wm].mean(axis=0), tr["network_timeseries"][r][:, 0])[0, 1]
        assert abs(c_wm) < 0.5


def test_physio_confined_to_csf(small, small_truth):
    tr = small_truth
    tissue = tr["tissue"]
    for key, label in (("physio_coef", 3), ("wm_coef", 2)):
        assert np.all(tr[key][tissue != label] == 0)
        assert np.all(tr[key][tissue == label] > 0)
    assert np.all(tr["network_coef"][:, tissue != 1] == 0)
    f = tr["parameters"]["physio_frequency_hz"]
    assert 0 < f < 0.5 / T_R
    for run in small.runs:
        conf = _confounds(run.confounds)
        physio = tr["physio"][run.index]
        x = np.column_stack([np.ones(T), tr["drift_basis"], conf[list(MOTION_COLUMNS)]])
        csf = conf["csf"] - x @ np.linalg.lstsq(x, conf["csf"], rcond=None)[0]
        gs = conf["global_signal"] - x @ np.linalg.lstsq(x, conf["global_signal"], rcond=None)[0]
        assert np.corrcoef(csf, physio)[0, 1] > 0.9
        assert abs(np.corrcoef(gs, physio)[0, 1]) < np.corrcoef(csf, physio)[0, 1] - 0.3
        spec = np.abs(np.fft.rfft(physio)) ** 2
        peak = np.fft.rfftfreq(T, T_R)[np.argmax(spec)]
        assert abs(peak - f) < 0.05


def test_network_timecourses_and_group_effect_in_truth(small_truth):
    tr = small_truth
    ts, subj = tr["network_timeseries"], tr["subject_corr"]
    k = ts.shape[2]
    np.testing.assert_allclose(ts.std(axis=1, ddof=1), 1.0, rtol=1e-10)
    for r, run in enumerate(tr["runs"]):
        # realised sample correlation is exactly the subject's matrix
        np.testing.assert_allclose(np.corrcoef(ts[r].T), subj[run["subject_index"]],
                                   atol=1e-10)
        spec = np.abs(np.fft.rfft(ts[r], axis=0)) ** 2
        freqs = np.fft.rfftfreq(T, T_R)
        outside = (freqs < 0.01) | (freqs > 0.1 + 1e-9)
        assert spec[outside].sum() < 1e-20 * spec.sum()
    control, patient = tr["group_corr"]
    assert tr["effect_pairs"] == [[0, 1], [2, 3]]
    off = ~np.eye(k, dtype=bool)
    for a, b in tr["effect_pairs"]:
        assert control[a, b] == pytest.approx(0.1)
        assert patient[a, b] == pytest.approx(0.1 + tr["parameters"]["group_effect"])
        off[a, b] = off[b, a] = False
    np.testing.assert_allclose(control[off], patient[off])
    groups = np.array([s["group"] for s in tr["subjects"]])
    for a, b in tr["effect_pairs"]:
        diff = subj[groups == "patient", a, b].mean() - subj[groups == "control", a, b].mean()
        assert diff == pytest.approx(0.5, abs=0.1)


def test_group_effect_visible_in_region_signals(small, small_truth):
    tr = small_truth
    atlas = _flat(tr["atlas"]).astype(int)
    net_of = {r["index"]: r["network"] for r in tr["regions"]}
    edges = tr["different_edges"]
    pairs = {frozenset(p) for p in tr["effect_pairs"]}
    assert edges and all(frozenset((net_of[a], net_of[b])) in pairs for a, b in edges)
    same = [(a, b) for a in net_of for b in net_of if a < b and net_of[a] is not None
            and net_of[b] is not None and [a, b] not in edges]
    per_group: dict[str, list[float]] = {"control": [], "patient": []}
    per_group_same: dict[str, list[float]] = {"control": [], "patient": []}
    for run in small.runs:
        r = run.index
        y = _bold(run.bold)
        nuis = np.column_stack([np.ones(T), tr["motion"][r], tr["drift_basis"],
                                tr["physio"][r], tr["wm_signal"][r]])
        yc = y.T - nuis @ np.linalg.lstsq(nuis, y.T, rcond=None)[0]
        sig = {lab: yc[:, atlas == lab].mean(axis=1) for lab in net_of}
        corr = {(a, b): np.corrcoef(sig[a], sig[b])[0, 1] for a, b in [*map(tuple, edges),
                                                                         *same]}
        per_group[run.group].append(np.mean([corr[tuple(e)] for e in edges]))
        per_group_same[run.group].append(np.mean([corr[e] for e in same]))
    effect = np.mean(per_group["patient"]) - np.mean(per_group["control"])
    assert effect > 0.25
    assert abs(np.mean(per_group_same["patient"]) - np.mean(per_group_same["control"])) < 0.2


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": "float64"}, "dtype"),
    ({"shape": (5, 20, 20)}, "shape"),
    ({"group_effect": 0.85}, "group_effect"),
    ({"n_volumes": 15}, "n_volumes"),
    ({"n_networks": 1}, "n_networks"),
    ({"sessions": "1"}, "sessions"),
    ({"t_r": 0}, "t_r"),
])
def test_invalid_parameters(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate_dataset(tmp_path, **{**SMALL, **kwargs})


def test_dvars_on_a_voxel_sample_for_large_masks(tmp_path):
    # > 10,000 brain voxels: the median and the standardisation use a fixed voxel sample
    ds = simulate_dataset(tmp_path, n_subjects=1, shape=(40, 40, 40), n_volumes=30,
                          n_networks=3, seed=2)
    truth = load_truth(ds.root)
    mask = _flat(truth["mask"]).astype(bool)
    assert mask.sum() > 10_000
    conf = _confounds(ds.confounds[0])
    std, nstd = _nipype_dvars(_bold(ds.bold[0])[mask])
    np.testing.assert_allclose(conf["dvars"][1:], nstd, rtol=0.01)
    np.testing.assert_allclose(conf["std_dvars"][1:], std, rtol=0.03)


def test_too_small_grid_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        simulate_dataset(tmp_path, n_subjects=1, shape=(8, 8, 8), n_volumes=20)
