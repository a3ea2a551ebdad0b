"""Single-subject spatial ICA (MELODIC-style) and its exports, on simulated data.

The simulation has 400 volumes, not the simulator's default 200: at the default noise
(``noise_std=0.01``), even the oracle GLM, regressing the data on the *true* time courses of
every source, estimates the network maps with a median |r| of about 0.87 at 200 volumes
(the network peaks are 2 % of the baseline and most map voxels are in the blobs' weak
tails), so the issue's "median >= 0.9, minimum >= 0.8" is unreachable there for
unthresholded maps by any method. At 400 volumes the oracle reaches about 0.92 and the ICA
z-maps match it. At 200 volumes the mixture-thresholded maps do meet the criterion
(:func:`test_default_length_thresholded_maps`).

The data are cleaned first as MELODIC's input usually is (linear detrend and a 100 s
cosine high-pass): the simulated scanner drift (linear + slow cosines, smooth spatial
fields) otherwise yields sub-Gaussian components on which FastICA does not converge.
"""

from __future__ import annotations

import dask
import dask.array as da
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from dask.callbacks import Callback
from scipy import stats
from sklearn.base import clone
from sklearn.decomposition import PCA

import storage
from pipeline.decomposition.ica import (
    SubjectICA,
    _estimate_dimension,
    mixture_threshold,
    power_spectra,
)
from pipeline.decomposition.melodic import export_ica_bids, export_melodic
from pipeline.masking import apply_mask, unmask
from pipeline.signal import clean_signals
from pipeline.simulate import load_truth, simulate_dataset

N_VOLUMES = 400
N_COMPONENTS = 20
T_R = 2.0


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    root = tmp_path_factory.mktemp("ica")
    sim = simulate_dataset(root / "derivs", n_subjects=1, shape=(20, 24, 20),
                           n_volumes=N_VOLUMES, seed=0)
    storage.ingest(sim.root, root / "a.zarr", chunk_bytes="400KiB")
    storage.ingest(sim.root, root / "b.zarr", chunk_bytes="150KiB")
    return sim, root / "a.zarr", root / "b.zarr"


def _masked(store) -> xr.DataArray:
    """Masked, detrended and high-passed run, lazy (voxel blocks with all volumes)."""
    ds = storage.open_run(store, subject="01", task="rest")
    m = apply_mask(ds)
    cleaned = clean_signals(m.data, detrend=True, standardize=None, filter="cosine",
                            high_pass=0.01, t_r=float(ds.attrs["repetition_time"]))
    return m.copy(data=cleaned)


@pytest.fixture(scope="module")
def fitted(sim):
    _, store, _ = sim
    masked = _masked(store)
    ica = SubjectICA(n_components=N_COMPONENTS, random_state=0, threshold="mixture")
    return ica.fit(masked), masked


@pytest.fixture(scope="module")
def truth(sim, fitted):
    """Ground-truth maps restricted to the run's mask, voxels in the fit's order."""
    t = load_truth(sim[0].root)
    ica = fitted[0]

    def masked(a):
        return a[..., ica.i_, ica.j_, ica.k_]

    return {"networks": masked(t["network_maps"]), "motion": masked(t["motion_coef"]),
            "physio": masked(t["physio_coef"]), "wm": masked(t["wm_coef"])}


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|Pearson r| between the rows of a and the rows of b."""
    a = np.atleast_2d(a) - np.atleast_2d(a).mean(axis=1, keepdims=True)
    b = np.atleast_2d(b) - np.atleast_2d(b).mean(axis=1, keepdims=True)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    norm = np.linalg.norm(b, axis=1, keepdims=True)
    b = np.divide(b, norm, out=np.zeros_like(b), where=norm > 0)  # empty maps: r = 0
    return np.abs(a @ b.T)


def _multiple_r(y: np.ndarray, regressors: np.ndarray) -> float:
    y = y - y.mean()
    x = regressors - regressors.mean(axis=1, keepdims=True)
    beta = np.linalg.lstsq(x.T, y, rcond=None)[0]
    return float(np.corrcoef(x.T @ beta, y)[0, 1])


class _CountComputes(Callback):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def _start(self, dsk) -> None:
        self.n += 1


# ------------------------------------------------------------------- ground truth
def test_recovers_every_network(fitted, truth):
    ica, _ = fitted
    r = _corr(truth["networks"], ica.components_)
    best = r.max(axis=1)
    assert np.median(best) >= 0.9, best
    assert best.min() >= 0.8, best
    # one component per network
    assert len(set(r.argmax(axis=1))) == truth["networks"].shape[0]
    # the thresholded (mixture-model) maps are cleaner still
    best_thr = _corr(truth["networks"], ica.thresholded_components_).max(axis=1)
    assert np.median(best_thr) >= 0.9 and best_thr.min() >= 0.85, best_thr


def test_default_length_thresholded_maps(tmp_path):
    """At the simulator's default 200 volumes the unthresholded z-maps stay at the oracle's
    level (median |r| about 0.86, below 0.9), but the mixture-thresholded maps, which drop
    the noise-dominated weak tails, meet the criterion."""
    sim = simulate_dataset(tmp_path / "derivs", n_subjects=1, shape=(20, 24, 20),
                           n_volumes=200, seed=0)
    storage.ingest(sim.root, tmp_path / "s.zarr", chunk_bytes="400KiB")
    ica = SubjectICA(n_components=N_COMPONENTS, threshold="mixture").fit(
        _masked(tmp_path / "s.zarr"))
    nets = load_truth(sim.root)["network_maps"][:, ica.i_, ica.j_, ica.k_]
    best = _corr(nets, ica.thresholded_components_).max(axis=1)
    assert np.median(best) >= 0.9 and best.min() >= 0.8, best
    assert np.median(_corr(nets, ica.components_).max(axis=1)) < 0.9  # documented limit


def test_noise_sources_are_separate_components(fitted, truth):
    ica, _ = fitted
    networks = set(_corr(truth["networks"], ica.components_).argmax(axis=1))
    found = {}
    for name, floor in (("physio", 0.95), ("wm", 0.8)):
        r = _corr(truth[name], ica.components_)[0]
        assert r.max() >= floor, (name, r.max())
        found[name] = int(r.argmax())
    assert found["physio"] != found["wm"]
    assert not set(found.values()) & networks
    # motion (first-order Taylor maps): the three translations, about 0.3 mm, are captured by
    # the non-network components and not by the network ones (the rotations move the brain
    # edge by about 0.15 mm and stay below the thermal noise)
    others = [c for c in range(ica.n_components_) if c not in networks]
    for trans in truth["motion"][:3]:
        assert _multiple_r(trans, ica.components_[others]) >= 0.9
        assert _multiple_r(trans, ica.components_[sorted(networks)]) < 0.5
        assert int(_corr(trans, ica.components_)[0].argmax()) not in networks


def test_automatic_dimension(sim, truth):
    """Laplace (MELODIC's default) finds the 11 sources above the noise here: 6 networks,
    physio, white matter and 3 motion translations."""
    ica = SubjectICA(random_state=0).fit(_masked(sim[1]))
    assert 9 <= ica.n_components_ <= 16
    best = _corr(truth["networks"], ica.components_).max(axis=1)
    assert np.median(best) >= 0.9 and best.min() >= 0.8


@pytest.mark.parametrize("method", ["laplace", "bic", "aic", "mdl"])
def test_dimension_estimate_on_ppca_data(method):
    rng = np.random.default_rng(3)
    n, d, k = 3000, 40, 6
    signal = rng.standard_normal((n, k)) @ (rng.standard_normal((k, d)) * 3.0)
    x = signal + rng.standard_normal((n, d))
    lam = np.linalg.eigvalsh(np.cov(x.T))[::-1]
    assert _estimate_dimension(lam, n, method=method) == k


def test_laplace_matches_scikit_learn_mle():
    """The Laplace evidence is Minka's, as scikit-learn's ``PCA(n_components="mle")``."""
    rng = np.random.default_rng(5)
    for n, d, k, noise in ((400, 30, 4, 1.0), (200, 60, 8, 3.0), (1000, 25, 2, 0.3)):
        x = rng.standard_normal((n, k)) @ rng.standard_normal((k, d)) \
            + noise * rng.standard_normal((n, d))
        lam = np.linalg.eigvalsh(np.cov(x.T))[::-1]
        assert _estimate_dimension(lam, n) == PCA(n_components="mle").fit(x).n_components_


# ------------------------------------------------------------ determinism, chunking
def test_deterministic_and_bounded_computes(sim, fitted):
    ica, _ = fitted
    masked = _masked(sim[1])
    counter = _CountComputes()
    with counter:
        again = SubjectICA(n_components=N_COMPONENTS, random_state=0,
                           threshold="mixture").fit(masked)
    assert counter.n == 2  # the Gram pass and the projection pass
    for attr in ("components_", "mixing_", "maps_", "power_spectra_",
                 "explained_variance_ratio_", "thresholded_components_", "thresholds_"):
        np.testing.assert_array_equal(getattr(again, attr), getattr(ica, attr), err_msg=attr)
    for attr in ("components_", "mixing_", "unmixing_", "mean_", "affine_", "i_"):
        assert type(getattr(again, attr)) is np.ndarray


def test_independent_of_voxel_chunking(sim, fitted):
    ica, masked = fitted
    other_masked = _masked(sim[2])
    assert other_masked.data.chunks[1] != masked.data.chunks[1]
    other = SubjectICA(n_components=N_COMPONENTS, random_state=0).fit(other_masked)
    # voxels are ordered block by block: compare in grid (C) order
    mine, theirs = (np.argsort(np.ravel_multi_index((e.i_, e.j_, e.k_), e.shape_))
                    for e in (ica, other))
    assert not np.array_equal(mine, theirs)
    np.testing.assert_allclose(other.components_[:, theirs], ica.components_[:, mine],
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(other.mean_[theirs], ica.mean_[mine], atol=1e-12)
    np.testing.assert_allclose(other.mixing_, ica.mixing_, rtol=0, atol=1e-6)
    np.testing.assert_allclose(other.explained_variance_ratio_,
                               ica.explained_variance_ratio_, rtol=1e-9)


# --------------------------------------------------------------- model conventions
def test_sign_order_and_scaling(fitted):
    ica, _ = fitted
    k = ica.n_components_
    assert k == N_COMPONENTS
    assert ica.components_.shape == ica.maps_.shape == (k, ica.i_.size)
    assert ica.mixing_.shape == (N_VOLUMES, k)
    assert np.all(stats.skew(ica.components_, axis=1) > 0)
    assert np.all(np.sign(ica.components_) * np.sign(ica.maps_) >= 0)  # same signs
    evr = ica.explained_variance_ratio_
    assert np.all(np.diff(evr) <= 0)
    np.testing.assert_allclose(evr.sum(), ica.pca_explained_variance_ratio_[:k].sum())
    np.testing.assert_allclose(ica.mixing_.std(axis=0), 1.0)
    np.testing.assert_allclose(ica.mixing_.mean(axis=0), 0.0, atol=1e-10)
    # order = variance of each component's contribution (unit-variance time courses)
    np.testing.assert_allclose(evr / evr.sum(), (ica.maps_**2).sum(1) / (ica.maps_**2).sum())


def test_power_spectra(fitted):
    ica, _ = fitted
    expected = np.abs(np.fft.rfft(ica.mixing_, axis=0))[1:] ** 2
    np.testing.assert_allclose(ica.power_spectra_, expected, rtol=1e-12)
    assert ica.power_spectra_.shape == (N_VOLUMES // 2, N_COMPONENTS)
    np.testing.assert_allclose(ica.frequencies_, np.arange(1, N_VOLUMES // 2 + 1)
                               / (N_VOLUMES * T_R))
    # odd lengths are zero-padded to even, as FSL's calc_FFT
    x = np.random.default_rng(0).standard_normal((9, 2))
    freqs, power = power_spectra(x, t_r=0.5)
    padded = np.vstack([x, np.zeros((1, 2))])
    np.testing.assert_allclose(power, np.abs(np.fft.rfft(padded, axis=0))[1:] ** 2)
    np.testing.assert_allclose(freqs, np.arange(1, 6) / (10 * 0.5))
    # the physiological component oscillates at 0.2 Hz, the networks below 0.1 Hz
    peak = ica.frequencies_[np.argmax(ica.power_spectra_, axis=0)]
    assert np.any(np.isclose(peak, 0.2, atol=0.01))


def test_zmaps_match_in_memory_glm(fitted):
    """Out-of-core z-maps equal MELODIC's formula computed on the materialised data."""
    ica, masked = fitted
    x = np.asarray(masked.values, dtype=float)
    y = x - x.mean(axis=0)
    y /= y.std(axis=0)
    y -= y.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(ica.mean_, x.mean(axis=0), rtol=1e-10, atol=1e-8)
    # the maps are the GLM betas of the data on the mixing matrix
    np.testing.assert_allclose(np.linalg.pinv(ica.mixing_) @ y, ica.maps_, atol=1e-8)
    resid = y - ica.mixing_ @ ica.maps_
    k = ica.n_components_
    sigma = np.sqrt((resid**2).sum(axis=0) / (N_VOLUMES - k))
    np.testing.assert_allclose(ica.residual_std_, sigma, rtol=1e-8)
    unmix = np.linalg.pinv(ica.mixing_)
    z = ica.maps_ * np.diag(unmix @ unmix.T)[:, None] ** -0.5 / sigma
    np.testing.assert_allclose(ica.components_, z, rtol=1e-7, atol=1e-7)


def test_transform_is_lazy_spatial_regression(fitted):
    ica, masked = fitted
    tcs = ica.transform(masked)
    assert isinstance(tcs.data, da.Array)
    assert tcs.dims == ("time", "component")
    np.testing.assert_array_equal(tcs["time"].values, masked["time"].values)
    np.testing.assert_allclose(tcs.values, ica.mixing_, atol=1e-8)
    with pytest.raises(ValueError, match="voxels"):
        ica.transform(masked.isel(voxel=slice(1, None)))


# -------------------------------------------------------------------- thresholding
def test_mixture_threshold_on_known_mixture():
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.standard_normal(9000), rng.normal(6.0, 1.0, 600),
                        rng.normal(-5.0, 0.7, 300)])
    lower, upper = mixture_threshold(z)
    assert 2.0 < upper < 4.5
    assert -4.5 < lower < -2.0
    # nothing survives in a null map
    assert mixture_threshold(rng.standard_normal(5000)) == (-np.inf, np.inf)


def test_thresholds(fitted):
    ica, masked = fitted
    assert ica.thresholds_.shape == (N_COMPONENTS, 2)
    z, thr = ica.components_, ica.thresholded_components_
    keep = (z <= ica.thresholds_[:, :1]) | (z >= ica.thresholds_[:, 1:])
    np.testing.assert_array_equal(thr, np.where(keep, z, 0.0))
    fixed = SubjectICA(n_components=N_COMPONENTS, threshold=3.0)
    fixed.fit(masked.copy(data=masked.data.compute()))  # in-memory input works too
    np.testing.assert_allclose(fixed.components_, z, atol=1e-6)
    np.testing.assert_array_equal(
        fixed.thresholded_components_,
        np.where(np.abs(fixed.components_) >= 3.0, fixed.components_, 0.0))


# -------------------------------------------------------------------------- export
def test_export_melodic(tmp_path, sim, fitted):
    ica, _ = fitted
    out = export_melodic(ica, tmp_path / "sub-01.ica")
    folder = tmp_path / "sub-01.ica"
    for name in ("melodic_IC.nii.gz", "melodic_mix", "melodic_FTmix", "melodic_ICstats",
                 "mask.nii.gz", "mean.nii.gz", "eigenvalues_percent",
                 "stats/thresh_zstat1.nii.gz", f"stats/thresh_zstat{N_COMPONENTS}.nii.gz"):
        assert (folder / name).exists(), name
    assert out["melodic_mix"] == str(folder / "melodic_mix")

    ds = storage.open_run(sim[1], subject="01", task="rest")
    img = nib.load(folder / "melodic_IC.nii.gz")
    assert img.shape == (20, 24, 20, N_COMPONENTS)
    np.testing.assert_allclose(img.affine, ds.attrs["affine"])
    vols = np.asarray(img.dataobj)
    for c in (0, 7, N_COMPONENTS - 1):
        zmap = xr.DataArray(ica.components_[c], dims="voxel",
                            coords={"i": ("voxel", ica.i_), "j": ("voxel", ica.j_),
                                    "k": ("voxel", ica.k_)},
                            attrs={"shape": ica.shape_, "affine": ica.affine_})
        np.testing.assert_allclose(vols[..., c], unmask(zmap).values, rtol=1e-6, atol=1e-5)

    mix = np.loadtxt(folder / "melodic_mix")
    assert mix.shape == (N_VOLUMES, N_COMPONENTS)
    np.testing.assert_allclose(mix, ica.mixing_, rtol=1e-8, atol=1e-12)
    first = (folder / "melodic_mix").read_text().splitlines()[0]
    assert first.endswith("  ") and len(first.split()) == N_COMPONENTS  # FSL layout
    ft = np.loadtxt(folder / "melodic_FTmix")
    assert ft.shape == (N_VOLUMES // 2, N_COMPONENTS)
    np.testing.assert_allclose(ft, ica.power_spectra_, rtol=1e-8)
    icstats = np.loadtxt(folder / "melodic_ICstats")
    assert icstats.shape == (N_COMPONENTS, 2)
    np.testing.assert_allclose(icstats[:, 0].sum(), 100.0)
    np.testing.assert_allclose(icstats[:, 1], 100 * ica.explained_variance_ratio_, rtol=1e-8)
    assert np.all(np.diff(icstats[:, 0]) <= 0)

    mask = np.asarray(nib.load(folder / "mask.nii.gz").dataobj)
    np.testing.assert_array_equal(mask.astype(bool), ds["mask"].values)
    mean = np.asarray(nib.load(folder / "mean.nii.gz").dataobj)
    np.testing.assert_allclose(mean[ica.i_, ica.j_, ica.k_], ica.mean_, rtol=1e-6)
    thr1 = np.asarray(nib.load(folder / "stats/thresh_zstat1.nii.gz").dataobj)
    np.testing.assert_allclose(thr1[ica.i_, ica.j_, ica.k_], ica.thresholded_components_[0],
                               rtol=1e-6, atol=1e-5)


def test_export_ica_bids(tmp_path, fitted):
    ica, _ = fitted
    prefix = tmp_path / "sub-01" / "func" / "sub-01_task-rest_space-MNI152NLin2009cAsym"
    out = export_ica_bids(ica, prefix, extra=["thresholded", "spectra"])
    assert out["components"].endswith("_desc-ica_components.nii.gz")
    img = nib.load(out["components"])
    assert img.shape == (20, 24, 20, N_COMPONENTS)
    vols = np.asarray(img.dataobj)
    np.testing.assert_allclose(vols[ica.i_, ica.j_, ica.k_].T, ica.components_,
                               rtol=1e-6, atol=1e-5)
    table = pd.read_csv(out["mixing"], sep="\t")
    assert out["mixing"].endswith("_desc-ica_mixing.tsv")
    assert list(table.columns) == [f"ICA{c:03d}" for c in range(N_COMPONENTS)]
    np.testing.assert_allclose(table.to_numpy(), ica.mixing_, rtol=1e-8, atol=1e-12)
    spectra = pd.read_csv(out["spectra"], sep="\t")
    np.testing.assert_allclose(spectra["frequency"], ica.frequencies_)
    assert nib.load(out["thresholded"]).shape == (20, 24, 20, N_COMPONENTS)


# -------------------------------------------------------------------------- errors
def test_invalid_use(tmp_path, fitted):
    _, masked = fitted
    with pytest.raises(ValueError, match="not fitted"):
        SubjectICA().transform(masked)
    with pytest.raises(ValueError, match="n_components"):
        SubjectICA(n_components=0).fit(masked)
    with pytest.raises(ValueError, match="fun"):
        SubjectICA(fun="tanh").fit(masked)
    with pytest.raises(ValueError, match="threshold"):
        SubjectICA(threshold="auto").fit(masked)
    small = da.random.default_rng(0).standard_normal((30, 500), chunks=(30, 100))
    with pytest.raises(ValueError, match="rank"):
        SubjectICA(n_components=40).fit(small)
    bare = SubjectICA(n_components=3, fun="pow3").fit(small)  # no grid: fit works ...
    assert bare.components_.shape == (3, 500) and bare.affine_ is None
    with pytest.raises(ValueError, match="voxel coordinates"):  # ... export does not
        export_ica_bids(bare, tmp_path / "out" / "x")
    assert not (tmp_path / "out").exists()  # nothing written
    params = clone(SubjectICA(n_components=5, threshold=2.5)).get_params()
    assert params["n_components"] == 5 and params["threshold"] == 2.5
    with dask.config.set(scheduler="sync"):
        assert SubjectICA(n_components=3).fit(small).n_components_ == 3
