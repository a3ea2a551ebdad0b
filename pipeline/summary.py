"""Human-readable summaries of stores and runs (CLI ``inspect`` and the demo)."""

from __future__ import annotations

import zarr
from dask.utils import format_bytes

__all__ = ["describe_store", "store_sizes"]


def store_sizes(bs) -> tuple[int, int]:
    """(uncompressed, stored) bytes of all complete runs' ``bold`` arrays."""
    raw = stored = 0
    for group in bs.runs()["group"]:
        try:
            arr = zarr.open_array(bs.zarr_store, path=f"{group}/bold", mode="r")
        except FileNotFoundError:  # ingested without voxels
            continue
        raw += arr.nbytes
        stored += arr.nbytes_stored()
    return raw, stored


def describe_store(store, *, storage_options: dict | None = None, max_runs: int = 20) -> str:
    """A text summary: catalog counts, failures, and the layout of the first runs."""
    import storage

    bs = storage.open_store(store, storage_options=storage_options)
    cat = bs.catalog
    ok = cat[cat["status"] == "complete"]
    lines = [f"store: {bs.ref}",
             f"runs: {len(ok)} complete, {len(cat) - len(ok)} failed"]
    if len(ok):
        raw, stored = store_sizes(bs)
        if stored:
            lines.append(f"bold: {format_bytes(raw)} uncompressed, {format_bytes(stored)} "
                         f"stored (compression {raw / stored:.1f}x)")
        else:
            lines.append("bold: none stored (runs ingested without voxels)")
        cols = [c for c in ("run_id", "n_volumes", "t_r", "dtype", "n_confounds", "has_mask",
                            "voxels") if c in ok]
        lines.append(ok[cols].head(max_runs).to_string(index=False))
        if len(ok) > max_runs:
            lines.append(f"... and {len(ok) - max_runs} more")
        first = bs.open_group(ok["group"].iloc[0], chunks=None)
        if "bold" in first:
            bold = first["bold"]
            lines.append(f"layout of {ok['run_id'].iloc[0]}: bold {dict(bold.sizes)} chunks "
                         f"{bold.encoding.get('chunks')} shards {bold.encoding.get('shards')}"
                         f", confounds {first.sizes['confound']} columns")
        else:
            lines.append(f"{ok['run_id'].iloc[0]} was ingested without voxels (region sums "
                         f"only), confounds {first.sizes['confound']} columns")
    failed = cat[cat["status"] == "failed"]
    for _, row in failed.iterrows():
        lines.append(f"FAILED {row['run_id']}: {row['error']}")
    return "\n".join(lines)
