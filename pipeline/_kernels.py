"""NumPy/SciPy kernels of :func:`pipeline.signal.clean_signals`, applied per voxel block.

Everything here works on one ``(time, voxel-block)`` array whose time axis is complete, and on
a :class:`CleanPlan` that holds all the time-only quantities (interpolation weights, Butterworth
second-order sections, confound basis, linear operators...) computed once, eagerly, by
:mod:`pipeline.signal`. This module imports neither nilearn nor dask, so that worker processes
only need NumPy to run the tasks (and :mod:`scipy.signal`, imported on first use, to
filter).

The cleaning of :func:`nilearn.signal.clean` is, up to the final standardisation, a *linear*
map of each voxel's time series: interpolation of censored volumes (cubic spline), linear
detrending, zero-phase Butterworth filtering (``sosfiltfilt`` with odd/even/constant padding),
censoring and projection on the orthogonal of the confounds. Two equivalent evaluations exist:

* "stepwise": the steps above, each vectorised over all the voxels of the block
  (one ``sosfiltfilt(..., axis=0)`` instead of nilearn's Python loop over voxels);
* "operator": the steps applied once to the identity matrix give the ``(T_out, T)`` matrix of
  the whole map, which is then applied to a block with a single matrix product. This is the
  fastest for short runs (a few hundred volumes); :mod:`pipeline.signal` picks it from a cost
  model.

Standardisation (``zscore_sample`` or ``psc``) is not linear and is applied afterwards.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CleanPlan",
    "RunPlan",
    "block_clean",
    "block_post",
    "block_pre",
    "block_psc_stats",
    "dask_block_clean",
    "dask_block_post",
    "detrend",
    "run_pre_stepwise",
]

_EPS64 = float(np.finfo(np.float64).eps)

#: Message of nilearn's ``standardize_signal`` for a zero-mean feature with ``psc``.
PSC_ZERO_MEAN_MESSAGE = (
    "psc standardization strategy is meaningless "
    "for features that have a mean of 0. "
    "These time series are set to 0."
)


@dataclass(frozen=True, eq=False)
class RunPlan:
    """Time-only description of the cleaning of one run.

    Attributes
    ----------
    rows : slice or numpy.ndarray
        Rows of the input (time) axis that belong to this run.
    n_in : int
        Number of input volumes of the run.
    interp_rows : numpy.ndarray or None
        Rows replaced by cubic-spline interpolation (Butterworth filter with ``sample_mask``).
    interp_src : numpy.ndarray or None
        Rows the interpolation is computed from (the kept volumes).
    interp_weights : numpy.ndarray or None
        ``(len(interp_rows), len(interp_src))`` interpolation weights.
    keep_rows : numpy.ndarray or None
        Rows kept after interpolation (censored edge volumes that could not be interpolated
        are dropped).
    censor_before : numpy.ndarray or None
        Volumes kept before detrending (cosine filter or no filter, with ``sample_mask``).
    detrend : bool
        Whether to remove a linear trend (and the mean).
    sos : numpy.ndarray or None
        Butterworth second-order sections, or None for no filtering.
    padtype : str or None
        ``padtype`` of :func:`scipy.signal.sosfiltfilt`.
    padlen : int or None
        ``padlen`` of :func:`scipy.signal.sosfiltfilt`.
    censor_after : numpy.ndarray or None
        Volumes kept after filtering (Butterworth filter with ``sample_mask``).
    confound_basis : numpy.ndarray or None
        Orthonormal basis ``Q`` of the processed confounds: signals -= Q (Q^T signals).
    standardize : {"zscore_sample", "psc", "zscore"} or None
        Standardisation of the run ("zscore", population std, only exists in nilearn < 0.14).
    n_out : int
        Number of output volumes of the run.
    operator : numpy.ndarray or None
        If set, the whole linear part as a matrix of shape ``(n_out [+ 1], len(operator_src))``
        (the extra row, with ``psc``, gives the mean of the signals before detrending).
    operator_src : slice or numpy.ndarray or None
        Input rows the operator is applied to (rows that influence the output).
    centered : bool
        The operator's output already has a zero mean over time (``zscore_sample``: the
        removal of the mean is folded into the operator).
    center_rows : slice or numpy.ndarray or None
        If set, the mean of the input over these rows (the rows that reach the output) is
        removed before the linear map and its contribution, ``const_response * mean``, added
        back. Constant features then give exact zeros wherever the map removes constants
        (detrending), as in nilearn, instead of amplified rounding errors, and the matrix
        product does not lose precision to large baselines.
    const_response : numpy.ndarray or None
        ``(n_pre,)`` response of the linear map to a constant 1 (entries that are rounding
        errors of 0 set to exactly 0), or None if it is all zeros.
    """

    rows: slice | np.ndarray
    n_in: int
    interp_rows: np.ndarray | None
    interp_src: np.ndarray | None
    interp_weights: np.ndarray | None
    keep_rows: np.ndarray | None
    censor_before: np.ndarray | None
    detrend: bool
    sos: np.ndarray | None
    padtype: str | None
    padlen: int | None
    censor_after: np.ndarray | None
    confound_basis: np.ndarray | None
    standardize: str | None
    n_out: int
    operator: np.ndarray | None = None
    operator_src: slice | np.ndarray | None = None
    centered: bool = False
    center_rows: slice | np.ndarray | None = None
    const_response: np.ndarray | None = None

    @property
    def psc(self) -> bool:
        """Whether this run is standardised to percent signal change."""
        return self.standardize == "psc"

    @property
    def n_pre(self) -> int:
        """Rows of the run in :func:`block_pre` output (an extra mean row with ``psc``)."""
        return self.n_out + int(self.psc)

    @property
    def is_linear_noop(self) -> bool:
        """True when the linear part only selects volumes (nothing to multiply)."""
        return (
            self.interp_rows is None
            and not self.detrend
            and self.sos is None
            and self.confound_basis is None
        )


@dataclass(frozen=True, eq=False)
class CleanPlan:
    """Time-only description of a whole :func:`~pipeline.signal.clean_signals` call.

    Attributes
    ----------
    runs : tuple of RunPlan
        One plan per run, in output order (sorted run labels, as nilearn).
    n_time : int
        Number of input volumes.
    work_dtype : numpy.dtype
        Floating dtype the input is cast to (nilearn's ``_ensure_float``).
    out_dtype : numpy.dtype
        Dtype of the output.
    ensure_finite : bool
        Whether non-finite input values are replaced by zeros first.
    """

    runs: tuple[RunPlan, ...]
    n_time: int
    work_dtype: np.dtype
    out_dtype: np.dtype
    ensure_finite: bool

    @property
    def n_out(self) -> int:
        """Number of output volumes."""
        return sum(rp.n_out for rp in self.runs)

    @property
    def n_pre(self) -> int:
        """Number of rows of the :func:`block_pre` output."""
        return sum(rp.n_pre for rp in self.runs)

    @property
    def psc(self) -> bool:
        """Whether any run needs the global ``psc`` statistics."""
        return any(rp.psc for rp in self.runs)


# ------------------------------------------------------------------------------ steps


#: Rows per step of the in-place trend removal (bounds its temporary to a few rows).
_DETREND_ROWS = 32


def detrend(x: np.ndarray, *, copy: bool = True) -> np.ndarray:
    """Remove the mean and the linear trend of each column, like nilearn's ``_detrend``.

    Parameters
    ----------
    x : numpy.ndarray
        ``(time, features)`` array.
    copy : bool, default=True
        False: detrend ``x`` in place when it already has the output dtype (the caller owns
        it); the numbers are the same.

    Returns
    -------
    numpy.ndarray
        Detrended array; float32/float64 keep their dtype, other dtypes become float64
        (as :func:`sklearn.utils.as_float_array` in nilearn).
    """
    dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.float64
    x = np.array(x, dtype=dtype, copy=True) if copy else np.asarray(x, dtype=dtype)
    n = x.shape[0]
    if n == 1:  # nilearn warns (at plan time) and skips
        return x
    x -= x.mean(axis=0)
    regressor = np.arange(n, dtype=x.dtype)
    regressor -= regressor.mean()
    std = np.sqrt((regressor**2).sum())
    if not std < _EPS64:
        regressor /= std
    coef = regressor @ x
    # x -= regressor[:, None] * coef[None, :], a few rows at a time: the same products and
    # differences, without a temporary of the size of x
    for start in range(0, n, _DETREND_ROWS):
        rows = slice(start, start + _DETREND_ROWS)
        x[rows] -= regressor[rows, None] * coef[None, :]
    return x


def run_pre_stepwise(
    x: np.ndarray, rp: RunPlan, *, with_mean: bool, owned: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Linear part of the cleaning of one run, step by step, vectorised over columns.

    Parameters
    ----------
    x : numpy.ndarray
        ``(rp.n_in, n_columns)`` signals of the run, already cast to the working dtype. Not
        modified unless ``owned``.
    rp : RunPlan
        Plan of the run.
    with_mean : bool
        Also return the mean over time of the signals after interpolation/censoring and before
        detrending (nilearn's ``original_mean_signals``, needed by ``psc``).
    owned : bool, default=False
        ``x`` is a temporary of the caller, which may be modified (fewer copies).

    Returns
    -------
    pre : numpy.ndarray
        ``(rp.n_out, n_columns)`` cleaned signals before standardisation.
    mean : numpy.ndarray or None
        ``(n_columns,)`` original means, or None.
    """
    if rp.interp_rows is not None:
        # cubic-spline interpolation of censored volumes, from the kept volumes only (so that
        # non-finite values in censored volumes do not leak, as in nilearn)
        assert rp.interp_src is not None and rp.interp_weights is not None
        filled = rp.interp_weights @ x[rp.interp_src]
        x = x.copy()
        x[rp.interp_rows] = filled
        owned = True
    if rp.keep_rows is not None:  # censored edge volumes that could not be interpolated
        x = x[rp.keep_rows]
        owned = True
    if rp.censor_before is not None:
        x = x[rp.censor_before]
        owned = True
    mean = x.mean(axis=0) if with_mean else None

    if rp.detrend:
        x = detrend(x, copy=not owned)
        owned = True
    if rp.sos is not None and x.shape[1] > 0:
        # imported here: scipy.signal (with scipy.stats) is ~40 MB of resident memory that a
        # worker only needs when a plan filters
        from scipy import signal as sp_signal

        filtered = sp_signal.sosfiltfilt(rp.sos, x, axis=0, padtype=rp.padtype, padlen=rp.padlen)
        x = filtered.astype(x.dtype, copy=False)  # nilearn assigns back into its array
        owned = True
    if rp.censor_after is not None:
        x = x[rp.censor_after]
        owned = True
    if rp.confound_basis is not None:
        q = rp.confound_basis
        if not owned:
            x = x.copy()
        # nilearn computes Q.dot(Q.T).dot(signals); same projection, O(T k) instead of O(T^2)
        x -= q @ (q.T @ x)
    elif not owned:
        x = x.copy()
    return x, mean


def run_pre(x: np.ndarray, rp: RunPlan, out_dtype: np.dtype) -> np.ndarray:
    """Linear part of one run (operator or stepwise), with the mean row appended for ``psc``.

    Parameters
    ----------
    x : numpy.ndarray
        ``(rp.n_in, n_columns)`` signals of the run in the working dtype.
    rp : RunPlan
        Plan of the run.
    out_dtype : numpy.dtype
        Dtype of the result.

    Returns
    -------
    numpy.ndarray
        ``(rp.n_pre, n_columns)`` array.
    """
    offset = None
    if rp.operator is not None:
        src = x if rp.operator_src is None else x[rp.operator_src]  # a copy when indexed
        if rp.center_rows is not None:
            offset = src.mean(axis=0)
            if src is x:
                src = src - offset  # x is the caller's array
            else:
                src -= offset  # same numbers, one block-sized temporary less
        pre = rp.operator @ src
    else:
        owned = rp.center_rows is not None
        if owned:
            offset = x[rp.center_rows].mean(axis=0)
            x = x - offset
        pre, mean = run_pre_stepwise(x, rp, with_mean=rp.psc, owned=owned)
        if mean is not None:
            pre = np.concatenate([pre, mean[None, :].astype(pre.dtype)], axis=0)
    if offset is not None and rp.const_response is not None:
        correction = rp.const_response[:, None] * offset[None, :]
        if np.result_type(pre, correction) == pre.dtype:
            pre += correction  # pre is always a new array here (never the input)
        else:
            pre = pre + correction
    return np.asarray(pre, dtype=out_dtype)


#: float64 bytes of the column tile the kernels clean at a time. Detrending, filtering and
#: the regression hold ~4 arrays of the size of what they clean; per tile, that is a
#: fixed amount whatever the block (long runs have wide blocks). Measured on one 31 MiB
#: block, one BLAS thread (tests/benchmarks/RESULTS.md, session 7): 4 MiB tiles are 8-29 %
#: slower than untiled at 800-1600 volumes and hold ~17 MiB of temporaries at 1600
#: (untiled: ~97; 8 MiB: ~33; 2 MiB: ~8 but 20-43 % slower).
TILE_BYTES = 4 * 2**20


def column_tiles(plan: CleanPlan, n_columns: int) -> list[slice]:
    """Column slices of at most :data:`TILE_BYTES` of float64 over the plan's time axis."""
    step = max(1, TILE_BYTES // (8 * max(plan.n_time, plan.n_pre, 1)))
    return [slice(s, min(s + step, n_columns)) for s in range(0, n_columns, step)] \
        or [slice(0, 0)]


def _prepare(block: np.ndarray, plan: CleanPlan) -> np.ndarray:
    block = np.asarray(block)
    if plan.ensure_finite:
        finite = np.isfinite(block)
        if not finite.all():
            block = np.where(finite, block, 0)
    return block.astype(plan.work_dtype, copy=False)


def block_pre(block: np.ndarray, plan: CleanPlan) -> np.ndarray:
    """Linear part of the cleaning of a ``(time, voxel-block)`` array, all runs.

    Parameters
    ----------
    block : numpy.ndarray
        ``(plan.n_time, n_columns)`` input block.
    plan : CleanPlan
        The plan.

    Returns
    -------
    numpy.ndarray
        ``(plan.n_pre, n_columns)`` array: for each run its cleaned, unstandardised volumes,
        followed (``psc`` only) by one row with the original means.
    """
    tiles = column_tiles(plan, block.shape[1])
    if len(tiles) > 1:
        pre = np.empty((plan.n_pre, block.shape[1]), dtype=plan.out_dtype)
        for sl in tiles:
            pre[:, sl] = block_pre(block[:, sl], plan)
        return pre
    x = _prepare(block, plan)
    parts = [run_pre(x[rp.rows], rp, plan.out_dtype) for rp in plan.runs]
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts, axis=0)


def _split_runs(pre: np.ndarray, plan: CleanPlan):
    start = 0
    for rp in plan.runs:
        yield rp, pre[start : start + rp.n_out], (pre[start + rp.n_out] if rp.psc else None)
        start += rp.n_pre


def block_psc_stats(pre: np.ndarray, plan: CleanPlan) -> np.ndarray:
    """Partial sums for nilearn's global ``psc`` decision, for one block.

    nilearn adds the original mean back before computing percent signal change when
    ``mean_v |mean_t(cleaned)| / mean_v |original mean| < 0.1``, an average over *all*
    features. The two sums are additive over voxel blocks.

    Parameters
    ----------
    pre : numpy.ndarray
        Output of :func:`block_pre`.
    plan : CleanPlan
        The plan.

    Returns
    -------
    numpy.ndarray
        ``(2 * n_runs, 1)`` float64: for each run ``sum |mean_t(pre)|`` then
        ``sum |original mean|`` (zeros for runs without ``psc``).
    """
    stats = np.zeros((2 * len(plan.runs), 1))
    for i, (rp, run, mean) in enumerate(_split_runs(pre, plan)):
        if rp.psc:
            stats[2 * i, 0] = np.abs(run.mean(axis=0)).sum(dtype=np.float64)
            stats[2 * i + 1, 0] = np.abs(mean).sum(dtype=np.float64)
    return stats


def block_post(
    pre: np.ndarray, plan: CleanPlan, totals: np.ndarray | None = None, *,
    inplace: bool = False,
) -> tuple[np.ndarray, list[bool]]:
    """Standardise the output of :func:`block_pre`.

    Parameters
    ----------
    pre : numpy.ndarray
        Output of :func:`block_pre` (not modified unless ``inplace``).
    plan : CleanPlan
        The plan.
    totals : numpy.ndarray or None
        ``(2 * n_runs,)`` sums of :func:`block_psc_stats` over *all* blocks (``psc`` only).
    inplace : bool, default=False
        ``pre`` is a temporary of the caller: ``zscore_sample`` may divide it in place (the
        same numbers, one block-sized array less).

    Returns
    -------
    out : numpy.ndarray
        ``(plan.n_out, n_columns)`` cleaned signals.
    zero_mean : list of bool
        Per run, whether ``psc`` met features with a zero mean (set to 0; nilearn warns).
    """
    tiles = column_tiles(plan, pre.shape[1])
    if len(tiles) > 1:
        return _tiled(lambda sl: block_post(pre[:, sl], plan, totals, inplace=inplace),
                      tiles, plan)
    parts = []
    zero_mean = []
    for i, (rp, run, mean) in enumerate(_split_runs(pre, plan)):
        run_totals = None if totals is None else totals[2 * i : 2 * i + 2]
        y, flagged = _standardize(run, mean, rp, run_totals, inplace=inplace)
        parts.append(y)
        zero_mean.append(flagged)
    out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    return np.asarray(out, dtype=plan.out_dtype), zero_mean


def _standardize(
    run: np.ndarray, mean: np.ndarray | None, rp: RunPlan, totals: np.ndarray | None,
    inplace: bool = False,
) -> tuple[np.ndarray, bool]:
    if rp.standardize is None:
        return run, False
    if rp.standardize in ("zscore_sample", "zscore"):  # "zscore" (ddof=0): nilearn < 0.14
        if rp.n_out == 1:  # nilearn warns (at plan time) and skips
            return run.copy(), False
        # nilearn: y = run - mean; y /= y.std(ddof=1). Same std, without temporaries:
        # var = (sum y^2 - n mean(y)^2) / (n - 1), mean(y) being ~0 (rounding errors), so
        # no cancellation; a constant y gives exactly 0 as in numpy.
        n = rp.n_out
        # in place only on C-ordered blocks: the sums below run in memory order, and
        # run - mean of a strided run (the filter's output) is laid out differently
        inplace = inplace and run.flags.c_contiguous
        if rp.centered:
            y = run
        elif inplace:
            y = run
            y -= run.mean(axis=0)  # the same numbers as run - run.mean(axis=0)
        else:
            y = run - run.mean(axis=0)
        y_mean = y.mean(axis=0)
        ddof = 1 if rp.standardize == "zscore_sample" else 0
        sum_sq = np.einsum("ij,ij->j", y, y, dtype=np.float64)  # float64 sums for float32
        var = (sum_sq - n * y_mean.astype(np.float64) ** 2) / (n - ddof)
        std = np.sqrt(np.maximum(var, 0)).astype(y.dtype)
        std[std < _EPS64] = 1.0
        if rp.centered and not inplace:
            return y / std, False
        y /= std  # a new array (run - mean) or, with inplace, the caller's temporary
        return y, False
    # psc: nilearn adds the original mean back when the cleaned means are small compared
    # with the original ones, on average over all features (hence the global totals)
    assert mean is not None and totals is not None
    with np.errstate(divide="ignore", invalid="ignore"):
        add_mean = bool(totals[0] / totals[1] < 1e-1)
    y = run + mean if add_mean else run.copy()
    if rp.n_out == 1:  # nilearn warns (at plan time) and skips
        return y, False
    m = y.mean(axis=0)
    invalid = np.abs(m) < _EPS64
    with np.errstate(divide="ignore", invalid="ignore"):
        y = (y - m) / np.abs(m)
    y *= 100
    flagged = bool(invalid.any())
    if flagged:
        y[:, invalid] = 0
    return y, flagged


def block_clean(block: np.ndarray, plan: CleanPlan) -> tuple[np.ndarray, list[bool]]:
    """Clean one block when no global statistic is needed (no ``psc``).

    Parameters
    ----------
    block : numpy.ndarray
        ``(plan.n_time, n_columns)`` input block.
    plan : CleanPlan
        The plan.

    Returns
    -------
    out : numpy.ndarray
        ``(plan.n_out, n_columns)`` cleaned signals.
    zero_mean : list of bool
        See :func:`block_post`.
    """
    tiles = column_tiles(plan, block.shape[1])
    if len(tiles) > 1:
        return _tiled(lambda sl: block_clean(block[:, sl], plan), tiles, plan)
    return block_post(block_pre(block, plan), plan, inplace=True)  # block_pre's output is new


def _tiled(clean: Callable[[slice], tuple[np.ndarray, list[bool]]], tiles: list[slice],
           plan: CleanPlan) -> tuple[np.ndarray, list[bool]]:
    """``clean(columns)`` of each column tile, gathered in one output array."""
    out = np.empty((plan.n_out, tiles[-1].stop), dtype=plan.out_dtype)
    zero_mean = [False] * len(plan.runs)
    for sl in tiles:
        out[:, sl], flags = clean(sl)
        zero_mean = [a or b for a, b in zip(zero_mean, flags, strict=True)]
    return out, zero_mean


# ------------------------------------------------------------------------------ dask tasks


def _warn_zero_mean(zero_mean: list[bool]) -> None:
    if any(zero_mean):
        warnings.warn(PSC_ZERO_MEAN_MESSAGE, UserWarning, stacklevel=3)


def dask_block_clean(block: np.ndarray, plan: CleanPlan) -> np.ndarray:
    """Task of the dask graph without ``psc``: :func:`block_clean` on one block."""
    out, zero_mean = block_clean(block, plan)
    _warn_zero_mean(zero_mean)
    return out


def dask_block_post(pre: np.ndarray, totals: np.ndarray, plan: CleanPlan) -> np.ndarray:
    """Task of the dask graph with ``psc``: :func:`block_post` with the global sums."""
    out, zero_mean = block_post(pre, plan, np.asarray(totals).reshape(-1))
    _warn_zero_mean(zero_mean)
    return out
