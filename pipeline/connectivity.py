"""Region-to-region functional connectivity and group comparison of connectomes.

Inputs are per-run region signals, an :class:`xarray.DataArray` with dims ``(time, region)``
(coordinate ``region``: the region labels), already cleaned. A region that is empty in a
subject (outside its mask) is a column of NaN, so that all subjects share the same columns.

- :func:`connectivity`: one subject's matrix, numerically identical to nilearn's
  :class:`~nilearn.connectome.ConnectivityMeasure` (default Ledoit-Wolf covariance
  estimator) for ``"correlation"``, ``"partial correlation"``, ``"covariance"`` and
  ``"precision"``, plus plain Pearson correlation (``"pearson"``, what XCP-D writes as
  ``stat-pearsoncorrelation_relmat.tsv``).
- :func:`group_connectivity`: a ``(subject, region, region_)`` stack with the subject
  metadata (``participants.tsv`` columns) as coordinates; also ``"tangent"``, which needs
  the whole group.
- :func:`compare_groups`: two-group comparison per edge (Welch t-test or a permutation test
  on the Welch t), Benjamini–Hochberg FDR over the unique edges.
- :func:`group_mean`: per-group mean matrices (Fisher-z averaged for correlations).
- :func:`vectorize` / :func:`unvectorize`: nilearn's ``sym_matrix_to_vec`` /
  ``vec_to_sym_matrix``, also for labelled arrays.

Conventions
-----------
Empty regions
    A column that is all NaN is an empty region; its row and column of the matrix are NaN
    and the rest equals nilearn on the remaining columns. A column that is exactly constant
    is treated the same way (with a warning): its correlation is undefined, and nilearn
    would return an arbitrary 0 (Ledoit-Wolf shrinkage keeps its variance positive). A
    column with only *some* NaN values is an error (censored volumes must be removed from
    ``time``, not blanked per region). For ``"tangent"``, which is defined relative to the
    group, a region empty in *any* subject is NaN in every subject (with a warning).
Edge order
    Unique edges are listed in the order of nilearn's ``sym_matrix_to_vec(...,
    discard_diagonal=True)`` (lower triangle, row by row): ``(1, 0), (2, 0), (2, 1), ...``;
    an edge's ``region_a`` is the region with the lower index, ``region_b`` the higher.
Fisher z
    For correlation-like kinds (``"correlation"``, ``"partial correlation"``,
    ``"pearson"``) tests and means use ``arctanh(r)``; means are transformed back with
    ``tanh``.

Notes
-----
nilearn's default ``"correlation"`` is *not* the Pearson correlation: with z-scored series
the Ledoit-Wolf estimate is ``(1 - delta) S + delta I`` (``S`` the Pearson matrix times
``(T-1)/T``), so every off-diagonal value is ``(1 - delta) r`` with one shrinkage
``delta`` per subject that depends on the whole matrix (about 0.25 for 10 regions and 200
volumes). When a few edges differ between groups, ``delta`` differs too, and *all other*
edges then differ systematically between the groups: :func:`compare_groups` correctly
detects these (real) differences of the shrunk estimates. To localise group differences in
marginal correlation use ``kind="pearson"`` (or ``cov_estimator=EmpiricalCovariance()``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import xarray as xr
from scipy import stats

__all__ = [
    "CORRELATION_KINDS",
    "GROUP_KINDS",
    "KINDS",
    "GroupComparison",
    "compare_groups",
    "connectivity",
    "edge_index",
    "group_connectivity",
    "group_mean",
    "unvectorize",
    "vectorize",
]

Kind = Literal["correlation", "partial correlation", "covariance", "precision", "pearson"]
GroupKind = Literal[
    "correlation", "partial correlation", "covariance", "precision", "pearson", "tangent"]

#: Kinds computed one subject at a time (:func:`connectivity`).
KINDS: tuple[str, ...] = ("correlation", "partial correlation", "covariance", "precision",
                          "pearson")
#: Kinds of :func:`group_connectivity` (``"tangent"`` needs the whole group).
GROUP_KINDS: tuple[str, ...] = (*KINDS, "tangent")
#: Kinds whose values are correlations (Fisher z applies).
CORRELATION_KINDS: frozenset[str] = frozenset({"correlation", "partial correlation",
                                               "pearson"})

_TIME, _REGION, _REGION2, _SUBJECT, _EDGE, _GROUP = (
    "time", "region", "region_", "subject", "edge", "group")
_PERMUTATION_BLOCK = 2**21  # elements of one (permutations, edges) block


# --------------------------------------------------------------------------------------
# one subject
# --------------------------------------------------------------------------------------
def connectivity(
    signals: xr.DataArray | np.ndarray,
    kind: Kind = "correlation",
    *,
    cov_estimator: Any = None,
    regions: Sequence[Hashable] | None = None,
) -> xr.DataArray:
    """Connectivity matrix of one subject (one run).

    Parameters
    ----------
    signals : xarray.DataArray or numpy.ndarray
        Region signals with dims ``(time, region)`` (any order for a DataArray; its
        ``region`` coordinate gives the labels), or a 2D array ``(time, region)``. Columns
        that are entirely NaN are empty regions.
    kind : {"correlation", "partial correlation", "covariance", "precision", "pearson"}
        The first four are nilearn's ``ConnectivityMeasure(kind=kind)``: covariance by
        ``cov_estimator`` (default Ledoit-Wolf, so correlations are slightly shrunk towards
        0) of the raw signals, except ``"correlation"`` which z-scores each series first
        (ddof=1) and converts the covariance to a correlation; ``"partial correlation"``
        and ``"precision"`` come from the inverse covariance. ``"pearson"`` is the plain
        sample correlation (:func:`numpy.corrcoef`).
    cov_estimator : sklearn covariance estimator, optional
        Passed to nilearn (``fit`` + ``covariance_``); default
        ``LedoitWolf(store_precision=False)``. Ignored for ``"pearson"``.
    regions : sequence, optional
        Region labels for a plain array (default ``0 .. R-1``). Not allowed with a
        DataArray.

    Returns
    -------
    xarray.DataArray
        ``(region, region_)`` float64 matrix, both coordinates the region labels, NaN rows
        and columns for empty (or constant) regions; ``attrs["kind"]`` is ``kind`` and
        ``attrs["cov_estimator"]`` the estimator's class name (not for ``"pearson"``).

    Raises
    ------
    ValueError
        Unknown ``kind`` (``"tangent"`` needs :func:`group_connectivity`), wrong dims, fewer
        than 2 time points, or a column with some but not all values NaN.

    Warns
    -----
    UserWarning
        When a region's signal is constant (it is treated as empty).
    """
    if kind not in KINDS:
        hint = "; 'tangent' needs the group: use group_connectivity" if kind == "tangent" else ""
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}{hint}")
    x, labels = _as_signals(signals, regions)
    valid = _valid_columns(x, labels)
    out = _embed(_matrix(x[:, valid], kind, cov_estimator), valid)
    return _matrix_array(out, labels, kind, cov_estimator)


def _matrix(x: np.ndarray, kind: str, cov_estimator: Any) -> np.ndarray:
    """Connectivity of the (all valid) columns of ``x``."""
    n = x.shape[1]
    if n == 0:
        return np.empty((0, 0))
    if kind == "pearson":
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.atleast_2d(np.corrcoef(x, rowvar=False))
    from nilearn.connectome import ConnectivityMeasure

    measure = ConnectivityMeasure(kind=kind, cov_estimator=cov_estimator)
    return np.asarray(measure.fit_transform([x])[0], dtype=np.float64)


def _embed(sub: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Full matrix with ``sub`` at the ``valid`` rows/columns and NaN elsewhere."""
    n = valid.size
    out = np.full((n, n), np.nan)
    idx = np.flatnonzero(valid)
    out[np.ix_(idx, idx)] = sub
    return out


def _as_signals(signals: xr.DataArray | np.ndarray,
                regions: Sequence[Hashable] | None) -> tuple[np.ndarray, np.ndarray]:
    """``(time, region)`` float64 array and the region labels."""
    if isinstance(signals, xr.DataArray):
        if regions is not None:
            raise ValueError("regions= is only for plain arrays; a DataArray has its own "
                             "'region' coordinate")
        if set(signals.dims) != {_TIME, _REGION}:
            raise ValueError(f"signals must have dims ('time', 'region'), got {signals.dims}")
        signals = signals.transpose(_TIME, _REGION)
        n = signals.sizes[_REGION]
        labels = (np.asarray(signals[_REGION].values) if _REGION in signals.coords
                  else np.arange(n))
        x = np.asarray(signals.values, dtype=np.float64)
    else:
        x = np.asarray(signals, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"signals must be 2D (time, region), got shape {x.shape}")
        labels = np.arange(x.shape[1]) if regions is None else np.asarray(regions)
        if labels.shape != (x.shape[1],):
            raise ValueError(f"{labels.size} region labels for {x.shape[1]} columns")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 time points, got {x.shape[0]}")
    if len(set(labels.tolist())) != labels.size:
        raise ValueError("region labels are not unique")
    return x, labels


def _valid_columns(x: np.ndarray, labels: np.ndarray, where: str = "") -> np.ndarray:
    """Boolean mask of the non-empty, non-constant columns (see the module conventions)."""
    nan = np.isnan(x)
    empty = nan.all(axis=0)
    partial = nan.any(axis=0) & ~empty
    if partial.any():
        raise ValueError(
            f"{where}regions with some (not all) NaN values: {_names(labels[partial])}; "
            "an empty region must be all NaN, censored volumes must be removed")
    if np.isinf(x).any():
        raise ValueError(f"{where}signals contain infinite values")
    constant = ~empty & np.all(x == x[:1], axis=0)
    if constant.any():
        warnings.warn(f"{where}constant signal in regions {_names(labels[constant])}: "
                      "treated as empty (NaN connectivity)", UserWarning, stacklevel=3)
    return ~(empty | constant)


def _names(labels: np.ndarray, limit: int = 20) -> str:
    items = [str(v) for v in np.asarray(labels).tolist()]
    more = f" ... ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _attrs(kind: str, cov_estimator: Any) -> dict[str, str]:
    attrs = {"kind": kind}
    if kind != "pearson":
        attrs["cov_estimator"] = ("LedoitWolf" if cov_estimator is None
                                  else type(cov_estimator).__name__)
    return attrs


def _matrix_array(values: np.ndarray, labels: np.ndarray, kind: str,
                  cov_estimator: Any) -> xr.DataArray:
    return xr.DataArray(values, dims=(_REGION, _REGION2),
                        coords={_REGION: labels, _REGION2: labels},
                        attrs=_attrs(kind, cov_estimator))


# --------------------------------------------------------------------------------------
# a group
# --------------------------------------------------------------------------------------
def group_connectivity(
    signals: Sequence[xr.DataArray | np.ndarray],
    kind: GroupKind = "correlation",
    *,
    subjects: Sequence[str],
    metadata: pd.DataFrame | None = None,
    cov_estimator: Any = None,
    regions: Sequence[Hashable] | None = None,
) -> xr.DataArray:
    """Connectivity matrices of a group of subjects, with their metadata.

    Parameters
    ----------
    signals : sequence of xarray.DataArray or numpy.ndarray
        One ``(time, region)`` signal array per subject (see :func:`connectivity`); the
        number of time points may differ. DataArrays must have the same set of region labels
        (they are aligned to the first one's order); plain arrays the same number of columns.
    kind : {"correlation", "partial correlation", "covariance", "precision", "pearson", \
"tangent"}
        As in :func:`connectivity`, plus ``"tangent"``: nilearn's
        ``ConnectivityMeasure(kind="tangent").fit_transform`` on the whole group
        (``logm(W C_s W)`` with ``W`` the inverse square root of the geometric mean of the
        subjects' covariances), computed on the regions valid in *every* subject.
    subjects : sequence of str
        Subject labels, one per signal array, unique (``"01"`` or ``"sub-01"``).
    metadata : pandas.DataFrame, optional
        Subject metadata, e.g. ``participants.tsv`` read with
        ``pd.read_csv(path, sep="\\t")``: one row per subject, identified by its
        ``participant_id`` column if present, else by its index; a ``sub-`` prefix is
        ignored when matching. Every other column becomes a coordinate on ``subject``
        (subjects absent from ``metadata`` get missing values, with a warning).
    cov_estimator : sklearn covariance estimator, optional
        As in :func:`connectivity`.
    regions : sequence, optional
        Region labels for plain arrays.

    Returns
    -------
    xarray.DataArray
        ``(subject, region, region_)`` float64, attributes as in :func:`connectivity`.

    Raises
    ------
    ValueError
        On mismatched lengths, duplicate subjects, different regions across subjects,
        metadata columns named like a dimension, duplicate metadata rows, or fewer than 2
        subjects for ``"tangent"``.

    Warns
    -----
    UserWarning
        For ``"tangent"``, naming the regions empty in some subject (NaN for all); for
        subjects missing from ``metadata``; for constant region signals.
    """
    if kind not in GROUP_KINDS:
        raise ValueError(f"kind must be one of {GROUP_KINDS}, got {kind!r}")
    subjects = [str(s) for s in subjects]
    if len(subjects) != len(signals):
        raise ValueError(f"{len(subjects)} subjects for {len(signals)} signal arrays")
    if len(set(subjects)) != len(subjects):
        dup = sorted({s for s in subjects if subjects.count(s) > 1})
        raise ValueError(f"duplicate subjects: {dup}")
    if not subjects:
        raise ValueError("no subjects")

    xs, labels = _aligned_signals(signals, regions)
    valid = np.stack([_valid_columns(x, labels, f"subject {s}: ")
                      for x, s in zip(xs, subjects, strict=True)])
    if kind == "tangent":
        values = _tangent(xs, valid, labels, cov_estimator)
    else:
        values = np.stack([_embed(_matrix(x[:, v], kind, cov_estimator), v)
                           for x, v in zip(xs, valid, strict=True)])

    coords: dict[str, Any] = {_SUBJECT: subjects, _REGION: labels, _REGION2: labels}
    if metadata is not None:
        coords.update(_subject_coords(subjects, metadata))
    return xr.DataArray(values, dims=(_SUBJECT, _REGION, _REGION2), coords=coords,
                        attrs=_attrs(kind, cov_estimator))


def _aligned_signals(signals: Sequence[xr.DataArray | np.ndarray],
                     regions: Sequence[Hashable] | None
                     ) -> tuple[list[np.ndarray], np.ndarray]:
    xs: list[np.ndarray] = []
    labels: np.ndarray | None = None
    for i, sig in enumerate(signals):
        x, lab = _as_signals(sig, regions)
        if labels is None:
            labels = lab
        elif isinstance(sig, xr.DataArray):
            if not np.array_equal(lab, labels):
                if set(lab.tolist()) != set(labels.tolist()):
                    extra = sorted(map(str, set(lab.tolist()) ^ set(labels.tolist())))
                    raise ValueError(f"signal array {i} has different regions than the first "
                                     f"one (differing: {extra[:20]})")
                pos = {v: k for k, v in enumerate(lab.tolist())}
                x = x[:, [pos[v] for v in labels.tolist()]]
        elif x.shape[1] != labels.size:
            raise ValueError(f"signal array {i} has {x.shape[1]} regions, the first one "
                             f"{labels.size}")
        xs.append(x)
    assert labels is not None
    return xs, labels


def _tangent(xs: list[np.ndarray], valid: np.ndarray, labels: np.ndarray,
             cov_estimator: Any) -> np.ndarray:
    if len(xs) < 2:
        raise ValueError("kind='tangent' needs at least 2 subjects (it is relative to the "
                         "group mean)")
    common = valid.all(axis=0)
    dropped = ~common & valid.any(axis=0)
    if dropped.any():
        warnings.warn(f"tangent: regions empty in some subjects are NaN for all: "
                      f"{_names(labels[dropped])}", UserWarning, stacklevel=3)
    n = labels.size
    out = np.full((len(xs), n, n), np.nan)
    if common.any():
        from nilearn.connectome import ConnectivityMeasure

        measure = ConnectivityMeasure(kind="tangent", cov_estimator=cov_estimator)
        sub = measure.fit_transform([x[:, common] for x in xs])
        for k in range(len(xs)):
            out[k] = _embed(sub[k], common)
    return out


def _strip_sub(label: object) -> str:
    s = str(label)
    return s[4:] if s.startswith("sub-") else s


def _subject_coords(subjects: list[str], metadata: pd.DataFrame) -> dict[str, Any]:
    md = metadata.copy()
    if "participant_id" in md.columns:
        md = md.set_index("participant_id")
    md.index = pd.Index([_strip_sub(v) for v in md.index])
    if md.index.duplicated().any():
        dup = sorted(set(md.index[md.index.duplicated()]))
        raise ValueError(f"metadata has duplicate subjects: {dup}")
    clash = {str(c) for c in md.columns} & {_SUBJECT, _REGION, _REGION2}
    if clash:
        raise ValueError(f"metadata columns clash with dimension names: {sorted(clash)}")
    wanted = [_strip_sub(s) for s in subjects]
    missing = [s for s, w in zip(subjects, wanted, strict=True) if w not in md.index]
    if missing:
        warnings.warn(f"subjects missing from metadata (missing values): {missing}",
                      UserWarning, stacklevel=3)
    md = md.reindex(wanted)
    return {str(c): (_SUBJECT, md[c].to_numpy()) for c in md.columns}


# --------------------------------------------------------------------------------------
# vectorisation
# --------------------------------------------------------------------------------------
def edge_index(n_regions: int, discard_diagonal: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the lower triangle, in nilearn's vectorisation order.

    Parameters
    ----------
    n_regions : int
        Matrix size.
    discard_diagonal : bool, default=True
        Leave out the diagonal (the unique edges, ``row > col``).

    Returns
    -------
    rows, cols : numpy.ndarray
        ``rows >= cols`` (``>`` without the diagonal), row by row.
    """
    return np.tril_indices(n_regions, k=-1 if discard_diagonal else 0)


def vectorize(matrices: xr.DataArray | np.ndarray,
              discard_diagonal: bool = False) -> xr.DataArray | np.ndarray:
    """Flatten the lower triangle of symmetric matrices (nilearn's ``sym_matrix_to_vec``).

    Parameters
    ----------
    matrices : xarray.DataArray or numpy.ndarray
        ``(..., n, n)`` array, or a DataArray whose last two dims are ``(region, region_)``
        (e.g. ``(subject, region, region_)``).
    discard_diagonal : bool, default=False
        Drop the diagonal; otherwise it is kept and divided by ``sqrt(2)`` (so that the
        Euclidean norm of the vector is the Frobenius norm of the matrix).

    Returns
    -------
    xarray.DataArray or numpy.ndarray
        ``(..., n (n + 1) / 2)`` (``n (n - 1) / 2`` without the diagonal), in nilearn's
        order (:func:`edge_index`). A DataArray gets a last dim ``edge`` with coordinates
        ``region_a`` (column label, the lower index) and ``region_b`` (row label), and
        keeps its other coordinates and attributes.
    """
    if isinstance(matrices, xr.DataArray):
        if matrices.dims[-2:] != (_REGION, _REGION2):
            raise ValueError(f"the last two dims must be ('region', 'region_'), got "
                             f"{matrices.dims}")
        n = matrices.sizes[_REGION]
        rows, cols = edge_index(n, discard_diagonal)
        labels = (np.asarray(matrices[_REGION].values) if _REGION in matrices.coords
                  else np.arange(n))
        vec = vectorize(np.asarray(matrices.values), discard_diagonal)
        coords = {k: v for k, v in matrices.coords.items()
                  if _REGION not in v.dims and _REGION2 not in v.dims}
        coords["region_a"] = (_EDGE, labels[cols])
        coords["region_b"] = (_EDGE, labels[rows])
        return xr.DataArray(vec, dims=(*matrices.dims[:-2], _EDGE), coords=coords,
                            attrs=dict(matrices.attrs))
    m = np.asarray(matrices)
    if m.ndim < 2 or m.shape[-1] != m.shape[-2]:
        raise ValueError(f"expected (..., n, n) matrices, got shape {m.shape}")
    n = m.shape[-1]
    if discard_diagonal:
        mask = np.tril(np.ones((n, n)), k=-1).astype(bool)
        return m[..., mask]
    scaling = np.ones((n, n))
    np.fill_diagonal(scaling, math.sqrt(2.0))
    mask = np.tril(np.ones((n, n))).astype(bool)
    return m[..., mask] / scaling[mask]


def unvectorize(vec: xr.DataArray | np.ndarray,
                diagonal: np.ndarray | None = None) -> xr.DataArray | np.ndarray:
    """Symmetric matrices from :func:`vectorize` output (nilearn's ``vec_to_sym_matrix``).

    Parameters
    ----------
    vec : xarray.DataArray or numpy.ndarray
        ``(..., n (n + 1) / 2)`` vectors (diagonal included, divided by ``sqrt(2)``), or
        ``(..., n (n - 1) / 2)`` with ``diagonal`` given. A DataArray must come from
        :func:`vectorize` (last dim ``edge`` with ``region_a``/``region_b``).
    diagonal : numpy.ndarray, optional
        ``(..., n)`` diagonal values when ``vec`` has none; as in nilearn they are
        multiplied by ``sqrt(2)`` (pass ``diag / sqrt(2)`` to get ``diag`` back).

    Returns
    -------
    xarray.DataArray or numpy.ndarray
        ``(..., n, n)``; a DataArray gets dims ``(..., region, region_)``.
    """
    if isinstance(vec, xr.DataArray):
        if vec.dims[-1] != _EDGE or "region_a" not in vec.coords:
            raise ValueError("a DataArray must have a last dim 'edge' with region_a/region_b "
                             "coordinates (from vectorize)")
        mats = unvectorize(np.asarray(vec.values), diagonal)
        n = mats.shape[-1]
        rows, cols = edge_index(n, diagonal is not None)
        labels = np.empty(n, dtype=vec["region_a"].dtype)
        labels[cols] = vec["region_a"].values
        labels[rows] = vec["region_b"].values
        coords = {k: v for k, v in vec.coords.items() if _EDGE not in v.dims}
        coords.update({_REGION: labels, _REGION2: labels})
        return xr.DataArray(mats, dims=(*vec.dims[:-1], _REGION, _REGION2), coords=coords,
                            attrs=dict(vec.attrs))
    v = np.asarray(vec, dtype=np.float64)
    size = v.shape[-1]
    n_float = (math.sqrt(8 * size + 1) - 1.0) / 2 + (diagonal is not None)
    if n_float != math.floor(n_float):
        raise ValueError(f"vectors of length {size} are not the triangle of a square matrix")
    n = int(n_float)
    if diagonal is not None:
        diagonal = np.asarray(diagonal, dtype=np.float64)
        if diagonal.shape != (*v.shape[:-1], n):
            raise ValueError(f"diagonal of shape {diagonal.shape} does not fit vectors of "
                             f"shape {v.shape}")
    out = np.zeros((*v.shape[:-1], n, n))
    rows, cols = edge_index(n, diagonal is not None)
    out[..., rows, cols] = v
    out[..., cols, rows] = v
    d = np.arange(n)
    if diagonal is not None:
        out[..., d, d] = diagonal
    out[..., d, d] *= math.sqrt(2.0)
    return out


# --------------------------------------------------------------------------------------
# group statistics
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupComparison:
    """Result of :func:`compare_groups`.

    Attributes
    ----------
    edges : pandas.DataFrame
        One row per unique edge (order of :func:`edge_index`), columns ``region_a``,
        ``region_b``, ``mean_<reference>``, ``mean_<comparison>`` (group means on the
        original scale; for Fisher-z transformed kinds, ``tanh`` of the mean z),
        ``difference`` (comparison minus reference of those means), ``statistic`` (Welch t,
        positive when the comparison group is higher), ``p`` (two-sided; parametric or
        permutation), ``p_fdr`` (Benjamini–Hochberg adjusted p over the edges with a finite
        p; NaN for the others) and ``significant`` (``p_fdr < alpha``).
    statistic, p, p_fdr : xarray.DataArray
        The same as ``(region, region_)`` symmetric matrices, NaN on the diagonal.
    groups : tuple
        ``(reference, comparison)`` labels; by default the two labels sorted.
    test : {"welch", "permutation"}
        The test used.
    alpha : float
        FDR level of ``significant``.
    fisher_z : bool
        Whether the values were Fisher z-transformed before testing.
    n_subjects : dict
        Number of subjects per group (after dropping missing labels).
    n_permutations : int or None
        Number of permutations (None for the Welch test).
    kind : str or None
        ``attrs["kind"]`` of the input matrices.
    """

    edges: pd.DataFrame
    statistic: xr.DataArray
    p: xr.DataArray
    p_fdr: xr.DataArray
    groups: tuple[Any, Any]
    test: str
    alpha: float
    fisher_z: bool
    n_subjects: dict[Any, int] = field(default_factory=dict)
    n_permutations: int | None = None
    kind: str | None = None

    @property
    def significant(self) -> xr.DataArray:
        """``(region, region_)`` boolean matrix of the FDR-significant edges."""
        return (self.p_fdr < self.alpha).rename("significant")

    def significant_edges(self) -> pd.DataFrame:
        """The rows of :attr:`edges` that are FDR-significant, by increasing ``p``."""
        return self.edges[self.edges["significant"]].sort_values("p")


def compare_groups(
    matrices: xr.DataArray,
    groups: str | Sequence[Any],
    *,
    test: Literal["welch", "permutation"] = "welch",
    n_permutations: int = 5000,
    alpha: float = 0.05,
    fisher_z: bool = True,
    random_state: int | np.random.Generator | None = 0,
    order: Sequence[Any] | None = None,
) -> GroupComparison:
    """Compare the connectivity of two groups, edge by edge, with FDR control.

    Parameters
    ----------
    matrices : xarray.DataArray
        ``(subject, region, region_)`` matrices (e.g. from :func:`group_connectivity`). NaN
        values (empty regions) are left out per edge: each edge is tested on the subjects
        where it is defined; edges with fewer than 2 subjects in a group get NaN results.
    groups : str or sequence
        Name of a coordinate on ``subject`` (e.g. ``"group"``), or one label per subject.
        Subjects with a missing label (None/NaN) are dropped with a warning. Exactly two
        distinct labels must remain.
    test : {"welch", "permutation"}, default="welch"
        ``"welch"``: Welch's unequal-variance t-test per edge (as
        ``scipy.stats.ttest_ind(comparison, reference, equal_var=False)``). ``"permutation"``:
        the same Welch t, with a two-sided p-value from ``n_permutations`` random
        relabellings of the subjects, ``p = (1 + #{|t_perm| >= |t_obs|}) / (1 +
        n_permutations)`` per edge (no max-statistic correction; FDR is applied after).
    n_permutations : int, default=5000
        Number of permutations for ``test="permutation"``. Cost is about
        ``n_permutations x n_edges`` vectorised operations (about 15 s for 400 regions,
        30 subjects and 5000 permutations; twice that with missing values).
    alpha : float, default=0.05
        FDR level of the ``significant`` column.
    fisher_z : bool, default=True
        Test ``arctanh`` of the values for correlation-like matrices: ``attrs["kind"]`` in
        :data:`CORRELATION_KINDS`, or, without a recorded kind, finite diagonal all 1 and
        off-diagonal values within [-1, 1]. Ignored for other kinds.
    random_state : int, numpy.random.Generator or None, default=0
        Seed of ``numpy.random.default_rng`` for the permutations; the same seed gives the
        same p-values.
    order : sequence of 2 labels, optional
        ``(reference, comparison)``; default the two labels sorted (e.g. ``("control",
        "patient")``, so positive statistics mean patient > control).

    Returns
    -------
    GroupComparison

    Raises
    ------
    ValueError
        Not exactly two groups (the message lists the labels found with their counts), a
        group with fewer than 2 subjects, an unknown coordinate or test, or bad ``order``.

    Warns
    -----
    UserWarning
        When subjects with a missing group label are dropped.
    """
    if test not in ("welch", "permutation"):
        raise ValueError(f"test must be 'welch' or 'permutation', got {test!r}")
    if test == "permutation" and n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    m = _as_matrices(matrices)
    labels, keep = _group_labels(m, groups)
    m, labels = m.isel({_SUBJECT: np.flatnonzero(keep)}), labels[keep]
    found = pd.Series(labels).value_counts(sort=False)
    if len(found) != 2:
        raise ValueError(f"exactly two groups are required, found {len(found)}: "
                         f"{dict(found.items())}")
    pair = _order(list(found.index), order)
    if found.min() < 2:
        raise ValueError(f"each group needs at least 2 subjects, got {dict(found.items())}")

    transform = _fisher_applies(m, fisher_z)
    n = m.sizes[_REGION]
    rows, cols = edge_index(n)
    x = np.asarray(m.values, dtype=np.float64)[:, rows, cols]  # (S, E)
    z = _to_z(x) if transform else x
    is_cmp = labels == pair[1]
    ref, cmp_ = z[~is_cmp], z[is_cmp]
    t, p = _welch(cmp_, ref)
    if test == "permutation":
        rng = np.random.default_rng(random_state)
        p = _permutation_p(z, is_cmp, n_permutations, rng, t)
    p_fdr = _fdr(p)

    means = [_from_z(_nanmean(g)) if transform else _nanmean(g) for g in (ref, cmp_)]
    region_labels = (np.asarray(m[_REGION].values) if _REGION in m.coords
                     else np.arange(n))
    edges = pd.DataFrame({
        "region_a": region_labels[cols],
        "region_b": region_labels[rows],
        f"mean_{pair[0]}": means[0],
        f"mean_{pair[1]}": means[1],
        "difference": means[1] - means[0],
        "statistic": t,
        "p": p,
        "p_fdr": p_fdr,
        "significant": np.nan_to_num(p_fdr, nan=np.inf) < alpha,
    })

    def square(v: np.ndarray, name: str) -> xr.DataArray:
        out = np.full((n, n), np.nan)
        out[rows, cols] = v
        out[cols, rows] = v
        return xr.DataArray(out, dims=(_REGION, _REGION2), name=name,
                            coords={_REGION: region_labels, _REGION2: region_labels})

    return GroupComparison(
        edges=edges, statistic=square(t, "statistic"), p=square(p, "p"),
        p_fdr=square(p_fdr, "p_fdr"), groups=pair, test=test, alpha=alpha,
        fisher_z=transform, n_subjects={g: int(found[g]) for g in pair},
        n_permutations=n_permutations if test == "permutation" else None,
        kind=m.attrs.get("kind"))


def group_mean(matrices: xr.DataArray, groups: str | Sequence[Any] | None = None, *,
               fisher_z: bool = True) -> xr.DataArray:
    """Mean connectivity matrix of each group.

    Parameters
    ----------
    matrices : xarray.DataArray
        ``(subject, region, region_)`` matrices. NaN values are left out per element (an
        element NaN in every subject of a group stays NaN).
    groups : str or sequence, optional
        Name of a coordinate on ``subject`` or one label per subject (subjects with a
        missing label are dropped with a warning); None: one group ``"all"``. Any number of
        groups.
    fisher_z : bool, default=True
        For correlation-like matrices (see :func:`compare_groups`), average ``arctanh`` of
        the values and transform back with ``tanh`` (the diagonal stays 1).

    Returns
    -------
    xarray.DataArray
        ``(group, region, region_)``, groups sorted, with a coordinate ``n_subjects`` on
        ``group``; ``attrs`` of the input plus ``fisher_z``.
    """
    m = _as_matrices(matrices)
    if groups is None:
        labels = np.full(m.sizes[_SUBJECT], "all", dtype=object)
    else:
        labels, keep = _group_labels(m, groups)
        m, labels = m.isel({_SUBJECT: np.flatnonzero(keep)}), labels[keep]
    names = _sorted(set(labels.tolist()))
    transform = _fisher_applies(m, fisher_z)
    x = np.asarray(m.values, dtype=np.float64)
    z = _to_z(x) if transform else x
    out = np.stack([_nanmean(z[labels == g]) for g in names]) if names else np.empty(
        (0, *x.shape[1:]))
    if transform:
        out = _from_z(out)
    coords: dict[str, Any] = {_GROUP: np.asarray(names, dtype=object),
                              "n_subjects": (_GROUP, [int(np.sum(labels == g)) for g in names])}
    for d in (_REGION, _REGION2):
        if d in m.coords:
            coords[d] = m[d].values
    return xr.DataArray(out, dims=(_GROUP, _REGION, _REGION2), coords=coords,
                        attrs={**m.attrs, "fisher_z": transform})


def _as_matrices(matrices: xr.DataArray) -> xr.DataArray:
    if not isinstance(matrices, xr.DataArray):
        raise TypeError("matrices must be an xarray.DataArray (subject, region, region_), "
                        f"got {type(matrices).__name__}")
    if set(matrices.dims) != {_SUBJECT, _REGION, _REGION2}:
        raise ValueError(f"matrices must have dims ('subject', 'region', 'region_'), got "
                         f"{matrices.dims}")
    m = matrices.transpose(_SUBJECT, _REGION, _REGION2)
    if m.sizes[_REGION] != m.sizes[_REGION2]:
        raise ValueError(f"matrices are not square: {dict(m.sizes)}")
    return m


def _group_labels(m: xr.DataArray, groups: str | Sequence[Any]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Group label per subject (object array) and the mask of subjects with a label."""
    if isinstance(groups, str):
        if groups not in m.coords or m[groups].dims != (_SUBJECT,):
            have = [k for k, v in m.coords.items() if v.dims == (_SUBJECT,)]
            raise ValueError(f"no coordinate {groups!r} on 'subject' (have: {have})")
        labels = np.asarray(m[groups].values, dtype=object)
    else:
        labels = np.asarray(list(groups), dtype=object)
        if labels.shape != (m.sizes[_SUBJECT],):
            raise ValueError(f"{labels.size} group labels for {m.sizes[_SUBJECT]} subjects")
    keep = ~np.asarray(pd.isna(labels), dtype=bool)
    if not keep.all():
        subs = (m[_SUBJECT].values[~keep].tolist() if _SUBJECT in m.coords
                else np.flatnonzero(~keep).tolist())
        warnings.warn(f"dropping {int((~keep).sum())} subjects without a group label: {subs}",
                      UserWarning, stacklevel=3)
    return labels, keep


def _sorted(values: Any) -> list[Any]:
    try:
        return sorted(values)
    except TypeError:
        return sorted(values, key=str)


def _order(found: list[Any], order: Sequence[Any] | None) -> tuple[Any, Any]:
    if order is None:
        a, b = _sorted(found)
        return a, b
    order = list(order)
    if len(order) != 2 or set(order) != set(found):
        raise ValueError(f"order must be the two group labels {found}, got {order}")
    return order[0], order[1]


def _fisher_applies(m: xr.DataArray, fisher_z: bool) -> bool:
    if not fisher_z:
        return False
    kind = m.attrs.get("kind")
    if kind is not None:
        return kind in CORRELATION_KINDS
    x = np.asarray(m.values, dtype=np.float64)
    diag = np.diagonal(x, axis1=1, axis2=2)
    diag = diag[np.isfinite(diag)]
    off = x[:, ~np.eye(x.shape[1], dtype=bool)]
    off = off[np.isfinite(off)]
    return bool(diag.size and np.all(diag == 1.0) and np.all(np.abs(off) <= 1.0))


def _to_z(r: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.arctanh(r)


def _from_z(z: np.ndarray) -> np.ndarray:
    return np.tanh(z)


def _nanmean(x: np.ndarray) -> np.ndarray:
    """Mean over axis 0 ignoring NaN, NaN (without a warning) where all are NaN."""
    ok = ~np.isnan(x)
    n = ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, x, 0.0).sum(axis=0) / np.where(n > 0, n, np.nan)


def _welch(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Welch t of ``a`` vs ``b`` (subjects x edges, NaN left out) and two-sided p."""
    stats_ = []
    for x in (a, b):
        ok = ~np.isnan(x)
        n = ok.sum(axis=0).astype(np.float64)
        mean = _nanmean(x)
        with np.errstate(invalid="ignore", divide="ignore"):
            var = np.where(ok, (x - mean) ** 2, 0.0).sum(axis=0) / (n - 1)
        stats_.append((n, mean, var))
    return _welch_t(*stats_[0], *stats_[1])


def _welch_t(n1: np.ndarray, m1: np.ndarray, v1: np.ndarray,
             n2: np.ndarray, m2: np.ndarray, v2: np.ndarray,
             with_p: bool = True) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(invalid="ignore", divide="ignore"):
        s1, s2 = v1 / n1, v2 / n2
        se2 = s1 + s2
        t = (m1 - m2) / np.sqrt(se2)
        bad = (n1 < 2) | (n2 < 2)
        t = np.where(bad, np.nan, t)
        if not with_p:
            return t, t
        df = se2**2 / (s1**2 / (n1 - 1) + s2**2 / (n2 - 1))
        p = 2.0 * stats.t.sf(np.abs(t), df)
    return t, np.where(np.isnan(t), np.nan, p)


def _permutation_p(z: np.ndarray, is_cmp: np.ndarray, n_permutations: int,
                   rng: np.random.Generator, t_obs: np.ndarray) -> np.ndarray:
    """Two-sided permutation p of the Welch t per edge (columns of ``z``).

    The permuted labels are drawn up front (``n_permutations x n_subjects``), so the result
    depends only on the generator, not on the block size. Per-group sums and sums of
    squares come from matrix products with the label matrix; the observed t goes through
    the same arithmetic so that it is recognised as a tie of itself.
    """
    ok = ~np.isnan(z)
    centre = np.nan_to_num(_nanmean(z))
    x = np.where(ok, z - centre, 0.0)  # centring keeps the sums-of-squares formula accurate
    x2 = x * x
    if ok.all():  # same group sizes for every edge: scalar n, squared-t comparison
        n_tot = float(z.shape[0])
        tot_s, tot_q = x.sum(axis=0), x2.sum(axis=0)

        def exceed(labels: np.ndarray, ref2: np.ndarray | None) -> np.ndarray:
            g = labels.astype(np.float64)
            n1 = float(labels[0].sum())
            n2 = n_tot - n1
            s1, q1 = g @ x, g @ x2
            s2, q2 = tot_s - s1, tot_q - q1
            num = s1 / n1 - s2 / n2
            num *= num
            q1 -= s1 * s1 / n1
            q2 -= s2 * s2 / n2
            se2 = q1 / (n1 * (n1 - 1)) + q2 / (n2 * (n2 - 1))
            if ref2 is None:
                with np.errstate(invalid="ignore", divide="ignore"):
                    return num / se2  # observed t^2
            se2 *= ref2
            return num >= se2

        if min(is_cmp.sum(), (~is_cmp).sum()) < 2:  # pragma: no cover - checked by caller
            return np.full(z.shape[1], np.nan)
        ref2 = exceed(is_cmp[None, :], None)[0] * (1.0 - 1e-10) ** 2
    else:
        okf = ok.astype(np.float64)
        tot = (okf.sum(axis=0), x.sum(axis=0), x2.sum(axis=0))

        def exceed(labels: np.ndarray, ref2: np.ndarray | None) -> np.ndarray:
            g = labels.astype(np.float64)
            n1, s1, q1 = g @ okf, g @ x, g @ x2
            n2, s2, q2 = tot[0] - n1, tot[1] - s1, tot[2] - q1
            with np.errstate(invalid="ignore", divide="ignore"):
                m1, m2 = s1 / n1, s2 / n2
                v1 = np.maximum(q1 - s1 * m1, 0.0) / (n1 - 1)
                v2 = np.maximum(q2 - s2 * m2, 0.0) / (n2 - 1)
                t = _welch_t(n1, m1, v1, n2, m2, v2, with_p=False)[0]
                t2 = t * t
                return t2 if ref2 is None else t2 >= ref2

        ref2 = exceed(is_cmp[None, :], None)[0] * (1.0 - 1e-10) ** 2

    perms = rng.permuted(np.tile(is_cmp, (n_permutations, 1)), axis=1)
    count = np.zeros(z.shape[1])
    block = max(1, _PERMUTATION_BLOCK // max(1, z.shape[1]))
    with np.errstate(invalid="ignore"):
        for start in range(0, n_permutations, block):
            count += exceed(perms[start:start + block], ref2).sum(axis=0)
    p = (1.0 + count) / (1.0 + n_permutations)
    return np.where(np.isnan(t_obs), np.nan, p)


def _fdr(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p over the finite entries (NaN elsewhere)."""
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = stats.false_discovery_control(p[ok], method="bh")
    return out
