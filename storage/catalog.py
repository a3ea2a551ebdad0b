"""The catalog: one row per run, kept in the root group's attributes of a store."""

from __future__ import annotations

import warnings
from typing import Any

import pandas as pd
import zarr

__all__ = ["CATALOG_ATTR", "FORMAT_VERSION", "STATUS_ATTR", "consolidate", "read_catalog",
           "write_catalog"]

#: version of the on-disk layout; bumped when a reader of the old layout would misread
FORMAT_VERSION = 1
#: root attribute holding the catalog rows
CATALOG_ATTR = "boldflow_catalog"
#: run-group attribute: "writing" while chunks are written, "complete" once committed
STATUS_ATTR = "boldflow_status"

_COLUMNS = ["run_id", "sub", "ses", "task", "acq", "run", "space", "group", "status", "action",
            "error", "bold", "shape", "n_volumes", "t_r", "dtype", "n_confounds", "has_mask",
            "fingerprint", "bytes", "seconds"]


def consolidate(zstore) -> None:
    """Write consolidated metadata so readers open the store with one request."""
    with warnings.catch_warnings():
        # zarr warns that consolidated metadata is not (yet) in the v3 spec; it is the
        # documented way to open large hierarchies on object stores with one request
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(zstore)


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for col in _COLUMNS:
        if col not in frame:
            frame[col] = None
    cols = _COLUMNS + [c for c in frame.columns if c not in _COLUMNS]
    return frame[cols].sort_values("run_id", kind="stable").reset_index(drop=True)


def write_catalog(zstore, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Merge ``rows`` into the store's catalog (newer rows win per run).

    The store's metadata is deliberately not consolidated: runs are opened by their group
    path (a few small reads each), and a consolidated root document grows with every array
    of every run (16 MB at 1000 runs, re-listed and re-parsed on each write and open)
    while the catalog alone stays ~0.5 KB per run.
    """
    root = zarr.open_group(zstore, mode="a", zarr_format=3, use_consolidated=False)
    merged = {r["run_id"]: r for r in root.attrs.get(CATALOG_ATTR, [])}
    for row in rows:
        merged[row["run_id"]] = {k: _jsonable(v) for k, v in row.items()}
    ordered = [merged[k] for k in sorted(merged)]
    root.attrs[CATALOG_ATTR] = ordered
    return _frame(ordered)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and not isinstance(value, list | dict | str):
        return value.item()
    return value


def read_catalog(zstore, *, consolidated: bool | None = False) -> pd.DataFrame:
    """The catalog of a store as a DataFrame (one row per run ever ingested).

    Parameters
    ----------
    zstore : zarr store
        An open store (see :func:`storage.open_store` for paths and URLs).
    consolidated : bool, optional
        Read the live root metadata (default) or a consolidated snapshot made with
        :func:`consolidate` (True).
    """
    try:
        root = zarr.open_group(zstore, mode="r", use_consolidated=consolidated)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        if consolidated:
            root = zarr.open_group(zstore, mode="r", use_consolidated=False)
        else:
            raise
    return _frame(list(root.attrs.get(CATALOG_ATTR, [])))
