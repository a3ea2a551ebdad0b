"""Confound-regression cleaning of ``(time, feature)`` signals, in NumPy or lazily with Dask.

:func:`clean_signals` is a drop-in for :func:`nilearn.signal.clean`: same signature, defaults,
semantics, warnings and errors, so that code written for nilearn switches by changing one
import. It differs in how the work is done:

* everything that depends only on time (validation of the parameters, loading and processing
  of the confounds, interpolation weights of censored volumes, run boundaries, cosine drift
  terms, Butterworth second-order sections, the orthonormal basis of the confounds) is computed
  once, eagerly, in NumPy; it is small (time x confounds);
* the per-feature work is vectorised over a whole ``(time, voxel-block)`` array (one
  ``sosfiltfilt(..., axis=0)`` instead of nilearn's Python loop over voxels, or, for short
  runs, one matrix product with the precomputed linear operator of the whole cleaning), see
  :mod:`pipeline._kernels`;
* a :class:`dask.array.Array` chunked along features (axis 1) gives a lazy dask array with the
  same chunks along features: nothing is computed before ``.compute()``.

Example
-------
>>> import numpy as np
>>> from pipeline.signal import clean_signals
>>> rng = np.random.default_rng(0)
>>> x = rng.standard_normal((100, 5)) + 100.0
>>> clean_signals(x, low_pass=0.1, t_r=2.0).shape
(100, 5)
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import warnings
from typing import Any, Literal

import dask
import dask.array as da

# ---------------------------------------------------------------------------------------------
# nilearn, in ONE place. Besides the public `clean` (run on a one-column dummy to reproduce its
# parameter checks, errors and warnings) we reuse these helpers of `nilearn.signal` for the
# small, time-only parts, so that confounds, sample masks, runs and cosine drifts are handled
# exactly as nilearn does:
#   sanitize_confounds, _sanitize_runs, _sanitize_sample_mask, _check_filter_parameters,
#   _create_cosine_drift_terms, _interpolate_volumes, _check_wn, butterworth,
#   standardize_signal, stringify_path, as_ndarray, AllVolumesRemovedError.
# All are reachable as attributes of `nilearn.signal` with the same call signatures in nilearn
# 0.11.1, 0.12.1, 0.13.1 and 0.14.1 (checked), except `_check_filter_parameters`, which returns
# the filter type in <= 0.13 and a tuple starting with it in >= 0.14 (handled below). The
# numerical semantics reproduced (and tested) are those of nilearn 0.14.
# `nilearn.signal` (which imports scikit-learn) and `scipy.signal` are imported on first use, by
# the planning code of `clean_signals`, so that importing this module stays light.
import numpy as np
from scipy import linalg

from . import _kernels
from ._kernels import CleanPlan, RunPlan

__all__ = ["clean_signals"]


class _OnFirstUse:
    """A module imported when one of its attributes is first read."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


_nls: Any = _OnFirstUse("nilearn.signal")


def _standardize_true() -> str:
    """nilearn < 0.14 maps standardize=True to "zscore" (population std), >= 0.14 to
    "zscore_sample"."""
    import nilearn

    version = tuple(int(p) for p in nilearn.__version__.split(".")[:2] if p.isdigit())
    return "zscore_sample" if version >= (0, 14) else "zscore"

#: Evaluation of the linear part: "auto" (cost model), "operator" or "stepwise" (for tests).
_METHOD: Literal["auto", "operator", "stepwise"] = "auto"

# Rough costs (ns) measured on the project machine (2 cores, float64): a multiply-add in a
# matrix product, a sample through one second-order section of sosfiltfilt (both passes), a
# sample through one vectorised elementwise pass over a block.
_NS_GEMM_MAC = 0.05
_NS_SOS_SECTION = 10.0
_NS_PASS = 4.0


def clean_signals(
    signals: Any,
    runs: np.ndarray | None = None,
    detrend: bool = True,
    standardize: Literal["zscore_sample", "psc"] | bool | None = "zscore_sample",
    sample_mask: Any = None,
    confounds: Any = None,
    standardize_confounds: bool = True,
    filter: Literal["butterworth", "cosine", False] = "butterworth",  # nilearn's name
    low_pass: float | None = None,
    high_pass: float | None = None,
    t_r: float | None = 2.5,
    ensure_finite: bool = False,
    extrapolate: bool = False,
    **kwargs: Any,
) -> Any:
    """Clean signals like :func:`nilearn.signal.clean`, fast, for NumPy or Dask arrays.

    With the default options the signals are detrended, filtered (Butterworth, when
    ``low_pass`` or ``high_pass`` is given), projected on the orthogonal of the confounds and
    z-scored. With ``sample_mask`` and the Butterworth filter, censored volumes are first
    interpolated (cubic spline), and removed after filtering; with the cosine filter or no
    filter they are removed first. Each run is cleaned separately. See
    :func:`nilearn.signal.clean` for the full description: the semantics are the same.

    Parameters
    ----------
    signals : numpy.ndarray or dask.array.Array
        ``(time, features)`` signals. A dask array must hold the whole time axis in one chunk
        (chunk along features only). Not modified.
    runs : numpy.ndarray or None, default=None
        Run label of each volume; each run is cleaned independently and the output stacks the
        runs in sorted label order (as nilearn).
    detrend : bool, default=True
        Remove the linear trend (signals and confounds).
    standardize : {"zscore_sample", "psc", None} or bool, default="zscore_sample"
        Standardisation of the output (booleans are deprecated by nilearn, with a
        FutureWarning).
    sample_mask : None, numpy.ndarray or list of numpy.ndarray, default=None
        Volumes to keep (boolean mask or indices), one per run when ``runs`` is given.
    confounds : numpy.ndarray, pandas.DataFrame, str, pathlib.Path or list of these, \
default=None
        ``(time, n_confounds)`` confounds to regress out (a path names a CSV/TSV file).
    standardize_confounds : bool, default=True
        z-score the confounds before the regression.
    filter : {"butterworth", "cosine", False}, default="butterworth"
        Temporal filter.
    low_pass : float or None, default=None
        Low-pass cut-off frequency (Hz).
    high_pass : float or None, default=None
        High-pass cut-off frequency (Hz).
    t_r : float or None, default=2.5
        Repetition time (s).
    ensure_finite : bool, default=False
        Replace non-finite values by zeros first.
    extrapolate : bool, default=False
        With the Butterworth filter and ``sample_mask``, extrapolate censored edge volumes
        instead of dropping them before filtering.
    **kwargs
        ``butterworth__order``, ``butterworth__padtype``, ``butterworth__padlen`` (and
        ``butterworth__copy``, which has no effect) are passed to the Butterworth filter;
        other keywords are ignored, as in nilearn.

    Returns
    -------
    numpy.ndarray or dask.array.Array
        ``(time_out, features)`` cleaned signals, ``time_out < time`` when volumes are
        censored. A lazy dask array, with the input's chunks along features, for a dask input.
        Float inputs keep their dtype (float16 becomes float64 when detrending, as in
        nilearn); integer inputs become float32 (float64 for 8-byte integers).

    Raises
    ------
    ValueError
        If ``signals`` is not 2-D, if a dask input has several chunks along time, and for
        every invalid parameter for which nilearn raises it (the other exception types raised
        by nilearn for invalid input, e.g. TypeError or IndexError, are raised as well).

    Warns
    -----
    UserWarning, FutureWarning
        The warnings of :func:`nilearn.signal.clean` for the same parameters. The warning for
        zero-mean features with ``psc`` depends on the data: for a dask input it is emitted
        when the result is computed, by the blocks concerned.

    Notes
    -----
    Known nilearn behaviours that are reproduced on purpose (drop-in semantics):

    * with ``runs``, each run is cleaned with ``standardize_confounds=True``,
      ``extrapolate=False`` and the default Butterworth options, whatever was passed;
    * with the Butterworth filter and ``sample_mask``, nilearn replaces the rows
      ``~index`` (bitwise not of the kept indices, i.e. counted from the end) by the
      interpolated values, so a censored volume ``t`` is only interpolated when volume
      ``T - 1 - t`` is kept; the other censored volumes keep their values during filtering;
    * with ``psc``, whether the original mean is added back before scaling is decided from an
      average over *all* features. For a dask input this is a global reduction: the blocks
      cleaned before standardisation are kept until it is known (memory of about the whole
      output); other standardisations are block-local.

    Differences: the input's ``sample_mask`` is never modified (nilearn shifts an int32 index
    array in place when it drops censored edge volumes), and 1-D signals raise a ValueError.
    Constant features give exact zeros when detrending, as in nilearn; without detrending,
    nilearn's output for a constant feature that went through a filter or the confound
    regression is its rounding noise scaled to unit variance (the z-score floor is an
    absolute 2.2e-16), which cannot be reproduced (ours is 0 or other noise). Results agree
    with nilearn to ~1e-13 relative (float64), not bit for bit.
    """
    is_dask = isinstance(signals, da.Array)
    if is_dask:
        _check_dask_signals(signals)
    else:
        if not isinstance(signals, np.ndarray):
            signals = _nls.as_ndarray(signals)
        if signals.ndim != 2:
            raise ValueError(
                f"signals must be a 2-D (time, features) array; got shape {signals.shape}."
            )
    runs, sample_mask, confounds = (
        _small_to_numpy(v) for v in (runs, sample_mask, confounds)
    )
    n_time = int(signals.shape[0])
    work_dtype = _work_dtype(signals.dtype)
    params = dict(
        runs=runs, detrend=detrend, standardize=standardize, sample_mask=sample_mask,
        confounds=confounds, standardize_confounds=standardize_confounds, filter=filter,
        low_pass=low_pass, high_pass=high_pass, t_r=t_r, ensure_finite=ensure_finite,
        extrapolate=extrapolate,
    )

    # nilearn's own checks, errors and warnings, on a one-column dummy with the same time axis
    caught, error = _nilearn_checks(n_time, work_dtype, params, kwargs)
    for w in caught:
        warnings.warn(w.message, stacklevel=2)
    if error is not None:
        raise error

    with warnings.catch_warnings():  # already emitted above
        warnings.simplefilter("ignore")
        n_features = signals.shape[1]
        plan = _build_plan(n_time, work_dtype, params, kwargs, n_features)

    if is_dask:
        return _clean_dask(signals, plan)
    out, zero_mean = _clean_numpy(signals, plan)
    for flagged in zero_mean:
        if flagged:
            warnings.warn(_kernels.PSC_ZERO_MEAN_MESSAGE, UserWarning, stacklevel=2)
    return out


# ------------------------------------------------------------------------------ checks


def _check_dask_signals(signals: da.Array) -> None:
    if signals.ndim != 2:
        raise ValueError(
            f"signals must be a 2-D (time, features) array; got shape {signals.shape}."
        )
    if np.isnan(signals.shape[0]):
        raise ValueError(
            "signals has an unknown number of volumes (axis 0); call "
            "signals.compute_chunk_sizes() first."
        )
    if len(signals.chunks[0]) != 1:
        raise ValueError(
            "clean_signals needs the whole time axis of each block: axis 0 (time) of signals "
            f"consists of {len(signals.chunks[0])} chunks {signals.chunks[0]}. To fix, rechunk "
            "into a single chunk along time (chunk along features only), i.e. "
            "signals.rechunk({0: -1}), keeping the chunks along axis 1 small enough for memory."
        )


def _small_to_numpy(value: Any) -> Any:
    """Time-only inputs (runs, sample_mask, confounds) given as dask arrays are loaded."""
    if isinstance(value, da.Array):
        return np.asarray(value)
    return value


def _work_dtype(dtype: np.dtype) -> np.dtype:
    """Dtype of nilearn's ``_ensure_float`` (nilearn >= 0.13 semantics)."""
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        return np.dtype(np.float64 if dtype.itemsize == 8 else np.float32)
    return dtype


def _nilearn_checks(
    n_time: int, work_dtype: np.dtype, params: dict[str, Any], kwargs: dict[str, Any]
) -> tuple[list[warnings.WarningMessage], BaseException | None]:
    """Run :func:`nilearn.signal.clean` on a ``(n_time, 1)`` column of ones.

    Every check of nilearn depends on the time axis and the parameters only, so this raises
    the same errors, with the same messages, and emits the same warnings (a column of ones
    triggers none of the data-dependent ones). Warnings are recorded, to be re-emitted from
    :func:`clean_signals` and attributed to its caller.
    """
    dummy = np.ones((n_time, 1), dtype=work_dtype)
    # nilearn modifies an int32 index sample_mask in place: give it a copy
    params = {**params, "sample_mask": copy.deepcopy(params["sample_mask"])}
    error: BaseException | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _nls.clean(dummy, **params, **kwargs)
        except Exception as exc:  # re-raised by the caller, after the warnings
            error = exc
    return list(caught), error


# ------------------------------------------------------------------------------ plan


def _filter_type(filter: Any, low_pass: Any, high_pass: Any, t_r: Any) -> Any:
    result = _nls._check_filter_parameters(filter, low_pass, high_pass, t_r)
    return result[0] if isinstance(result, tuple) else result


def _as_rows(index: np.ndarray) -> slice | np.ndarray:
    """A slice when the indices are contiguous and increasing (cheaper to take)."""
    if index.size and np.array_equal(index, np.arange(index[0], index[0] + index.size)):
        return slice(int(index[0]), int(index[0]) + index.size)
    return index


def _build_plan(
    n_time: int,
    work_dtype: np.dtype,
    params: dict[str, Any],
    kwargs: dict[str, Any],
    n_features: float,
) -> CleanPlan:
    """Mirror of the time-only part of :func:`nilearn.signal.clean` (inputs already checked)."""
    p = params
    confounds = _nls.stringify_path(p["confounds"])
    filter_type = _filter_type(p["filter"], p["low_pass"], p["high_pass"], p["t_r"])
    n_runs, runs = _nls._sanitize_runs(n_time, p["runs"])
    confounds = _nls.sanitize_confounds(n_time, confounds)
    sample_mask = _nls._sanitize_sample_mask(
        n_time, n_runs, runs, copy.deepcopy(p["sample_mask"])
    )
    standardize = p["standardize"]
    if isinstance(standardize, bool):
        standardize = _standardize_true() if standardize else None
    detrend = p["detrend"]
    out_dtype = work_dtype
    if detrend and work_dtype not in (np.float32, np.float64):
        out_dtype = np.dtype(np.float64)  # sklearn's as_float_array in nilearn's _detrend
    common = dict(
        detrend=detrend, standardize=standardize, low_pass=p["low_pass"],
        high_pass=p["high_pass"], t_r=p["t_r"], n_features=n_features,
    )
    if runs is None:
        plans = [
            _plan_run(
                slice(None), n_time, sample_mask=sample_mask, confounds=confounds,
                filter_type=filter_type, standardize_confounds=p["standardize_confounds"],
                extrapolate=p["extrapolate"], bw_kwargs=_butterworth_kwargs(kwargs), **common,
            )
        ]
    else:
        # nilearn's _process_runs: clean() again on each run (sorted labels), with only these
        # arguments: standardize_confounds, extrapolate and butterworth__* take their defaults
        runs = np.asarray(runs)
        plans = []
        for i, run in enumerate(np.unique(runs)):
            selected = runs == run
            n_run = int(selected.sum())
            run_confounds = None if confounds is None else confounds[selected]
            run_mask = None if sample_mask is None else sample_mask[i]
            run_filter = _filter_type(filter_type, p["low_pass"], p["high_pass"], p["t_r"])
            run_confounds = _nls.sanitize_confounds(n_run, run_confounds)
            run_mask = _nls._sanitize_sample_mask(n_run, 1, None, run_mask)
            plans.append(
                _plan_run(
                    _as_rows(np.flatnonzero(selected)), n_run, sample_mask=run_mask,
                    confounds=run_confounds, filter_type=run_filter,
                    standardize_confounds=True, extrapolate=False, bw_kwargs={}, **common,
                )
            )
    return CleanPlan(
        runs=tuple(plans), n_time=n_time, work_dtype=work_dtype, out_dtype=out_dtype,
        ensure_finite=bool(p["ensure_finite"]),
    )


def _butterworth_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {
        k.replace("butterworth__", ""): v for k, v in kwargs.items()
        if k.startswith("butterworth__")
    }


def _butterworth_sos(
    sampling_rate: float, low_pass: float | None, high_pass: float | None, order: int
) -> np.ndarray | None:
    """Second-order sections of :func:`nilearn.signal.butterworth` (None: no filtering)."""
    if low_pass is None and high_pass is None:
        return None
    nyq = sampling_rate * 0.5
    critical_freq = []
    btype = ""
    if high_pass is not None:
        btype = "high"
        critical_freq.append(_nls._check_wn(btype, high_pass, nyq))
    if low_pass is not None:
        btype = "low"
        critical_freq.append(_nls._check_wn(btype, low_pass, nyq))
    if len(critical_freq) == 2:
        btype = "band"
        if critical_freq[0] == critical_freq[1]:  # nilearn warns and returns unfiltered
            return None
        wn: Any = critical_freq
    else:
        wn = critical_freq[0]
    from scipy import signal as sp_signal

    return sp_signal.butter(N=order, Wn=wn, btype=btype, output="sos", fs=sampling_rate)


def _plan_run(
    rows: slice | np.ndarray,
    n_time: int,
    *,
    detrend: bool,
    standardize: str | None,
    sample_mask: np.ndarray | None,
    confounds: np.ndarray | None,
    standardize_confounds: bool,
    filter_type: Any,
    low_pass: float | None,
    high_pass: float | None,
    t_r: float | None,
    extrapolate: bool,
    bw_kwargs: dict[str, Any],
    n_features: float,
) -> RunPlan:
    """Time-only plan of one run: the body of nilearn's ``clean`` without the signals."""
    if filter_type == "cosine":
        confounds = _nls._create_cosine_drift_terms(
            np.empty((n_time, 0)), confounds, high_pass, t_r
        )

    # interpolation / censoring (nilearn's _handle_scrubbed_volumes)
    interp_rows = interp_src = interp_weights = keep_rows = None
    censor_before = censor_after = None
    n_cur = n_time
    if sample_mask is not None:
        if sample_mask.size == 0:
            raise _nls.AllVolumesRemovedError()
        if filter_type == "butterworth":
            # the interpolation is linear: apply nilearn's to the identity to get its matrix
            eye = np.eye(n_time)
            op = _nls._interpolate_volumes(eye.copy(), sample_mask, t_r, extrapolate)
            keep = ~np.isnan(op).all(axis=1)  # non-interpolated edge volumes are dropped
            changed = np.flatnonzero(keep & np.any(op != eye, axis=1))
            if changed.size:
                src = np.flatnonzero(np.any(op[changed] != 0, axis=0))
                interp_rows, interp_src = changed, src
                interp_weights = np.ascontiguousarray(op[np.ix_(changed, src)])
            if not keep.all():
                keep_rows = np.flatnonzero(keep)
            n_cur = int(keep.sum())
            if confounds is not None:
                confounds = _nls._interpolate_volumes(confounds, sample_mask, t_r, extrapolate)
                confounds = confounds[~np.isnan(confounds).all(axis=1), :]
            # nilearn then shifts the (index) sample mask by its first index
            censor_after = sample_mask if extrapolate else sample_mask - sample_mask[0]
        else:
            censor_before = np.asarray(sample_mask)
            n_cur = np.arange(n_time)[censor_before].size
            if confounds is not None:
                confounds = confounds[censor_before]

    if detrend and confounds is not None:
        confounds = _nls.standardize_signal(confounds, standardize=None, detrend=True)

    sos = None
    padtype = bw_kwargs.get("padtype", "odd")  # defaults of nilearn.signal.butterworth
    padlen = bw_kwargs.get("padlen")
    if filter_type == "butterworth":
        sampling_rate = 1.0 / t_r
        sos = _butterworth_sos(sampling_rate, low_pass, high_pass, bw_kwargs.get("order", 5))
        if confounds is not None:
            # copy=True: nilearn's one sosfiltfilt(axis=0) call instead of its loop over
            # columns (each column is filtered independently either way: same numbers)
            confounds = _nls.butterworth(
                confounds, sampling_rate=sampling_rate, low_pass=low_pass,
                high_pass=high_pass, **{**bw_kwargs, "copy": True},
            )
        if censor_after is not None:
            n_cur = np.arange(n_cur)[censor_after].size
            if confounds is not None:
                confounds = confounds[censor_after]

    basis = None
    if confounds is not None:
        tmp = None if standardize_confounds is False else "zscore_sample"
        confounds = _nls.standardize_signal(confounds, standardize=tmp, detrend=False)
        if not standardize_confounds:
            confound_max = np.max(np.abs(confounds), axis=0)
            confound_max[confound_max == 0] = 1
            confounds /= confound_max
        q, r, _ = linalg.qr(confounds, mode="economic", pivoting=True)
        q = q[:, np.abs(np.diag(r)) > np.finfo(np.float64).eps * 100.0]
        basis = np.ascontiguousarray(q) if q.shape[1] else None

    rp = RunPlan(
        rows=rows, n_in=n_time, interp_rows=interp_rows, interp_src=interp_src,
        interp_weights=interp_weights, keep_rows=keep_rows, censor_before=censor_before,
        detrend=bool(detrend), sos=sos, padtype=padtype, padlen=padlen,
        censor_after=censor_after, confound_basis=basis, standardize=standardize,
        n_out=int(n_cur),
    )
    if rp.is_linear_noop:  # pure selection of volumes
        return rp
    if _use_operator(rp, n_features):
        rp = _with_operator(rp)
    return _with_centering(rp)


def _use_operator(rp: RunPlan, n_features: float) -> bool:
    """Cost model: one (T_out x T) matrix product per feature versus the vectorised steps.

    Building the operator costs the steps on ``T`` columns (the identity), so it pays when
    ``operator * V + stepwise * T < stepwise * V``: for short runs and many features.
    """
    if _METHOD != "auto":
        return _METHOD == "operator"
    n = rp.n_in
    stepwise = 0.0  # per feature
    if rp.sos is not None:
        n_sections = rp.sos.shape[0]
        padlen = rp.padlen if rp.padlen is not None else 3 * (2 * n_sections + 1)
        stepwise += _NS_SOS_SECTION * n_sections * (n + 2 * padlen)
    if rp.detrend:
        stepwise += 5 * _NS_PASS * n
    if rp.confound_basis is not None:
        stepwise += 2 * _NS_PASS * n + 2 * _NS_GEMM_MAC * rp.confound_basis.size
    if rp.interp_weights is not None:
        stepwise += 2 * _NS_PASS * n + _NS_GEMM_MAC * rp.interp_weights.size
    operator = _NS_GEMM_MAC * rp.n_pre * n
    if np.isnan(n_features):  # dask array with unknown chunk sizes
        n_features = 10 * n
    return operator * n_features + stepwise * n < stepwise * n_features


def _with_operator(rp: RunPlan) -> RunPlan:
    """Precompute the matrix of the linear part by applying the steps to the identity."""
    pre, mean = _kernels.run_pre_stepwise(np.eye(rp.n_in), rp, with_mean=rp.psc)
    operator = pre if mean is None else np.vstack([pre, mean[None, :]])
    centered = rp.standardize in ("zscore_sample", "zscore") and rp.n_out > 1
    if centered:  # fold the removal of the mean of zscore_sample into the operator
        operator -= operator.mean(axis=0)
    used = np.any(operator != 0, axis=0)  # inputs that influence the output
    src = None if used.all() else np.flatnonzero(used)
    if src is not None:
        operator = operator[:, src]
    return dataclasses.replace(
        rp, operator=np.ascontiguousarray(operator), operator_src=src, centered=centered
    )


def _with_centering(rp: RunPlan) -> RunPlan:
    """Remove the input mean before the linear map, add its (exact) response back after."""
    if rp.operator is not None:
        center_rows: slice | np.ndarray = (
            slice(None) if rp.operator_src is None else rp.operator_src
        )
        response = rp.operator @ np.ones(rp.operator.shape[1])
    else:
        used = np.zeros(rp.n_in, dtype=bool)  # input rows whose values reach the output
        if rp.censor_before is not None:
            used[rp.censor_before] = True
        else:
            used[:] = True
        if rp.keep_rows is not None:
            kept = np.zeros(rp.n_in, dtype=bool)
            kept[rp.keep_rows] = True
            used &= kept
        if rp.interp_rows is not None:
            used[rp.interp_rows] = False  # replaced by interpolated values
        center_rows = slice(None) if used.all() else np.flatnonzero(used)
        pre, mean = _kernels.run_pre_stepwise(np.ones((rp.n_in, 1)), rp, with_mean=rp.psc)
        response = pre[:, 0] if mean is None else np.append(pre[:, 0], mean)
    # the map's entries are O(1): smaller responses are rounding errors of an exact 0
    response[np.abs(response) < 1e-10] = 0.0
    return dataclasses.replace(
        rp, center_rows=center_rows, const_response=response if response.any() else None
    )


# ------------------------------------------------------------------------------ drivers


def _clean_numpy(signals: np.ndarray, plan: CleanPlan) -> tuple[np.ndarray, list[bool]]:
    """Clean a NumPy array (the kernels work by column tiles: bounded temporaries)."""
    if not plan.psc:
        return _kernels.block_clean(signals, plan)
    pre = _kernels.block_pre(signals, plan)
    totals = _kernels.block_psc_stats(pre, plan)[:, 0]
    return _kernels.block_post(pre, plan, totals, inplace=True)


def _clean_dask(signals: da.Array, plan: CleanPlan) -> da.Array:
    """Lazy cleaning: one task per feature block (plus a tiny reduction for ``psc``)."""
    plan_key = dask.delayed(plan, pure=True)  # in the graph once, not once per task
    out_dtype = plan.out_dtype
    meta = np.empty((0, 0), dtype=out_dtype)
    if not plan.psc:
        return da.map_blocks(
            _kernels.dask_block_clean, signals, plan=plan_key, dtype=out_dtype, meta=meta,
            chunks=((plan.n_out,), signals.chunks[1]), token="clean-signals",
        )
    pre = da.map_blocks(
        _kernels.block_pre, signals, plan=plan_key, dtype=out_dtype, meta=meta,
        chunks=((plan.n_pre,), signals.chunks[1]), token="clean-signals-pre",
    )
    stats = da.map_blocks(
        _kernels.block_psc_stats, pre, plan=plan_key, dtype=np.float64,
        meta=np.empty((0, 0)), chunks=((2 * len(plan.runs),), (1,) * pre.numblocks[1]),
        token="clean-signals-psc-stats",
    )
    totals = stats.sum(axis=1)
    return da.blockwise(
        _kernels.dask_block_post, "ij", pre, "ij", totals, "k", plan=plan_key,
        dtype=out_dtype, meta=meta, adjust_chunks={"i": plan.n_out}, concatenate=True,
        token="clean-signals-post",
    )
