"""pipeline.strategies against nilearn's fMRIPrep confound loaders on the same files.

nilearn's ``load_confounds``/``load_confounds_strategy`` find the confounds TSV/JSON next to
an image path (the image itself is never read, so an empty file with the right name is
enough, as in nilearn's own tests); ours get the table and the JSON dict. Both must give the
same columns in the same order, the same values, the same sample mask, the same warnings, and
fail on the same inputs.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from nilearn.interfaces.fmriprep import load_confounds, load_confounds_strategy

from pipeline.simulate import simulate_dataset
from pipeline.strategies import (
    STRATEGIES,
    STRATEGY_PRESETS,
    select_confounds,
    strategy_confounds,
)
from storage.confounds import read_confounds
from storage.errors import InputError

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "confounds"

#: name -> (TSV, JSON) in DATA; the two older ones use fMRIPrep < 20.2's "_regressors" suffix
#: (nilearn looks for "_timeseries" then "_regressors").
FILES = {
    "v21": ("test-v21_desc-confounds_timeseries.tsv", "test-v21_desc-confounds_timeseries.json"),
    "v1.4": ("test_desc-confounds_regressors.tsv", "test_desc-confounds_regressors.json"),
    "no_nonsteady": ("no_nonsteady_desc-confounds_regressors.tsv",
                     "test_desc-confounds_regressors.json"),
}
IMG = "sub-01_task-rest_desc-preproc_bold.nii.gz"
AROMA_IMG = "sub-01_task-rest_space-MNI152NLin6Asym_desc-smoothAROMAnonaggr_bold.nii.gz"


@dataclass
class Run:
    """One fMRIPrep run as nilearn sees it (image paths) and as boldflow does (table, dict)."""

    name: str
    img: str
    aroma_img: str
    tsv: Path
    metadata: dict

    def table(self) -> pd.DataFrame:
        return pd.read_csv(self.tsv, sep="\t", na_values="n/a")


def _fmriprep_folder(root: Path, name: str) -> Run:
    tsv, js = FILES[name]
    suffix = tsv.rsplit("_", 1)[1].removesuffix(".tsv")  # timeseries | regressors
    d = root / name
    d.mkdir()
    conf = d / f"sub-01_task-rest_desc-confounds_{suffix}.tsv"
    shutil.copy(DATA / tsv, conf)
    shutil.copy(DATA / js, conf.with_suffix(".json"))
    (d / IMG).touch()
    (d / AROMA_IMG).touch()
    return Run(name, str(d / IMG), str(d / AROMA_IMG), conf,
               json.loads((DATA / js).read_text()))


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("sim")
    sim = simulate_dataset(root, n_subjects=1, shape=(12, 14, 10), n_volumes=60, n_dummy=3)
    run = sim.runs[0]
    aroma = Path(str(run.bold).replace("desc-preproc", "desc-smoothAROMAnonaggr"))
    aroma.touch()
    return Run("sim", str(run.bold), str(aroma), run.confounds,
               json.loads(run.confounds_json.read_text()))


@pytest.fixture(scope="module", params=[*FILES, "sim"])
def run(request, tmp_path_factory) -> Run:
    if request.param == "sim":
        return request.getfixturevalue("sim_run")
    return _fmriprep_folder(tmp_path_factory.mktemp("fmriprep"), request.param)


# ------------------------------------------------------------------------------ helpers
class Q(float):
    """A threshold given as a quantile of the run's column, so that some volumes are censored."""


def _resolve(kwargs: dict, table: pd.DataFrame) -> dict:
    out = dict(kwargs)
    for key, col in (("fd_threshold", "framewise_displacement"),
                     ("std_dvars_threshold", "std_dvars")):
        if isinstance(out.get(key), Q):
            out[key] = float(np.nanquantile(table[col], float(out[key])))
    return out


_IGNORED = (DeprecationWarning, FutureWarning, ResourceWarning)


def _call(fn):
    """(result or exception, sorted (category, message) of the warnings raised)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            result = fn()
        except (ValueError, KeyError) as e:
            result = e
    return result, sorted({(w.category.__name__, str(w.message)) for w in rec
                           if not issubclass(w.category, _IGNORED)})


def _assert_same(expected, got, source: str) -> None:
    (exp, exp_warn), (res, res_warn) = expected, got
    if isinstance(exp, Exception):
        assert isinstance(res, ValueError), f"nilearn raised {exp!r}, we returned"
        if isinstance(res, InputError):  # ours, for what nilearn reports as missing
            assert source in str(res)
        else:  # parameter validation: nilearn's own checks, same message
            assert str(res) == str(exp)
        return
    assert not isinstance(res, Exception), res
    assert res_warn == exp_warn
    (exp_conf, exp_mask), (conf, mask) = exp, res
    if exp_conf is None:
        assert conf is None
    else:
        assert list(conf.columns) == list(exp_conf.columns)
        assert conf.shape == exp_conf.shape
        np.testing.assert_allclose(conf.to_numpy(float), exp_conf.to_numpy(float),
                                   rtol=1e-12, atol=0, equal_nan=True)
    if exp_mask is None:
        assert mask is None
    else:
        assert mask is not None
        np.testing.assert_array_equal(mask, exp_mask)


def _img(run: Run, kwargs: dict) -> str:
    full_aroma = "ica_aroma" in kwargs.get("strategy", ()) and kwargs.get("ica_aroma",
                                                                          "full") == "full"
    return run.aroma_img if full_aroma else run.img


# ------------------------------------------------------------------------------ load_confounds
LEVELS = ["basic", "power2", "derivatives", "full"]
COMPCOR = ["anat_combined", "anat_separated", "temporal", "temporal_anat_combined",
           "temporal_anat_separated"]
SCRUB = ("motion", "high_pass", "wm_csf", "scrub")

CASES: list[dict] = [
    {},
    {"demean": False},
    *({"strategy": ("motion",), "motion": lv} for lv in LEVELS),
    *({"strategy": ("high_pass", "wm_csf"), "wm_csf": lv, "demean": False} for lv in LEVELS),
    *({"strategy": ["global_signal"], "global_signal": lv} for lv in LEVELS),
    {"strategy": ("motion", "high_pass", "wm_csf", "global_signal"), "motion": "power2",
     "wm_csf": "full", "global_signal": "derivatives"},
    # scrubbing: default thresholds, then quantile thresholds so that some volumes survive
    {"strategy": SCRUB},
    {"strategy": SCRUB, "fd_threshold": Q(0.8), "std_dvars_threshold": Q(0.9)},
    {"strategy": SCRUB, "fd_threshold": Q(0.8), "std_dvars_threshold": Q(0.9), "scrub": 0},
    {"strategy": SCRUB, "fd_threshold": Q(0.8), "std_dvars_threshold": Q(0.9), "scrub": 2,
     "demean": False},
    {"strategy": SCRUB, "fd_threshold": Q(0.7), "std_dvars_threshold": 1e9, "scrub": 3},
    {"strategy": SCRUB, "fd_threshold": 1e9, "std_dvars_threshold": Q(0.85)},
    {"strategy": ("scrub",), "fd_threshold": Q(0.9), "std_dvars_threshold": Q(0.9)},
    {"strategy": ("high_pass",)},
    {"strategy": ("non_steady_state", "motion")},
    {"strategy": ()},
    # compcor: every type, all / some components
    *({"strategy": ("high_pass", "compcor"), "compcor": cc, "n_compcor": n}
      for cc in COMPCOR for n in ("all", 1, 3)),
    {"strategy": ("high_pass", "motion", "compcor"), "compcor": "anat_combined",
     "n_compcor": 2, "demean": False},
    # ICA-AROMA: "full" (nilearn needs the desc-smoothAROMAnonaggr image) and "basic"
    {"strategy": ("high_pass", "wm_csf", "ica_aroma")},
    {"strategy": ("high_pass", "wm_csf", "ica_aroma"), "ica_aroma": "basic"},
    {"strategy": ("ica_aroma",), "ica_aroma": "basic", "demean": False},
    # invalid parameters: same ValueError
    {"strategy": ("motion",), "motion": "nope"},
    {"strategy": ("compcor",)},
    {"strategy": ("high_pass", "compcor"), "compcor": "nope"},
    {"strategy": "motion"},
]


def _case_id(case: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in case.items()) or "defaults"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_select_confounds_matches_nilearn(run: Run, case: dict) -> None:
    table = run.table()
    kwargs = _resolve(case, table)
    expected = _call(lambda: load_confounds(_img(run, kwargs), **kwargs))
    got = _call(lambda: select_confounds(table, metadata=run.metadata, source=str(run.tsv),
                                         **kwargs))
    _assert_same(expected, got, str(run.tsv))


def test_quantile_scrubbing_censors_some_but_not_all(run: Run) -> None:
    table = run.table()
    kwargs = _resolve({"strategy": SCRUB, "fd_threshold": Q(0.8),
                       "std_dvars_threshold": Q(0.9)}, table)
    _, mask = select_confounds(table, **kwargs)
    n_nss = sum(int(table[c].sum()) for c in table if "non_steady_state" in c)
    assert 0 < mask.size < len(table) - n_nss


def test_all_censored_warns_like_nilearn() -> None:
    table = pd.read_csv(DATA / FILES["v21"][0], sep="\t", na_values="n/a")
    with pytest.warns(RuntimeWarning, match="All volumes were marked as motion outliers"):
        conf, mask = select_confounds(table, strategy=SCRUB)
    assert mask.size == 0 and conf.shape == (len(table), 24 + 1 + 2)


# ------------------------------------------------------------------------------ presets
NILEARN_PRESET_CASES = [
    ("simple", {}),
    ("simple", {"global_signal": "full"}),
    ("simple", {"motion": "basic", "wm_csf": "power2", "demean": False}),
    ("simple", {"fd_threshold": 0.3, "motion": None}),  # not needed: warning; None ignored
    ("scrubbing", {}),
    ("scrubbing", {"fd_threshold": Q(0.8), "std_dvars_threshold": Q(0.9)}),
    ("scrubbing", {"fd_threshold": Q(0.8), "std_dvars_threshold": Q(0.9), "scrub": 0}),
    ("scrubbing", {"global_signal": "basic", "motion": "derivatives", "demean": False}),
    ("compcor", {}),
    ("compcor", {"n_compcor": 2}),
    ("compcor", {"compcor": "temporal_anat_separated"}),
    ("compcor", {"compcor": "anat_separated", "n_compcor": 1, "global_signal": "power2"}),
    ("ica_aroma", {}),
    ("ica_aroma", {"wm_csf": "full", "global_signal": "basic"}),
    ("ica_aroma", {"ica_aroma": "basic"}),  # fixed to "full" in nilearn: warning, ignored
]


@pytest.mark.parametrize(("name", "overrides"), NILEARN_PRESET_CASES,
                         ids=[f"{n}-{_case_id(o)}" for n, o in NILEARN_PRESET_CASES])
def test_nilearn_presets_match_load_confounds_strategy(run: Run, name: str,
                                                       overrides: dict) -> None:
    table = run.table()
    kwargs = _resolve(overrides, table)
    img = run.aroma_img if name == "ica_aroma" else run.img
    expected = _call(lambda: load_confounds_strategy(img, name, **kwargs))
    got = _call(lambda: strategy_confounds(table, strategy=name, metadata=run.metadata,
                                           source=str(run.tsv), **kwargs))
    _assert_same(expected, got, str(run.tsv))


#: our presets as nilearn load_confounds calls
OUR_PRESETS = {
    "yeo2011": {"strategy": ("motion", "wm_csf", "global_signal"), "motion": "derivatives",
                "wm_csf": "derivatives", "global_signal": "derivatives"},
    "24p": {"strategy": ("motion",), "motion": "full"},
    "36p": {"strategy": ("motion", "wm_csf", "global_signal"), "motion": "full",
            "wm_csf": "full", "global_signal": "full"},
}


@pytest.mark.parametrize("name", [*OUR_PRESETS, "none"])
def test_our_presets_match_load_confounds(run: Run, name: str) -> None:
    table = run.table()
    got = _call(lambda: strategy_confounds(table, strategy=name, metadata=run.metadata))
    if name == "none":  # nilearn's empty strategy, without its "strategy is empty" warning
        expected = _call(lambda: load_confounds(run.img, strategy=()))
        assert got[1] == []
        got = (got[0], expected[1])
    else:
        expected = _call(lambda: load_confounds(run.img, **OUR_PRESETS[name]))
    _assert_same(expected, got, str(run.tsv))


def test_our_presets_columns() -> None:
    table = pd.read_csv(DATA / FILES["v21"][0], sep="\t", na_values="n/a")
    motion = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
    yeo = [*motion, "csf", "white_matter", "global_signal"]
    conf, mask = strategy_confounds(table, strategy="yeo2011")
    assert list(conf.columns) == sorted([*yeo, *(f"{c}_derivative1" for c in yeo)])
    assert conf.shape == (30, 18)
    np.testing.assert_array_equal(mask, np.arange(3, 30))  # 3 non-steady-state volumes
    assert not any("cosine" in c for c in conf.columns)
    np.testing.assert_allclose(conf.iloc[mask].mean(), 0, atol=1e-9)  # mean of kept volumes

    expand = ("", "_derivative1", "_power2", "_derivative1_power2")
    conf, _ = strategy_confounds(table, strategy="24p")
    assert set(conf.columns) == {f"{m}{s}" for m in motion for s in expand}
    conf, _ = strategy_confounds(table, strategy="36p")
    assert conf.shape[1] == 36
    assert set(conf.columns) == {f"{m}{s}" for m in [*motion, "csf", "white_matter",
                                                     "global_signal"] for s in expand}
    conf, mask = strategy_confounds(table, strategy="none")
    assert conf is None
    np.testing.assert_array_equal(mask, np.arange(3, 30))
    no_nss = pd.read_csv(DATA / FILES["no_nonsteady"][0], sep="\t", na_values="n/a")
    assert strategy_confounds(no_nss, strategy="none") == (None, None)


def test_strategies_names() -> None:
    assert STRATEGIES == ("simple", "scrubbing", "compcor", "ica_aroma", "yeo2011", "24p",
                          "36p", "none")
    assert set(STRATEGY_PRESETS) == set(STRATEGIES)
    with pytest.raises(ValueError, match="'strategy' must be one of"):
        strategy_confounds(pd.DataFrame(), strategy="friston")


def test_preset_overrides() -> None:
    table = pd.read_csv(DATA / FILES["v21"][0], sep="\t", na_values="n/a")
    conf, _ = strategy_confounds(table, strategy="24p", global_signal="basic", motion="basic")
    assert list(conf.columns) == sorted(["trans_x", "trans_y", "trans_z", "rot_x", "rot_y",
                                         "rot_z", "global_signal"])
    conf, _ = strategy_confounds(table, strategy="yeo2011", global_signal="basic")
    assert conf.shape[1] == 17 and "global_signal_derivative1" not in conf
    conf, _ = strategy_confounds(table, strategy="yeo2011", global_signal=None)
    assert conf.shape[1] == 18
    with pytest.warns(UserWarning, match=r"not needed .* 'yeo2011': \['scrub'\]"):
        strategy_confounds(table, strategy="yeo2011", scrub=3)
    with pytest.warns(UserWarning, match=r"not needed .* 'none': \['demean'\]"):
        strategy_confounds(table, strategy="none", demean=False)


# ------------------------------------------------------------------------------ errors
def test_missing_columns_error_names_source_and_columns() -> None:
    table = pd.read_csv(DATA / FILES["v21"][0], sep="\t", na_values="n/a")
    broken = table.drop(columns=["rot_z_power2", "csf", "framewise_displacement"])
    src = "sub-02/func/sub-02_task-rest_desc-confounds_timeseries.tsv"
    with pytest.raises(InputError) as info:
        select_confounds(broken, strategy=SCRUB, wm_csf="full", source=src)
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and info.value.path == src
    assert msg.startswith(src)
    for col in ("rot_z_power2", "csf", "framewise_displacement"):
        assert col in msg
    for component in ("motion", "wm_csf", "scrub"):
        assert f"{component}:" in msg
    # nilearn itself fails on a partly missing wm_csf with a bare KeyError; we name the columns
    with pytest.raises(InputError, match=r"wm_csf: missing columns \['csf'\]"):
        select_confounds(table.drop(columns=["csf"]), source=src)


def test_compcor_needs_metadata() -> None:
    table = pd.read_csv(DATA / FILES["v21"][0], sep="\t", na_values="n/a")
    for meta in (None, {}):
        with pytest.raises(InputError, match=r"x\.tsv: .*needs the confounds JSON metadata"):
            strategy_confounds(table, strategy="compcor", metadata=meta, source="x.tsv")
    meta = json.loads((DATA / FILES["v21"][1]).read_text())
    with pytest.raises(InputError, match=r"missing columns \['a_comp_cor_04'\]"):
        strategy_confounds(table.drop(columns=["a_comp_cor_04"]), strategy="compcor",
                           metadata=meta)
    del meta["a_comp_cor_01"]["Mask"]
    with pytest.raises(InputError, match="'Mask'"):
        strategy_confounds(table, strategy="compcor", metadata=meta)
    with pytest.raises(InputError, match="no CompCor component of type 'temporal'"):
        strategy_confounds(table, strategy="compcor", compcor="temporal",
                           metadata={"a_comp_cor_00": {"Mask": "combined"}})


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"strategy": ("high_pass", "compcor"), "n_compcor": 0}, "n_compcor"),
    ({"strategy": ("high_pass", "compcor"), "n_compcor": "3"}, "n_compcor"),
    ({"strategy": ("tedana",)}, "tedana"),
    ({"strategy": ("motion", "ica_aroma"), "ica_aroma": "aggressive"}, "'ica_aroma' must be"),
    ({"strategy": ("motion", "nope")}, "'strategy' must be one of"),
])
def test_invalid_parameters(kwargs: dict, match: str) -> None:
    table = pd.read_csv(DATA / FILES["v21"][0], sep="\t", na_values="n/a")
    meta = json.loads((DATA / FILES["v21"][1]).read_text())
    with pytest.raises(ValueError, match=match):
        select_confounds(table, metadata=meta, **kwargs)


# ------------------------------------------------------------------------------ inputs
def test_input_forms_give_the_same_result() -> None:
    path = DATA / FILES["v21"][0]
    table = pd.read_csv(path, sep="\t", na_values="n/a")
    before = table.copy()
    kwargs = {"strategy": SCRUB, "fd_threshold": 2.0, "std_dvars_threshold": 3.0}
    ref_conf, ref_mask = select_confounds(table, **kwargs)
    pd.testing.assert_frame_equal(table, before)  # input untouched

    # a time index (seconds), as the store's tables have
    timed = table.set_axis(np.arange(len(table)) * 2.0, axis=0)
    conf, mask = select_confounds(timed, **kwargs)
    pd.testing.assert_frame_equal(conf, ref_conf)
    np.testing.assert_array_equal(mask, ref_mask)

    # the store's xarray variable, (confound, time) or (time, confound), float32
    da = xr.DataArray(table.to_numpy(np.float32).T, dims=("confound", "time"),
                      coords={"confound": np.array(table.columns, dtype=str),
                              "time": np.arange(len(table)) * 2.0})
    conf, mask = select_confounds(da, **kwargs)
    assert list(conf.columns) == list(ref_conf.columns) and conf.dtypes.eq(np.float64).all()
    scale = float(ref_conf.abs().to_numpy().max())
    np.testing.assert_allclose(conf, ref_conf, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_array_equal(mask, ref_mask)

    # storage.read_confounds (what ingestion stores)
    conf, mask = select_confounds(read_confounds(str(path)), **kwargs)
    pd.testing.assert_frame_equal(conf, ref_conf)
    np.testing.assert_array_equal(mask, ref_mask)
