"""Confound strategies: nilearn's fMRIPrep confound selection, from an in-memory table.

boldflow's store keeps each run's fMRIPrep confounds table (``*_desc-confounds_timeseries.tsv``,
or ``*_desc-confounds_regressors.tsv`` before fMRIPrep 20.2) as a table with the TSV's column
names, NaN where the file says ``n/a``, and the JSON sidecar as a dict. nilearn's
:func:`nilearn.interfaces.fmriprep.load_confounds` and
:func:`~nilearn.interfaces.fmriprep.load_confounds_strategy` select regressors from the same
information but only starting from an image *file* (they find the TSV and JSON next to it).
:func:`select_confounds` and :func:`strategy_confounds` are the same selection for a table and
a metadata dict: same parameter names, defaults, validation, columns, values and sample mask
as nilearn (tests compare them with nilearn on real files).

How nilearn's selection works (and therefore ours):

* each strategy component selects columns by name: ``motion`` the six ``trans_*``/``rot_*``
  plus, by level, ``_derivative1``, ``_power2`` and ``_derivative1_power2`` (basic 6, power2 12,
  derivatives 12, full 24); ``wm_csf`` the same expansions of ``csf`` and ``white_matter``
  (2/4/4/8); ``global_signal`` of ``global_signal`` (1/2/2/4); ``high_pass`` every column
  whose name contains ``cosine`` (none is not an error); ``compcor`` the CompCor columns listed
  by the JSON metadata (``anat_combined``: ``a_comp_cor_*`` with ``"Mask": "combined"``;
  ``anat_separated``: ``a_comp_cor_*`` with mask ``WM`` then ``CSF`` (fMRIPrep < 21) plus
  ``w_comp_cor_*`` and ``c_comp_cor_*`` (fMRIPrep >= 21); ``temporal``: ``t_comp_cor_*``;
  ``n_compcor`` keeps the first *n* of each mask); ``ica_aroma="basic"`` every column containing
  ``aroma`` (``"full"`` none: the data are expected to be fMRIPrep's
  ``desc-smoothAROMAnonaggr`` series, already denoised);
* the columns of the result are sorted by name (nilearn sorts them, whatever the strategy
  order);
* NaN in the first row (fMRIPrep's derivatives) is replaced by the value of the second row,
  only in the first row; other NaN are kept;
* the sample mask keeps the volumes that are neither non-steady-state (fMRIPrep's
  ``non_steady_state_outlier*`` columns, always applied) nor, with ``"scrub"`` in the strategy,
  motion outliers: ``framewise_displacement > fd_threshold`` or ``std_dvars >
  std_dvars_threshold``, then (``scrub > 0``) the runs of kept volumes shorter than ``scrub``
  between outliers, and at the start or end of the run, are censored too. ``None`` when no
  volume is removed;
* ``demean`` subtracts each column's mean over the kept volumes (all volumes when the sample
  mask is ``None``), after the first-row fill.

Presets (:data:`STRATEGIES`), the first four exactly nilearn's:

============= ==========================================================================
``simple``    high_pass + motion full (24) + wm_csf basic (2)
``scrubbing`` high_pass + motion full (24) + wm_csf full (8) + scrub 5, FD 0.5 mm,
              std DVARS 1.5
``compcor``   high_pass + motion full (24) + compcor anat_combined, n_compcor "all"
``ica_aroma`` high_pass + wm_csf basic (2); ica_aroma "full" (use the AROMA-denoised
              series)
``yeo2011``   motion + csf/white_matter + global_signal, each with its first derivative
              (18); no cosines (the band-pass belongs to the cleaner)
``24p``       motion full (24; Friston 24-parameter model); no cosines
``36p``       motion full (24) + wm_csf full (8) + global_signal full (4); no cosines
``none``      no regressors: ``(None, sample_mask)``, the mask still dropping fMRIPrep's
              non-steady-state volumes (``None`` when there are none)
============= ==========================================================================

In every preset the non-steady-state volumes are removed through the sample mask and the
regressors are demeaned (``demean=True``), as in nilearn.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

# --------------------------------------------------------------------------------------
# nilearn private API. Every import of nilearn internals is here; they are the pieces of
# nilearn.interfaces.fmriprep.load_confounds that take a DataFrame and a dict rather than
# files (tested against nilearn 0.14's public functions in tests/pipeline/test_strategies.py).
# --------------------------------------------------------------------------------------
from nilearn._utils.param_validation import check_parameter_in_allowed
from nilearn.interfaces.fmriprep.load_confounds import (
    COMPCOR_TYPES as _COMPCOR_TYPES,
)
from nilearn.interfaces.fmriprep.load_confounds import (
    CONFOUND_MODEL as _CONFOUND_MODEL,
)
from nilearn.interfaces.fmriprep.load_confounds import (
    _check_strategy as _nl_check_strategy,
)
from nilearn.interfaces.fmriprep.load_confounds import (
    _load_noise_component as _nl_load_noise_component,
)
from nilearn.interfaces.fmriprep.load_confounds_compcor import find_compcor as _nl_find_compcor
from nilearn.interfaces.fmriprep.load_confounds_utils import add_suffix as _nl_add_suffix
from nilearn.interfaces.fmriprep.load_confounds_utils import find_confounds as _nl_find_confounds
from nilearn.interfaces.fmriprep.load_confounds_utils import prepare_output as _nl_prepare_output

from storage.errors import InputError

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["STRATEGIES", "STRATEGY_PRESETS", "select_confounds", "strategy_confounds"]

#: fMRIPrep's six rigid-body motion parameters.
_MOTION = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]

#: Preset name -> parameters of :func:`select_confounds`. The first four are nilearn 0.14's
#: ``preset_strategies`` (``load_confounds_strategy``); the others are boldflow's. Every key
#: but ``strategy`` (and ``ica_aroma``, fixed to "full" as in nilearn) can be overridden in
#: :func:`strategy_confounds`; ``global_signal=None`` means "not in the strategy unless the
#: caller gives a level".
STRATEGY_PRESETS: dict[str, dict[str, Any]] = {
    "simple": {"strategy": ("high_pass", "motion", "wm_csf"), "motion": "full",
               "wm_csf": "basic", "global_signal": None, "demean": True},
    "scrubbing": {"strategy": ("high_pass", "motion", "wm_csf", "scrub"), "motion": "full",
                  "wm_csf": "full", "scrub": 5, "fd_threshold": 0.5,
                  "std_dvars_threshold": 1.5, "global_signal": None, "demean": True},
    "compcor": {"strategy": ("high_pass", "motion", "compcor"), "motion": "full",
                "n_compcor": "all", "compcor": "anat_combined", "global_signal": None,
                "demean": True},
    "ica_aroma": {"strategy": ("high_pass", "wm_csf", "ica_aroma"), "wm_csf": "basic",
                  "ica_aroma": "full", "global_signal": None, "demean": True},
    "yeo2011": {"strategy": ("motion", "wm_csf", "global_signal"), "motion": "derivatives",
                "wm_csf": "derivatives", "global_signal": "derivatives", "demean": True},
    "24p": {"strategy": ("motion",), "motion": "full", "global_signal": None, "demean": True},
    "36p": {"strategy": ("motion", "wm_csf", "global_signal"), "motion": "full",
            "wm_csf": "full", "global_signal": "full", "demean": True},
    "none": {"strategy": ()},
}

#: Names of the presets accepted by the job configuration (:func:`strategy_confounds`).
STRATEGIES: tuple[str, ...] = tuple(STRATEGY_PRESETS)

#: Parameters a preset never lets the caller change (nilearn: AROMA is always "full").
_FIXED = ("strategy", "ica_aroma")


def select_confounds(
    confounds: pd.DataFrame | xr.DataArray,
    *,
    metadata: Mapping[str, Any] | None = None,
    strategy: Sequence[str] = ("motion", "high_pass", "wm_csf"),
    motion: str = "full",
    scrub: int = 5,
    fd_threshold: float = 0.5,
    std_dvars_threshold: float = 1.5,
    wm_csf: str = "basic",
    global_signal: str = "basic",
    compcor: str = "anat_combined",
    n_compcor: str | int = "all",
    ica_aroma: str = "full",
    demean: bool = True,
    source: str = "<confounds>",
) -> tuple[pd.DataFrame | None, np.ndarray | None]:
    """Select confound regressors from one run's fMRIPrep table, as nilearn's ``load_confounds``.

    Same parameters (but the first two), defaults and results as
    :func:`nilearn.interfaces.fmriprep.load_confounds` for a single image, without reading
    any file; see the module docstring for what each component selects.

    Parameters
    ----------
    confounds : pandas.DataFrame or xarray.DataArray
        The fMRIPrep confounds table: one row per volume, the TSV's column names, NaN for
        ``n/a``. A DataArray must have dims ``(time, confound)`` (either order) with the
        column names as ``confound`` coordinate. Not modified.
    metadata : mapping, optional
        The confounds JSON sidecar. Needed by ``"compcor"`` only (column selection by
        ``"Mask"``); ``None`` or empty is then an error.
    strategy : sequence of str, default=("motion", "high_pass", "wm_csf")
        Components among ``"motion"``, ``"high_pass"``, ``"wm_csf"``, ``"global_signal"``,
        ``"compcor"`` (requires ``"high_pass"``), ``"ica_aroma"``, ``"scrub"`` (and
        ``"non_steady_state"``, accepted with a warning: it is always applied). A list or a
        tuple, as nilearn requires. Empty: no regressors (a warning, as in nilearn).
    motion, wm_csf, global_signal : {"basic", "power2", "derivatives", "full"}
        Expansion of the motion parameters / of the WM and CSF means / of the global signal.
        Defaults "full", "basic", "basic".
    scrub : int, default=5
        Minimum length of a run of kept volumes between motion outliers (shorter runs are
        censored too); 0 censors the outliers only. Used with ``"scrub"`` only.
    fd_threshold : float, default=0.5
        Framewise displacement (mm) above which a volume is a motion outlier.
    std_dvars_threshold : float, default=1.5
        Standardised DVARS above which a volume is a motion outlier.
    compcor : {"anat_combined", "anat_separated", "temporal", "temporal_anat_combined", \
"temporal_anat_separated"}, default="anat_combined"
        Which CompCor components.
    n_compcor : "all" or int, default="all"
        Number of CompCor components kept per mask (the first ones).
    ica_aroma : {"full", "basic"}, default="full"
        ``"full"``: no AROMA regressors (the input series is fMRIPrep's non-aggressively
        denoised ``desc-smoothAROMAnonaggr`` image; that is the caller's responsibility,
        nilearn checks the image name). ``"basic"``: the ``aroma_motion_*`` noise
        components as regressors.
    demean : bool, default=True
        Subtract each regressor's mean over the kept volumes.
    source : str, default="<confounds>"
        Where the table comes from (its file path), for error messages.

    Returns
    -------
    confounds : pandas.DataFrame or None
        The selected regressors, float64, columns sorted by name (as nilearn), one row per
        volume (all volumes, censored ones included) with a ``RangeIndex``. ``None`` when
        ``strategy`` is empty; an empty frame when the components select nothing (e.g.
        ``("high_pass",)`` without cosine columns, or ``ica_aroma="full"`` alone).
    sample_mask : numpy.ndarray or None
        Indices (int64, increasing) of the volumes to keep, or ``None`` when none is removed.
        Empty (with nilearn's RuntimeWarning) when every volume is censored.

    Raises
    ------
    storage.errors.InputError
        (a ``ValueError``) naming ``source``: when columns the strategy needs are missing
        (all of them are listed), when CompCor needs metadata that is absent or incomplete,
        when a selected column is not numeric, or when the table has fewer than 2 rows.
    ValueError
        For invalid parameters (nilearn's messages), including ``"tedana"``.
    """
    table = _as_frame(confounds, source)
    _check_parameters(strategy, motion, wm_csf, global_signal, compcor, n_compcor, ica_aroma,
                      warn_empty=True)
    return _select(table, source, metadata, strategy, demean, motion=motion, scrub=scrub,
                   fd_threshold=fd_threshold, std_dvars_threshold=std_dvars_threshold,
                   wm_csf=wm_csf, global_signal=global_signal, compcor=compcor,
                   n_compcor=n_compcor, ica_aroma=ica_aroma)


def strategy_confounds(
    confounds: pd.DataFrame | xr.DataArray,
    *,
    strategy: str = "simple",
    metadata: Mapping[str, Any] | None = None,
    source: str = "<confounds>",
    **overrides: Any,
) -> tuple[pd.DataFrame | None, np.ndarray | None]:
    """Select confound regressors with a named preset, as nilearn's ``load_confounds_strategy``.

    Parameters
    ----------
    confounds : pandas.DataFrame or xarray.DataArray
        The run's fMRIPrep confounds table (see :func:`select_confounds`).
    strategy : str, default="simple"
        One of :data:`STRATEGIES` (see the module docstring for what each selects).
    metadata : mapping, optional
        The confounds JSON sidecar (needed by ``"compcor"``).
    source : str, default="<confounds>"
        The table's file path, for error messages.
    **overrides
        Parameters of :func:`select_confounds` that the preset defines (the keys of
        :data:`STRATEGY_PRESETS` ``[strategy]``, except ``strategy`` and ``ica_aroma``), as in
        nilearn: a value ``None`` keeps the preset's; ``global_signal`` given a level adds the
        global signal to a preset that has none (except ``"none"``). Any other parameter is
        ignored with a ``UserWarning`` listing the accepted ones (nilearn's behaviour).

    Returns
    -------
    confounds : pandas.DataFrame or None
        See :func:`select_confounds`; ``None`` for ``"none"``.
    sample_mask : numpy.ndarray or None
        See :func:`select_confounds`.

    Raises
    ------
    ValueError
        If ``strategy`` is not one of :data:`STRATEGIES`, or as :func:`select_confounds`.

    Examples
    --------
    >>> conf, mask = strategy_confounds(table, strategy="scrubbing", fd_threshold=0.3,
    ...                                 source="sub-01_desc-confounds_timeseries.tsv",
    ...                                 metadata=sidecar)  # doctest: +SKIP
    """
    check_parameter_in_allowed(strategy, STRATEGIES, "strategy")
    params = _preset_parameters(strategy, overrides)
    table = _as_frame(confounds, source)
    components = params.pop("strategy")
    demean = params.pop("demean", True)
    levels = {k: params.get(k, v) for k, v in _DEFAULTS.items()}
    _check_parameters(components, levels["motion"], levels["wm_csf"], levels["global_signal"],
                      levels["compcor"], levels["n_compcor"], levels["ica_aroma"],
                      warn_empty=False)
    return _select(table, source, metadata, components, demean, **levels)


# --------------------------------------------------------------------------------------
# internals
# --------------------------------------------------------------------------------------
#: select_confounds' defaults of the component parameters.
_DEFAULTS: dict[str, Any] = {"motion": "full", "scrub": 5, "fd_threshold": 0.5,
                             "std_dvars_threshold": 1.5, "wm_csf": "basic",
                             "global_signal": "basic", "compcor": "anat_combined",
                             "n_compcor": "all", "ica_aroma": "full"}


def _preset_parameters(name: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A preset's parameters updated with the caller's (nilearn's ``_update_user_inputs``)."""
    params = dict(STRATEGY_PRESETS[name])
    params["strategy"] = tuple(params["strategy"])
    accepted = [k for k in params if k not in _FIXED]
    user = dict(overrides)
    for key in accepted:
        value = user.pop(key, None)
        if value is not None:
            params[key] = value
        if key == "global_signal" and "global_signal" not in STRATEGY_PRESETS[name]["strategy"]:
            if isinstance(value, str):
                params["strategy"] += ("global_signal",)
            else:
                params.pop("global_signal", None)
    if user:
        warnings.warn(f"The following parameters are not needed for the selected strategy "
                      f"{name!r}: {list(user)}; parameters accepted: {accepted}",
                      UserWarning, stacklevel=3)
    return params


def _as_frame(confounds: pd.DataFrame | xr.DataArray, source: str) -> pd.DataFrame:
    """A float64 copy of the table with string column names and a RangeIndex."""
    if isinstance(confounds, pd.DataFrame):
        df = confounds.copy()
    elif hasattr(confounds, "dims") and hasattr(confounds, "to_pandas"):
        da = confounds
        if set(da.dims) == {"time", "confound"}:
            da = da.transpose("time", "confound")
        if da.ndim != 2:
            raise InputError(source, f"confounds must be 2-D (time, confound), got dims "
                                     f"{tuple(da.dims)}")
        df = da.to_pandas().copy()
    else:
        raise TypeError(f"confounds must be a pandas DataFrame or an xarray DataArray, "
                        f"got {type(confounds).__name__}")
    df.columns = [str(c) for c in df.columns]
    df = df.reset_index(drop=True)
    if df.columns.has_duplicates:
        dup = sorted(set(df.columns[df.columns.duplicated()]))
        raise InputError(source, f"confounds table has duplicate columns {dup}")
    numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c])]
    return df.astype(dict.fromkeys(numeric, np.float64))


def _check_parameters(strategy: Sequence[str], motion: str, wm_csf: str, global_signal: str,
                      compcor: str, n_compcor: str | int, ica_aroma: str, *,
                      warn_empty: bool) -> None:
    """nilearn's parameter checks (same order, same messages), plus ours."""
    if warn_empty or not isinstance(strategy, tuple | list) or len(strategy):
        _nl_check_strategy(strategy)  # warns when empty, as nilearn
    if "tedana" in strategy:
        raise ValueError("strategy 'tedana' is not supported: its regressors are in tedana's "
                         "files, not in the fMRIPrep confounds table")
    if "motion" in strategy:
        check_parameter_in_allowed(motion, _CONFOUND_MODEL, "motion")
    if "wm_csf" in strategy:
        check_parameter_in_allowed(wm_csf, _CONFOUND_MODEL, "wm_csf")
    if "global_signal" in strategy:
        check_parameter_in_allowed(global_signal, _CONFOUND_MODEL, "global_signal")
    if "compcor" in strategy:
        check_parameter_in_allowed(compcor, _COMPCOR_TYPES, "compcor")
        if n_compcor != "all" and (isinstance(n_compcor, bool)
                                   or not isinstance(n_compcor, int | np.integer)
                                   or n_compcor < 1):
            raise ValueError(f"'n_compcor' must be 'all' or a positive integer; "
                             f"{n_compcor!r} was provided.")
    if "ica_aroma" in strategy:
        check_parameter_in_allowed(ica_aroma, ("full", "basic"), "ica_aroma")


def _required_columns(table: pd.DataFrame, component: str, metadata: Mapping[str, Any],
                      params: Mapping[str, Any]) -> tuple[list[str], str | None]:
    """Columns a component needs and, when it cannot even name them, the reason."""
    if component in ("motion", "wm_csf", "global_signal"):
        base = {"motion": _MOTION, "wm_csf": ["csf", "white_matter"],
                "global_signal": ["global_signal"]}[component]
        return _nl_add_suffix(base, params[component]), None
    if component == "scrub":
        return ["framewise_displacement", "std_dvars"], None
    if component == "ica_aroma" and params["ica_aroma"] == "basic":
        if not _nl_find_confounds(table, ["aroma"]):
            return [], "ICA-AROMA 'basic' needs the aroma_motion_* columns; there are none"
        return [], None
    if component == "compcor":
        if not metadata:
            return [], (f"CompCor ({params['compcor']!r}) needs the confounds JSON metadata "
                        "(the *_desc-confounds_timeseries.json sidecar); none was given")
        try:
            cols = _nl_find_compcor(dict(metadata), params["compcor"], params["n_compcor"])
        except (KeyError, TypeError) as e:
            return [], (f"the confounds metadata lacks the CompCor entry or its 'Mask' field "
                        f"({type(e).__name__}: {e})")
        if not cols:
            return [], (f"the confounds metadata lists no CompCor component of type "
                        f"{params['compcor']!r}")
        return cols, None
    return [], None


def _select(table: pd.DataFrame, source: str, metadata: Mapping[str, Any] | None,
            strategy: Sequence[str], demean: bool, **params: Any
            ) -> tuple[pd.DataFrame | None, np.ndarray | None]:
    """nilearn's ``_load_single_confounds_file`` from a table and a dict (no files)."""
    meta = dict(metadata) if metadata else {}
    # our checks first: nilearn raises KeyError for some missing columns (scrub, partial
    # wm_csf/global_signal/compcor) and its messages do not name the file nor all columns
    problems = []
    for component in dict.fromkeys(strategy):
        needed, reason = _required_columns(table, component, meta, params)
        missing = [c for c in needed if c not in table.columns]
        if reason:
            problems.append(f"{component}: {reason}")
        elif missing:
            problems.append(f"{component}: missing columns {missing}")
    if problems:
        raise InputError(source, "the confounds table does not support the confound strategy "
                                 f"{tuple(strategy)}: " + "; ".join(problems))
    if len(table) < 2:
        raise InputError(source, f"confounds table has {len(table)} row(s); at least 2 needed")

    missing_nl: dict[str, list[str]] = {"confounds": [], "keywords": []}
    selected, missing_nl = _nl_load_noise_component(table, "non_steady_state", missing_nl,
                                                    meta_json=meta, **params)
    for component in strategy:
        loaded, missing_nl = _nl_load_noise_component(table, component, missing_nl,
                                                      meta_json=meta, **params)
        selected = pd.concat([selected, loaded], axis=1)
    if missing_nl["confounds"] or missing_nl["keywords"]:  # not expected after our checks
        raise InputError(source, f"missing confounds {missing_nl['confounds']} for "
                                 f"{missing_nl['keywords']}")
    bad = sorted({c for c, t in selected.dtypes.items() if not pd.api.types.is_numeric_dtype(t)})
    if bad:
        raise InputError(source, f"selected confound columns are not numeric: {bad}")
    sample_mask, out = _nl_prepare_output(selected, demean)
    if len(strategy) == 0:
        return None, sample_mask
    out = out.astype(np.float64)
    out.columns = pd.Index([str(c) for c in out.columns])
    return out, sample_mask
