"""Tests of pipeline.signal.clean_signals against the reference, nilearn.signal.clean.

Every comparison runs nilearn on the same array and asserts the same shape, dtype, values
(see `assert_matches` for the tolerances) and the same warnings. Both evaluations of the
linear part (the precomputed operator and the vectorised steps) are exercised; dask inputs
must give the numpy results, lazily.

Micro-benchmark (by hand, not a test): ``.venv/bin/python -m tests.pipeline.test_signal``.
"""

from __future__ import annotations

import contextlib
import copy
import pickle
import re
import time
import warnings
from pathlib import Path

import dask.array as da
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from dask.callbacks import Callback
from nilearn.signal import clean as nilearn_clean
from scipy.signal import lfilter
from threadpoolctl import threadpool_limits

import pipeline.signal as ps
from pipeline.signal import clean_signals

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CONFOUNDS_TSV = DATA / "confounds" / "test-v21_desc-confounds_timeseries.tsv"
HAXBY = DATA / "haxby2001" / "sub001"

T, V, T_R = 120, 80, 2.0  # nilearn filters at ~0.5 ms per feature: V kept small


# ------------------------------------------------------------------------------ helpers


def make_signals(n_time: int = T, n_features: int = V, n_confounds: int = 4, seed: int = 0):
    """Realistic signals: baselines 100-1000, linear and slow drifts, a 0.05 Hz "neural"
    component, motion-like confounds (AR(1) with a mean and a trend, not so slow that nilearn
    would take them for cosine drifts) leaking into the signals and white noise.
    Returns (signals, confounds)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_time) * T_R
    confounds = np.column_stack(
        [lfilter([1.0], [1.0, -0.8], 0.1 * rng.standard_normal(n_time)) for _ in
         range(n_confounds)]
    ) + rng.normal(0, 0.5, n_confounds) + np.outer(t / t[-1], rng.normal(0, 0.1, n_confounds))
    x = (
        rng.uniform(100, 1000, n_features)
        + np.outer(t / t[-1], rng.normal(0, 20, n_features))
        + np.outer(np.sin(2 * np.pi * 0.004 * t), rng.normal(0, 10, n_features))
        + np.outer(np.sin(2 * np.pi * 0.05 * t), rng.normal(0, 5, n_features))
        + confounds @ rng.normal(0, 5, (n_confounds, n_features))
        + rng.normal(0, 3, (n_time, n_features))
    )
    return x, confounds


def assert_matches(got: np.ndarray, ref: np.ndarray) -> None:
    """Same shape, dtype and values.

    Tolerances. Cleaning removes large baselines and trends (values ~1000) to leave residuals
    of a few units, so rounding errors scale with the *input*, not with each output value, and
    outputs cross zero: a purely relative test is meaningless near zero. Hence an absolute
    tolerance proportional to the peak of the reference output, plus a relative one.

    * float64: rtol 1e-5, atol 1e-8 x peak. Observed differences are ~1e-13 x peak (a matrix
      product instead of nilearn's sequence of steps, different summation orders).
    * float32: rtol 1e-3, atol 1e-4 x peak. nilearn detrends and standardises in float32;
      its float32 result differs from its own float64 result by up to ~2e-5 x peak (we
      compute some steps in float64, so we are closer to the float64 result than nilearn is).
    """
    assert isinstance(got, np.ndarray)
    assert got.shape == ref.shape
    assert got.dtype == ref.dtype
    peak = float(np.nanmax(np.abs(ref))) if ref.size and not np.isnan(ref).all() else 0.0
    if ref.dtype == np.float64:
        rtol, atol = 1e-5, 1e-8 * peak
    else:
        rtol, atol = 1e-3, 1e-4 * peak
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol, equal_nan=True)


def _warning_list(records) -> list[tuple[type, str]]:
    # numpy RuntimeWarnings (e.g. divisions by zero inside nilearn) are not part of the API
    return [
        (w.category, str(w.message)) for w in records
        if not issubclass(w.category, RuntimeWarning)
    ]


def compare(
    signals, *, warns: str | None = None, methods=("operator", "stepwise"), **kwargs
) -> np.ndarray:
    """Run nilearn once and ours with each evaluation of the linear part (the precomputed
    operator and the vectorised steps; the cost model picks one of them); assert same
    values and warnings. Returns ours (last method).

    ``warns``: a regular expression that one of the (common) warnings must match.
    """
    # nilearn may modify an int32 sample_mask in place: give it copies
    ref_kwargs = copy.deepcopy(kwargs)
    with warnings.catch_warnings(record=True) as ref_w:
        warnings.simplefilter("always")
        ref = nilearn_clean(np.array(signals, copy=True), **ref_kwargs)
    ref_warnings = _warning_list(ref_w)
    if warns is not None:
        assert any(re.search(warns, message) for _, message in ref_warnings)
    for method in methods:
        with warnings.catch_warnings(record=True) as got_w, _method(method):
            warnings.simplefilter("always")
            got = clean_signals(signals, **kwargs)
        assert_matches(got, ref)
        assert _warning_list(got_w) == ref_warnings, method
    return got


@contextlib.contextmanager
def _method(name: str):
    """Force an evaluation of the linear part (the cost model picks one otherwise)."""
    saved, ps._METHOD = ps._METHOD, name
    try:
        yield
    finally:
        ps._METHOD = saved


@pytest.fixture(scope="module", autouse=True)
def _single_threaded_blas():
    """Tiny matrix products: multithreaded OpenBLAS only adds synchronisation (up to 100x
    slower on a busy 2-core machine)."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def data():
    return make_signals()


# ------------------------------------------------------------------------------ option grid

FILTERS = {
    "none": dict(),
    "low": dict(low_pass=0.1, t_r=T_R),
    "high": dict(high_pass=0.01, t_r=T_R),
    "band": dict(low_pass=0.08, high_pass=0.01, t_r=T_R),
    "cosine": dict(filter="cosine", high_pass=0.01, t_r=T_R),
}  # filter=False: the same plan as "none" (test_warnings_like_nilearn, dask cases)


@pytest.mark.parametrize("confounds", [False, True])
@pytest.mark.parametrize("filt", list(FILTERS))
@pytest.mark.parametrize("standardize", ["zscore_sample", "psc", None])
@pytest.mark.parametrize("detrend", [True, False])
def test_grid_matches_nilearn(data, detrend, standardize, filt, confounds):
    x, conf = data
    kwargs = dict(detrend=detrend, standardize=standardize, **FILTERS[filt])
    if confounds:
        kwargs["confounds"] = conf
    compare(x, **kwargs)


@pytest.mark.parametrize("filt", list(FILTERS))
@pytest.mark.parametrize("detrend", [True, False])
def test_unstandardized_confounds(data, detrend, filt):
    x, conf = data
    # detrend=False too: nilearn warns, and scales the confounds by their max instead
    compare(x, confounds=conf, standardize_confounds=False, detrend=detrend, **FILTERS[filt])
    if detrend:
        compare(x, confounds=conf, standardize_confounds=False, standardize="psc",
                **FILTERS[filt])


@pytest.mark.parametrize("standardize", [True, False])
def test_boolean_standardize_is_deprecated_like_nilearn(data, standardize):
    x, conf = data
    compare(x, standardize=standardize, confounds=conf, high_pass=0.01, t_r=T_R,
            warns="boolean values for 'standardize'")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(butterworth__order=3),
        dict(butterworth__padtype="even", butterworth__padlen=20),
        dict(butterworth__padtype="constant"),
        dict(butterworth__padtype=None, butterworth__copy=True),
        dict(unrelated_keyword=1),  # ignored by nilearn
    ],
)
def test_butterworth_kwargs(data, kwargs):
    x, conf = data
    compare(x, confounds=conf, low_pass=0.08, high_pass=0.01, t_r=T_R, **kwargs)


def test_cutoffs_at_or_above_nyquist(data):
    x, conf = data
    compare(x, confounds=conf, low_pass=0.3, high_pass=0.01, t_r=T_R, warns="Nyquist")
    compare(x, low_pass=0.3, high_pass=0.29, t_r=T_R,
            warns="band-pass critical frequencies are equal")


def test_collinear_confounds_and_constant_confound(data):
    x, conf = data
    confounds = np.column_stack([conf, conf[:, 0] + conf[:, 1], np.ones(T), 2 * conf[:, 2]])
    compare(x, confounds=confounds, high_pass=0.01, t_r=T_R)
    compare(x, confounds=confounds, standardize_confounds=False, detrend=True)


def test_confounds_as_list_1d_and_paths(data, tmp_path):
    x, conf = data
    compare(x, confounds=[conf[:, :2], pd.DataFrame(conf[:, 2:]), conf[:, 0] ** 2])
    compare(x, confounds=conf[:, 0], low_pass=0.1, t_r=T_R)
    frame = pd.DataFrame(conf, columns=list("abcd"))
    compare(x, confounds=frame, low_pass=0.08, high_pass=0.01, t_r=T_R)
    compare(x, confounds=frame, filter="cosine", high_pass=0.01, t_r=T_R, standardize="psc")
    csv = tmp_path / "confounds.csv"
    pd.DataFrame(conf, columns=list("abcd")).to_csv(csv, index=False)  # with a header
    compare(x, confounds=csv, high_pass=0.01, t_r=T_R)  # pathlib.Path
    compare(x, confounds=str(csv), high_pass=0.01, t_r=T_R)


def test_cost_model_picks_operator_for_short_runs():
    x, conf = make_signals(n_time=100, n_features=2000)
    kwargs = dict(confounds=conf, low_pass=0.08, high_pass=0.01, t_r=T_R)
    plan = ps._build_plan(100, np.dtype(np.float64), _params(**kwargs), {}, 2000)
    assert plan.runs[0].operator is not None
    compare(x, methods=("auto",), **kwargs)
    # long run, few features: building the operator would not pay
    x, conf = make_signals(n_time=1500, n_features=20)
    kwargs["confounds"] = conf
    plan = ps._build_plan(1500, np.dtype(np.float64), _params(**kwargs), {}, 20)
    assert plan.runs[0].operator is None
    compare(x, methods=("auto",), **kwargs)


def _params(**kwargs):
    defaults = dict(runs=None, detrend=True, standardize="zscore_sample", sample_mask=None,
                    confounds=None, standardize_confounds=True, filter="butterworth",
                    low_pass=None, high_pass=None, t_r=2.5, ensure_finite=False,
                    extrapolate=False)
    return {**defaults, **kwargs}


# ------------------------------------------------------------------------------ scrubbing


def _mask(censored, n=T):
    mask = np.ones(n, dtype=bool)
    mask[list(censored)] = False
    return mask


CENSORING = {
    "middle": [30, 31, 32, 70],
    "start-only": [0, 1],
    "end": [60, 117, 118, 119],
    "both-edges": [0, 1, 40, 118, 119],
    # nilearn interpolates row ~i (= T-1-i) for kept i: with 10 and T-1-10 both censored,
    # neither is interpolated (reproduced on purpose)
    "mirrored": [10, T - 1 - 10, 50],
}


SCRUB_CASES = [
    *((f, c, e) for f in ("band", "high") for c in CENSORING for e in (False, True)),
    # extrapolate only matters with the Butterworth filter
    *((f, c, False) for f in ("cosine", "none") for c in CENSORING),
]


@pytest.mark.parametrize(("filt", "censoring", "extrapolate"), SCRUB_CASES)
def test_sample_mask(data, filt, censoring, extrapolate):
    x, conf = data
    mask = _mask(CENSORING[censoring])
    kwargs = dict(confounds=conf, extrapolate=extrapolate, **FILTERS[filt])
    out = compare(x, sample_mask=mask, **kwargs)  # last evaluated: stepwise
    assert out.shape[0] == mask.sum()
    # index form: same result (nilearn converts booleans to indices)
    with _method("stepwise"):
        index_out = clean_signals(x, sample_mask=np.flatnonzero(mask), **kwargs)
    np.testing.assert_array_equal(index_out, out)


@pytest.mark.parametrize("standardize", ["psc", None])
def test_sample_mask_other_standardizations(data, standardize):
    x, conf = data
    compare(x, sample_mask=_mask([0, 20, 21, 119]), confounds=conf, low_pass=0.1, t_r=T_R,
            standardize=standardize)


def test_sample_mask_is_not_modified(data):
    x, _ = data
    sample_mask = np.arange(3, T, dtype=np.int32)
    clean_signals(x, sample_mask=sample_mask, low_pass=0.1, t_r=T_R)
    np.testing.assert_array_equal(sample_mask, np.arange(3, T))
    nilearn_clean(x, sample_mask=sample_mask, low_pass=0.1, t_r=T_R)
    assert sample_mask[0] == 0  # nilearn shifts it in place (not reproduced)


def test_nan_in_censored_volume_does_not_leak(data):
    x, conf = data
    x = x.copy()
    x[50, :] = np.nan  # a corrupted volume, censored
    mask = _mask([50])
    for filt in ("band", "cosine"):
        out = compare(x, sample_mask=mask, confounds=conf, **FILTERS[filt])
        assert np.isfinite(out).all()


# ------------------------------------------------------------------------------ runs


def test_runs(data):
    x, conf = data
    runs = np.repeat([0, 1], T // 2)
    compare(x, runs=runs, confounds=conf, low_pass=0.08, high_pass=0.01, t_r=T_R)
    compare(x, runs=runs, filter="cosine", high_pass=0.01, t_r=T_R, standardize="psc")


def test_runs_sample_masks_and_ignored_options(data):
    x, conf = data
    runs = np.repeat([0, 1, 2], T // 3)
    masks = [_mask([0, 5], 40), _mask([20], 40), _mask([38, 39], 40)]
    # nilearn cleans each run with standardize_confounds=True, extrapolate=False and the
    # default Butterworth options whatever is passed: reproduced
    compare(x, runs=runs, sample_mask=masks, confounds=conf, low_pass=0.1, t_r=T_R,
            standardize_confounds=False, extrapolate=True, butterworth__order=2)
    compare(x, runs=runs, sample_mask=[np.flatnonzero(m) for m in masks], confounds=conf)


def test_runs_unsorted_and_interleaved_labels(data):
    x, conf = data
    # output stacks the runs in sorted label order, as nilearn
    compare(x, runs=np.repeat([1, 0], T // 2), confounds=conf, high_pass=0.01, t_r=T_R)
    compare(x, runs=np.tile([0, 0, 1, 1, 2, 2], T // 6), confounds=conf)


# ------------------------------------------------------------------------------ dtypes, NaN


@pytest.mark.parametrize(
    "dtype", [np.float32, np.float16, np.int16, np.int32, np.int64, np.uint8]
)
@pytest.mark.parametrize("detrend", [True, False])
def test_dtypes(data, dtype, detrend):
    x, conf = data
    if np.dtype(dtype).kind in "iu":  # use the range of the type (uint8: 0-255)
        x = x * min(1.0, 0.9 * np.iinfo(dtype).max / np.abs(x).max())
    xt = x.astype(dtype)
    if dtype == np.float16:
        # float16 stays float16 without detrending (nilearn): only check dtype and shape
        got = clean_signals(xt, detrend=detrend, high_pass=0.01, t_r=T_R, confounds=conf)
        ref = nilearn_clean(xt.copy(), detrend=detrend, high_pass=0.01, t_r=T_R,
                            confounds=conf)
        assert got.dtype == ref.dtype and got.shape == ref.shape
        return
    compare(xt, detrend=detrend, low_pass=0.08, high_pass=0.01, t_r=T_R, confounds=conf)
    compare(xt, detrend=detrend, standardize="psc", confounds=conf)


def test_ensure_finite(data):
    x, conf = data
    x = x.copy()
    x[3, 10] = np.nan
    x[50, 20] = np.inf
    x[:, 30] = np.nan
    x[70, 40] = -np.inf
    for kwargs in (dict(), dict(low_pass=0.08, high_pass=0.01, t_r=T_R, confounds=conf),
                   dict(standardize="psc", filter="cosine", high_pass=0.01, t_r=T_R)):
        out = compare(x, ensure_finite=True, **kwargs)
        assert np.isfinite(out).all()


def test_nan_without_ensure_finite_propagates_like_nilearn(data):
    x, conf = data
    x = x.copy()
    x[3, 10] = np.nan
    x[:, 30] = np.nan
    out = compare(x, confounds=conf, low_pass=0.1, t_r=T_R)
    assert np.isnan(out[:, [10, 30]]).all()
    assert np.isfinite(np.delete(out, [10, 30], axis=1)).all()


@pytest.mark.parametrize("filt", ["none", "band", "cosine"])
def test_constant_features(filt):
    """Constant features give exact zeros when detrending, as in nilearn (with the operator,
    the input mean is removed before the matrix product for that)."""
    x, conf = make_signals(n_features=10)
    x[:, 0], x[:, 1], x[:, 2] = 500.0, 0.1, 0.0
    for standardize in ("zscore_sample", "psc", None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # psc: zero-mean feature
            out = compare(x, confounds=conf, standardize=standardize, **FILTERS[filt])
        if standardize != "psc":
            assert (out[:, [0, 2]] == 0).all()
            assert (np.abs(out[:, 1]) < 1e-12).all()  # 0.1 is not exact: rounding errors
    out = compare(x, detrend=False, filter=False)
    assert (out[:, [0, 2]] == 0).all()
    assert (np.abs(out[:, 1]) < 1e-12).all()


def test_psc_zero_mean_feature_warns(data):
    x, _ = data
    x = x.copy()
    x[:, 3] = 0.0
    out = compare(x, standardize="psc", detrend=False,
                  warns="psc standardization strategy is meaningless")
    assert (out[:, 3] == 0).all()


def test_short_and_degenerate_runs():
    x, _ = make_signals(n_time=12, n_features=20)
    compare(x, high_pass=0.05, t_r=T_R, butterworth__order=2)  # padlen 9 < 12 volumes
    _assert_same_error(x, high_pass=0.05, t_r=T_R)  # default padlen 18 > 12 volumes
    # one volume left: nilearn warns and skips detrending and standardisation
    for standardize in ("zscore_sample", "psc"):
        compare(x, sample_mask=_mask(range(1, 12), 12), filter=False,
                standardize=standardize, warns="3D signal")


# ------------------------------------------------------------------------------ real data


def test_real_fmriprep_confounds_table():
    df = pd.read_csv(CONFOUNDS_TSV, sep="\t")
    n = len(df)  # 30
    x, _ = make_signals(n_time=n, n_features=60, seed=1)
    motion = [c for c in df.columns if c.startswith(("trans_", "rot_"))]  # 24 expansions
    confounds = df[[*motion, "csf", "white_matter", "global_signal"]].fillna(0)
    # 27 confounds for 30 volumes (1 dimension left after detrending): the pivoted-QR rank
    # cut-off is exercised
    compare(x, confounds=confounds, high_pass=0.01, t_r=T_R)
    # (with the cosine term too nothing would be left but rounding errors: 24 confounds)
    compare(x, confounds=confounds.iloc[:, 3:], filter="cosine", high_pass=0.01, t_r=T_R)
    six = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
    compare(x, confounds=df[six], standardize="psc", low_pass=0.1, t_r=T_R,
            sample_mask=_mask([0, 1, 2], n))  # non-steady-state volumes
    # derivatives with their n/a first row: fine when that volume is censored and dropped
    compare(x, confounds=df[[*six, "trans_x_derivative1", "csf_derivative1"]],
            low_pass=0.1, t_r=T_R, sample_mask=_mask([0, 1], n))
    # the table itself, with its n/a first rows, makes nilearn fail: same error
    _assert_same_error(x, confounds=CONFOUNDS_TSV, high_pass=0.01, t_r=T_R)


@pytest.fixture(scope="module")
def haxby():
    bold = nib.load(HAXBY / "run-001" / "bold_25mm.nii.gz")
    mask = np.asarray(nib.load(HAXBY / "masks" / "25mm" / "brain.nii.gz").dataobj) > 0
    scaled = np.asarray(bold.dataobj)[mask].T  # (121, n_voxels), float with scaling
    raw = bold.dataobj.get_unscaled()[mask].T  # int16
    return scaled, raw, HAXBY / "run-001" / "bold_moest.txt"


def test_haxby(haxby):
    scaled, raw, motion_file = haxby
    assert scaled.shape[0] == 121 and raw.dtype == np.int16
    motion = np.loadtxt(motion_file)
    band = dict(low_pass=0.08, high_pass=0.01, t_r=2.5)
    compare(scaled, confounds=motion_file, **band)  # motion file path
    compare(raw, confounds=motion, **band)  # int16 -> float32
    fd = np.abs(np.diff(motion, axis=0, prepend=motion[:1])).sum(axis=1)
    keep = fd < np.quantile(fd, 0.9)  # censor the 10 % highest-motion volumes
    compare(scaled, confounds=motion, sample_mask=keep, standardize="psc", **band)
    compare(scaled, confounds=motion, sample_mask=keep, filter="cosine", high_pass=0.01,
            t_r=2.5)


# ------------------------------------------------------------------------------ errors


def _assert_same_error(signals, **kwargs) -> None:
    # learn the exception type and message from nilearn, then expect the same
    with pytest.raises(Exception) as ref, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nilearn_clean(np.array(signals, copy=True), **copy.deepcopy(kwargs))
    with (
        pytest.raises(type(ref.value), match=re.escape(str(ref.value))) as got,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        clean_signals(signals, **kwargs)
    assert type(got.value) is type(ref.value)


ERROR_CASES = {
    "high >= low": dict(low_pass=0.05, high_pass=0.08, t_r=T_R),
    "high == low": dict(low_pass=0.05, high_pass=0.05, t_r=T_R),
    "no t_r with filter": dict(low_pass=0.1, t_r=None),
    "cosine without high_pass": dict(filter="cosine", t_r=T_R),
    "unknown filter": dict(filter="gaussian", low_pass=0.1),
    "confounds rows": dict(confounds=np.ones((T - 1, 2))),
    "confounds 3d": dict(confounds=np.ones((T, 2, 2))),
    "confounds type": dict(confounds={"a": 1}),
    "sample_mask out of range": dict(sample_mask=np.array([0, 5, T + 3])),
    "sample_mask at the end": dict(sample_mask=np.array([0, 5, T]), low_pass=0.1, t_r=T_R),
    "sample_mask negative": dict(sample_mask=np.array([-1, 5])),
    "sample_mask too long": dict(sample_mask=np.ones(T + 1, dtype=bool)),
    "sample_mask empty": dict(sample_mask=np.array([], dtype=int)),
    "sample_mask type": dict(sample_mask="all"),
    "sample masks vs runs": dict(runs=np.repeat([0, 1], T // 2), sample_mask=[_mask([], 60)]),
    "runs length": dict(runs=np.zeros(T - 2)),
    "standardize zscore": dict(standardize="zscore"),
    "standardize value": dict(standardize="l2"),
    "detrend type": dict(detrend="yes"),
    "t_r type": dict(t_r="2", low_pass=0.1),
    "ensure_finite value": dict(ensure_finite=None),
    "butterworth kwarg": dict(low_pass=0.1, t_r=T_R, butterworth__width=3),
    "nan confounds": dict(confounds=np.full((T, 1), np.nan)),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_like_nilearn(data, case):
    x, _ = data
    _assert_same_error(x, **ERROR_CASES[case])


def test_errors_for_dask_input(data):
    x, _ = data
    dx = da.from_array(x, chunks=(T, 100))
    for case in ("high >= low", "confounds rows", "sample_mask negative", "standardize zscore"):
        with pytest.raises(Exception) as ref:
            nilearn_clean(x.copy(), **copy.deepcopy(ERROR_CASES[case]))
        with pytest.raises(type(ref.value), match=re.escape(str(ref.value))):
            clean_signals(dx, **ERROR_CASES[case])


def test_public_name():
    import pipeline

    assert pipeline.clean_signals is clean_signals


def test_signals_must_be_2d(data):
    x, _ = data
    with pytest.raises(ValueError, match="2-D"):
        clean_signals(x[:, 0])
    with pytest.raises(ValueError, match="2-D"):
        clean_signals(da.from_array(x[:, :4].reshape(T, 2, 2)))


def test_lists_are_accepted_dataframes_are_not(data):
    x, _ = data
    compare(x[:, :5].tolist())
    frame = pd.DataFrame(x[:, :5])
    with pytest.raises(TypeError) as ref:
        nilearn_clean(frame)
    with pytest.raises(TypeError, match=re.escape(str(ref.value))):
        clean_signals(frame)


WARNING_CASES = {
    "cutoff without filter": dict(filter=False, low_pass=0.1),
    "no detrend nor standardized confounds": dict(detrend=False, standardize_confounds=False),
    "cosine with low_pass": dict(filter="cosine", high_pass=0.01, low_pass=0.1, t_r=T_R),
    "cosine too short": dict(filter="cosine", high_pass=0.001, t_r=T_R),
    "negative high_pass": dict(high_pass=-0.01, low_pass=0.1, t_r=T_R),
    "runs repeat warnings": dict(runs=np.repeat([0, 1], T // 2), filter=False, low_pass=0.1),
    "cosine already in confounds": dict(
        filter="cosine", high_pass=0.01, t_r=T_R,
        confounds=np.cos(np.pi / T * (np.arange(T) + 0.5))[:, None],
    ),
}


@pytest.mark.parametrize("case", list(WARNING_CASES))
def test_warnings_like_nilearn(data, case):
    x, conf = data
    kwargs = {"confounds": conf, **WARNING_CASES[case]}
    with warnings.catch_warnings(record=True) as ref_w:
        warnings.simplefilter("always")
        nilearn_clean(x.copy(), **copy.deepcopy(kwargs))
    assert _warning_list(ref_w)  # the case does warn
    compare(x, **kwargs)  # same warnings, same values
    # and attributed to the caller (this file), not to pipeline/ or nilearn/
    with warnings.catch_warnings(record=True) as got_w:
        warnings.simplefilter("always")
        clean_signals(x, **kwargs)
    assert {Path(w.filename).name for w in got_w} == {Path(__file__).name}


# ------------------------------------------------------------------------------ dask

DASK_CASES = {
    "default": dict(),
    "band+confounds": dict(low_pass=0.08, high_pass=0.01, t_r=T_R, confounds="conf"),
    "scrub+extrapolate": dict(low_pass=0.08, t_r=T_R, confounds="conf", extrapolate=True,
                              sample_mask=_mask([0, 30, 31, 119])),
    "scrub index cosine": dict(filter="cosine", high_pass=0.01, t_r=T_R, confounds="conf",
                               sample_mask=np.flatnonzero(_mask([0, 1, 60]))),
    "psc band": dict(standardize="psc", low_pass=0.08, high_pass=0.01, t_r=T_R),
    "psc no detrend": dict(standardize="psc", detrend=False, confounds="conf"),
    "runs": dict(runs=np.repeat([1, 0], T // 2), high_pass=0.01, t_r=T_R, confounds="conf",
                 standardize="psc"),
    "none": dict(standardize=None, detrend=False, filter=False),
}


@pytest.mark.parametrize("case", list(DASK_CASES))
def test_dask_matches_numpy_and_nilearn(data, case):
    x, conf = data
    kwargs = dict(DASK_CASES[case])
    if kwargs.get("confounds") == "conf":
        kwargs["confounds"] = conf
    compare(x, **kwargs)  # numpy path == nilearn
    for method in ("operator", "stepwise"):
        with _method(method):
            expected = clean_signals(x, **kwargs)
            for chunk in (1, 32, V):
                dx = da.from_array(x, chunks=(T, chunk))
                lazy = clean_signals(dx, **kwargs)
                assert isinstance(lazy, da.Array)
                assert lazy.chunks == ((expected.shape[0],), dx.chunks[1])
                assert lazy.dtype == expected.dtype
                got = lazy.compute(scheduler="sync")
                assert got.dtype == expected.dtype
                # the numpy numbers, up to BLAS rounding (blocks of other shapes)
                np.testing.assert_allclose(
                    got, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max()
                )


@pytest.mark.parametrize("case", ["band+confounds", "scrub+extrapolate", "psc band", "runs"])
def test_column_tiles_give_the_same_numbers(data, case, monkeypatch):
    """Blocks wider than a tile are cleaned tile by tile (7 columns here, the last one
    shorter): numpy and dask results stay nilearn's, in both evaluations."""
    import pipeline._kernels as kernels

    x, conf = data
    kwargs = dict(DASK_CASES[case])
    if kwargs.get("confounds") == "conf":
        kwargs["confounds"] = conf
    monkeypatch.setattr(kernels, "TILE_BYTES", 8 * T * 7)
    expected = compare(x, **kwargs)  # numpy path, tiled, == nilearn
    got = clean_signals(da.from_array(x, chunks=(T, 50)), **kwargs).compute(scheduler="sync")
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())


def test_block_temporaries_are_bounded_by_the_tile(monkeypatch):
    """A wide block's cleaning (filter + confounds + zscore) holds its output and a few
    tiles, not several copies of the block: what keeps long runs' memory flat."""
    import tracemalloc

    import pipeline._kernels as kernels

    n_time, n_cols = 400, 10_000  # 32 MB of float64
    x, conf = make_signals(n_time, n_cols)
    kwargs = dict(confounds=conf, low_pass=0.08, high_pass=0.01, t_r=T_R)

    def peak(tile_bytes: int) -> tuple[int, np.ndarray]:
        monkeypatch.setattr(kernels, "TILE_BYTES", tile_bytes)
        with _method("stepwise"):
            tracemalloc.start()
            try:
                out = clean_signals(x, **kwargs)
                return tracemalloc.get_traced_memory()[1], out
            finally:
                tracemalloc.stop()

    tiled, out_tiled = peak(2 * 2**20)
    whole, out_whole = peak(2**40)
    np.testing.assert_allclose(out_tiled, out_whole, rtol=1e-10,
                               atol=1e-12 * np.abs(out_whole).max())
    assert tiled < 1.5 * x.nbytes  # the output (1x) and ~4 tiles of 2 MiB
    assert whole > 2.5 * x.nbytes  # what the same cleaning holds without tiles


class _CountTasks(Callback):
    def __init__(self):
        super().__init__()
        self.started = 0

    def _pretask(self, key, dsk, state):
        self.started += 1


def test_dask_result_is_lazy(data):
    x, conf = data
    computed = []
    dx = da.from_array(x, chunks=(T, 50)).map_blocks(
        lambda b: computed.append(1) or b, dtype=x.dtype, meta=np.empty((0, 0))
    )
    with _CountTasks() as counter:
        for standardize in ("zscore_sample", "psc"):
            lazy = clean_signals(dx, confounds=conf, standardize=standardize,
                                 low_pass=0.08, high_pass=0.01, t_r=T_R,
                                 sample_mask=_mask([0, 10]))
        assert counter.started == 0
        assert not computed
        lazy.compute()
        assert counter.started > 0 and computed


def test_dask_chunked_along_time_raises_fix_it_error(data):
    x, _ = data
    dx = da.from_array(x, chunks=(60, 100))
    with pytest.raises(ValueError, match=re.escape("signals.rechunk({0: -1})")):
        clean_signals(dx)
    out = clean_signals(dx.rechunk({0: -1}), low_pass=0.1, t_r=T_R)
    assert out.chunks[1] == dx.chunks[1]


def test_dask_float32_and_psc_warning_at_compute(data):
    x, _ = data
    x32 = x.astype(np.float32)
    x32[:, 3] = 0
    kwargs = dict(standardize="psc", detrend=False)
    expected = compare(x32, warns="meaningless", **kwargs)
    lazy = clean_signals(da.from_array(x32, chunks=(T, 100)), **kwargs)  # no warning yet
    with pytest.warns(UserWarning, match="meaningless"):
        got = lazy.compute(scheduler="sync")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


@pytest.mark.slow
def test_dask_graph_pickles_and_runs_in_processes(data):
    x, conf = data
    lazy = clean_signals(da.from_array(x, chunks=(T, 100)), confounds=conf, low_pass=0.1,
                         t_r=T_R, standardize="psc")
    pickle.loads(pickle.dumps(lazy.dask))
    expected = clean_signals(x, confounds=conf, low_pass=0.1, t_r=T_R, standardize="psc")
    got = lazy.compute(scheduler="processes", num_workers=2)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())


def test_dask_small_inputs_may_be_dask(data):
    x, conf = data
    expected = clean_signals(x, confounds=conf, sample_mask=_mask([5]), low_pass=0.1, t_r=T_R)
    got = clean_signals(da.from_array(x, chunks=(T, 100)), confounds=da.from_array(conf),
                        sample_mask=da.from_array(_mask([5])), low_pass=0.1, t_r=T_R)
    np.testing.assert_allclose(got.compute(), expected, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------ benchmark


def _benchmark(n_time: int = 200, n_features: int = 58_665, repeat: int = 3) -> None:
    """nilearn.signal.clean vs clean_signals, band-pass 0.01-0.08 Hz, t_r 2, 6 confounds,
    detrend, zscore_sample, float64. Prints the best wall time and its CPU time (all
    threads: less sensitive to other load on the machine)."""
    x, conf = make_signals(n_time=n_time, n_features=n_features, n_confounds=6)
    kwargs = dict(confounds=conf, detrend=True, standardize="zscore_sample",
                  low_pass=0.08, high_pass=0.01, t_r=2.0)

    def best(f, repeat=repeat):
        runs = []
        for _ in range(repeat):
            w0, c0 = time.perf_counter(), time.process_time()
            result = f()
            runs.append((time.perf_counter() - w0, time.process_time() - c0))
        return min(runs), result

    (w_ref, c_ref), ref = best(lambda: nilearn_clean(x, **kwargs), repeat=1)  # ~20 s
    print(f"{n_time} x {n_features} float64, band-pass, 6 confounds, detrend, zscore_sample")
    print(f"{'nilearn.signal.clean':32s} wall {w_ref:7.3f} s   cpu {c_ref:7.3f} s")
    for name in ("auto", "operator", "stepwise"):
        ps._METHOD = name
        (w, c), ours = best(lambda: clean_signals(x, **kwargs))
        err = np.abs(ours - ref).max()
        print(f"{'clean_signals (' + name + ')':32s} wall {w:7.3f} s   cpu {c:7.3f} s   "
              f"x{w_ref / w:5.0f} wall  x{c_ref / c:5.0f} cpu   max |diff| {err:.1e}")
    ps._METHOD = "auto"
    dx = da.from_array(x, chunks=(n_time, 8192))
    (w, c), _ = best(lambda: clean_signals(dx, **kwargs).compute())
    print(f"{'clean_signals (dask, 8192 cols)':32s} wall {w:7.3f} s   cpu {c:7.3f} s   "
          f"x{w_ref / w:5.0f} wall  x{c_ref / c:5.0f} cpu")


if __name__ == "__main__":
    _benchmark()
