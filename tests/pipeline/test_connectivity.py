"""Tests of region-to-region connectivity and group comparison (pipeline.connectivity).

References: nilearn's ``ConnectivityMeasure`` / ``sym_matrix_to_vec`` for the matrices,
``scipy.stats.ttest_ind`` / ``false_discovery_control`` for the statistics, and ground truth
(simulated group effects, null designs, the project simulator) for the whole chain.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from nilearn.connectome import ConnectivityMeasure, sym_matrix_to_vec, vec_to_sym_matrix
from scipy import stats

from pipeline.connectivity import (
    GroupComparison,
    compare_groups,
    connectivity,
    edge_index,
    group_connectivity,
    group_mean,
    unvectorize,
    vectorize,
)
from pipeline.simulate import load_truth, simulate_dataset

T, R, N_SUBJECTS = 100, 12, 5
LABELS = [f"17Networks_LH_Region_{i}" for i in range(R)]
NILEARN_KINDS = ["correlation", "partial correlation", "covariance", "precision"]
ATOL = 1e-10


def _signals(x: np.ndarray, labels=LABELS) -> xr.DataArray:
    return xr.DataArray(x, dims=("time", "region"), coords={"region": list(labels)})


@pytest.fixture(scope="module")
def arrays() -> list[np.ndarray]:
    """Correlated, non-centred region signals of a few subjects."""
    rng = np.random.default_rng(42)
    mixing = rng.normal(size=(R, R)) / np.sqrt(R) + np.eye(R)
    return [rng.normal(size=(T, R)) @ mixing * rng.uniform(0.5, 3, R) + rng.normal(0, 5, R)
            for _ in range(N_SUBJECTS)]


@pytest.fixture(scope="module")
def signals(arrays) -> list[xr.DataArray]:
    return [_signals(x) for x in arrays]


SUBJECTS = [f"{i + 1:02d}" for i in range(N_SUBJECTS)]


# --------------------------------------------------------------------------------------
# matrices vs nilearn
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", NILEARN_KINDS)
def test_kinds_equal_nilearn(arrays, signals, kind):
    expected = ConnectivityMeasure(kind=kind).fit_transform(arrays)
    group = group_connectivity(signals, kind, subjects=SUBJECTS)
    assert group.dims == ("subject", "region", "region_")
    assert group.attrs["kind"] == kind
    assert list(group["region"].values) == LABELS == list(group["region_"].values)
    np.testing.assert_allclose(group.values, expected, rtol=0, atol=ATOL)
    for x, sig, exp in zip(arrays, signals, expected, strict=True):
        one = connectivity(sig, kind)
        assert one.dims == ("region", "region_")
        np.testing.assert_allclose(one.values, exp, rtol=0, atol=ATOL)
        np.testing.assert_allclose(connectivity(x, kind).values, exp, rtol=0, atol=ATOL)


def test_custom_cov_estimator_is_passed_to_nilearn(arrays):
    from sklearn.covariance import EmpiricalCovariance

    est = EmpiricalCovariance()
    expected = ConnectivityMeasure(kind="correlation", cov_estimator=est).fit_transform(
        arrays[:1])[0]
    got = connectivity(arrays[0], "correlation", cov_estimator=est)
    np.testing.assert_allclose(got.values, expected, rtol=0, atol=ATOL)
    # unshrunk correlation of z-scored series is the Pearson correlation
    np.testing.assert_allclose(got.values, np.corrcoef(arrays[0].T), rtol=0, atol=ATOL)


def test_pearson_is_corrcoef(arrays, signals):
    got = connectivity(signals[0], "pearson")
    np.testing.assert_allclose(got.values, np.corrcoef(arrays[0], rowvar=False),
                               rtol=0, atol=ATOL)
    # Ledoit-Wolf shrinks correlations towards 0: nilearn's default is not Pearson
    lw = connectivity(signals[0], "correlation").values
    off = ~np.eye(R, dtype=bool)
    assert np.all(np.abs(lw[off]) < np.abs(got.values[off]))


def test_tangent_equals_nilearn_on_group(arrays, signals):
    expected = ConnectivityMeasure(kind="tangent").fit_transform(arrays)
    got = group_connectivity(signals, "tangent", subjects=SUBJECTS)
    np.testing.assert_allclose(got.values, expected, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="group_connectivity"):
        connectivity(signals[0], "tangent")
    with pytest.raises(ValueError, match="at least 2 subjects"):
        group_connectivity(signals[:1], "tangent", subjects=["01"])


def test_dataarray_dim_order_and_region_alignment(arrays, signals):
    ref = connectivity(signals[1], "partial correlation")
    transposed = connectivity(signals[1].T, "partial correlation")
    xr.testing.assert_identical(ref, transposed)
    # a subject whose columns come in another order is aligned by label
    shuffled = signals[1].isel(region=np.random.default_rng(0).permutation(R))
    group = group_connectivity([signals[0], shuffled], "correlation", subjects=["a", "b"])
    np.testing.assert_allclose(group.sel(subject="b").values,
                               connectivity(signals[1], "correlation").values, atol=ATOL)
    with pytest.raises(ValueError, match="different regions"):
        group_connectivity([signals[0], signals[1].assign_coords(region=list("abcdefghijkl"))],
                           subjects=["a", "b"])


@pytest.mark.parametrize("discard_diagonal", [False, True])
def test_vectorize_equals_nilearn(signals, discard_diagonal):
    group = group_connectivity(signals, "covariance", subjects=SUBJECTS)
    expected = sym_matrix_to_vec(group.values, discard_diagonal=discard_diagonal)
    np.testing.assert_array_equal(vectorize(group.values, discard_diagonal), expected)
    np.testing.assert_array_equal(vectorize(group.values[0], discard_diagonal), expected[0])
    vec = vectorize(group, discard_diagonal)
    assert vec.dims == ("subject", "edge")
    np.testing.assert_array_equal(vec.values, expected)
    rows, cols = edge_index(R, discard_diagonal)
    assert list(vec["region_a"].values) == [LABELS[c] for c in cols]
    assert list(vec["region_b"].values) == [LABELS[r] for r in rows]
    # inverse
    diag = None
    if discard_diagonal:
        diag = np.diagonal(group.values, axis1=1, axis2=2) / np.sqrt(2)
    np.testing.assert_allclose(unvectorize(expected, diag),
                               vec_to_sym_matrix(expected, diagonal=diag), rtol=0, atol=0)
    back = unvectorize(vec, diag)
    assert back.dims == ("subject", "region", "region_")
    assert list(back["region"].values) == LABELS
    np.testing.assert_allclose(back.values, group.values, rtol=1e-14, atol=1e-14)


# --------------------------------------------------------------------------------------
# empty regions
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [*NILEARN_KINDS, "pearson"])
def test_nan_region_gets_nan_row_and_column(arrays, kind):
    x = arrays[2].copy()
    empty = [3, 7]
    x[:, empty] = np.nan
    got = connectivity(_signals(x), kind).values
    keep = [i for i in range(R) if i not in empty]
    if kind == "pearson":
        expected = np.corrcoef(arrays[2][:, keep], rowvar=False)
    else:
        expected = ConnectivityMeasure(kind=kind).fit_transform([arrays[2][:, keep]])[0]
    assert np.isnan(got[empty]).all() and np.isnan(got[:, empty]).all()
    np.testing.assert_allclose(got[np.ix_(keep, keep)], expected, rtol=0, atol=ATOL)


def test_all_regions_empty_gives_all_nan():
    got = connectivity(np.full((10, 3), np.nan))
    assert got.shape == (3, 3) and np.isnan(got.values).all()


def test_tangent_drops_regions_empty_in_any_subject(arrays):
    xs = [x.copy() for x in arrays]
    xs[1][:, 5] = np.nan
    with pytest.warns(UserWarning, match=LABELS[5]):
        got = group_connectivity([_signals(x) for x in xs], "tangent", subjects=SUBJECTS)
    keep = [i for i in range(R) if i != 5]
    expected = ConnectivityMeasure(kind="tangent").fit_transform([x[:, keep] for x in arrays])
    assert np.isnan(got.values[:, 5, :]).all() and np.isnan(got.values[:, :, 5]).all()
    np.testing.assert_allclose(got.values[:, keep][:, :, keep], expected, rtol=0, atol=ATOL)


def test_group_connectivity_nan_region_only_in_that_subject(arrays):
    xs = [x.copy() for x in arrays]
    xs[1][:, 5] = np.nan
    got = group_connectivity([_signals(x) for x in xs], "correlation", subjects=SUBJECTS)
    assert np.isnan(got.values[1, 5]).all()
    assert not np.isnan(got.values[[0, 2, 3, 4]]).any()


def test_partial_nan_and_constant_columns(arrays):
    x = arrays[0].copy()
    x[:10, 2] = np.nan
    with pytest.raises(ValueError, match=LABELS[2]):
        connectivity(_signals(x))
    x = arrays[0].copy()
    x[:, 4] = 7.0
    with pytest.warns(UserWarning, match=f"constant.*{LABELS[4]}"):
        got = connectivity(_signals(x)).values
    assert np.isnan(got[4]).all() and np.isnan(got[:, 4]).all()
    with pytest.raises(ValueError, match="2 time points"):
        connectivity(arrays[0][:1])


def test_metadata_becomes_subject_coordinates(signals):
    participants = pd.DataFrame({
        "participant_id": [f"sub-{s}" for s in SUBJECTS[::-1]],
        "group": ["patient", "control", "patient", "control", "patient"],
        "age": [30, 41, 52, 63, 24],
    })
    got = group_connectivity(signals, subjects=SUBJECTS, metadata=participants)
    assert list(got["subject"].values) == SUBJECTS
    assert list(got["group"].values) == ["patient", "control", "patient", "control",
                                         "patient"][::-1]
    assert list(got["age"].values) == [24, 63, 52, 41, 30]
    with pytest.warns(UserWarning, match="missing from metadata"):
        partial = group_connectivity(signals, subjects=SUBJECTS, metadata=participants[1:])
    assert pd.isna(partial["group"].values[-1])
    with pytest.raises(ValueError, match="duplicate subjects"):
        group_connectivity(signals[:2], subjects=["01", "01"])


# --------------------------------------------------------------------------------------
# group comparison vs scipy
# --------------------------------------------------------------------------------------
def _simulated_matrices(rng, n_regions, corr_ref, corr_cmp, n_ref=15, n_cmp=15, n_time=200,
                        kind="correlation") -> xr.DataArray:
    """Correlation matrices of subjects whose signals have the given true correlations."""
    series = []
    for corr, n in ((corr_ref, n_ref), (corr_cmp, n_cmp)):
        chol = np.linalg.cholesky(corr)
        series += list(rng.standard_normal((n, n_time, n_regions)) @ chol.T)
    labels = [f"r{i:02d}" for i in range(n_regions)]
    subjects = [f"{i + 1:02d}" for i in range(n_ref + n_cmp)]
    meta = pd.DataFrame({"participant_id": subjects,
                         "group": ["control"] * n_ref + ["patient"] * n_cmp})
    return group_connectivity([_signals(s, labels) for s in series], kind,
                              subjects=subjects, metadata=meta)


def _base_correlation(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    load = rng.normal(0, 0.4, size=(n, 2))
    cov = load @ load.T + np.eye(n)
    d = np.sqrt(np.diag(cov))
    return cov / np.outer(d, d)


@pytest.fixture(scope="module")
def null_matrices() -> xr.DataArray:
    base = _base_correlation(8)
    return _simulated_matrices(np.random.default_rng(7), 8, base, base, n_ref=12, n_cmp=9)


def test_welch_equals_scipy(null_matrices):
    res = compare_groups(null_matrices, "group")
    assert isinstance(res, GroupComparison)
    assert res.groups == ("control", "patient") and res.test == "welch" and res.fisher_z
    assert res.n_subjects == {"control": 12, "patient": 9}
    edges = res.edges
    assert list(edges.columns) == ["region_a", "region_b", "mean_control", "mean_patient",
                                   "difference", "statistic", "p", "p_fdr", "significant"]
    assert len(edges) == 8 * 7 // 2
    with np.errstate(divide="ignore"):  # the diagonal
        z = np.arctanh(null_matrices.values)
    ctrl = null_matrices["group"].values == "control"
    for k in (0, 5, 17, 27):
        a, b = edges.loc[k, "region_a"], edges.loc[k, "region_b"]
        i, j = int(a[1:]), int(b[1:])
        assert i < j
        ref = stats.ttest_ind(z[~ctrl, i, j], z[ctrl, i, j], equal_var=False)
        assert edges.loc[k, "statistic"] == pytest.approx(ref.statistic, rel=1e-10)
        assert edges.loc[k, "p"] == pytest.approx(ref.pvalue, rel=1e-10)
        assert res.statistic.sel(region=a, region_=b) == edges.loc[k, "statistic"]
        assert res.p.sel(region=b, region_=a) == edges.loc[k, "p"]
        assert edges.loc[k, "mean_control"] == pytest.approx(np.tanh(z[ctrl, i, j].mean()))
        assert edges.loc[k, "difference"] == pytest.approx(
            np.tanh(z[~ctrl, i, j].mean()) - np.tanh(z[ctrl, i, j].mean()))
    np.testing.assert_allclose(edges["p_fdr"], stats.false_discovery_control(edges["p"]),
                               rtol=1e-12)
    assert np.isnan(np.diag(res.p.values)).all()
    # explicit labels and order
    labels = list(null_matrices["group"].values)
    flipped = compare_groups(null_matrices, labels, order=("patient", "control"))
    np.testing.assert_allclose(flipped.edges["statistic"], -edges["statistic"])
    np.testing.assert_allclose(flipped.edges["p"], edges["p"])
    # without Fisher z: the raw correlations
    raw = compare_groups(null_matrices, "group", fisher_z=False)
    r = null_matrices.values
    ref = stats.ttest_ind(r[~ctrl, 0, 1], r[ctrl, 0, 1], equal_var=False)
    assert raw.edges.loc[0, "statistic"] == pytest.approx(ref.statistic, rel=1e-10)


def test_nan_edges_are_left_out(null_matrices):
    m = null_matrices.copy()
    ctrl = np.flatnonzero(m["group"].values == "control")
    m.values[ctrl[0], 2, :] = m.values[ctrl[0], :, 2] = np.nan  # region r02 empty in 1 subject
    m.values[ctrl[1:], 5, :] = m.values[ctrl[1:], :, 5] = np.nan  # r05 defined in 1 control
    res = compare_groups(m, "group")
    e = res.edges.set_index(["region_a", "region_b"])
    with np.errstate(divide="ignore"):
        z = np.arctanh(m.values)
    is_c = m["group"].values == "control"
    ref = stats.ttest_ind(z[~is_c, 2, 3], z[is_c, 2, 3], equal_var=False, nan_policy="omit")
    assert e.loc[("r02", "r03"), "p"] == pytest.approx(ref.pvalue, rel=1e-10)
    nan_edges = e.xs("r05", level="region_b").index.tolist() + \
        e.xs("r05", level="region_a").index.tolist()
    assert len(nan_edges) == 7
    assert e["p"].isna().sum() == 7 and e["p_fdr"].isna().sum() == 7
    assert not e["significant"][e["p"].isna()].any()
    finite = e["p"].notna()
    np.testing.assert_allclose(e.loc[finite, "p_fdr"],
                               stats.false_discovery_control(e.loc[finite, "p"]), rtol=1e-12)


def test_group_label_errors(null_matrices):
    n = null_matrices.sizes["subject"]
    with pytest.raises(ValueError, match=r"exactly two groups.*'a'.*'b'.*'c'"):
        compare_groups(null_matrices, ["a", "b", "c"] * (n // 3))
    with pytest.raises(ValueError, match=r"exactly two groups.*found 1"):
        compare_groups(null_matrices, ["a"] * n)
    with pytest.raises(ValueError, match="no coordinate 'diagnosis'"):
        compare_groups(null_matrices, "diagnosis")
    labels = list(null_matrices["group"].values)
    labels[0] = None
    labels[3] = np.nan
    with pytest.warns(UserWarning, match="dropping 2 subjects.*01.*04"):
        res = compare_groups(null_matrices, labels)
    assert res.n_subjects == {"control": 10, "patient": 9}
    with pytest.raises(ValueError, match="at least 2 subjects"):
        compare_groups(null_matrices, ["a"] * (n - 1) + ["b"])


def test_group_mean(null_matrices):
    gm = group_mean(null_matrices, "group")
    assert gm.dims == ("group", "region", "region_")
    assert list(gm["group"].values) == ["control", "patient"]
    assert list(gm["n_subjects"].values) == [12, 9]
    ctrl = null_matrices["group"].values == "control"
    expected = np.tanh(np.arctanh(null_matrices.values[ctrl][:, 0, 4]).mean())
    assert gm.sel(group="control").values[0, 4] == pytest.approx(expected, rel=1e-12)
    np.testing.assert_array_equal(np.diagonal(gm.values, axis1=1, axis2=2), 1.0)
    everyone = group_mean(null_matrices)
    assert list(everyone["group"].values) == ["all"]
    cov = null_matrices.copy(data=null_matrices.values * 3.0).assign_attrs(kind="covariance")
    arith = group_mean(cov, "group")
    assert not arith.attrs["fisher_z"]
    np.testing.assert_allclose(arith.sel(group="patient").values,
                               cov.values[~ctrl].mean(axis=0), rtol=1e-12)


# --------------------------------------------------------------------------------------
# ground truth: simulated effects and null designs
# --------------------------------------------------------------------------------------
EFFECT_EDGES = {(0, 1), (2, 3), (4, 7)}


def _found(res: GroupComparison) -> set[tuple[int, int]]:
    sig = res.significant_edges()
    return {(int(a[1:]), int(b[1:])) for a, b in zip(sig["region_a"], sig["region_b"],
                                                      strict=True)}


@pytest.mark.parametrize("kind", ["pearson", "correlation"])
def test_known_effect_edges_are_detected(kind):
    n = 10
    ref = _base_correlation(n, seed=3)
    ref[np.eye(n, dtype=bool) == 0] *= 0.5
    cmp_ = ref.copy()
    for i, j in EFFECT_EDGES:
        ref[i, j] = ref[j, i] = 0.1
        cmp_[i, j] = cmp_[j, i] = 0.5
    assert np.linalg.eigvalsh(ref).min() > 0 and np.linalg.eigvalsh(cmp_).min() > 0
    m = _simulated_matrices(np.random.default_rng(11), n, ref, cmp_, kind=kind)
    res = compare_groups(m, "group")
    e = res.edges.set_index(["region_a", "region_b"])
    effect = e.loc[[("r00", "r01"), ("r02", "r03"), ("r04", "r07")]]
    assert (effect["p_fdr"] < 1e-6).all() and (effect["statistic"] > 0).all()
    if kind == "pearson":
        assert _found(res) == EFFECT_EDGES
        np.testing.assert_allclose(effect["difference"], 0.4, atol=0.06)
    else:
        # nilearn's default Ledoit-Wolf correlation is (1 - delta_s) * Pearson with a
        # shrinkage delta_s that depends on the whole matrix: the group with the stronger
        # effect edges is shrunk less, so *other* edges also differ between groups.
        assert _found(res) > EFFECT_EDGES


def test_ledoit_wolf_correlation_is_uniformly_shrunk_pearson(arrays):
    from nilearn.signal import standardize_signal
    from sklearn.covariance import LedoitWolf

    off = ~np.eye(R, dtype=bool)
    for x in arrays:
        delta = LedoitWolf().fit(standardize_signal(x, standardize="zscore_sample")).shrinkage_
        lw = connectivity(x, "correlation").values
        pearson = connectivity(x, "pearson").values
        np.testing.assert_allclose(lw[off], (1 - delta) * pearson[off], rtol=1e-12)


def test_null_design_false_positive_rates():
    n, n_seeds, alpha = 12, 20, 0.05
    base = _base_correlation(n, seed=5)
    n_edges = n * (n - 1) // 2
    uncorrected, fdr_seeds = 0, 0
    for seed in range(n_seeds):
        m = _simulated_matrices(np.random.default_rng(1000 + seed), n, base, base,
                                kind="pearson")
        res = compare_groups(m, "group")
        uncorrected += int((res.edges["p"] < alpha).sum())
        fdr_seeds += bool(res.edges["significant"].any())
    lo, hi = stats.binom.interval(0.999, n_seeds * n_edges, alpha)
    assert lo <= uncorrected <= hi, (uncorrected, lo, hi)
    # BH controls the family-wise error under the complete null: ~alpha of the seeds
    assert fdr_seeds <= 3


# --------------------------------------------------------------------------------------
# permutation test
# --------------------------------------------------------------------------------------
def test_permutation_agrees_with_welch_and_is_reproducible(null_matrices):
    welch = compare_groups(null_matrices, "group")
    perm = compare_groups(null_matrices, "group", test="permutation", n_permutations=4000,
                          random_state=3)
    assert perm.test == "permutation" and perm.n_permutations == 4000
    np.testing.assert_array_equal(perm.edges["statistic"], welch.edges["statistic"])
    diff = np.abs(perm.edges["p"] - welch.edges["p"])
    assert (diff < 0.05).mean() >= 0.9, diff.describe()
    assert diff.max() < 0.1
    assert (perm.edges["p"] >= 1 / 4001).all()
    np.testing.assert_allclose(perm.edges["p_fdr"], stats.false_discovery_control(
        perm.edges["p"]), rtol=1e-12)
    again = compare_groups(null_matrices, "group", test="permutation", n_permutations=4000,
                           random_state=3)
    pd.testing.assert_frame_equal(perm.edges, again.edges)
    other = compare_groups(null_matrices, "group", test="permutation", n_permutations=4000,
                           random_state=4)
    assert not np.array_equal(other.edges["p"], perm.edges["p"])


def test_permutation_with_missing_values(null_matrices):
    """Edges untouched by a missing region get the same p as without it (same draws)."""
    full = compare_groups(null_matrices, "group", test="permutation", n_permutations=500)
    m = null_matrices.copy()
    m.values[0, 3, :] = m.values[0, :, 3] = np.nan
    res = compare_groups(m, "group", test="permutation", n_permutations=500)
    touched = (res.edges["region_a"] == "r03") | (res.edges["region_b"] == "r03")
    np.testing.assert_array_equal(res.edges.loc[~touched, "p"], full.edges.loc[~touched, "p"])
    assert res.edges.loc[touched, "p"].notna().all()
    assert not np.array_equal(res.edges.loc[touched, "p"], full.edges.loc[touched, "p"])


def test_permutation_p_matches_exhaustive_enumeration():
    """3 vs 4 subjects: 35 labellings, so the exact permutation p is known."""
    rng = np.random.default_rng(5)
    n_sub, n_reg = 7, 4
    vals = rng.normal(size=(n_sub, n_reg, n_reg))
    vals = vals + vals.transpose(0, 2, 1)
    m = xr.DataArray(vals, dims=("subject", "region", "region_"),
                     coords={"subject": [str(i) for i in range(n_sub)],
                             "group": ("subject", list("aaabbbb"))},
                     attrs={"kind": "covariance"})
    res = compare_groups(m, "group", test="permutation", n_permutations=20000,
                         random_state=0)
    rows, cols = edge_index(n_reg)
    x = vals[:, rows, cols]
    is_b = np.array(list("aaabbbb")) == "b"
    t_obs = np.abs(stats.ttest_ind(x[is_b], x[~is_b], equal_var=False).statistic)
    exact = np.zeros(x.shape[1])
    for a_idx in itertools.combinations(range(n_sub), 3):
        lab = np.ones(n_sub, dtype=bool)
        lab[list(a_idx)] = False
        t = np.abs(stats.ttest_ind(x[lab], x[~lab], equal_var=False).statistic)
        exact += t >= t_obs * (1 - 1e-10)
    exact /= 35
    np.testing.assert_allclose(res.edges["p"], exact, atol=0.012)


# --------------------------------------------------------------------------------------
# end to end with the project simulator (true network time courses, no pipeline)
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    sim = simulate_dataset(tmp_path_factory.mktemp("conn_sim"), shape=(12, 14, 10),
                           n_volumes=200, n_subjects=16, seed=0)
    return sim, load_truth(sim.root)


@pytest.mark.parametrize("kind", ["correlation", "pearson"])
def test_simulator_effect_pairs_are_found(simulated, kind):
    sim, truth = simulated
    names = [net["name"] for net in truth["networks"]]
    signals = [_signals(truth["network_timeseries"][run["index"]], names)
               for run in truth["runs"]]
    subjects = [run["subject"] for run in truth["runs"]]
    participants = pd.read_csv(sim.participants, sep="\t")
    m = group_connectivity(signals, kind, subjects=subjects, metadata=participants)
    if kind == "pearson":  # the simulator realises each subject's correlation exactly
        np.testing.assert_allclose(m.values, truth["subject_corr"], rtol=0, atol=1e-10)
    res = compare_groups(m, "group")
    assert res.groups == ("control", "patient")
    assert res.n_subjects == {"control": 8, "patient": 8}
    sig = res.significant_edges()
    found = {frozenset((a, b)) for a, b in zip(sig["region_a"], sig["region_b"], strict=True)}
    expected = {frozenset((names[a], names[b])) for a, b in truth["effect_pairs"]}
    e = res.edges.set_index(["region_a", "region_b"])
    effect = e.loc[[(names[a], names[b]) for a, b in truth["effect_pairs"]]]
    assert (effect["p_fdr"] < 1e-6).all()
    assert (effect["statistic"] > 0).all()  # patients have the higher correlation
    if kind == "correlation":
        # Ledoit-Wolf shrinkage couples the edges (see the test above): the effect pairs
        # are found, and possibly strong edges whose shrinkage differs between groups
        assert found >= expected
    else:
        assert found == expected
        true_diff = (truth["effect_correlation"]["patient"]
                     - truth["effect_correlation"]["control"])
        np.testing.assert_allclose(effect["difference"], true_diff, atol=0.05)
