"""Export of a fitted :class:`~pipeline.decomposition.ica.SubjectICA`.

- :func:`export_melodic`: a MELODIC-compatible output folder (``melodic_IC.nii.gz``,
  ``melodic_mix``, ``melodic_FTmix``, ``melodic_ICstats``, ``mask.nii.gz``,
  ``mean.nii.gz``, ``eigenvalues_percent`` and, with thresholded maps,
  ``stats/thresh_zstat<n>.nii.gz``) that FSL tools (``fsl_regfilt``, FSLeyes' MELODIC
  mode, FIX feature extraction) and viewers read.
- :func:`export_ica_bids`: the BIDS-derivatives style outputs of a run,
  ``<prefix>_desc-ica_components.nii.gz`` (4D, one z-map per volume) and
  ``<prefix>_desc-ica_mixing.tsv`` (time x component, columns ``ICA000``, ``ICA001``...).

Both accept local paths or fsspec URLs (``storage_options`` for credentials). Images are
written with :func:`storage.to_nifti` (float32) after :func:`pipeline.masking.unmask`.

Text matrices use FSL's ``write_ascii_matrix`` layout: one row per line, every value
followed by two spaces, scientific notation with an explicit sign (FSL's format when a
precision is given; 9 decimals here so that the values round-trip to about 1e-9).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import fsspec
import numpy as np
import pandas as pd
import xarray as xr

import storage

from ..masking import unmask
from .ica import SubjectICA

__all__ = ["component_names", "export_ica_bids", "export_melodic", "format_fsl_matrix"]


def format_fsl_matrix(matrix: np.ndarray, precision: int = 9) -> str:
    """Text of a matrix in FSL's ``write_ascii_matrix`` layout (rows on lines)."""
    matrix = np.atleast_2d(np.asarray(matrix, dtype=float))
    lines = ("".join(f"{v:+.{precision}e}  " for v in row) for row in matrix)
    return "\n".join(lines) + "\n"


def _join(base: str | os.PathLike, name: str) -> str:
    return f"{str(base).rstrip('/')}/{name}"


def _write_text(url: str, text: str, storage_options: dict | None) -> None:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    parent = os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(text)


def _makedirs(url: str, storage_options: dict | None) -> None:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    fs.makedirs(path, exist_ok=True)


def _volume(ica: SubjectICA, values: np.ndarray, name: str) -> xr.DataArray:
    """A ``(voxel,)`` vector of the fitted voxels as an ``(x, y, z)`` image."""
    template = ica.to_dataarray("raw")
    vec = xr.DataArray(np.asarray(values), dims=("voxel",),
                       coords={c: template[c] for c in ("i", "j", "k")},
                       attrs=template.attrs, name=name)
    return unmask(vec)


def _maps4d(ica: SubjectICA, kind: str) -> xr.DataArray:
    """``(x, y, z, time)`` image with one volume per component (lazy, streamed)."""
    return unmask(ica.to_dataarray(kind, dim="time"))


def _write_nifti(image: xr.DataArray, url: str, storage_options: dict | None) -> str:
    return storage.to_nifti(image, url, dtype=np.float32, storage_options=storage_options)


def export_melodic(ica: SubjectICA, folder: str | os.PathLike, *,
                   storage_options: dict | None = None) -> dict[str, str]:
    """Write a MELODIC-compatible output folder.

    Parameters
    ----------
    ica : SubjectICA
        A fitted decomposition of :func:`pipeline.masking.apply_mask` data (the voxel
        coordinates and grid are needed to write images).
    folder : str or path
        Destination folder (``<name>.ica`` by FSL convention), local or fsspec URL; created
        if needed, files in it are replaced.
    storage_options : dict, optional
        fsspec options of remote destinations.

    Returns
    -------
    dict of str
        Paths written, by file name (``"melodic_IC"``, ``"melodic_mix"``, ...).

    Notes
    -----
    - ``melodic_IC.nii.gz``: 4D, volume ``c`` is ``ica.components_[c]`` (z-statistics) in
      the data grid, 0 outside the mask, with the run's affine.
    - ``melodic_mix``: ``(time, k)`` ``mixing_``; ``melodic_FTmix``: ``(n/2, k)``
      ``power_spectra_`` (DC dropped, as FSL).
    - ``melodic_ICstats``: one row per component, percent of the variance explained by the
      decomposition and percent of the total variance (MELODIC's first two columns).
    - ``eigenvalues_percent``: cumulative percent of variance of the PCA eigenvalues (one
      row), as MELODIC.
    - ``mask.nii.gz`` (uint8) and ``mean.nii.gz`` (temporal mean of the input data).
    - ``stats/thresh_zstat<n>.nii.gz`` (n from 1) when the ICA was fitted with
      ``threshold``.
    """
    ica.to_dataarray("z")  # fitted, with a grid: fail before writing anything
    folder = str(folder)
    _makedirs(folder, storage_options)
    out: dict[str, str] = {}
    out["melodic_IC"] = _write_nifti(_maps4d(ica, "z"), _join(folder, "melodic_IC.nii.gz"),
                                     storage_options)
    texts = {
        "melodic_mix": format_fsl_matrix(ica.mixing_),
        "melodic_FTmix": format_fsl_matrix(ica.power_spectra_),
        "melodic_ICstats": format_fsl_matrix(_ic_stats(ica)),
        "eigenvalues_percent": format_fsl_matrix(
            100.0 * np.cumsum(ica.pca_explained_variance_ratio_)[None, :]),
    }
    for name, text in texts.items():
        url = _join(folder, name)
        _write_text(url, text, storage_options)
        out[name] = url
    mask = _volume(ica, np.ones(ica.maps_.shape[1], dtype=bool), "mask")
    out["mask"] = storage.to_nifti(mask.astype(np.uint8), _join(folder, "mask.nii.gz"),
                                   storage_options=storage_options)
    out["mean"] = _write_nifti(_volume(ica, ica.mean_, "mean"), _join(folder, "mean.nii.gz"),
                               storage_options)
    if ica.thresholded_components_ is not None:
        _makedirs(_join(folder, "stats"), storage_options)
        for c, zmap in enumerate(ica.thresholded_components_, start=1):
            name = f"thresh_zstat{c}"
            out[name] = _write_nifti(_volume(ica, zmap, name),
                                     _join(folder, f"stats/{name}.nii.gz"), storage_options)
    return out


def _ic_stats(ica: SubjectICA) -> np.ndarray:
    ratio = np.asarray(ica.explained_variance_ratio_, dtype=float)
    total = ratio.sum()
    explained = 100.0 * ratio / total if total > 0 else np.zeros_like(ratio)
    return np.column_stack([explained, 100.0 * ratio])


def component_names(n: int) -> list[str]:
    """Column names of the mixing TSV: ``ICA000``, ``ICA001``, ..."""
    width = max(3, len(str(n - 1)))
    return [f"ICA{c:0{width}d}" for c in range(n)]


def export_ica_bids(ica: SubjectICA, prefix: str | os.PathLike, *,
                    storage_options: dict | None = None,
                    extra: Iterable[str] = ()) -> dict[str, str]:
    """Write a run's ICA as BIDS-derivatives style files.

    Parameters
    ----------
    ica : SubjectICA
        Fitted decomposition of :func:`pipeline.masking.apply_mask` data.
    prefix : str or path
        Path and file-name prefix of the run's outputs, e.g.
        ``<output>/sub-01/func/sub-01_task-rest_space-MNI`` (see
        :func:`pipeline.jobs.run_prefix`).
    storage_options : dict, optional
        fsspec options of remote destinations.
    extra : iterable of str, optional
        Also write ``"thresholded"`` (``<prefix>_desc-icathresholded_components.nii.gz``)
        and/or ``"spectra"`` (``<prefix>_desc-ica_spectra.tsv``: one row per frequency,
        first column ``frequency`` in Hz).

    Returns
    -------
    dict of str
        ``{"components": ..., "mixing": ...}`` plus the extras written.
    """
    ica.to_dataarray("z")  # fitted, with a grid: fail before writing anything
    prefix = str(prefix)
    extra = set(extra)
    unknown = extra - {"thresholded", "spectra"}
    if unknown:
        raise ValueError(f"unknown extra outputs {sorted(unknown)}")
    parent = os.path.dirname(prefix)
    if parent:
        _makedirs(parent, storage_options)
    names = component_names(ica.n_components_)
    out = {"components": _write_nifti(_maps4d(ica, "z"),
                                      f"{prefix}_desc-ica_components.nii.gz",
                                      storage_options)}
    mixing = pd.DataFrame(ica.mixing_, columns=names)
    out["mixing"] = f"{prefix}_desc-ica_mixing.tsv"
    _write_text(out["mixing"], mixing.to_csv(sep="\t", index=False, float_format="%.10g"),
                storage_options)
    if "thresholded" in extra:
        out["thresholded"] = _write_nifti(
            _maps4d(ica, "thresholded"),
            f"{prefix}_desc-icathresholded_components.nii.gz", storage_options)
    if "spectra" in extra:
        spectra = pd.DataFrame(ica.power_spectra_, columns=names)
        spectra.insert(0, "frequency", ica.frequencies_)
        out["spectra"] = f"{prefix}_desc-ica_spectra.tsv"
        _write_text(out["spectra"], spectra.to_csv(sep="\t", index=False,
                                                   float_format="%.10g"), storage_options)
    return out
