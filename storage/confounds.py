"""Confound regressors: fMRIPrep tables and plain motion-parameter files, as DataFrames.

Two kinds of files are read into a float64 :class:`pandas.DataFrame` (one row per volume,
NaN for missing values):

* a table with a header row (fMRIPrep ``*_desc-confounds_timeseries.tsv``, or any TSV /
  CSV of regressors), with its column names as in the file;
* a headerless numeric file of six motion parameters per volume (FSL MCFLIRT ``.par``,
  SPM ``rp_*.txt``, AFNI ``3dvolreg -1Dfile``), renamed to fMRIPrep's names and expanded
  the way fMRIPrep expands them, so that confound strategies written for fMRIPrep apply.

Which kind a file is comes from its content, not its name: a file whose first line (blank
lines and ``#`` comments skipped) is all numbers has no header.
"""

from __future__ import annotations

import csv
import io
import posixpath
import re

import fsspec
import numpy as np
import pandas as pd

from .errors import InputError

__all__ = ["MOTION_COLUMNS", "MOTION_FORMATS", "check_confounds", "motion_expansions",
           "read_confounds"]

#: fMRIPrep's names of the six rigid-body parameters (mm, radians).
MOTION_COLUMNS: tuple[str, ...] = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")

#: For each supported motion format: the fMRIPrep name of each file column, and whether
#: the rotations are in degrees. AFNI follows nipype's ``normalize_mc_params``: roll is a
#: rotation about z (I-S), pitch about x (R-L), yaw about y (A-P); dS/dL/dP are shifts
#: along z/x/y. Signs are kept as in the file (they do not matter for regression or FD).
MOTION_FORMATS: dict[str, tuple[tuple[str, ...], bool]] = {
    "fsl": (("rot_x", "rot_y", "rot_z", "trans_x", "trans_y", "trans_z"), False),
    "spm": (("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"), False),
    "afni": (("rot_z", "rot_x", "rot_y", "trans_z", "trans_x", "trans_y"), True),
}

#: Strings read as missing values in tables (fMRIPrep writes ``n/a``; empty cells and R's
#: ``NA`` too). Nothing else is: a column holding "None" or "null" is not numeric.
NA_VALUES: tuple[str, ...] = ("n/a", "N/A", "NA", "nan", "NaN", "")

#: Radius (mm) of the sphere on which rotations become displacements (Power et al. 2012).
FD_RADIUS_MM = 50.0

_NA = frozenset(NA_VALUES)
_SPLIT = re.compile(r"[\s,]+")


def read_confounds(path: str, *, storage_options: dict | None = None,
                   motion_format: str = "fsl") -> pd.DataFrame:
    """Read a confounds table or a motion-parameter file.

    Parameters
    ----------
    path : str
        Local path or fsspec URL. Gzipped files (``.gz``) are decompressed.
    storage_options : dict, optional
        fsspec options for ``path``.
    motion_format : {"fsl", "spm", "afni"}, default="fsl"
        Column order of a headerless motion file (ignored for tables with a header):

        * ``"fsl"`` (MCFLIRT ``.par``): rot_x rot_y rot_z (rad), trans_x trans_y trans_z (mm);
        * ``"spm"`` (``rp_*.txt``): trans_x trans_y trans_z (mm), rot_x rot_y rot_z (rad);
        * ``"afni"`` (``3dvolreg -1Dfile``): roll pitch yaw (degrees) dS dL dP (mm), read
          as rot_z rot_x rot_y trans_z trans_x trans_y with degrees converted to radians.

    Returns
    -------
    pandas.DataFrame
        float64 columns, one row per volume, NaN for missing values. A table keeps its
        columns and their names. A motion file gives the six :data:`MOTION_COLUMNS`, each
        followed by fMRIPrep's expansions ``<p>_derivative1`` (backward difference, first
        row NaN), ``<p>_power2`` and ``<p>_derivative1_power2`` (first row NaN), then
        ``framewise_displacement`` (Power et al. 2012: sum of absolute translation
        differences plus 50 mm times the sum of absolute rotation differences in
        radians; first row NaN, as fMRIPrep writes it).

    Raises
    ------
    InputError
        If the file cannot be read or is not UTF-8 text; if a table has duplicate or
        empty column names, rows of the wrong length, or a non-numeric column (named in
        the message); if a headerless file does not have exactly 6 numeric columns.
    ValueError
        If ``motion_format`` is not one of :data:`MOTION_FORMATS`.

    Notes
    -----
    Infinite values are kept; :func:`check_confounds` rejects them.
    """
    if motion_format not in MOTION_FORMATS:
        raise ValueError(f"motion_format={motion_format!r}: expected one of "
                         f"{sorted(MOTION_FORMATS)}")
    text = _read_text(path, storage_options)
    first = _first_data_line(text)
    if first is None:
        raise InputError(path, "confounds file is empty")
    if _is_numeric_row(first):
        return _read_motion(text, path, motion_format)
    return _read_table(text, path)


def check_confounds(df: pd.DataFrame, n_volumes: int, path: str) -> None:
    """Check that a confounds table fits its BOLD series.

    Parameters
    ----------
    df : pandas.DataFrame
        Confounds as returned by :func:`read_confounds`.
    n_volumes : int
        Number of volumes of the BOLD series.
    path : str
        The confounds file, for error messages.

    Raises
    ------
    InputError
        If the row count differs from ``n_volumes``, or a column holds an infinite value.
        Columns that are partly or entirely NaN are accepted (a confound strategy decides
        what to do with them).
    """
    if len(df) != n_volumes:
        raise InputError(path, f"has {len(df)} rows but the BOLD image has {n_volumes} "
                               "volumes")
    values = df.to_numpy(dtype=np.float64)
    bad = np.isinf(values)
    if bad.any():
        cols = [str(c) for c, b in zip(df.columns, bad.any(axis=0), strict=True) if b]
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        raise InputError(path, f"infinite values in column(s) {cols} (first at row {row + 1})")


# ----------------------------------------------------------------------------------------
# helpers


def _read_text(path: str, storage_options: dict | None) -> str:
    try:
        with fsspec.open(str(path), "rb", compression="infer",
                         **(storage_options or {})) as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise InputError(path, "confounds file does not exist") from e
    except Exception as e:  # any fsspec backend or decompression error means unreadable
        raise InputError(path, f"cannot read confounds file ({type(e).__name__}: {e})") from e
    try:
        return raw.decode("utf-8-sig")  # -sig: drop a byte-order mark (Excel CSVs)
    except UnicodeDecodeError as e:
        raise InputError(path, f"confounds file is not UTF-8 text ({e})") from e


def _first_data_line(text: str) -> str | None:
    for line in text.splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            return s
    return None


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _is_numeric_row(line: str) -> bool:
    return all(_is_number(t) for t in _SPLIT.split(line.strip()))


def _separator(path: str, header: str) -> str:
    name = posixpath.basename(str(path)).lower().removesuffix(".gz")
    if name.endswith(".tsv"):
        return "\t"
    if name.endswith(".csv"):
        return ","
    if "\t" in header:
        return "\t"
    return "," if "," in header else " "


def _read_table(text: str, path: str) -> pd.DataFrame:
    """A table with a header row; every cell a number or one of :data:`NA_VALUES`."""
    header = next(line for line in text.splitlines() if line.strip())
    sep = _separator(path, header)
    if sep == ",":  # CSV fields may be quoted
        reader = csv.reader(io.StringIO(text), delimiter=sep)
        rows = [(reader.line_num, r) for r in reader if any(f.strip() for f in r)]
    else:  # TSV (no quoting in BIDS) or runs of whitespace
        rows = [(i, line.split(None if sep == " " else sep))
                for i, line in enumerate(text.splitlines(), start=1) if line.strip()]
    (_, names), body = rows[0], rows[1:]
    names = [n.strip() for n in names]
    if "" in names:
        raise InputError(path, f"column {names.index('') + 1} of the header has no name "
                               "(a stray separator?)")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(path, f"duplicate column names {dupes}")
    for lineno, r in body:
        if len(r) != len(names):
            raise InputError(path, f"line {lineno} has {len(r)} fields but the header has "
                                   f"{len(names)} columns")
    columns: dict[str, np.ndarray] = {}
    for j, name in enumerate(names):
        tokens = [r[j] for _, r in body]
        cells = [np.nan if t.strip() in _NA else t for t in tokens]
        try:
            columns[name] = np.asarray(cells, dtype=object).astype(np.float64)
        except (ValueError, TypeError):
            i = next(i for i, c in enumerate(cells) if isinstance(c, str) and not _is_number(c))
            raise InputError(path, f"column {name!r} is not numeric: line {body[i][0]} holds "
                                   f"{tokens[i]!r}") from None
    return pd.DataFrame(columns, columns=names, dtype=np.float64)


def _read_motion(text: str, path: str, motion_format: str) -> pd.DataFrame:
    rows: list[list[float]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.split("#", 1)[0].strip()
        if not s:
            continue
        tokens = _SPLIT.split(s)
        if len(tokens) != 6:
            raise InputError(path, f"line {lineno} has {len(tokens)} columns; a confounds "
                                   "file without a header must hold 6 motion parameters "
                                   f"per line ({motion_format} order)")
        try:
            rows.append([float(t) for t in tokens])
        except ValueError:
            bad = next(t for t in tokens if not _is_number(t))
            raise InputError(path, f"line {lineno}: {bad!r} is not a number (a motion file "
                                   "holds 6 numbers per line)") from None
    names, degrees = MOTION_FORMATS[motion_format]
    values = np.asarray(rows, dtype=np.float64)
    if degrees:
        values[:, [names.index(r) for r in MOTION_COLUMNS[3:]]] *= np.pi / 180.0
    params = pd.DataFrame(values, columns=list(names))[list(MOTION_COLUMNS)]
    return motion_expansions(params)


def motion_expansions(params: pd.DataFrame) -> pd.DataFrame:
    """Add fMRIPrep's expansions and framewise displacement to the six motion parameters.

    Parameters
    ----------
    params : pandas.DataFrame
        Columns :data:`MOTION_COLUMNS` (translations in mm, rotations in radians).

    Returns
    -------
    pandas.DataFrame
        For each parameter ``p``: ``p``, ``p_derivative1``, ``p_power2``,
        ``p_derivative1_power2``; then ``framewise_displacement``. float64.
    """
    diff = params.diff()  # backward difference: row t holds p[t] - p[t-1]; row 0 NaN
    cols: dict[str, pd.Series] = {}
    for p in MOTION_COLUMNS:
        cols[p] = params[p]
        cols[f"{p}_derivative1"] = diff[p]
        cols[f"{p}_power2"] = params[p] ** 2
        cols[f"{p}_derivative1_power2"] = diff[p] ** 2
    absdiff = diff.abs()
    fd = (absdiff[list(MOTION_COLUMNS[:3])].sum(axis=1, skipna=False)
          + FD_RADIUS_MM * absdiff[list(MOTION_COLUMNS[3:])].sum(axis=1, skipna=False))
    cols["framewise_displacement"] = fd
    return pd.DataFrame(cols).astype(np.float64)
