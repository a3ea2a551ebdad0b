"""Tests of confounds reading (storage.confounds) on real fMRIPrep tables and motion files."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from storage.confounds import (
    MOTION_COLUMNS,
    check_confounds,
    motion_expansions,
    read_confounds,
)
from storage.errors import InputError

DATA = Path(__file__).parents[2].parent / "shared" / "data"
V21 = DATA / "confounds" / "test-v21_desc-confounds_timeseries.tsv"
OLD = DATA / "confounds" / "no_nonsteady_desc-confounds_regressors.tsv"
HAXBY_MOTION = DATA / "haxby2001" / "sub001" / "run-001" / "bold_moest.txt"

EXPANDED = [f"{p}{s}" for p in MOTION_COLUMNS
            for s in ("", "_derivative1", "_power2", "_derivative1_power2")]


def write(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


def power_fd(motion: np.ndarray) -> np.ndarray:
    """Framewise displacement (Power 2012) of (n, 6) trans (mm) + rot (rad), loop version."""
    fd = np.full(len(motion), np.nan)
    for t in range(1, len(motion)):
        d = np.abs(motion[t] - motion[t - 1])
        fd[t] = d[0] + d[1] + d[2] + 50.0 * (d[3] + d[4] + d[5])
    return fd


# ----------------------------------------------------------------------------------------
# fMRIPrep tables


def test_fmriprep_v21_table():
    df = read_confounds(str(V21))
    assert df.shape == (30, 84)
    assert (df.dtypes == np.float64).all()
    assert isinstance(df.index, pd.RangeIndex)
    assert list(df.columns) == V21.read_text().splitlines()[0].split("\t")
    # fMRIPrep writes n/a in the first row of derivatives, DVARS and FD
    first_row_na = [c for c in df.columns if "derivative1" in c] + [
        "std_dvars", "dvars", "framewise_displacement", "rmsd"]
    assert df.loc[0, first_row_na].isna().all()
    assert not df.loc[1:, first_row_na].isna().any().any()
    assert df.drop(columns=first_row_na).notna().all().all()
    assert df.loc[0, "non_steady_state_outlier00"] == 1.0
    # the same numbers as pandas' own reading of the file
    direct = pd.read_csv(V21, sep="\t", na_values=["n/a"])
    pd.testing.assert_frame_equal(df, direct.astype(np.float64))
    assert df.loc[1, "framewise_displacement"] == pytest.approx(3.25947984825)
    assert df.loc[0, "trans_x"] == pytest.approx(6.79825e-06)


def test_fmriprep_table_matches_nilearn(tmp_path):
    """nilearn's load_confounds on the same file gives our values (it back-fills the n/a)."""
    from nilearn.interfaces.fmriprep import load_confounds

    bold = tmp_path / "sub-01_task-rest_desc-preproc_bold.nii.gz"
    bold.touch()
    for ext in (".tsv", ".json"):
        shutil.copy(V21.with_suffix(ext), tmp_path / f"sub-01_task-rest_desc-confounds_"
                                                     f"timeseries{ext}")
    theirs, _ = load_confounds(str(bold), strategy=("motion", "wm_csf", "global_signal"),
                               motion="full", wm_csf="full", global_signal="full",
                               demean=False)
    ours = read_confounds(str(tmp_path / "sub-01_task-rest_desc-confounds_timeseries.tsv"))
    assert set(theirs.columns) <= set(ours.columns)
    assert set(EXPANDED) <= set(theirs.columns)
    pd.testing.assert_frame_equal(ours[theirs.columns].bfill(), theirs.astype(np.float64),
                                  check_exact=False, rtol=1e-12)


@pytest.mark.parametrize("table", [V21, OLD], ids=["v21", "regressors"])
def test_motion_expansions_reproduce_fmriprep(table):
    """Our expansions and FD of fMRIPrep's own motion columns are fMRIPrep's columns."""
    df = read_confounds(str(table))
    ours = motion_expansions(df[list(MOTION_COLUMNS)])
    assert list(ours.columns) == [*EXPANDED, "framewise_displacement"]
    pd.testing.assert_frame_equal(ours, df[ours.columns], check_exact=False, rtol=1e-6,
                                  atol=1e-12)


def test_table_csv_gz_and_whitespace(tmp_path):
    csv = write(tmp_path, "conf.csv", "a,b\n1,n/a\n2,3.5\n\n")
    pd.testing.assert_frame_equal(read_confounds(csv),
                                  pd.DataFrame({"a": [1.0, 2.0], "b": [np.nan, 3.5]}))
    tsv = tmp_path / "conf.tsv.gz"
    tsv.write_bytes(gzip.compress(b"a\tb\r\n1\tNaN\r\n2\t\r\n"))  # CRLF, empty cell
    pd.testing.assert_frame_equal(read_confounds(str(tsv)),
                                  pd.DataFrame({"a": [1.0, 2.0], "b": [np.nan, np.nan]}))
    txt = write(tmp_path, "regressors.txt", "\ufeffgs  csf\n0.5  1e-3\n")  # BOM, spaces
    pd.testing.assert_frame_equal(read_confounds(txt),
                                  pd.DataFrame({"gs": [0.5], "csf": [1e-3]}))
    header_only = write(tmp_path, "h.tsv", "a\tb\n")
    assert read_confounds(header_only).shape == (0, 2)


# ----------------------------------------------------------------------------------------
# motion-parameter files


def test_haxby_motion_fsl_order():
    raw = np.loadtxt(HAXBY_MOTION)
    assert raw.shape == (121, 6)
    df = read_confounds(str(HAXBY_MOTION))  # FSL order: rotations (rad), then translations
    assert list(df.columns) == [*EXPANDED, "framewise_displacement"]
    assert df.shape == (121, 25)
    assert (df.dtypes == np.float64).all()
    np.testing.assert_array_equal(df[["trans_x", "trans_y", "trans_z"]], raw[:, 3:])
    np.testing.assert_array_equal(df[["rot_x", "rot_y", "rot_z"]], raw[:, :3])
    for p in MOTION_COLUMNS:
        assert np.isnan(df.loc[0, f"{p}_derivative1"])
        assert np.isnan(df.loc[0, f"{p}_derivative1_power2"])
        assert not df.loc[1:, f"{p}_derivative1"].isna().any()
        np.testing.assert_allclose(df[f"{p}_derivative1"][1:], np.diff(df[p]))
        np.testing.assert_allclose(df[f"{p}_power2"], df[p] ** 2)
        np.testing.assert_allclose(df[f"{p}_derivative1_power2"][1:], np.diff(df[p]) ** 2)
    fd = power_fd(np.c_[raw[:, 3:], raw[:, :3]])
    assert np.isnan(df.loc[0, "framewise_displacement"])
    np.testing.assert_allclose(df["framewise_displacement"], fd, equal_nan=True)
    # sub-millimetre motion: rotations really are radians, translations mm
    assert 0.01 < np.nanmedian(fd) < 0.5


def test_spm_and_afni_orders(tmp_path):
    rng = np.random.default_rng(0)
    trans = rng.normal(0, 0.3, (10, 3))
    rot = rng.normal(0, 0.005, (10, 3))
    fsl = write(tmp_path, "prefiltered_func_data_mcf.par",
                "\n".join("  ".join(f"{v:.9g}" for v in row) for row in np.c_[rot, trans]))
    spm = write(tmp_path, "rp_sub-01_task-rest_bold.txt",
                "\n".join("  ".join(f"{v:.9g}" for v in row) for row in np.c_[trans, rot]))
    # AFNI 3dvolreg -1Dfile: roll(z) pitch(x) yaw(y) in degrees, dS(z) dL(x) dP(y) in mm
    afni_rows = np.c_[np.degrees(rot[:, [2, 0, 1]]), trans[:, [2, 0, 1]]]
    afni = write(tmp_path, "motion.1D", "# 3dvolreg output\n# roll pitch yaw dS dL dP\n"
                 + "\n".join(" ".join(f"{v:.12g}" for v in row) for row in afni_rows))
    frames = [read_confounds(fsl), read_confounds(spm, motion_format="spm"),
              read_confounds(afni, motion_format="afni")]
    for df in frames:
        np.testing.assert_allclose(df[list(MOTION_COLUMNS)], np.c_[trans, rot], rtol=1e-7,
                                   atol=1e-12)
        np.testing.assert_allclose(df["framewise_displacement"], power_fd(np.c_[trans, rot]),
                                   rtol=1e-6, equal_nan=True)


# ----------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize(("name", "content", "problem"), [
    ("sub-01_desc-confounds_timeseries.tsv", "csf\tlabel\n1.0\tgood\n2.0\tbad\n",
     "column 'label' is not numeric: line 2 holds 'good'"),
    ("sub-01_desc-confounds_timeseries.tsv", "csf\tflag\n1.0\tn/a\n2.0\tTrue\n",
     "column 'flag' is not numeric: line 3 holds 'True'"),
    ("sub-01_desc-confounds_timeseries.tsv", "csf\tgs\n1.0\tNone\n",
     "column 'gs' is not numeric"),
    ("sub-01_desc-confounds_timeseries.tsv", "csf\tgs\n1.0\t2.0\n3.0\n",
     "line 3 has 1 fields but the header has 2 columns"),
    ("sub-01_desc-confounds_timeseries.tsv", "csf\tgs\n1.0\t2.0\t3.0\n",
     "line 2 has 3 fields"),
    ("sub-01_desc-confounds_timeseries.tsv", "csf\tcsf\n1.0\t2.0\n", "duplicate column"),
    ("sub-01_desc-confounds_timeseries.tsv", "csf\t\tgs\n1\t2\t3\n", "column 2 of the header"),
    ("sub-01_desc-confounds_timeseries.tsv", "\n\n", "empty"),
    ("sub-01_desc-confounds_timeseries.tsv", b"csf\n\xff\xfe\n", "not UTF-8"),
    ("bold_mcf.par", "0 0 0 0 0\n0 0 0 0 0\n", "line 1 has 5 columns"),
    ("bold_mcf.par", "0 0 0 0 0 0\n0 0 0 0 0\n", "line 2 has 5 columns"),
    ("bold_mcf.par", "0 0 0 0 0 0 0\n", "line 1 has 7 columns"),
    ("bold_mcf.par", "0 0 0 0 0 0\n0 0 0 0 0 x\n", "line 2: 'x' is not a number"),
])
def test_bad_confounds(tmp_path, name, content, problem):
    path = write(tmp_path, name, content)
    with pytest.raises(InputError, match=problem) as exc:
        read_confounds(path)
    assert exc.value.path == path
    assert name in str(exc.value)


def test_missing_confounds_file(tmp_path):
    with pytest.raises(InputError, match="does not exist") as exc:
        read_confounds(str(tmp_path / "rp_missing.txt"))
    assert "rp_missing.txt" in str(exc.value)


def test_unknown_motion_format():
    with pytest.raises(ValueError, match="motion_format='fsfast'"):
        read_confounds(str(HAXBY_MOTION), motion_format="fsfast")


# ----------------------------------------------------------------------------------------
# check_confounds


def test_check_confounds():
    df = read_confounds(str(V21))
    check_confounds(df, 30, str(V21))
    df["all_nan"] = np.nan  # kept: a strategy decides
    check_confounds(df, 30, str(V21))
    with pytest.raises(InputError) as exc:
        check_confounds(df, 31, str(V21))
    assert str(exc.value) == f"{V21}: has 30 rows but the BOLD image has 31 volumes"


def test_check_confounds_inf(tmp_path):
    path = write(tmp_path, "sub-01_desc-confounds_timeseries.tsv", "a\tb\n1\t2\n3\tinf\n")
    df = read_confounds(path)
    assert np.isinf(df.loc[1, "b"])
    with pytest.raises(InputError, match=r"infinite values in column\(s\) \['b'\] "
                                         r"\(first at row 2\)") as exc:
        check_confounds(df, 2, path)
    assert "sub-01_desc-confounds_timeseries.tsv" in str(exc.value)


def test_haxby_motion_rows_match_volumes():
    import nibabel as nib

    bold = DATA / "haxby2001" / "sub001" / "run-001" / "bold_25mm.nii.gz"
    n_volumes = nib.load(bold).shape[3]
    check_confounds(read_confounds(str(HAXBY_MOTION)), n_volumes, str(HAXBY_MOTION))
    with pytest.raises(InputError, match=r"bold_moest\.txt: has 121 rows but the BOLD image has "
                                         "120 volumes"):
        check_confounds(read_confounds(str(HAXBY_MOTION)), n_volumes - 1, str(HAXBY_MOTION))
