"""Subject-level PCA of the masked ``(time, voxel)`` data, out of core, for spatial ICA.

Spatial ICA treats voxels as samples and time points as features: the data matrix
transposed, ``A = X.T`` of shape ``(voxel, time)``, is tall and skinny (``V`` up to a few
hundred thousand voxels, ``T`` a few hundred volumes). :class:`SubjectPCA` decomposes it
without ever materialising ``X``:

* ``svd_solver="tsqr"`` (exact): the direct tall-and-skinny QR of
  :func:`dask.array.linalg.tsqr` over voxel blocks. Each ``(voxel-block, time)`` block is
  factorised where it is read and only ``T x T`` triangular factors travel and are merged;
  the SVD of the final ``R`` (``T x T``, in NumPy) gives the singular values and the temporal
  eigenvectors of the whole matrix. One pass over the data.
* ``svd_solver="randomized"``: a seeded randomized range finder (Halko, Martinsson & Tropp
  2011) in the *time* domain, written with dask so that each pass over the data is an
  independent, re-read copy of the input graph (:func:`dask.graph_manipulation.bind`): memory
  stays bounded by a few blocks although the algorithm needs ``n_power_iter + 2`` passes. The
  random test matrix is ``T x (k + oversampling)``, drawn in NumPy from ``random_state``, so
  the result does not depend on the chunking. (:func:`dask.array.linalg.svd_compressed` is
  not used: in a single graph it keeps every data block in memory between its passes, with
  ``compute=True`` it triggers one compute per pass, and its random matrix follows the
  chunks.)

Either way a fit is **one** :func:`dask.compute` of small results (a ``T x T`` or
``l x l`` factor, the per-voxel mean and scale, the total sum of squares); every fitted
attribute is a NumPy array.

Centring convention
-------------------
As MELODIC (and nilearn's CanICA), each voxel's *temporal* mean is removed
(``demean=True``), i.e. every column of ``X`` is centred; optionally each voxel time series
is then divided by its temporal standard deviation (``variance_normalize=True``, MELODIC's
``--vn``; MELODIC estimates that standard deviation robustly, after removing the top
components, which is not done here: run the cleaning stage with standardisation for that).
This is *not* scikit-learn's convention on ``X.T`` (which would centre every time point
across voxels, i.e. remove the global signal): the two agree when the data are centred both
ways. Removing the voxel means makes the constant time course a null direction, so the
``T x T`` covariance has rank ``T - 1``: the last eigenvalue is (numerically) zero and is left
out of dimensionality estimation.

What :meth:`SubjectPCA.transform` returns
-----------------------------------------
``transform(X)`` projects the (centred, optionally variance-normalised) data onto the
temporal eigenvectors: ``components_ @ X_c``, shape ``(k, voxel)``. Its rows are the spatial
eigenmaps scaled by the singular values (``S_k U_k^T`` in ``A_c = U S W^T``): the reduced data
on which spatial ICA runs (``k`` mixtures, ``V`` samples). ``whiten=True`` rescales each row
to unit variance across voxels (``U_k^T * sqrt(V - 1)``). For dask input the result is lazy
(one more pass over the data when computed): the maps are ``k x V`` (80 MB in float64 for
``k = 50``, ``V = 200 000``), so they are not stored on the estimator.

Dimensionality
--------------
:func:`estimate_dimension` implements the criteria MELODIC offers (``melodic --dimest``):
the Laplace approximation to the evidence of probabilistic PCA (Minka 2000, MELODIC's
default and scikit-learn's ``PCA(n_components="mle")``), BIC (Minka's form), and the
information-theoretic MDL and AIC of Wax & Kailath (1985). They take the eigenvalue spectrum
of the ``T x T`` covariance and the number of *independent* samples. Voxels are not
independent (spatial smoothness): MELODIC corrects for this by estimating an effective
number of samples from the smoothness (resels) and adjusting the eigenspectrum; here the
number of voxels is used unless ``n_samples=`` gives an effective number (fewer effective
samples give a lower, more conservative estimate).

References
----------
Minka, T. P. (2000). Automatic choice of dimensionality for PCA. NIPS 13, 598-604.
Beckmann, C. F. & Smith, S. M. (2004). Probabilistic independent component analysis for
functional magnetic resonance imaging. IEEE TMI 23(2), 137-152.
Wax, M. & Kailath, T. (1985). Detection of signals by information theoretic criteria.
IEEE TASSP 33(2), 387-392.
Halko, N., Martinsson, P. G. & Tropp, J. A. (2011). Finding structure with randomness.
SIAM Review 53(2), 217-288.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import lgamma, log, pi
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from dask.graph_manipulation import bind
from sklearn.base import BaseEstimator

from ._blocks import orthonormal as _orthonormal
from ._blocks import prepare_block as _prepare_block
from ._blocks import voxel_scale as _voxel_scale

__all__ = ["SubjectPCA", "dimension_scores", "estimate_dimension"]

DimensionMethod = Literal["laplace", "bic", "mdl", "aic"]
_METHODS = ("laplace", "bic", "mdl", "aic")
_SOLVERS = ("tsqr", "randomized")
_DEFAULT_RANDOMIZED_MAX = 100
_TARGET_BLOCK_BYTES = 32 * 2**20  # voxel-block size used to chunk NumPy input


# ----------------------------------------------------------------------------------------
# dimensionality estimation
# ----------------------------------------------------------------------------------------
def _spectrum(eigenvalues: Sequence[float] | np.ndarray, n_features: int | None,
              total_variance: float | None) -> np.ndarray:
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64).ravel())[::-1]
    if lam.size == 0 or not np.all(np.isfinite(lam)):
        raise ValueError("eigenvalues must be a non-empty array of finite numbers")
    lam = np.clip(lam, 0.0, None)  # rounding can make null eigenvalues slightly negative
    if lam[0] <= 0:
        raise ValueError("all eigenvalues are zero")
    d = lam.size if n_features is None else int(n_features)
    if d < lam.size:
        raise ValueError(f"n_features={d} is smaller than the number of eigenvalues "
                         f"({lam.size})")
    if d > lam.size:  # truncated spectrum: spread the remaining variance evenly
        if total_variance is None:
            raise ValueError("a truncated spectrum (n_features > len(eigenvalues)) needs "
                             "total_variance")
        rest = max(float(total_variance) - float(lam.sum()), 0.0)
        lam = np.concatenate([lam, np.full(d - lam.size, rest / (d - lam.size))])
    return lam


def dimension_scores(eigenvalues: Sequence[float] | np.ndarray, n_samples: float,
                     method: DimensionMethod = "laplace", *, n_features: int | None = None,
                     total_variance: float | None = None,
                     max_rank: int | None = None) -> np.ndarray:
    """Model-selection score of every candidate dimensionality ``k = 1, 2, ...``.

    Higher is better for every method: the log evidence for ``"laplace"`` and ``"bic"``, minus
    the criterion for ``"mdl"`` and ``"aic"`` (which are minimised).

    Parameters
    ----------
    eigenvalues : array-like of shape (m,)
        Eigenvalues of the ``d x d`` covariance (for spatial ICA: the ``time x time``
        covariance of the voxel-demeaned data); any scale, any order.
    n_samples : float
        Number of independent samples the covariance was estimated from (voxels, or an
        effective number that accounts for spatial smoothness).
    method : {"laplace", "bic", "mdl", "aic"}, default="laplace"
        ``"laplace"``: Laplace approximation to the PPCA evidence (Minka 2000), the
        same expression as :func:`sklearn.decomposition._pca._assess_dimension`.
        ``"bic"``: Minka's BIC approximation of the same evidence.
        ``"mdl"``: Wax & Kailath's minimum description length,
        ``-N (d - k) log(g_k / a_k) + k (2d - k) log(N) / 2``, where ``g_k`` and ``a_k`` are the
        geometric and arithmetic means of the ``d - k`` smallest eigenvalues.
        ``"aic"``: ``-2 N (d - k) log(g_k / a_k) + 2 k (2d - k)``.
    n_features : int, optional
        Dimension ``d`` of the covariance; default ``len(eigenvalues)``. When larger, the
        spectrum is truncated and the missing ``d - m`` eigenvalues are taken equal to the
        mean of the variance they hold (``total_variance`` minus the given ones): exact for
        ``"bic"``, an approximation for the others.
    total_variance : float, optional
        Sum of all ``d`` eigenvalues; required when the spectrum is truncated.
    max_rank : int, optional
        Largest candidate ``k``; default ``d - 1``.

    Returns
    -------
    numpy.ndarray of shape (K,)
        ``scores[k - 1]`` is the score of dimensionality ``k``, ``k = 1 .. K`` with
        ``K = min(r - 1, max_rank)``.

    Notes
    -----
    Null eigenvalues (below ``d * eps`` times the largest) are dropped first and ``d``
    becomes the numerical rank ``r``: data that span fewer dimensions than the covariance
    (after removing voxel means, ``T - 1`` of ``T``) are modelled in those dimensions.
    Keeping a null eigenvalue would make it the "noise floor" of rank ``r``, with an
    unbounded likelihood: scikit-learn's ``_assess_dimension`` does so (its
    ``PCA(n_components="mle")`` then returns ``n_features - 1`` on voxel-demeaned data). On
    full-rank spectra the two agree to rounding. Ties between eigenvalues (a degenerate
    Laplace Hessian) score ``-inf``.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    lam = _spectrum(eigenvalues, n_features, total_variance)
    tiny = lam[0] * lam.size * np.finfo(np.float64).eps
    lam = lam[lam > tiny]  # null eigenvalues: the data span fewer dimensions
    d = lam.size
    if d < 2:
        raise ValueError("dimensionality estimation needs at least 2 non-null eigenvalues")
    n = float(n_samples)
    if not n > 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    kmax = d - 1 if max_rank is None else min(int(max_rank), d - 1)
    if kmax < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    ks = np.arange(1, kmax + 1, dtype=np.float64)
    log_lam = np.log(lam)
    # tail sums sum_{j > k} lam_j, by suffix sums (no cancellation)
    tail = np.cumsum(lam[::-1])[::-1]  # tail[i] = sum_{j >= i} (0-based)
    v = tail[1:kmax + 1] / (d - ks)  # mean of the discarded eigenvalues

    if method in ("laplace", "bic"):
        m = d * ks - ks * (ks + 1) / 2  # dimension of the Stiefel manifold
        loglik = -n / 2 * np.cumsum(log_lam[:kmax]) - n * (d - ks) / 2 * np.log(v)
        if method == "bic":
            score = loglik - (m + ks) / 2 * log(n)
        else:
            pu = np.cumsum([-log(2.0) + lgamma((d - i + 1) / 2) - log(pi) * (d - i + 1) / 2
                            for i in range(1, kmax + 1)])
            pp = log(2.0 * pi) * (m + ks) / 2
            pa = _laplace_hessian_logdet(lam, v, kmax) + m * log(n)
            score = pu + loglik + pp - pa / 2 - ks * log(n) / 2
    else:
        tail_log = np.cumsum(log_lam[::-1])[::-1][1:kmax + 1]  # sum_{j > k} log lam_j
        log_ratio = tail_log / (d - ks) - np.log(v)  # log(geometric / arithmetic) <= 0
        if method == "mdl":
            crit = -n * (d - ks) * log_ratio + ks * (2 * d - ks) * log(n) / 2
        else:
            crit = -2 * n * (d - ks) * log_ratio + 2 * ks * (2 * d - ks)
        score = -crit
    return np.where(np.isfinite(score), score, -np.inf)


def _laplace_hessian_logdet(lam: np.ndarray, v: np.ndarray, kmax: int) -> np.ndarray:
    """``sum_{i<=k, j>i} log((lam_i - lam_j)(1/lam^_j - 1/lam_i))`` for ``k = 1..kmax``.

    ``lam^_j = lam_j`` for ``j <= k`` and ``v_k`` beyond (Minka 2000): O(d * kmax)
    time, O(d) memory. Ties give ``+inf`` (the caller turns the score into ``-inf``).
    """
    d = lam.size
    inv = 1.0 / np.maximum(lam, np.finfo(np.float64).tiny)
    with np.errstate(divide="ignore", invalid="ignore"):
        # rows i < kmax: sum_{j > i} log(lam_i - lam_j)
        diff = np.array([np.sum(np.log(lam[i] - lam[i + 1:])) for i in range(kmax)])
        # pairs i < j < k: log(1/lam_j - 1/lam_i), accumulated by column j
        inner = np.array([np.sum(np.log(inv[j] - inv[:j])) if j else 0.0
                          for j in range(kmax)])
        # pairs i < k <= j: (d - k) copies of log(1/v_k - 1/lam_i)
        cross = np.array([(d - k) * np.sum(np.log(1.0 / v[k - 1] - inv[:k]))
                          for k in range(1, kmax + 1)])
    out = np.cumsum(diff) + np.cumsum(inner) + cross
    return np.where(np.isnan(out), -np.inf, out)  # -inf -> score +inf -> rejected below


def estimate_dimension(eigenvalues: Sequence[float] | np.ndarray, n_samples: float,
                       method: DimensionMethod = "laplace", *, n_features: int | None = None,
                       total_variance: float | None = None,
                       max_rank: int | None = None) -> int:
    """Number of components chosen by a PPCA model-selection criterion, as MELODIC does.

    Parameters
    ----------
    eigenvalues : array-like of shape (m,)
        Eigenvalue spectrum of the ``d x d`` covariance (for spatial ICA the ``time x time``
        covariance; scale does not matter).
    n_samples : float
        Number of independent samples (voxels). MELODIC uses an *effective* number that
        accounts for spatial smoothness; pass it here if known.
    method : {"laplace", "bic", "mdl", "aic"}, default="laplace"
        See :func:`dimension_scores`. On the same spectrum and ``n_samples``, ``"laplace"``
        returns scikit-learn's ``PCA(n_components="mle")`` choice.
    n_features, total_variance, max_rank
        See :func:`dimension_scores`.

    Returns
    -------
    int
        The dimensionality ``k`` (``1 <= k <= d - 1``) with the best score.
    """
    scores = dimension_scores(eigenvalues, n_samples, method, n_features=n_features,
                              total_variance=total_variance, max_rank=max_rank)
    if not np.isfinite(scores).any():
        return 1
    return int(np.argmax(scores)) + 1


# ----------------------------------------------------------------------------------------
# blockwise kernels
# ----------------------------------------------------------------------------------------
# _voxel_scale, _prepare_block, _orthonormal: see ._blocks (the workers import only that)


def _sign_flip(vt: np.ndarray) -> np.ndarray:
    """Largest-magnitude entry of every row positive (scikit-learn's PCA convention)."""
    idx = np.argmax(np.abs(vt), axis=1)
    signs = np.sign(vt[np.arange(vt.shape[0]), idx])
    signs[signs == 0] = 1.0
    return vt * signs[:, None]


# ----------------------------------------------------------------------------------------
# estimator
# ----------------------------------------------------------------------------------------
class SubjectPCA(BaseEstimator):
    """Out-of-core PCA of one run's ``(time, voxel)`` data, with MELODIC-style dimensionality.

    Parameters
    ----------
    n_components : int or "auto", default="auto"
        Number of components kept; ``"auto"`` estimates it from the eigenvalue spectrum with
        ``method`` (see :func:`estimate_dimension`).
    method : {"laplace", "bic", "mdl", "aic"}, default="laplace"
        Dimensionality criterion used when ``n_components="auto"``.
    svd_solver : {"tsqr", "randomized"}, default="tsqr"
        ``"tsqr"``: exact, one pass over the data (all ``T`` singular values).
        ``"randomized"``: approximate top singular triplets, ``n_power_iter + 2`` passes;
        with ``n_components="auto"`` it computes ``max_components`` of them and the total
        variance, and the criteria take the missing eigenvalues equal to their mean.
    demean : bool, default=True
        Remove each voxel's temporal mean (MELODIC, CanICA). See the module notes.
    variance_normalize : bool, default=False
        Divide each voxel time series by its temporal standard deviation (ddof=1; constant
        voxels are left unscaled), after demeaning: MELODIC's variance normalisation (not
        its robust variant).
    random_state : int, numpy.random.Generator or None, default=None
        Seed of the randomized solver's test matrix.
    max_components : int, optional
        Upper bound of the automatic estimate. Default: no bound for ``"tsqr"``
        (``T - 2`` with demeaning), ``min(T - 2, 100)`` for ``"randomized"``.
    n_samples : float, optional
        Number of independent samples assumed by the dimensionality criteria; default the
        number of voxels. Pass an effective number to account for spatial smoothness as
        MELODIC does.
    n_power_iter : int, default=4
        Randomized solver: power iterations after the first sketch ``(X X^T) Omega`` (which
        already applies one), i.e. ``n_power_iter + 2`` passes over the data. The error
        shrinks by about ``(s_{k+1} / s_k) ** 2`` per iteration: fMRI spectra decay slowly,
        hence the default (scikit-learn's ``randomized_svd`` uses 4 to 7).
    n_oversamples : int, default=10
        Randomized solver: extra sketch columns.

    Attributes
    ----------
    n_components_ : int
        Number of components kept.
    components_ : numpy.ndarray of shape (n_components_, n_timepoints)
        Temporal eigenvectors (unit norm, orthogonal), sorted by decreasing singular value;
        the largest-magnitude entry of each is positive.
    singular_values_ : numpy.ndarray of shape (n_components_,)
        Singular values of the prepared ``(voxel, time)`` matrix.
    explained_variance_ : numpy.ndarray of shape (n_components_,)
        ``singular_values_ ** 2 / (n_voxels - 1)``.
    explained_variance_ratio_ : numpy.ndarray of shape (n_components_,)
        Fraction of the total variance of the prepared data.
    eigenvalues_ : numpy.ndarray
        Every eigenvalue of the ``time x time`` covariance that was computed (all
        ``min(T, V)`` for ``"tsqr"``; the top ``max_components + n_oversamples`` or
        ``n_components + n_oversamples`` for ``"randomized"``), same scale as
        ``explained_variance_``.
    total_variance_ : float
        Sum of all eigenvalues (squared Frobenius norm of the prepared data / (V - 1)).
    noise_variance_ : float
        Mean of the discarded eigenvalues (the PPCA noise variance), over the ``T - 1``
        non-null dimensions when demeaning.
    dimension_scores_ : numpy.ndarray or None
        Score of each candidate dimensionality (``n_components="auto"`` only).
    mean_ : numpy.ndarray of shape (n_voxels,) or None
        Temporal mean of each voxel (None when ``demean=False``).
    scale_ : numpy.ndarray of shape (n_voxels,) or None
        Temporal standard deviation used for variance normalisation (None when off).
    n_timepoints_, n_voxels_ : int
        Shape of the fitted data.
    n_samples_ : float
        Number of samples used by the dimensionality criteria.
    """

    def __init__(self, n_components: int | Literal["auto"] = "auto", *,
                 method: DimensionMethod = "laplace",
                 svd_solver: Literal["tsqr", "randomized"] = "tsqr", demean: bool = True,
                 variance_normalize: bool = False,
                 random_state: int | np.random.Generator | None = None,
                 max_components: int | None = None, n_samples: float | None = None,
                 n_power_iter: int = 4, n_oversamples: int = 10) -> None:
        self.n_components = n_components
        self.method = method
        self.svd_solver = svd_solver
        self.demean = demean
        self.variance_normalize = variance_normalize
        self.random_state = random_state
        self.max_components = max_components
        self.n_samples = n_samples
        self.n_power_iter = n_power_iter
        self.n_oversamples = n_oversamples

    # ------------------------------------------------------------------ input handling
    @staticmethod
    def _as_dask(X: Any) -> da.Array:
        data = X.data if isinstance(X, xr.DataArray) else X
        if isinstance(X, xr.DataArray) and X.dims != ("time", "voxel"):
            raise ValueError(f"expected a DataArray with dims ('time', 'voxel'), got {X.dims}")
        if not isinstance(data, da.Array):
            data = np.asarray(data)
            if data.ndim != 2:
                raise ValueError(f"expected a 2D (time, voxel) array, got shape {data.shape}")
            block = max(data.shape[0], _TARGET_BLOCK_BYTES // (8 * max(data.shape[0], 1)))
            data = da.from_array(data, chunks=(-1, block))
        if data.ndim != 2:
            raise ValueError(f"expected a 2D (time, voxel) array, got shape {data.shape}")
        if data.numblocks[0] != 1:  # every block must hold whole time series
            data = data.rechunk({0: -1})
        return data

    def _prepared(self, data: da.Array) -> da.Array:
        return data.map_blocks(_prepare_block, self.demean, self.variance_normalize,
                               dtype=np.float64)

    def _check_params(self, n_time: int, n_vox: int) -> tuple[int | None, int]:
        if self.svd_solver not in _SOLVERS:
            raise ValueError(f"svd_solver must be one of {_SOLVERS}, got {self.svd_solver!r}")
        if self.method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {self.method!r}")
        if n_time < 3 or n_vox < 2:
            raise ValueError(f"need at least 3 time points and 2 voxels, got {n_time} x "
                             f"{n_vox}")
        rank = min(n_time - int(self.demean), n_vox)  # non-null dimensions
        if self.n_components == "auto":
            fixed = None
        elif isinstance(self.n_components, int | np.integer) and not isinstance(
                self.n_components, bool):
            fixed = int(self.n_components)
            if not 1 <= fixed <= rank:
                raise ValueError(f"n_components must be in [1, {rank}] for data of shape "
                                 f"({n_time}, {n_vox}) (demean={self.demean}), got {fixed}")
        else:
            raise ValueError(f"n_components must be an int or 'auto', got "
                             f"{self.n_components!r}")
        cap = rank - 1
        if self.max_components is not None:
            if int(self.max_components) < 1:
                raise ValueError("max_components must be >= 1")
            cap = min(cap, int(self.max_components))
        elif self.svd_solver == "randomized":
            cap = min(cap, _DEFAULT_RANDOMIZED_MAX)
        return fixed, max(cap, 1)

    # ------------------------------------------------------------------ fitting
    def fit(self, X: Any, y: None = None) -> SubjectPCA:
        """Fit on ``X``, ``(time, voxel)``: one :func:`dask.compute`, ``X`` never in memory.

        Parameters
        ----------
        X : xarray.DataArray, dask.array.Array or numpy.ndarray of shape (time, voxel)
            The masked (cleaned) data, e.g. from :func:`pipeline.masking.apply_mask`. Dask
            input is processed block by block (chunks along voxels; a chunked time axis is
            merged first).
        y : None
            Ignored.

        Returns
        -------
        SubjectPCA
            self, with NumPy fitted attributes.
        """
        data = self._as_dask(X)
        n_time, n_vox = data.shape
        fixed, cap = self._check_params(n_time, n_vox)
        prepared = self._prepared(data)
        f64 = data.astype(np.float64)
        mean = f64.mean(axis=0) if self.demean else None
        scale = f64.map_blocks(_voxel_scale, drop_axis=0, dtype=np.float64) \
            if self.variance_normalize else None
        sumsq = (prepared ** 2).sum()

        if self.svd_solver == "tsqr":
            _, r = da.linalg.tsqr(prepared.T)
            r_np, mean_np, scale_np, ss = dask.compute(r, mean, scale, sumsq)
            _, s, vt = np.linalg.svd(r_np, full_matrices=False)
        else:
            n_keep = cap if fixed is None else fixed
            width = min(n_keep + int(self.n_oversamples), min(n_time, n_vox))
            basis, r = self._randomized_graph(prepared, width)
            basis_np, r_np, mean_np, scale_np, ss = dask.compute(basis, r, mean, scale, sumsq)
            _, s, wt = np.linalg.svd(r_np, full_matrices=False)
            vt = (basis_np @ wt.T).T  # temporal singular vectors of the data
        vt = _sign_flip(vt)

        eig = s ** 2 / (n_vox - 1)
        total = float(ss) / (n_vox - 1)
        d = min(n_time - int(self.demean), n_vox)
        self.n_samples_ = float(n_vox if self.n_samples is None else self.n_samples)
        if fixed is None:
            informative = eig[:d]  # the null direction of demeaning is not a dimension
            if self.svd_solver == "tsqr":
                scores = dimension_scores(informative, self.n_samples_, self.method,
                                          max_rank=cap)
            else:
                scores = dimension_scores(informative, self.n_samples_, self.method,
                                          n_features=d, total_variance=total, max_rank=cap)
            k = int(np.argmax(scores)) + 1 if np.isfinite(scores).any() else 1
            self.dimension_scores_ = scores
        else:
            k = fixed
            self.dimension_scores_ = None

        self.n_components_ = k
        self.components_ = np.ascontiguousarray(vt[:k])
        self.singular_values_ = s[:k].copy()
        self.explained_variance_ = eig[:k].copy()
        self.explained_variance_ratio_ = eig[:k] / total if total > 0 else np.zeros(k)
        self.eigenvalues_ = eig
        self.total_variance_ = total
        self.noise_variance_ = (max(total - float(eig[:k].sum()), 0.0) / (d - k)
                                if d > k else 0.0)
        self.mean_ = None if mean_np is None else np.asarray(mean_np, dtype=np.float64)
        self.scale_ = None if scale_np is None else np.asarray(scale_np, dtype=np.float64)
        self.n_timepoints_ = int(n_time)
        self.n_voxels_ = int(n_vox)
        return self

    def _randomized_graph(self, prepared: da.Array, width: int) -> tuple[da.Array, da.Array]:
        """Lazy ``(Q, R)``: ``Q`` (T x l) orthonormal basis of the dominant temporal subspace
        and ``R`` the triangular factor of ``X_c^T Q`` (V x l), ``X_c^T Q = Q' R``.

        Pass ``p`` reads a copy of the input graph bound to the result of pass ``p - 1``, so
        no data block is held across the global synchronisation between passes.
        """
        n_time = prepared.shape[0]
        rng = np.random.default_rng(self.random_state)
        omega = rng.standard_normal((n_time, width))
        q = da.from_array(omega, chunks=omega.shape)
        token = tokenize(prepared, omega, self.n_power_iter)
        for it in range(int(self.n_power_iter) + 1):
            # the first pass shares its blocks with the mean, scale and sum of squares
            x = prepared if it == 0 else bind(prepared, q, seed=(token, it))
            y = x @ (x.T @ q)  # (X X^T) q, summed over voxel blocks: T x l
            q = y.map_blocks(_orthonormal, dtype=np.float64)
        x = bind(prepared, q, seed=(token, -1))
        _, r = da.linalg.tsqr((x.T @ q).rechunk({1: -1}))
        return q, r

    # ------------------------------------------------------------------ projections
    def _check_fitted(self) -> None:
        if not hasattr(self, "components_"):
            raise AttributeError("this SubjectPCA is not fitted yet: call fit first")

    def _block_vectors(self, data: da.Array) -> tuple[da.Array | None, da.Array | None]:
        chunks = (data.chunks[1],)
        mean = None if self.mean_ is None else da.from_array(self.mean_, chunks=chunks)
        scale = None if self.scale_ is None else da.from_array(self.scale_, chunks=chunks)
        return mean, scale

    def transform(self, X: Any, *, whiten: bool = False) -> Any:
        """Reduced data for spatial ICA: ``components_ @ X_c``, shape ``(k, voxel)``.

        ``X_c`` is ``X`` centred with ``mean_`` and divided by ``scale_`` (as in ``fit``);
        the rows are the spatial eigenmaps scaled by the singular values.

        Parameters
        ----------
        X : xarray.DataArray, dask.array.Array or numpy.ndarray of shape (time, voxel)
            Data with the fitted shape (normally the fitted data itself).
        whiten : bool, default=False
            Divide each row by ``sqrt(explained_variance_)``: unit variance across voxels
            (``U_k^T * sqrt(V - 1)``).

        Returns
        -------
        Same kind as ``X``
            Lazy dask array (DataArray with dims ``("component", "voxel")``, the voxel
            coordinates and attributes of ``X``, for DataArray input); NumPy for NumPy input.
        """
        self._check_fitted()
        is_numpy = not isinstance(X, xr.DataArray | da.Array)
        data = self._as_dask(X)
        if data.shape != (self.n_timepoints_, self.n_voxels_):
            raise ValueError(f"X has shape {data.shape}, fitted on "
                             f"({self.n_timepoints_}, {self.n_voxels_})")
        mean, scale = self._block_vectors(data)
        x = data.astype(np.float64)
        if mean is not None:
            x = x - mean[None, :]
        if scale is not None:
            x = x / scale[None, :]
        weights = self.components_
        if whiten:
            weights = weights / np.sqrt(self.explained_variance_)[:, None]
        out = da.from_array(weights, chunks=weights.shape) @ x
        if is_numpy:
            return out.compute()
        if isinstance(X, xr.DataArray):
            voxel_coords = {name: c for name, c in X.coords.items() if c.dims == ("voxel",)}
            return xr.DataArray(out, dims=("component", "voxel"),
                                coords={"component": np.arange(self.n_components_),
                                        **voxel_coords},
                                attrs=dict(X.attrs), name="pca_maps")
        return out

    def fit_transform(self, X: Any, y: None = None, *, whiten: bool = False) -> Any:
        """``fit(X)`` then ``transform(X)`` (lazy: computing it is a second pass)."""
        return self.fit(X).transform(X, whiten=whiten)

    def inverse_transform(self, maps: Any, *, whiten: bool = False) -> Any:
        """Data ``(time, voxel)`` rebuilt from reduced data ``(k, voxel)``.

        ``components_.T @ maps``, then multiplied by ``scale_`` and shifted by ``mean_``.
        Lazy for dask/DataArray input (a DataArray gives a dask array), NumPy for NumPy.
        ``whiten`` must match the one used in :meth:`transform`.
        """
        self._check_fitted()
        is_numpy = not isinstance(maps, xr.DataArray | da.Array)
        z = maps.data if isinstance(maps, xr.DataArray) else maps
        if is_numpy:
            z = da.from_array(np.asarray(z, dtype=np.float64), chunks=(-1, "auto"))
        if z.shape[0] != self.n_components_:
            raise ValueError(f"expected {self.n_components_} rows, got {z.shape[0]}")
        z = z.rechunk({0: -1})
        weights = self.components_.T
        if whiten:
            weights = weights * np.sqrt(self.explained_variance_)[None, :]
        out = da.from_array(weights, chunks=weights.shape) @ z
        mean, scale = self._block_vectors(out)
        if scale is not None:
            out = out * scale[None, :]
        if mean is not None:
            out = out + mean[None, :]
        return out.compute() if is_numpy else out
