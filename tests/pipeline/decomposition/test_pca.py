"""Subject-level PCA: accuracy against NumPy / scikit-learn, dimensionality, out-of-core."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from dask.callbacks import Callback
from scipy.linalg import null_space, subspace_angles
from sklearn.decomposition import PCA
from sklearn.decomposition._pca import _assess_dimension, _infer_dimension
from threadpoolctl import threadpool_limits

from pipeline.decomposition.pca import SubjectPCA, dimension_scores, estimate_dimension

T, V, K = 150, 5000, 8


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    # dask already runs one task per core; threaded BLAS inside each task only oversubscribes
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _sources(noise: float, seed: int = 0) -> np.ndarray:
    """``(T, V)``: K temporal sources with spatial maps of decreasing strength, plus noise
    and a per-voxel offset (removed by demeaning)."""
    rng = np.random.default_rng(seed)
    tcs = rng.standard_normal((T, K))
    maps = rng.standard_normal((K, V)) * np.linspace(0.3, 1.0, K)[:, None]
    offset = rng.uniform(50, 150, V)
    return tcs @ maps + noise * rng.standard_normal((T, V)) + offset


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return _sources(noise=2.0)


@pytest.fixture(scope="module")
def reference(data):
    """NumPy SVD of the voxel-demeaned ``(voxel, time)`` matrix."""
    u, s, vt = np.linalg.svd((data - data.mean(axis=0)).T, full_matrices=False)
    return u, s, vt


def _chunked(x: np.ndarray, chunks) -> da.Array:
    return da.from_array(x, chunks=chunks)


CHUNKINGS = {
    "one-block": (T, V),
    "700-voxels": (T, 700),
    "blocks-thinner-than-T": (T, 97),
    "time-chunked": (40, 1000),  # rechunked to whole time series by fit
}


# ------------------------------------------------------------------ exact solver accuracy
@pytest.mark.parametrize("chunks", CHUNKINGS.values(), ids=CHUNKINGS.keys())
def test_tsqr_matches_numpy_svd(data, reference, chunks):
    _, s, vt = reference
    pca = SubjectPCA(n_components=20).fit(_chunked(data, chunks))
    # all T - 1 non-null singular values, not only the kept ones
    np.testing.assert_allclose(np.sqrt(pca.eigenvalues_[:T - 1] * (V - 1)), s[:T - 1],
                               rtol=1e-6)
    np.testing.assert_allclose(pca.singular_values_, s[:20], rtol=1e-6)
    assert np.max(subspace_angles(pca.components_.T, vt[:20].T)) < 1e-6
    # same vectors up to sign (distinct singular values)
    np.testing.assert_allclose(np.abs(np.sum(pca.components_ * vt[:20], axis=1)), 1.0,
                               atol=1e-8)
    np.testing.assert_allclose(pca.explained_variance_, s[:20] ** 2 / (V - 1), rtol=1e-6)
    np.testing.assert_allclose(pca.explained_variance_ratio_, s[:20] ** 2 / np.sum(s ** 2),
                               rtol=1e-6)
    np.testing.assert_allclose(pca.mean_, data.mean(axis=0), rtol=1e-12)
    assert pca.scale_ is None
    assert pca.components_.shape == (20, T) and isinstance(pca.components_, np.ndarray)


def test_tsqr_independent_of_chunking(data):
    fits = [SubjectPCA(n_components=K).fit(_chunked(data, c)) for c in CHUNKINGS.values()]
    for other in fits[1:]:
        np.testing.assert_allclose(other.eigenvalues_[:T - 1], fits[0].eigenvalues_[:T - 1],
                                   rtol=1e-10)
        # same sign convention, so the vectors themselves agree
        np.testing.assert_allclose(other.components_, fits[0].components_, atol=1e-10)
        assert other.n_components_ == fits[0].n_components_


def test_matches_sklearn_on_double_centred_matrix(data):
    # voxel means and volume means both zero: the two centring conventions coincide
    x = data - data.mean(axis=0)
    x = x - x.mean(axis=1, keepdims=True)
    ours = SubjectPCA(n_components=12).fit(_chunked(x, (T, 600)))
    ref = PCA(n_components=12, svd_solver="full").fit(x.T)
    np.testing.assert_allclose(ours.singular_values_, ref.singular_values_, rtol=1e-6)
    np.testing.assert_allclose(ours.explained_variance_, ref.explained_variance_, rtol=1e-6)
    np.testing.assert_allclose(ours.explained_variance_ratio_, ref.explained_variance_ratio_,
                               rtol=1e-6)
    # scikit-learn's sign convention (largest |entry| of each component positive)
    np.testing.assert_allclose(ours.components_, ref.components_, atol=1e-8)
    assert np.max(subspace_angles(ours.components_.T, ref.components_.T)) < 1e-6


def test_sklearn_convention_is_demean_false_on_volume_centred_data(data):
    """scikit-learn on ``X.T`` centres each time point across voxels; that is
    ``demean=False`` on volume-centred data (documented relation of the conventions)."""
    ref = PCA(n_components=10, svd_solver="full").fit(data.T)
    ours = SubjectPCA(n_components=10, demean=False).fit(
        _chunked(data - data.mean(axis=1, keepdims=True), (T, 800)))
    np.testing.assert_allclose(ours.singular_values_, ref.singular_values_, rtol=1e-6)
    np.testing.assert_allclose(ours.components_, ref.components_, atol=1e-8)
    assert ours.mean_ is None


def test_variance_normalize_matches_numpy(data):
    z = (data - data.mean(axis=0)) / data.std(axis=0, ddof=1)
    _, s, vt = np.linalg.svd(z.T, full_matrices=False)
    pca = SubjectPCA(n_components=K, variance_normalize=True).fit(_chunked(data, (T, 512)))
    np.testing.assert_allclose(pca.singular_values_, s[:K], rtol=1e-6)
    assert np.max(subspace_angles(pca.components_.T, vt[:K].T)) < 1e-6
    np.testing.assert_allclose(pca.scale_, data.std(axis=0, ddof=1), rtol=1e-12)


def test_numpy_input(data, reference):
    pca = SubjectPCA(n_components=K).fit(data)
    np.testing.assert_allclose(pca.singular_values_, reference[1][:K], rtol=1e-6)
    maps = pca.transform(data)
    assert isinstance(maps, np.ndarray) and maps.shape == (K, V)


# ------------------------------------------------------------------ randomized solver
def test_randomized_close_to_exact(data, reference):
    _, s, vt = reference
    x = _chunked(data, (T, 700))
    pca = SubjectPCA(n_components=K, svd_solver="randomized", random_state=0).fit(x)
    # approximate: a (T x 18) sketch after 5 multiplications by X X^T (n_power_iter=4). The
    # weakest source is only ~1.7x above the noise edge here, so convergence is slow
    # (factor ~0.35 per iteration): measured 7e-6 relative error on the singular values and
    # 4.5e-3 rad on the subspace; the bounds leave a margin of 10 and 4
    np.testing.assert_allclose(pca.singular_values_, s[:K], rtol=1e-4)
    assert np.max(subspace_angles(pca.components_.T, vt[:K].T)) < 2e-2
    # more power iterations, smaller error
    rough = SubjectPCA(n_components=K, svd_solver="randomized", random_state=0,
                       n_power_iter=1).fit(x)
    assert (np.max(subspace_angles(rough.components_.T, vt[:K].T))
            > 10 * np.max(subspace_angles(pca.components_.T, vt[:K].T)))
    # seeded: identical when refitted, and independent of the chunking up to rounding (the
    # random test matrix lives in the time domain, it does not follow the voxel chunks)
    again = SubjectPCA(n_components=K, svd_solver="randomized", random_state=0).fit(x)
    np.testing.assert_array_equal(again.components_, pca.components_)
    other = SubjectPCA(n_components=K, svd_solver="randomized", random_state=0).fit(
        _chunked(data, (T, 333)))
    np.testing.assert_allclose(other.components_, pca.components_, atol=1e-9)
    np.testing.assert_allclose(other.singular_values_, pca.singular_values_, rtol=1e-10)


def test_randomized_auto_dimension():
    x = _sources(noise=4.0)
    exact = SubjectPCA().fit(_chunked(x, (T, 1000)))
    approx = SubjectPCA(svd_solver="randomized", random_state=1, max_components=40).fit(
        _chunked(x, (T, 1000)))
    assert exact.n_components_ == approx.n_components_ == K
    assert approx.eigenvalues_.shape == (50,)  # max_components + oversampling
    np.testing.assert_allclose(approx.total_variance_, exact.total_variance_, rtol=1e-10)


# ------------------------------------------------------------------ dimensionality
def test_laplace_scores_equal_sklearn_assess_dimension():
    rng = np.random.default_rng(3)
    for _ in range(10):
        d = int(rng.integers(4, 40))
        n = int(rng.integers(d + 1, 2000))
        spectrum = np.sort(rng.gamma(rng.uniform(0.3, 3.0), size=d))[::-1]
        ours = dimension_scores(spectrum, n, "laplace")
        ref = np.array([_assess_dimension(spectrum, k, n) for k in range(1, d)])
        np.testing.assert_allclose(ours, ref, rtol=1e-10)
        assert estimate_dimension(spectrum, n) == int(_infer_dimension(spectrum, n))


def test_bic_with_truncated_spectrum_is_exact():
    rng = np.random.default_rng(4)
    spectrum = np.sort(rng.gamma(0.7, size=60))[::-1]
    full = dimension_scores(spectrum, 500, "bic")
    truncated = dimension_scores(spectrum[:25], 500, "bic", n_features=60,
                                 total_variance=spectrum.sum(), max_rank=24)
    np.testing.assert_allclose(truncated, full[:24], rtol=1e-12)
    with pytest.raises(ValueError, match="total_variance"):
        dimension_scores(spectrum[:25], 500, "bic", n_features=60)


# tolerances measured over 8 seeds at this noise level: laplace 8/8 exact; BIC and MDL are
# conservative (7 or 8: the weakest source is near their detection limit); AIC 8 or 9
TOLERANCE = {"laplace": 0, "bic": 1, "mdl": 1, "aic": 1}


@pytest.fixture(scope="module")
def noisy():
    return _sources(noise=4.0)


@pytest.mark.parametrize("method", TOLERANCE)
def test_dimension_of_synthetic_sources(noisy, method):
    pca = SubjectPCA(method=method).fit(_chunked(noisy, (T, 1000)))
    assert abs(pca.n_components_ - K) <= TOLERANCE[method]
    assert pca.dimension_scores_.shape == (T - 2,)  # candidates 1 .. d - 1, d = T - 1
    assert pca.components_.shape == (pca.n_components_, T)
    # the function on the fitted spectrum gives the same answer
    assert estimate_dimension(pca.eigenvalues_[:T - 1], V, method) == pca.n_components_


def test_laplace_equals_sklearn_mle_on_same_data(noisy):
    # scikit-learn's "mle" loops in Python over O(d^3) terms: 80 time points keep it quick
    noisy = noisy[:80]
    n_time = noisy.shape[0]
    # double-centred data: SubjectPCA's and scikit-learn's centring are both no-ops
    x = noisy - noisy.mean(axis=0)
    x = x - x.mean(axis=1, keepdims=True)
    ours = SubjectPCA(method="laplace").fit(_chunked(x, (n_time, 1000)))
    # removing the voxel means leaves n_time - 1 dimensions; the same data expressed in an
    # orthonormal basis of them (full rank, zero mean across voxels) for scikit-learn
    basis = null_space(np.ones((1, n_time)))  # (n_time, n_time - 1)
    sk = PCA(n_components="mle", svd_solver="full").fit((basis.T @ x).T)
    assert ours.n_components_ == sk.n_components_ == K
    # scikit-learn directly on the rank-deficient (time, voxel) data sees the null eigenvalue
    # (~1e-25) as the noise floor of rank n_time - 1 and picks it: why SubjectPCA drops it
    assert PCA(n_components="mle", svd_solver="full").fit(x.T).n_components_ == n_time - 1
    # on an identical full-rank spectrum the function agrees exactly
    full = PCA(svd_solver="full").fit(noisy.T).explained_variance_
    assert estimate_dimension(full, V, "laplace") == int(_infer_dimension(full, V))
    # scikit-learn on the raw data (its centring: each time point across voxels) is
    # demean=False on volume-centred data, and counts the mean image (per-voxel offsets x
    # constant time course) as one more component: the reason for demeaning voxels
    sk_raw = PCA(n_components="mle", svd_solver="full").fit(noisy.T)
    same = SubjectPCA(demean=False).fit(noisy - noisy.mean(axis=1, keepdims=True))
    assert same.n_components_ == sk_raw.n_components_ == K + 1


def test_effective_n_samples_lowers_the_estimate(noisy):
    # fewer independent samples (spatial smoothness) -> weaker evidence -> fewer components
    full = SubjectPCA(method="bic").fit(noisy)
    smooth = SubjectPCA(method="bic", n_samples=V / 20).fit(noisy)
    assert smooth.n_samples_ == V / 20
    assert smooth.n_components_ < full.n_components_


# ------------------------------------------------------------------ out of core
class _Recorder(Callback):
    """Counts scheduler runs and the peak bytes of results held by the scheduler."""

    def __init__(self):
        super().__init__()
        self.computes = 0
        self.peak = 0

    def _start(self, dsk):
        self.computes += 1

    def _posttask(self, key, result, dsk, state, worker_id):
        held = sum(getattr(v, "nbytes", 0) for v in state["cache"].values())
        self.peak = max(self.peak, held)


def _counted_input(n_time=60, n_vox=96_000, block=3_000):
    """A lazy ``(time, voxel)`` array generated block by block, counting block reads."""
    reads: list[int] = []

    def make(block_info=None):
        start, stop = block_info[None]["array-location"][1]
        reads.append(start)
        rng = np.random.default_rng(start)
        tc = np.random.default_rng(0).standard_normal((n_time, 3))
        return tc @ rng.standard_normal((3, stop - start)) + rng.standard_normal(
            (n_time, stop - start))

    x = da.map_blocks(make, chunks=((n_time,), (block,) * (n_vox // block)), dtype=float)
    return x, reads


@pytest.mark.parametrize("solver", ["tsqr", "randomized"])
def test_fit_is_one_compute_and_never_holds_the_data(solver):
    x, reads = _counted_input()
    n_blocks = x.numblocks[1]
    rec = _Recorder()
    with rec:
        pca = SubjectPCA(svd_solver=solver, random_state=0, max_components=10,
                         n_power_iter=2).fit(x)
    assert rec.computes == 1
    passes = 1 if solver == "tsqr" else pca.n_power_iter + 2
    # every block read exactly once per pass: the input is never gathered or converted
    assert sorted(reads) == sorted(list(range(0, x.shape[1], 3_000)) * passes)
    assert len(reads) == n_blocks * passes
    # a few blocks (and their QR factors) in memory at once, never the data: measured ~5
    # blocks' worth for 8 to 64 blocks (2 threads)
    block_bytes = x.shape[0] * 3_000 * 8
    assert rec.peak < 8 * block_bytes, (rec.peak / block_bytes, n_blocks)
    assert pca.n_components_ == 3
    for name in ("components_", "singular_values_", "eigenvalues_", "mean_",
                 "explained_variance_ratio_"):
        assert isinstance(getattr(pca, name), np.ndarray), name

    # transform is lazy: no compute until asked, then one more pass
    reads.clear()
    with _Recorder() as rec2:
        maps = pca.transform(x)
    assert rec2.computes == 0 and not reads
    assert isinstance(maps, da.Array) and maps.shape == (3, x.shape[1])
    maps.compute()
    assert len(reads) == n_blocks


# ------------------------------------------------------------------ projections
def test_transform_and_inverse(data, reference):
    u, s, _ = reference
    xr_in = xr.DataArray(_chunked(data, (T, 1000)), dims=("time", "voxel"),
                         coords={"i": ("voxel", np.arange(V)), "j": ("voxel", np.zeros(V)),
                                 "k": ("voxel", np.zeros(V))},
                         attrs={"shape": (V, 1, 1), "affine": np.eye(4)})
    pca = SubjectPCA(n_components=K).fit(xr_in)
    maps = pca.transform(xr_in)
    assert isinstance(maps, xr.DataArray) and isinstance(maps.data, da.Array)
    assert maps.dims == ("component", "voxel") and "i" in maps.coords
    assert maps.attrs["shape"] == (V, 1, 1)
    got = maps.values
    # rows are the spatial eigenmaps scaled by the singular values: S_k U_k^T (up to sign)
    signs = np.sign(np.sum(got * u[:, :K].T, axis=1))
    np.testing.assert_allclose(got * signs[:, None], s[:K, None] * u[:, :K].T, atol=1e-8)
    white = pca.transform(xr_in, whiten=True).values
    np.testing.assert_allclose(np.sum(white ** 2, axis=1), V - 1, rtol=1e-10)

    # with every non-null component, inverse_transform(transform(X)) is X
    full = SubjectPCA(n_components=T - 1).fit(xr_in)
    back = full.inverse_transform(full.transform(xr_in, whiten=True), whiten=True)
    assert isinstance(back, da.Array)
    np.testing.assert_allclose(back.compute(), data, atol=1e-8)


def test_fit_transform_and_params(data):
    pca = SubjectPCA(n_components=5)
    maps = pca.fit_transform(_chunked(data, (T, 1000)))
    assert pca.n_components_ == 5 and maps.shape == (5, V)
    assert SubjectPCA(n_components=5).get_params()["n_components"] == 5
    with pytest.raises(AttributeError, match="not fitted"):
        SubjectPCA().transform(data)
    with pytest.raises(ValueError, match="fitted on"):
        pca.transform(data[:, :100])


@pytest.mark.parametrize("kwargs, match", [
    ({"n_components": 0}, "n_components"),
    ({"n_components": T}, "n_components"),  # only T - 1 non-null dimensions after demeaning
    ({"n_components": "mle"}, "n_components"),
    ({"method": "bayes"}, "method"),
    ({"svd_solver": "arpack"}, "svd_solver"),
    ({"max_components": 0}, "max_components"),
])
def test_invalid_parameters(data, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SubjectPCA(**kwargs).fit(data)


def test_dimension_function_errors():
    with pytest.raises(ValueError, match="method"):
        estimate_dimension([3.0, 2.0, 1.0], 10, "hq")
    with pytest.raises(ValueError, match="n_samples"):
        estimate_dimension([3.0, 2.0, 1.0], 0)
    with pytest.raises(ValueError, match="zero"):
        estimate_dimension([0.0, 0.0, 0.0], 10)
    with pytest.raises(ValueError, match="non-null"):
        estimate_dimension([3.0, 0.0, 0.0], 10)


@pytest.mark.parametrize("method", TOLERANCE)
def test_null_eigenvalues_are_dropped(method):
    rng = np.random.default_rng(5)
    spectrum = np.sort(rng.gamma(0.5, size=30))[::-1]
    padded = np.concatenate([spectrum, [1e-20 * spectrum[0], 0.0, -1e-18]])
    np.testing.assert_array_equal(dimension_scores(padded, 400, method),
                                  dimension_scores(spectrum, 400, method))


# ------------------------------------------------------------------ simulated run
@pytest.fixture(scope="module")
def simulated_run(tmp_path_factory):
    import storage
    from pipeline.masking import apply_mask
    from pipeline.simulate import load_truth, simulate_dataset

    root = tmp_path_factory.mktemp("pca_sim")
    sim = simulate_dataset(root / "derivs", n_subjects=1, shape=(16, 18, 14), n_volumes=120,
                           seed=0)
    store = root / "store.zarr"
    storage.ingest(sim.root, store, chunk_bytes="64KiB")
    ds = storage.open_run(store, subject="01", task="rest")
    return apply_mask(ds), load_truth(sim.root)


def _r2(basis: np.ndarray, ts: np.ndarray) -> np.ndarray:
    ts = ts - ts.mean(axis=0)
    fit = basis @ (basis.T @ ts)
    return 1 - np.sum((ts - fit) ** 2, axis=0) / np.sum(ts ** 2, axis=0)


def test_simulated_run(simulated_run):
    from pipeline.masking import unmask

    x, truth = simulated_run
    assert isinstance(x.data, da.Array) and x.data.numblocks[1] > 1
    n_time = x.sizes["time"]
    pca = SubjectPCA().fit(x)
    # every simulated source with a time course: networks, 6 motion parameters, 3 drift
    # terms, physiological and white-matter signals (thermal noise is white)
    n_networks = len(truth["networks"])
    n_structured = n_networks + 6 + 3 + 1 + 1
    assert len(truth["sources"]) >= 5
    assert n_networks <= pca.n_components_ <= n_structured
    # the kept temporal subspace holds the true network, physiological and WM time courses
    basis = pca.components_.T
    assert np.all(_r2(basis, truth["network_timeseries"][0]) > 0.85)
    assert _r2(basis, truth["physio"][0][:, None])[0] > 0.9
    assert _r2(basis, truth["wm_signal"][0][:, None])[0] > 0.9
    for method in ("bic", "mdl", "aic"):
        k = SubjectPCA(method=method).fit(x).n_components_
        assert n_networks <= k <= n_structured + 5, (method, k)
    # reduced data keep the voxel coordinates: each map goes back to the 3D grid
    maps = pca.transform(x)
    assert maps.sizes == {"component": pca.n_components_, "voxel": x.sizes["voxel"]}
    first = unmask(maps.isel(component=0))
    assert first.shape == tuple(x.attrs["shape"])
    assert pca.components_.shape == (pca.n_components_, n_time)
