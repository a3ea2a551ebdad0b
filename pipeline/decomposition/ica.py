"""Single-subject spatial ICA, MELODIC-style, out of core over voxel blocks.

:class:`SubjectICA` decomposes one run's masked ``(time, voxel)`` data (a lazy DataArray
from :func:`pipeline.masking.apply_mask`, chunked along voxels with all volumes per chunk)
into spatially independent maps and their time courses::

    X_n  ~=  mixing_ @ maps_          (time x voxel)  ~=  (time x k) @ (k x voxel)

Steps (MELODIC, Beckmann & Smith 2004, as far as it applies):

1. Preprocessing, block by block: remove each voxel's temporal mean, optionally divide by
   its temporal standard deviation (variance normalisation), then remove the mean time
   course over voxels (MELODIC removes both means).
2. PCA reduction (:func:`_spatial_pca`): the ``(time x time)`` Gram matrix is a sum over
   voxel blocks (one pass, one ``compute``); its eigenvectors are the temporal
   eigenvectors. The dimension is fixed or estimated from the eigenvalues (Laplace
   approximation to the PPCA evidence, Minka 2000; or BIC / AIC / MDL). A second pass
   projects every block on the kept eigenvectors (spatial eigenmaps, ``k x voxel``) and
   returns each voxel's residual sum of squares. The 2D data are never held in one
   process: only ``k x voxel`` and ``time x time`` arrays are.
3. FastICA (scikit-learn, ``whiten=False`` on the already white spatial eigenmaps, voxels as
   samples) gives the unmixing matrix; maps, mixing matrix, z-statistic maps, power spectra,
   explained variance and (optionally) thresholded maps follow in NumPy.

The PCA step is a small private function (:func:`_spatial_pca`, a Gram-matrix reduction),
kept apart so that it can be swapped for :class:`pipeline.decomposition.pca.SubjectPCA`
(TSQR / randomized): a replacement only needs to return a :class:`_Reduction` (note that
MELODIC, and this module, also remove the mean time course over voxels).
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import xarray as xr
from scipy import special, stats
from sklearn.base import BaseEstimator
from threadpoolctl import threadpool_limits

from ._blocks import ica_fun

__all__ = ["SubjectICA", "mixture_threshold", "power_spectra"]

DimMethod = Literal["laplace", "bic", "aic", "mdl"]
_DIM_METHODS = ("laplace", "bic", "aic", "mdl")
_FUNS = {"logcosh": "logcosh", "cube": "cube", "pow3": "cube", "exp": "exp"}
_TINY = 1e-12
_SINGLE_THREAD_SIZE = 2**22  # k x V elements below which FastICA runs on one BLAS thread


def _blas_threads(size: int):
    """One BLAS/OpenMP thread for small in-memory problems (threads only add overhead there,
    and contend with Dask's worker threads); no limit for large ones."""
    return threadpool_limits(limits=1 if size <= _SINGLE_THREAD_SIZE else None)


# ----------------------------------------------------------------------------- PCA step
@dataclass(frozen=True)
class _Reduction:
    """Result of the PCA reduction of the preprocessed ``(time, voxel)`` data ``Y``.

    ``Y = (X - mean) / scale - global_signal[:, None]``; ``Y ~= timecourses @
    diag(singular_values) @ maps`` with orthonormal columns / rows.
    """

    mean: np.ndarray  # (V,) temporal mean of each voxel (before normalisation)
    scale: np.ndarray  # (V,) divisor of each voxel (its temporal std, or ones)
    global_signal: np.ndarray  # (T,) mean time course over voxels, removed
    eigenvalues: np.ndarray  # (r,) non-zero eigenvalues of Y Y^T, descending
    timecourses: np.ndarray  # (T, k) temporal eigenvectors
    singular_values: np.ndarray  # (k,)
    maps: np.ndarray  # (k, V) spatial eigenmaps, orthonormal rows
    residual_ss: np.ndarray  # (V,) residual sum of squares after the k-dim reconstruction

    @property
    def total_ss(self) -> float:
        """Total sum of squares of ``Y`` (trace of the Gram matrix)."""
        return float(self.eigenvalues.sum())


def _as_dask(X: Any) -> da.Array:
    data = X.data if isinstance(X, xr.DataArray) else X
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=(-1, "auto"))
    if data.ndim != 2:
        raise ValueError(f"expected a (time, voxel) matrix, got shape {data.shape}")
    if len(data.chunks[0]) != 1:
        data = data.rechunk({0: -1})  # every block needs whole time series
    return data.astype(np.float64)


def _normalise(data: da.Array, variance_normalize: bool
               ) -> tuple[da.Array, da.Array, da.Array]:
    mean = data.mean(axis=0)
    centred = data - mean
    if variance_normalize:
        std = da.sqrt((centred**2).mean(axis=0))
        scale = da.where(std > _TINY * da.maximum(da.fabs(mean), 1.0), std, 1.0)
    else:
        scale = da.ones_like(mean)
    return mean, scale, centred / scale


def _spatial_pca(data: da.Array, n_components: int | str, *, dim_method: DimMethod,
                 variance_normalize: bool, max_components: int | None = None) -> _Reduction:
    """PCA of the preprocessed data over voxel blocks: two ``compute`` calls.

    Pass 1 sums per-block ``B B^T`` (time x time) and ``B 1``; pass 2 projects each block on
    the kept temporal eigenvectors and returns the residual sum of squares per voxel.
    """
    n_vox = data.shape[1]
    mean, scale, normed = _normalise(data, variance_normalize)
    gram, colsum = normed @ normed.T, normed.sum(axis=1)
    mean, scale, gram, colsum = dask.compute(mean, scale, gram, colsum)
    glob = colsum / n_vox
    gram = gram - n_vox * np.outer(glob, glob)  # Gram of Y = normed - glob 1^T
    gram = 0.5 * (gram + gram.T)
    with _blas_threads(gram.size):
        evals, evecs = np.linalg.eigh(gram)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    rank = int(np.sum(evals > max(evals[0], 0.0) * 1e-10)) if evals[0] > 0 else 0
    if rank < 2:
        raise ValueError("the data have fewer than 2 non-degenerate dimensions")
    evals = evals[:rank]
    if n_components == "auto":
        k = _estimate_dimension(evals, n_vox, method=dim_method, max_rank=max_components)
    else:
        k = int(n_components)
        if not 1 <= k <= rank:
            raise ValueError(f"n_components={k} must be between 1 and the data rank ({rank})")
    u = evecs[:, :k]
    # deterministic signs (chunking-independent): the largest entry of each column positive
    u = u * np.where(u[np.argmax(np.abs(u), axis=0), np.arange(k)] < 0, -1.0, 1.0)
    s = np.sqrt(evals[:k])

    normed = (data - mean) / scale  # same graph as pass 1, with NumPy statistics
    u_d = da.from_array(u, chunks=-1)
    proj = (normed.T @ u_d).T - (u.T @ glob)[:, None]  # (k, V) = U^T Y
    resid = normed - glob[:, None] - u_d @ proj
    rss = (resid**2).sum(axis=0)
    proj, rss = dask.compute(proj, rss)
    return _Reduction(mean=np.asarray(mean), scale=np.asarray(scale), global_signal=glob,
                      eigenvalues=evals, timecourses=u, singular_values=s,
                      maps=proj / s[:, None], residual_ss=np.asarray(rss))


def _estimate_dimension(eigenvalues: np.ndarray, n_samples: int, *,
                       method: DimMethod = "laplace", max_rank: int | None = None) -> int:
    """Number of components from a PCA eigenspectrum, as MELODIC's ``--dimest``.

    Parameters
    ----------
    eigenvalues : (d,) array
        Eigenvalues of the sample covariance (any common scale), descending, non-zero.
    n_samples : int
        Number of samples (voxels for spatial ICA).
    method : {"laplace", "bic", "aic", "mdl"}, default="laplace"
        ``"laplace"``: Laplace approximation to the PPCA evidence (Minka 2000, MELODIC's
        default); ``"bic"``: Minka's BIC approximation of the same evidence; ``"aic"`` /
        ``"mdl"``: Wax & Kailath (1985) information criteria on the eigenvalues.
    max_rank : int, optional
        Largest dimension considered (default ``d - 1``).

    Returns
    -------
    int
        The dimension maximising the evidence (minimising AIC / MDL), at least 1.

    Notes
    -----
    These criteria assume independent samples and isotropic noise; on spatially smooth data
    with few volumes they tend to overestimate (MELODIC corrects the spectrum for spatial
    smoothness first, which is not done here). Pass an explicit ``n_components`` when in
    doubt.
    """
    lam = np.asarray(eigenvalues, dtype=float)
    if method not in _DIM_METHODS:
        raise ValueError(f"dim_method must be one of {_DIM_METHODS}, got {method!r}")
    d = lam.size
    if d < 2:
        return 1
    lam = np.maximum(lam / lam[0], 1e-300)
    n = float(n_samples)
    top = d - 1 if max_rank is None else max(1, min(int(max_rank), d - 1))
    ks = np.arange(1, top + 1)
    log_lam = np.log(lam)
    cum_log = np.cumsum(log_lam)
    tail_sum = np.cumsum(lam[::-1])[::-1]  # tail_sum[k] = sum_{j>=k} lam_j
    v = np.maximum(tail_sum[ks] / (d - ks), 1e-300)  # mean of the discarded eigenvalues
    if method in ("aic", "mdl"):
        tail_log = cum_log[-1] - cum_log[ks - 1]
        log_ratio = tail_log / (d - ks) - np.log(v)  # log(geometric / arithmetic mean) <= 0
        free = ks * (2 * d - ks)
        crit = (-2 * n * (d - ks) * log_ratio + 2 * free if method == "aic"
                else -n * (d - ks) * log_ratio + 0.5 * free * np.log(n))
        return int(ks[np.argmin(crit)])
    m = d * ks - ks * (ks + 1) / 2.0
    ll = -n / 2.0 * cum_log[ks - 1] - n * (d - ks) / 2.0 * np.log(v)
    if method == "bic":
        ll = ll - (m + ks) / 2.0 * np.log(n)
        return int(ks[np.argmax(ll)])
    i_idx = np.arange(1, d + 1)
    gam = np.cumsum(special.gammaln((d - i_idx + 1) / 2.0)
                    - np.log(np.pi) * (d - i_idx + 1) / 2.0)
    ll = ll + gam[ks - 1] - ks * np.log(2.0) + (m + ks) / 2.0 * np.log(2 * np.pi)
    ll = ll - ks * np.log(n) / 2.0
    ll = ll - 0.5 * _laplace_pair_terms(lam, v, ks, n)
    return int(ks[np.argmax(ll)])


def _laplace_pair_terms(lam: np.ndarray, v: np.ndarray, ks: np.ndarray, n: float
                        ) -> np.ndarray:
    """Minka's ``log |A_Z|`` for every rank ``k`` in ``ks``, in O(d^2).

    ``sum_{i<k} sum_{j>i} log((lam_i - lam_j) (1/hat_j - 1/hat_i)) + log(n)`` with
    ``hat_j = lam_j`` for ``j < k`` and ``v_k`` (mean discarded eigenvalue) otherwise: the
    pairs inside the kept set do not depend on ``k`` beyond their range (cumulative sums),
    the cross pairs split into ``log(lam_i - lam_j)`` (2D cumulative sums) and
    ``(d - k) sum_{i<k} log(1/v_k - 1/lam_i)``.
    """
    d = lam.size
    upper = np.triu(np.ones((d, d), dtype=bool), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = np.where(upper, np.log(np.maximum(lam[:, None] - lam[None, :], 1e-300)), 0.0)
        inv = np.where(upper, np.log(np.maximum(1.0 / lam[None, :] - 1.0 / lam[:, None],
                                                1e-300)), 0.0)
    # pairs i < j < k
    within = np.concatenate([[0.0], np.cumsum((diff + inv).sum(axis=0))])[ks]
    # pairs i < k <= j: log(lam_i - lam_j) ...
    rows = np.cumsum(diff, axis=0)  # rows[k-1, j] = sum_{i<k} diff[i, j]
    tails = np.cumsum(rows[:, ::-1], axis=1)[:, ::-1]  # tails[r, j] = sum_{j'>=j} rows[r, j']
    cross = tails[ks - 1, ks]
    # ... + log(1/v_k - 1/lam_i), the same for every j >= k
    kept = np.arange(d)[None, :] < ks[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        lv = np.log(np.maximum(1.0 / v[:, None] - 1.0 / lam[None, :], 1e-300))
    cross = cross + (d - ks) * np.where(kept, lv, 0.0).sum(axis=1)
    n_pairs = ks * (d - 1) - ks * (ks - 1) / 2.0
    return within + cross + n_pairs * np.log(n)


# ------------------------------------------------------------------------- helpers
def power_spectra(mixing: np.ndarray, t_r: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Power spectra of time courses, as MELODIC's ``melodic_FTmix``.

    Each column is zero-padded to an even length ``n``, Fourier transformed
    (``numpy.fft.rfft``), and the power ``|F|^2`` of bins ``1 .. n/2`` kept (the DC bin is
    dropped, the Nyquist bin kept), like FSL's ``calc_FFT``.

    Parameters
    ----------
    mixing : (T, k) array
        Time courses in columns.
    t_r : float, default=1.0
        Repetition time (s).

    Returns
    -------
    frequencies : (n/2,) array
        Frequencies (Hz) of the rows.
    power : (n/2, k) array
    """
    mixing = np.asarray(mixing, dtype=float)
    n = mixing.shape[0] + mixing.shape[0] % 2
    spec = np.fft.rfft(mixing, n=n, axis=0)[1:]
    return np.fft.rfftfreq(n, d=t_r)[1:], spec.real**2 + spec.imag**2


def mixture_threshold(zmap: np.ndarray, *, p_threshold: float = 0.5,
                      random_state: int | None = 0) -> tuple[float, float]:
    """Thresholds of a z-map from a 3-class Gaussian mixture, MELODIC-like.

    MELODIC fits a Gaussian (null) and two Gamma distributions (positive and negative
    tails) to each z-map and keeps voxels whose probability of belonging to a tail exceeds
    0.5. This uses a 3-component :class:`sklearn.mixture.GaussianMixture` on the z values
    instead (means initialised at the 50th, 99th and 1st percentiles). The null class is
    the heaviest; a class whose mean is within one null standard deviation of the null mean
    counts as null too (it models heavier tails of the null, not activation). When a single
    Gaussian fits the map as well (BIC), nothing survives. The posterior of the non-null
    classes is not always monotone in ``z``, so the cut-offs are made monotone: the upper
    threshold is the smallest ``z`` above the null mean such that every larger ``z`` has a
    non-null posterior above ``p_threshold`` (and the same downwards).

    Parameters
    ----------
    zmap : (V,) array
        z values of one map.
    p_threshold : float, default=0.5
        Posterior probability of the non-null classes needed (MELODIC's ``--mmthresh``).
    random_state : int or None, default=0
        Seed of the mixture fit (deterministic with the fixed initial means).

    Returns
    -------
    lower, upper : float
        Keep voxels with ``z <= lower`` or ``z >= upper`` (``-inf`` / ``inf``: none).
    """
    from sklearn.mixture import GaussianMixture

    z = np.asarray(zmap, dtype=float).ravel()
    z = z[np.isfinite(z)]
    if z.size < 10 or np.ptp(z) == 0:
        return -np.inf, np.inf
    q01, q50, q99 = np.percentile(z, [1, 50, 99])
    spread = max(float(np.std(z)), 1e-6)
    gm = GaussianMixture(n_components=3, covariance_type="full", tol=1e-4, max_iter=300,
                         init_params="random_from_data", weights_init=[0.8, 0.1, 0.1],
                         means_init=[[q50], [q99], [q01]],
                         precisions_init=np.full((3, 1, 1), 1.0 / spread**2),
                         random_state=random_state)
    with warnings.catch_warnings(), _blas_threads(z.size):
        warnings.simplefilter("ignore")  # convergence warnings of degenerate maps
        gm.fit(z[:, None])
        single = GaussianMixture(n_components=1, covariance_type="full").fit(z[:, None])
    if gm.bic(z[:, None]) >= single.bic(z[:, None]):
        return -np.inf, np.inf  # one Gaussian explains the map as well: no tails
    null = int(np.argmax(gm.weights_))
    mu0 = float(gm.means_[null, 0])
    sd0 = float(np.sqrt(gm.covariances_[null, 0, 0]))
    # a class centred within one null sd of the null mean models the null's shape (heavier
    # tails), not activation: it counts as null
    nullish = np.abs(gm.means_[:, 0] - mu0) <= sd0
    zs = np.sort(z)
    alt = gm.predict_proba(zs[:, None])[:, ~nullish].sum(axis=1)
    ok = alt > p_threshold
    upper, lower = np.inf, -np.inf
    above = np.flatnonzero(zs > mu0)
    if above.size:
        bad = above[~ok[above]]
        start = (bad[-1] + 1) if bad.size else above[0]
        if start < zs.size:
            upper = float(zs[start])
    below = np.flatnonzero(zs < mu0)
    if below.size:
        bad = below[~ok[below]]
        stop = (bad[0] - 1) if bad.size else below[-1]
        if stop >= 0:
            lower = float(zs[stop])
    return lower, upper


def _skew_signs(maps: np.ndarray) -> np.ndarray:
    sk = stats.skew(maps, axis=1)
    return np.where(sk < 0, -1.0, 1.0)


# --------------------------------------------------------------------------- estimator
class SubjectICA(BaseEstimator):
    """Single-subject spatial ICA (MELODIC-style) of a masked ``(time, voxel)`` run.

    Parameters
    ----------
    n_components : int or "auto", default="auto"
        Number of components; ``"auto"`` estimates it from the PCA eigenspectrum with
        ``dim_method``.
    dim_method : {"laplace", "bic", "aic", "mdl"}, default="laplace"
        Dimensionality estimate for ``n_components="auto"`` (see
        ``_estimate_dimension`` in this module; Laplace is MELODIC's default).
    random_state : int, default=0
        Seed of FastICA's initial unmixing matrix (and of the mixture model); the same seed
        gives identical results.
    fun : {"logcosh", "cube", "pow3", "exp"}, default="logcosh"
        FastICA non-linearity. ``"pow3"`` (MELODIC's default) is scikit-learn's ``"cube"``.
        ``"logcosh"`` is more robust to outlying voxels and converges in fewer iterations
        on fMRI-like data; both recover the same networks on the simulated data.
    max_iter : int, default=1000
        Maximum FastICA iterations.
    tol : float, default=1e-4
        FastICA tolerance.
    threshold : None, float or "mixture", default=None
        Thresholding of the z-maps: a float keeps ``|z| >= threshold``; ``"mixture"``
        uses :func:`mixture_threshold` per map. None: no thresholded maps.
    variance_normalize : bool, default=True
        Divide each voxel's time series by its temporal standard deviation before the PCA
        (MELODIC's ``--vn``; MELODIC uses a robust standard deviation, this uses the plain
        one).
    mm_threshold : float, default=0.5
        Posterior probability of the non-null classes for ``threshold="mixture"``.
    max_components : int, optional
        Upper bound of the automatic dimension.
    t_r : float, optional
        Repetition time (s) for the spectra; default the ``repetition_time`` attribute of
        the data, else 1.

    Attributes
    ----------
    n_components_ : int
        Number of components.
    components_ : ndarray (n_components, n_voxels)
        z-statistic maps, as MELODIC's ``melodic_IC``: raw map divided by the voxel's
        residual standard deviation and by ``sqrt(diag((A^T A)^-1))``, i.e. the GLM
        statistic of the voxel's time series on the mixing matrix ``A``.
    maps_ : ndarray (n_components, n_voxels)
        Raw maps, in units of the preprocessed data (``Y ~= mixing_ @ maps_``).
    mixing_ : ndarray (n_times, n_components)
        Time courses, each with zero mean and unit standard deviation.
    power_spectra_ : ndarray (n_freqs, n_components)
        Power of the time courses (:func:`power_spectra`, as ``melodic_FTmix``).
    frequencies_ : ndarray (n_freqs,)
        Frequencies (Hz) of the rows of ``power_spectra_``.
    explained_variance_ratio_ : ndarray (n_components,)
        Fraction of the total variance of the preprocessed data explained by each component:
        its share of the summed map variances (time courses have unit variance) times the
        fraction kept by the PCA, as MELODIC's ``melodic_ICstats`` (columns 1-2 are
        ``100 * ratio / ratio.sum()`` and ``100 * ratio``). Components are sorted by it,
        descending.
    pca_explained_variance_ratio_ : ndarray (n_eigenvalues,)
        Eigenspectrum of the preprocessed data as fractions of its total variance.
    thresholded_components_ : ndarray (n_components, n_voxels) or None
        ``components_`` with sub-threshold voxels set to 0 (None without ``threshold``).
    thresholds_ : ndarray (n_components, 2) or None
        Lower and upper z cut-offs of each map.
    mean_ : ndarray (n_voxels,)
        Temporal mean of each voxel.
    scale_ : ndarray (n_voxels,)
        Divisor of each voxel (temporal std with ``variance_normalize``, else 1).
    residual_std_ : ndarray (n_voxels,)
        Residual standard deviation after the ``k``-dimensional model (dof ``T - k``).
    unmixing_ : ndarray (n_components, n_components)
        Unmixing matrix from the whitened PCA space (``maps_ = unmixing_ @ white``), after
        the scaling, flipping and sorting of the components.
    n_iter_ : int
        FastICA iterations.
    i_, j_, k_ : ndarray (n_voxels,) of int or None
        Voxel indices (from the ``i``, ``j``, ``k`` coordinates of :func:`apply_mask`).
    affine_ : ndarray (4, 4) or None
    shape_ : tuple of int or None
        The 3D grid.
    repetition_time_ : float
    time_ : ndarray (n_times,)
        The ``time`` coordinate (or volume indices).

    Notes
    -----
    Sign convention: each z-map is flipped (with its raw map and time course) so that its
    skewness is positive. Ordering: by explained variance, descending. Determinism: the PCA
    eigenvector signs are fixed (largest entry positive) and FastICA starts from
    ``random_state``, so results do not depend on the voxel chunking beyond floating-point
    summation order.

    Examples
    --------
    >>> ds = storage.open_run("study.zarr", subject="01", task="rest")  # doctest: +SKIP
    >>> ica = SubjectICA(n_components=20).fit(apply_mask(ds))  # doctest: +SKIP
    >>> export_melodic(ica, "sub-01.ica")  # doctest: +SKIP
    """

    def __init__(self, n_components: int | Literal["auto"] = "auto", *,
                 dim_method: DimMethod = "laplace", random_state: int = 0,
                 fun: Literal["logcosh", "cube", "pow3", "exp"] = "logcosh",
                 max_iter: int = 1000, tol: float = 1e-4,
                 threshold: float | Literal["mixture"] | None = None,
                 variance_normalize: bool = True, mm_threshold: float = 0.5,
                 max_components: int | None = None, t_r: float | None = None) -> None:
        self.n_components = n_components
        self.dim_method = dim_method
        self.random_state = random_state
        self.fun = fun
        self.max_iter = max_iter
        self.tol = tol
        self.threshold = threshold
        self.variance_normalize = variance_normalize
        self.mm_threshold = mm_threshold
        self.max_components = max_components
        self.t_r = t_r

    # ------------------------------------------------------------------ validation
    def _check_params(self) -> str:
        if self.n_components != "auto" and (isinstance(self.n_components, bool)
                                            or not isinstance(self.n_components,
                                                              int | np.integer)
                                            or self.n_components < 1):
            raise ValueError(f"n_components must be a positive int or 'auto', "
                             f"got {self.n_components!r}")
        if self.dim_method not in _DIM_METHODS:
            raise ValueError(f"dim_method must be one of {_DIM_METHODS}, "
                             f"got {self.dim_method!r}")
        if self.fun not in _FUNS:
            raise ValueError(f"fun must be one of {sorted(_FUNS)}, got {self.fun!r}")
        thr = self.threshold
        if not (thr is None or thr == "mixture"
                or (isinstance(thr, int | float) and not isinstance(thr, bool) and thr >= 0)):
            raise ValueError(f"threshold must be None, a non-negative z value or 'mixture', "
                             f"got {thr!r}")
        return _FUNS[self.fun]

    # ------------------------------------------------------------------------- fit
    def fit(self, X: xr.DataArray | da.Array | np.ndarray, y: None = None) -> SubjectICA:
        """Fit the decomposition.

        Parameters
        ----------
        X : xarray.DataArray, dask array or ndarray
            ``(time, voxel)`` data, typically :func:`pipeline.masking.apply_mask` output
            (optionally cleaned). Chunked along voxels; computed block by block in two
            passes.
        y : None
            Ignored.

        Returns
        -------
        SubjectICA
            self.
        """
        from sklearn.decomposition import FastICA

        fun = self._check_params()
        self._remember_grid(X)
        data = _as_dask(X)
        n_time, n_vox = data.shape
        red = _spatial_pca(data, self.n_components, dim_method=self.dim_method,
                           variance_normalize=self.variance_normalize,
                           max_components=self.max_components)
        k = red.singular_values.size

        # FastICA on the white spatial eigenmaps: voxels are samples, rows have zero mean
        # over voxels and identity covariance, so no further whitening is needed
        white = red.maps * np.sqrt(n_vox)  # (k, V)
        ica = FastICA(n_components=None, algorithm="parallel", whiten=False, fun=ica_fun(fun),
                      max_iter=self.max_iter, tol=self.tol, random_state=self.random_state)
        with _blas_threads(white.size):
            ica.fit(white.T)
        unmix = ica.components_  # (k, k)
        maps = unmix @ white  # (k, V)
        dewhite = red.timecourses * red.singular_values / np.sqrt(n_vox)  # (T, k)
        mixing = dewhite @ np.linalg.inv(unmix)  # Y_k = mixing @ maps

        # scale: unit-variance time courses
        sd = mixing.std(axis=0)
        sd = np.where(sd > 0, sd, 1.0)
        mixing, maps, unmix = mixing / sd, maps * sd[:, None], unmix * sd[:, None]

        # z-statistics as MELODIC: IC * diag(pinv(A) pinv(A)^T)^-1/2 / residual std
        dof = max(n_time - k, 1)
        resid_std = np.sqrt(red.residual_ss / dof)
        se_factor = np.sqrt(np.diag(np.linalg.inv(mixing.T @ mixing)))
        with np.errstate(divide="ignore", invalid="ignore"):
            z = maps / (se_factor[:, None] * resid_std[None, :])
        z[:, ~(resid_std > 0)] = 0.0

        # sign: positive skew of the z-map; order: explained variance, descending
        sign = _skew_signs(z)[:, None]
        mixing, maps, unmix, z = mixing * sign.T, maps * sign, unmix * sign, z * sign
        energy = np.sum(maps**2, axis=1)
        order = np.argsort(-energy, kind="stable")
        mixing, maps, unmix, z = mixing[:, order], maps[order], unmix[order], z[order]
        energy = energy[order]

        total = red.total_ss
        kept = float(red.eigenvalues[:k].sum()) / total
        ratio = energy / energy.sum() * kept

        t_r = self._repetition_time(X)
        freqs, power = power_spectra(mixing, t_r)

        self.n_components_ = k
        self.components_ = z
        self.maps_ = maps
        self.mixing_ = mixing
        self.unmixing_ = unmix
        self.n_iter_ = int(ica.n_iter_)
        self.power_spectra_ = power
        self.frequencies_ = freqs
        self.explained_variance_ratio_ = ratio
        self.pca_explained_variance_ratio_ = red.eigenvalues / total
        self.mean_ = red.mean
        self.scale_ = red.scale
        self.residual_std_ = resid_std
        self.repetition_time_ = t_r
        self.time_ = (np.asarray(X["time"].values) if isinstance(X, xr.DataArray)
                      and "time" in X.coords else np.arange(n_time) * t_r)
        self.thresholds_, self.thresholded_components_ = self._threshold(z)
        return self

    def _remember_grid(self, X: Any) -> None:
        self.i_ = self.j_ = self.k_ = None
        self.affine_, self.shape_ = None, None
        if isinstance(X, xr.DataArray):
            if all(c in X.coords for c in ("i", "j", "k")):
                self.i_, self.j_, self.k_ = (np.asarray(X[c].values) for c in ("i", "j", "k"))
            if X.attrs.get("affine") is not None:
                self.affine_ = np.asarray(X.attrs["affine"], dtype=float)
            if X.attrs.get("shape") is not None:
                self.shape_ = tuple(int(s) for s in X.attrs["shape"])

    def _repetition_time(self, X: Any) -> float:
        if self.t_r is not None:
            return float(self.t_r)
        if isinstance(X, xr.DataArray) and X.attrs.get("repetition_time"):
            return float(X.attrs["repetition_time"])
        return 1.0

    def _threshold(self, z: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        if self.threshold is None:
            return None, None
        if self.threshold == "mixture":
            cuts = np.array([mixture_threshold(row, p_threshold=self.mm_threshold,
                                               random_state=self.random_state) for row in z])
        else:
            t = float(self.threshold)
            cuts = np.tile([-t, t], (z.shape[0], 1))
        keep = (z <= cuts[:, :1]) | (z >= cuts[:, 1:])
        return cuts, np.where(keep, z, 0.0)

    # ------------------------------------------------------------------- transform
    def _check_fitted(self) -> None:
        if not hasattr(self, "components_"):
            raise ValueError("this SubjectICA is not fitted yet; call fit first")

    def transform(self, X: xr.DataArray | da.Array | np.ndarray) -> xr.DataArray:
        """Time courses of the fitted maps in ``X`` by spatial regression, lazily.

        ``X`` is preprocessed like the training data (temporal mean removed per voxel and,
        with ``variance_normalize``, divided by its own temporal std), then regressed on
        ``maps_``: ``X_n @ pinv(maps_)``. On the training data this returns ``mixing_``
        (the maps have zero spatial mean, so the removed mean time course does not matter).
        This is stage 1 of dual regression.

        Parameters
        ----------
        X : xarray.DataArray, dask array or ndarray
            ``(time, voxel)`` with the fitted voxels in the same order.

        Returns
        -------
        xarray.DataArray
            Lazy ``(time, component)`` time courses.
        """
        self._check_fitted()
        data = _as_dask(X)
        if data.shape[1] != self.maps_.shape[1]:
            raise ValueError(f"X has {data.shape[1]} voxels, the fit had "
                             f"{self.maps_.shape[1]}")
        if isinstance(X, xr.DataArray) and self.i_ is not None and all(
                c in X.coords for c in ("i", "j", "k")):
            same = all(np.array_equal(X[c].values, v)
                       for c, v in (("i", self.i_), ("j", self.j_), ("k", self.k_)))
            if not same:
                raise ValueError("X's voxels (i, j, k coordinates) differ from the fit's")
        _, _, normed = _normalise(data, self.variance_normalize)
        pinv = np.linalg.pinv(self.maps_)  # (V, k)
        tcs = normed @ pinv
        coords: dict[Hashable, Any] = {"component": np.arange(self.n_components_)}
        if isinstance(X, xr.DataArray) and "time" in X.coords:
            coords["time"] = X["time"].values
        return xr.DataArray(tcs, dims=("time", "component"), coords=coords,
                            name="timecourses")

    # ----------------------------------------------------------------- export aids
    def to_dataarray(self, kind: Literal["z", "thresholded", "raw"] = "z",
                     *, dim: str = "component") -> xr.DataArray:
        """Maps as a ``(dim, voxel)`` DataArray that :func:`pipeline.masking.unmask` takes.

        Parameters
        ----------
        kind : {"z", "thresholded", "raw"}, default="z"
            ``components_``, ``thresholded_components_`` or ``maps_``.
        dim : str, default="component"
            Name of the first dimension (``"time"`` makes ``unmask`` return a 4D
            ``(x, y, z, time)`` image with one volume per component).

        Returns
        -------
        xarray.DataArray
            With coordinates ``i``, ``j``, ``k`` and attributes ``affine``, ``shape``.
        """
        self._check_fitted()
        values = {"z": self.components_, "thresholded": self.thresholded_components_,
                  "raw": self.maps_}[kind]
        if values is None:
            raise ValueError("no thresholded maps: set threshold= before fitting")
        if self.i_ is None or self.shape_ is None:
            raise ValueError("the fit data had no voxel coordinates (i, j, k) and grid shape; "
                             "fit on pipeline.masking.apply_mask output")
        attrs = {"shape": self.shape_}
        if self.affine_ is not None:
            attrs["affine"] = self.affine_
        return xr.DataArray(values, dims=(dim, "voxel"),
                            coords={dim: np.arange(values.shape[0]), "i": ("voxel", self.i_),
                                    "j": ("voxel", self.j_), "k": ("voxel", self.k_)},
                            attrs=attrs, name=f"ica_{kind}")
